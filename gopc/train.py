"""The training loop, shared by `gopc train` and the sweep's Tune trials.

Seeded and resumable: the batch order is a function of (seed, epoch) and the checkpoint holds the
model, optimizer, schedule and RNG state, so a resumed run follows the uninterrupted run's loss curve.
What a run reports goes through `Hooks`: MLflow for the CLI, `tune.report` inside a sweep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from gopc import config as C
from gopc import locks
from gopc.data import build_datasets, to_float
from gopc.disk import DiskFull, no_space, reason
from gopc.errors import ConfigError, GopcError
from gopc.evaluate import add_validation, evaluate, outcome, validations
from gopc.guard import Divergence, Guard
from gopc.models import build_model, n_params


class Hooks:
    """Where a run's results go. Every method is optional."""

    grids_at_every_eval = False  # True: every validation draws the image grids, not only the last one

    def started(self, cfg: C.Config, run_dir: str, n_params: int) -> None: ...

    def metrics(self, step: int, metrics: dict, checkpoint: str | None) -> None: ...

    def evaluated(self, step: int, metrics: dict, images: dict[str, str]) -> None: ...

    def diverged(self, record: Divergence, run_dir: str) -> None: ...

    def finished(self, result: "Result") -> None: ...

    # the run raised (not a signal, not a divergence): record it as failed; `resumable`: it stopped with its
    # last checkpoint kept (a full disk), to go on with --resume, as after a signal
    def failed(self, resumable: bool = False) -> None: ...

    def settle(self) -> None: ...  # wait until what was reported is recorded (MLflow writes from a thread)


@dataclass
class Result:
    status: str  # completed | diverged | killed (by a signal: checkpoint saved at `step`)
    step: int  # steps taken
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    divergence: Divergence | None = None
    run_dir: str = ""
    signal: int = 0  # killed: the signal's number
    outcome: str = ""  # learned | degraded | collapsed (a completed run, against trivial predictions) | diverged
    checkpoint_step: int | None = None  # the step of the last checkpoint saved (or resumed from)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):  # torch would fail only at the first tensor, after the run folder exists
        index = torch.device(name).index or 0
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {name!r} but this machine has no CUDA GPU; use train.device=auto or cpu")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: {name!r} but this machine has {torch.cuda.device_count()} GPU(s); "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """What a trial needs, for choosing `resources.gpu`: on a GPU the most memory torch's allocator has
    held on it since the run started (reserved, not just allocated: that is what other trials packed on
    the GPU cannot use; the CUDA context's few hundred MB come on top); on a CPU the process's peak
    resident memory, which a reused Ray worker carries over from its earlier trials."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch_indices(seed: int, n: int, batch: int, step: int) -> np.ndarray:
    """The batch of step `step`: a fixed permutation per (seed, epoch), so resume needs only the step."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch:(k + 1) * batch]


CHECKPOINT_KEYS = {"step", "model", "opt", "sched", "torch_rng", "max_grad_norm", "config"}


