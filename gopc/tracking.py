"""MLflow for single runs (`gopc train`): params, per-step metrics, the exact config, the checkpoint,
the evaluation's numbers and image grids, and a status tag."""
from __future__ import annotations

import os

from gopc.config import Config, dump, redact
from gopc.errors import ConfigError
from gopc.train import Hooks, Result


def resolve_uri(uri: str) -> str:
    """'' means a SQLite file in the working directory (MLflow 3 refuses plain folders). Relative SQLite
    paths become absolute, because Ray trials run in folders of their own."""
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"
    if uri.startswith(("sqlite:", "http://", "https://", "postgresql", "mysql", "databricks")):
        return uri
    raise ConfigError(f"mlflow.tracking_uri: {uri!r} is not supported (MLflow 3 refuses file stores); "
                      "use sqlite:///path/mlflow.db or http://host:port")


def clean_params(cfg: Config) -> dict[str, str]:
    return {k: redact(str(v)) for k, v in cfg.flat().items()}


class MlflowHooks(Hooks):
    def __init__(self, cfg: Config, run_id: str | None = None, tags: dict | None = None):
        import mlflow
        self.mlflow, self.cfg, self.run_id, self.tags = mlflow, cfg, run_id, tags or {}

    def started(self, cfg, run_dir, n_params):
        mlflow = self.mlflow
        mlflow.set_tracking_uri(resolve_uri(cfg.mlflow.tracking_uri))
        mlflow.set_experiment(cfg.mlflow.experiment)
        resumed = self.run_id is not None
        run = mlflow.start_run(run_id=self.run_id, run_name=cfg.mlflow.run_name or os.path.basename(run_dir))
        self.run_id = run.info.run_id
        with open(os.path.join(run_dir, "mlflow_run_id"), "w") as f:
            f.write(self.run_id)
        if not resumed:
            mlflow.log_params(clean_params(cfg))
            mlflow.log_param("n_params", n_params)
        mlflow.set_tags({"status": "running", "model": cfg.model.kind, **self.tags})
        mlflow.log_text(redact(dump(cfg)), "config.yaml")
        self.run_dir = run_dir

    def metrics(self, step, metrics, checkpoint):
        self.mlflow.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def evaluated(self, step, metrics, images):
        self.mlflow.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
        for path in images.values():
            self.mlflow.log_artifact(str(path), artifact_path=f"eval/step-{step}")

    def diverged(self, record, run_dir):
        self.mlflow.log_dict(record.to_dict(), "divergence.json")
        self.mlflow.set_tags({"diverged_step": record.step, "diverged_quantity": record.quantity})

    def finished(self, result: Result):
        ckpt = os.path.join(self.run_dir, "checkpoint.pt")
        if os.path.exists(ckpt):
            self.mlflow.log_artifact(ckpt)
        self.mlflow.set_tag("status", result.outcome)  # learned / collapsed / diverged
        self.mlflow.end_run()
