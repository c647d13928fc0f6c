"""MLflow for `gopc train`: params, per-step metrics, config, checkpoint, evaluation numbers and grids, status tag."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import urllib.error
import urllib.request

from gopc import dbfile, locks
from gopc import outcome as O
from gopc.checkpoint import load_checkpoint
from gopc.config import Config, dump, redact
from gopc.errors import ConfigError
from gopc.models import build_model
from gopc.train import Hooks, Result
from gopc.write_queue import WriteQueue

# An unreachable server must cost seconds, not MLflow's minutes of retries (read at each request; as gopc/sweep/run.py)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
URI_FILE = "mlflow_tracking_uri"  # in a run folder: where the default tracking URI pointed at its start


def resolve_uri(uri: str) -> str:
    """'' is ./mlflow.db (MLflow 3 refuses folders); relative SQLite paths become absolute (trials run elsewhere)."""
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(os.path.expanduser(uri[len('sqlite:///'):]))}"
    if uri.startswith(("sqlite:", "http://", "https://", "postgresql", "mysql", "databricks")):
        return uri
    raise ConfigError(f"mlflow.tracking_uri: {uri!r} is not supported (MLflow 3 refuses file stores); "
                      "use sqlite:///path/mlflow.db or http://host:port")


def check_tracking(uri: str, field: str, run_id: str | None = None, write: bool = True) -> None:
    """Before anything is written: the tracking store answers and holds MLflow's tables (and the run
    to continue, if any). Creates nothing: a missing SQLite file is only created by the run itself.
    `write=False` (gopc best, which only reads) accepts a read-only database."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        folder = os.path.dirname(path) or "."
        if run_id and not os.path.exists(path):
            raise ConfigError(f"{field}: there is no MLflow database {path} to continue run {run_id} in; "
                              f"set mlflow.tracking_uri to where the run was logged, or resume with --no-mlflow")
        if write and (not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
            raise ConfigError(f"{field}: the folder of {path} is missing or not writable; create it or fix {field}")
        # read-only, cut off, damaged or held: one line (gopc/dbfile.py), not MLflow's traceback
        tables = dbfile.check(path, field, "an MLflow database", f"point {field} elsewhere", write=write)
        if tables is None:
            return
        if tables and "experiments" not in tables:
            raise ConfigError(f"{field}: {path} is an SQLite file but not an MLflow database; move it away or "
                              f"point {field} elsewhere")
    elif not uri.startswith(("http://", "https://")):
        return  # databases and Databricks: MLflow's own errors; nothing here can check them without writing
    elif (reason := _silent(uri)) is not None:
        raise ConfigError(f"{field}: MLflow at {redact(uri)} does not answer ({reason}); start the server, "
                          f"or set {field} to a reachable one")
    import mlflow
    try:
        client = mlflow.MlflowClient(uri)
        if run_id:
            client.get_run(run_id)
        else:
            client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the run could not be recorded
        if run_id and getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError(f"{field}: MLflow at {redact(uri)} holds no run {run_id} to continue; set "
                              f"mlflow.tracking_uri to where the run was logged, or resume with --no-mlflow") from None
        if uri.startswith("sqlite:"):  # a file that answers but that MLflow cannot use: half-made, or damaged
            raise ConfigError(f"{field}: {uri[len('sqlite:///'):]} is a damaged or half-created MLflow database "
                              f"({type(e).__name__}); move it away, or point {field} elsewhere") from None
        raise ConfigError(f"{field}: MLflow at {redact(uri)} does not answer ({type(e).__name__}); start the "
                          f"server, or set {field} to a reachable one") from None


def create_store(uri: str) -> None:
    """Create a new SQLite database's MLflow tables once, under gopc.locks.creating (which says why)."""
    if uri.startswith("sqlite:///"):
        import mlflow
        with locks.creating(uri[len("sqlite:///"):]):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # MLflow makes its tables on first use


def _silent(uri: str, timeout: float = 3.0) -> str | None:
    """The quick look before MLflow's own (bounded, but 5 s a request): why nothing answers at the
    server's /health within `timeout`, or None if something does, even with an HTTP error."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:
        return type(getattr(e, "reason", e)).__name__
    return None


def run_uri(cfg: Config, run_dir: str | None = None) -> str:
    """The run's tracking URI: its config's, or for '' the database the run started with (--resume from any folder)."""
    recorded = os.path.join(run_dir, URI_FILE) if run_dir else ""
    if not cfg.mlflow.tracking_uri and recorded and os.path.isfile(recorded):
        with open(recorded) as f:
            return f.read().strip()
    return resolve_uri(cfg.mlflow.tracking_uri)


def every_run(client, experiment_id: str, filter_string: str, page_size: int = 1000) -> list:
    """Every run the filter matches: search_runs answers at most 1,000 a page (a sweep may have more trials).
    MLflow's own pager, as its fluent search_runs uses it; the client's, for this tracking URI."""
    from mlflow.utils import get_results_from_paginated_fn
    return get_results_from_paginated_fn(lambda n, token: client.search_runs(
        [experiment_id], filter_string, max_results=n, page_token=token), page_size)


def logged_steps(client, run_id: str) -> dict[str, int]:
    """The last step of each metric a run already holds (a resumed run logs only the steps after it)."""
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in client.get_run(run_id).data.metrics}


def dataset(cfg: Config):
    """The data as an MLflow dataset input: source the generator, digest the config that determines every sequence."""
    import hashlib
    import json

    import numpy as np
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec
    d = cfg.data
    fields = {f"data.{k}": str(v) for k, v in cfg.to_dict()["data"].items()}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    frames = TensorSpec(np.dtype("uint8"), (-1, d.seq_len, d.frame_size, d.frame_size), "frames")
    return MetaDataset(CodeDatasetSource({"generator": "gopc.data.build_datasets", **fields}),
                       name=f"smooth-mnist-{d.frame_size}px-{d.seq_len}f-{d.num_digits}digit", digest=digest,
                       schema=Schema([frames]))


def log_model(cfg: Config, checkpoint: str) -> None:
    """The checkpoint's weights as an MLflow PyTorch model (`mlflow.pytorch.load_model` gives the module
    back), registered as the next version of cfg.mlflow.register_as when that is set."""
    import mlflow.pytorch
    import torch
    model = build_model(cfg)
    load_checkpoint(checkpoint, model, cfg)
    # pickled, not traced (pt2): GOPC's inference steps take gradients inside forward; requirements given, not
    # inferred: inferring them imports and probes the model for tens of seconds. MLflow's pickle warning is moot.
    pytorch_log = logging.getLogger("mlflow.pytorch")
    level = pytorch_log.level
    pytorch_log.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=cfg.mlflow.register_as or None,
                                 serialization_format="pickle",
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "gopc-sweep"])
    finally:
        pytorch_log.setLevel(level)


def clean_params(cfg: Config) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in cfg.flat().items()}


class MlflowHooks(Hooks):
    """Call check_tracking(uri, ...) first: this class assumes a store that answers when the run starts.

    Once the run is created, tracking trouble never stops the training: its writes go to MLflow in order from a
    thread of their own (gopc/write_queue.py). At the run's end the queue gets GOPC_BUSY_WAIT seconds to empty,
    then the model is logged and the run ended; what is still queued then is named in one line (the checkpoint
    and the evaluation are in the run folder either way)."""

    def __init__(self, cfg: Config, run_id: str | None = None, tags: dict | None = None, uri: str | None = None):
        import mlflow
        self.mlflow, self.cfg, self.run_id, self.tags = mlflow, cfg, run_id, tags or {}
        self.uri = uri or resolve_uri(cfg.mlflow.tracking_uri)
        self.logged: dict[str, int] = {}  # a resumed run: the last step of each metric already in MLflow
        self.queue: WriteQueue | None = None  # from the run's start on

    def started(self, cfg, run_dir, n_params):
        from mlflow.entities import Param, RunTag
        mlflow = self.mlflow
        create_store(self.uri)
        mlflow.set_tracking_uri(self.uri)
        if "mlflow.experimentKind" not in mlflow.set_experiment(cfg.mlflow.experiment).tags:
            mlflow.set_experiment_tag("mlflow.experimentKind", "custom_model_development")  # the UI's runs pages
        resumed = self.run_id is not None
        # a failed write is the queue's one line: not MLflow's SQL dump at each try, nor system metrics' (lost) samples
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.ERROR)
        # system metrics: CPU and memory (psutil), GPU where nvidia-ml-py is installed (scripts/install.sh)
        run = mlflow.start_run(run_id=self.run_id, run_name=cfg.mlflow.run_name or os.path.basename(run_dir),
                               log_system_metrics=True)
        self.run_id, self.run_dir = run.info.run_id, run_dir
        self.client, self.queue = mlflow.MlflowClient(self.uri), WriteQueue(redact(self.uri))
        with open(os.path.join(run_dir, "mlflow_run_id"), "w") as f:
            f.write(self.run_id)
        if not cfg.mlflow.tracking_uri:  # ./mlflow.db of the folder it started in, for --resume from elsewhere
            with open(os.path.join(run_dir, URI_FILE), "w") as f:
                f.write(self.uri)
        if resumed:
            # the steps after its checkpoint come again: MLflow keeps its first rows (the same: resume is exact)
            self.logged = logged_steps(self.client, self.run_id)
        else:
            params = {**clean_params(cfg), "n_params": str(n_params)}
            self.queue.put(lambda: self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()]))
            self.queue.put(self._log_input)
        tags = {"status": "running", "model": cfg.model.kind, **self.tags}
        self.queue.put(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))
        self.queue.put(lambda: self.client.log_text(self.run_id, redact(dump(cfg)), "config.yaml"))

    def _log_input(self):
        """The client's log_inputs, as mlflow.log_input makes it (which needs the run active on its thread)."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        def log():
            self.client.log_inputs(self.run_id, [DatasetInput(dataset(self.cfg)._to_mlflow_entity(),
                                                              [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
        try:
            log()
        except self.mlflow.MlflowException as e:  # another run added the same dataset since MLflow looked: link theirs
            if "locked" in str(e):
                raise
            log()

    def _log(self, step, metrics):
        from mlflow.entities import Metric
        # each (key, step) once: a resumed run repeats steps after its checkpoint, a diverged one its last finite step
        new = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if new:
            self.logged.update(dict.fromkeys(new, step))
            batch = [Metric(k, float(v), int(time.time() * 1000), step) for k, v in new.items()]
            self.queue.put(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def metrics(self, step, metrics, checkpoint):
        self._log(step, {f"train/{k}": v for k, v in metrics.items()})

    def evaluated(self, step, metrics, images):
        self._log(step, {f"val/{k}": v for k, v in metrics.items()})
        for path in images.values():
            self.queue.put(lambda path=str(path): self.client.log_artifact(self.run_id, path, f"eval/step-{step}"))

    def diverged(self, record, run_dir):
        from mlflow.entities import RunTag
        self.queue.put(lambda: self.client.log_dict(self.run_id, record.to_dict(), "divergence.json"))
        self.queue.put(lambda: self.client.log_batch(self.run_id, tags=[
            RunTag("diverged_step", str(record.step)), RunTag("diverged_quantity", str(record.quantity))]))

    def _end(self, status: str, model: str | None = None) -> None:
        """Wait (GOPC_BUSY_WAIT at most) for the queue, then log the model and end the run, on this thread:
        MLflow's fluent run (its model logging, its system metrics) belongs to the thread that started it."""
        if not self.queue.drain(dbfile.busy_wait()):
            print(f"gopc: MLflow at {redact(self.uri)} still fails ({self.queue.trouble}): {len(self.queue)} write(s) "
                  f"not logged, run {self.run_id} left RUNNING there; the checkpoint and the evaluation are in "
                  f"{self.run_dir}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # it pops the run first, so a next seed can start its own
                self.mlflow.end_run(status)
            return
        if model:
            log_model(self.cfg, model)
        self.mlflow.end_run(status)

    def settle(self):
        if self.queue is not None:
            self.queue.drain(dbfile.busy_wait(), quiet=True)

    def failed(self, resumable: bool = False):
        """`resumable`: it stopped with its last checkpoint kept (a full disk): KILLED, to go on with --resume."""
        if self.queue is None:  # the run was never created
            return
        self.queue.put(lambda: self.client.set_tag(self.run_id, "status", "disk full" if resumable else O.ERRORED))
        with contextlib.suppress(Exception):  # the error itself is raised anyway
            self._end("KILLED" if resumable else "FAILED")

    def finished(self, result: Result):
        ckpt = os.path.join(self.run_dir, "checkpoint.pt")
        if os.path.exists(ckpt):
            self.queue.put(lambda: self.client.log_artifact(self.run_id, ckpt))
        status = result.outcome or result.status  # what it learned; else diverged or killed
        self.queue.put(lambda: self.client.set_tag(self.run_id, "status", status))
        self._end(O.MLFLOW_STATUS.get(result.status, "FINISHED"), ckpt if result.status == O.COMPLETED else None)