def load_checkpoint(path: str, model, cfg: C.Config, field: str = "--resume") -> dict:
    """Load a checkpoint written by save_checkpoint into `model`, or refuse it in one line: a damaged,
    foreign or other-model checkpoint is bad input. Tensors only (weights_only): never run its pickle."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, a pickle of anything else
        # torch's own messages run to paragraphs; the exception's name is enough to tell them apart
        raise GopcError(f"{field}: {path} is not a readable gopc checkpoint ({type(e).__name__}); "
                        f"it is damaged or not written by gopc train") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise GopcError(f"{field}: {path} is not a gopc checkpoint (it lacks the model, optimizer and step); "
                        f"give a run folder written by gopc train")
    saved = (state["config"] or {}).get("model", {}) if isinstance(state["config"], dict) else {}
    for key, value in dataclasses.asdict(cfg.model).items():
        if key in saved and saved[key] != value:
            raise GopcError(f"model.{key}: {path} holds a model with model.{key}={saved[key]!r}, but the run's "
                            f"config asks for {value!r}; use the config the checkpoint was trained with")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GopcError(f"{field}: {path} does not fit a {cfg.model.kind} model of this config ({first}); "
                        f"give the run folder the checkpoint came from") from None
    return state


def save_checkpoint(path: str, step: int, model, opt, sched, guard: Guard, cfg: C.Config) -> str:
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "max_grad_norm": guard.max_grad_norm, "config": cfg.to_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path + ".tmp"
    try:
        # through a Python file, so that a full disk reaches the caller as the OSError (ENOSPC) behind
        # torch's RuntimeError, which alone does not say why the write failed
        with open(tmp, "wb") as f:
            torch.save(state, f)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # the space it took, and no half-written file beside the last good checkpoint
        raise
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a torn checkpoint
    return path


LOCK_FILE = ".lock"
DIVERGENCE_FILE = "divergence.json"  # in the folder of a run that diverged: the guard's record (Divergence)


def diverged_at(run_dir: str) -> int | None:
    """The step at which the run in `run_dir` diverged, from its divergence.json; None if it did not."""
    try:
        with open(os.path.join(run_dir, DIVERGENCE_FILE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: the callers only lose a note
        return None


def _in_use(run_dir: str, field: str):
    return lambda pid: GopcError(f"{field}: {run_dir} is in use by another run (pid {pid}); wait for it to end, "
                                 f"or choose another folder")


def check_free(run_dir: str, field: str) -> None:
    """Refuse a run folder that a running run holds, writing nothing (`locked` is what takes it)."""
    if pid := locks.holder(os.path.join(run_dir, LOCK_FILE)):
        raise _in_use(run_dir, field)(pid)


def locked(run_dir: str, field: str):
    """Hold the run folder's lock while a run uses it: a second run into the same folder is refused."""
    return locks.held(os.path.join(run_dir, LOCK_FILE), _in_use(run_dir, field))


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop at the next step boundary, where it checkpoints and ends
    as killed, instead of dying mid-step. A second signal acts at once (the previous handler). Only the
    main thread can install handlers; elsewhere (a Tune trial's thread) the run keeps the defaults."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def active(self) -> bool:
        return bool(self._previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def full_disk_ends_the_run(run_dir: str, field: str, result: Result):
    """A write into the run folder that finds the disk full (a checkpoint, the evaluation's files) ends
    the run as DiskFull: one line naming the folder and the checkpoint kept, instead of torch's
    RuntimeError. The checkpoint before it is whole (save_checkpoint), so --resume goes on from there."""
    try:
        yield
    except Exception as e:
        if not no_space(e):
            raise
        kept = (f"its checkpoint of step {result.checkpoint_step} is kept" if result.checkpoint_step is not None
                else "no checkpoint was saved yet")
        raise DiskFull(f"{field}: {reason(e)} in {run_dir} at step {result.step}; {kept}",
                       resumable=result.checkpoint_step is not None) from None


def wait_for_signal(stop: StopOnSignal, step: int) -> None:
    """Test hook (train.inject=wait@STEP): stand still before STEP until SIGINT or SIGTERM arrives, so a
    test interrupts a run mid-way at a known step, never racing it."""
    if not stop.active:
        raise ConfigError("train.inject: wait@STEP needs a run in the main thread, where signals arrive")
    print(f"train.inject: waiting before step {step} for SIGINT or SIGTERM", flush=True)
    while not stop.signum:
        time.sleep(0.05)  # the handler sets stop.signum; this only bounds how soon the loop sees it


def inject(model, site: str, value: float) -> None:
    """Test hook (train.inject): force a value into one guarded quantity at one step, or fail the step."""
    if site == "raise":
        raise RuntimeError("train.inject: injected failure")
    if site == "oom":
        raise torch.OutOfMemoryError("train.inject: injected out-of-memory")
    if site in ("z0_grad", "rh_grad"):
        model.poison[site] = value
    elif site == "overflow":  # finite, but large enough that the next computation overflows
        model.poison["z0_grad"] = 1e30


def train(cfg: C.Config, run_dir: str, hooks: Hooks | None = None, resume_from: str | None = None,
          progress: bool = True, field: str = "--out") -> Result:
    """`field`: the option or setting that named `run_dir`, for the messages about it (--out, --resume, ...)."""
    hooks = hooks or Hooks()
    t_cfg = cfg.train
    torch.manual_seed(t_cfg.seed)
    device = pick_device(t_cfg.device)
    data = build_datasets(cfg.data)  # before anything is written: a bad data path leaves nothing behind
    train_set, val_set = data["train"], data["val"][: t_cfg.eval_size]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t_cfg.lr_decay)
    guard, start = Guard(), 0
    if resume_from:  # every check of the checkpoint comes before anything is written
        state = load_checkpoint(resume_from, model, cfg)
        if state["step"] > t_cfg.steps:
            raise ConfigError(f"train.steps: {t_cfg.steps} is below the checkpoint's step {state['step']}; "
                              f"a resumed run can only train on: drop that --set or give a larger value")
        try:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        except (ValueError, KeyError, TypeError) as e:
            raise GopcError(f"--resume: {resume_from} holds an optimizer state that does not fit this model "
                            f"({type(e).__name__}); give the run folder the checkpoint came from") from None
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        guard.max_grad_norm, start = state["max_grad_norm"], state["step"]

    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise GopcError(f"{field}: {run_dir} cannot be created ({e.strerror}); choose another folder") from None
    result = Result("completed", start, run_dir=run_dir, checkpoint_step=start if resume_from else None)
    # the folder is held from here on: a second run into it is refused, a signal ends this one cleanly,
    # and so does a full disk
    with locked(run_dir, field), StopOnSignal() as stop, full_disk_ends_the_run(run_dir, field, result):
        C.save(cfg, os.path.join(run_dir, "config.yaml"))  # the file alone reproduces the run
        ckpt_path = os.path.join(run_dir, "checkpoint.pt")
        last_ckpt = resume_from
        hooks.started(cfg, run_dir, n_params(model))
        fault = C.parse_inject(t_cfg.inject, t_cfg.seed)
        history = validations(os.path.dirname(resume_from), start) if resume_from else []  # the peak: `degraded`
        last_finite: dict = {}

        bar = tqdm(range(start, t_cfg.steps), initial=start, total=t_cfg.steps, disable=not progress,
                   desc=f"{cfg.model.kind} train", unit="step", dynamic_ncols=True)
        for step in bar:
            if fault and fault[1] == step and fault[0] == "wait":
                hooks.settle()  # a test kills the run once it waits: with everything before logged
                wait_for_signal(stop, step)
            if stop.signum:
                break
            t0 = time.perf_counter()
            x = to_float(train_set[batch_indices(t_cfg.seed, len(train_set), t_cfg.batch_size, step)]).to(device)
            if fault and fault[1] == step:
                inject(model, fault[0], fault[2])
            beta = min(1.0, (step + 1) / cfg.stab.kl_anneal_steps) if cfg.stab.kl_anneal_steps else 1.0
            loss, parts = model(x, beta)
            if fault and fault[1] == step and fault[0] == "loss":
                loss = loss + fault[2]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if fault and fault[1] == step and fault[0] == "param_grad":
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] += fault[2]
            params = [p for p in model.parameters() if p.grad is not None]
            if t_cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
            # bad data is not divergence: the guard raises a DataError for it, in the same sync
            record, stats = guard.check(step, loss, grad_norm, model.watch, last_ckpt, torch.isfinite(x).all())
            if record is not None:  # stop before the optimizer can write a non-finite value
                result.status, result.outcome, result.divergence, result.step = "diverged", "diverged", record, step
                with open(os.path.join(run_dir, DIVERGENCE_FILE), "w") as f:
                    json.dump(record.to_dict(), f, indent=1)
                bar.close()
                if last_finite:  # the blow-up's approach: the loss and norms of the last finite step
                    hooks.metrics(step, last_finite, None)
                hooks.diverged(record, run_dir)
                hooks.finished(result)
                return result
            opt.step()
            sched.step()
            result.step = step + 1
            result.losses.append(stats.pop("loss"))
            last_finite = {"loss": result.losses[-1], **stats}

            saved = None
            if (step + 1) % t_cfg.ckpt_every == 0 or step + 1 == t_cfg.steps:
                saved = last_ckpt = save_checkpoint(ckpt_path, step + 1, model, opt, sched, guard, cfg)
                result.checkpoint_step = step + 1
            if (step + 1) % t_cfg.log_every == 0 or saved or step == 0:
                # .item() syncs: on log steps only
                metrics = {"loss": result.losses[-1], "recon": parts["recon"].item(), "kl": parts["kl"].item(),
                           "beta": beta, "lr": sched.get_last_lr()[0],
                           "seq_per_s": x.shape[0] / (time.perf_counter() - t0),
                           "peak_mem_mb": peak_memory_mb(device), **stats}
                bar.set_postfix(loss=f"{metrics['loss']:.1f}", gnorm=f"{stats['grad_norm']:.2g}")
                hooks.metrics(step + 1, metrics, saved)
            if t_cfg.eval_every and (step + 1) % t_cfg.eval_every == 0 and step + 1 < t_cfg.steps:
                grids = os.path.join(run_dir, "eval") if hooks.grids_at_every_eval else None
                metrics, images = evaluate(model, val_set, cfg, grids)
                add_validation(run_dir, history, step + 1, metrics)
                hooks.evaluated(step + 1, metrics, images)
        bar.close()
        if stop.signum:  # a signal: checkpoint where the run stands and end it as killed; --resume goes on
            if result.checkpoint_step != result.step:
                save_checkpoint(ckpt_path, result.step, model, opt, sched, guard, cfg)
                result.checkpoint_step = result.step
            result.status, result.signal = "killed", stop.signum
            hooks.finished(result)
            return result
        result.eval, images = evaluate(model, val_set, cfg, os.path.join(run_dir, "eval"))
        add_validation(run_dir, history, result.step, result.eval)
        with open(os.path.join(run_dir, "eval", "metrics.json"), "w") as f:
            json.dump(result.eval, f, indent=1)
        result.outcome = outcome(result.eval, t_cfg.learned_margin)
        hooks.evaluated(result.step, result.eval, images)
        hooks.finished(result)
        return result
