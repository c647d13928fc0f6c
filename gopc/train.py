"""The training loop, shared by `gopc train` and the sweep's Tune trials.

Seeded and resumable: the batch order is a function of (seed, epoch) and the checkpoint holds the model, optimizer,
schedule and RNG state, so a resumed run follows the uninterrupted run's loss curve. What a run reports goes through
`Hooks`: MLflow for the CLI, `tune.report` inside a sweep."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from gopc import config as C
from gopc import outcome as O
from gopc import stabilizers
from gopc.checkpoint import load_checkpoint, restore_training, save_checkpoint
from gopc.data import build_datasets, to_float
from gopc.errors import ConfigError, GopcError
from gopc.evaluate import add_validation, evaluate, validations
from gopc.guard import Divergence, Guard
from gopc.inject import Fault
from gopc.models import build_model, n_params
from gopc.runfolder import StopOnSignal, full_disk_ends_the_run, locked, record_divergence


class Hooks:
    """Where a run's results go. Every method is optional."""

    grids_at_every_eval = False  # True: every validation draws the image grids, not only the last one

    def started(self, cfg: C.Config, run_dir: str, n_params: int) -> None: ...

    def metrics(self, step: int, metrics: dict, checkpoint: str | None) -> None: ...

    def evaluated(self, step: int, metrics: dict, images: dict[str, str]) -> None: ...

    def diverged(self, record: Divergence, run_dir: str) -> None: ...

    def finished(self, result: "Result") -> None: ...

    # the run raised (not a signal or a divergence); `resumable`: its last checkpoint is kept (a full disk) for --resume
    def failed(self, resumable: bool = False) -> None: ...

    def settle(self) -> None: ...  # wait until what was reported is recorded (MLflow writes from a thread)


@dataclass
class Result:
    status: str  # O.COMPLETED | O.DIVERGED | O.KILLED (by a signal: checkpoint saved at `step`)
    step: int  # steps taken
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    divergence: Divergence | None = None
    run_dir: str = ""
    signal: int = 0  # killed: the signal's number
    outcome: str = ""  # O.classify of a completed run (against trivial predictions), or O.DIVERGED
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
    epoch, k = divmod(step, max(n // batch, 1))
    return np.random.default_rng([seed, epoch]).permutation(n)[k * batch:(k + 1) * batch]


def step(model, opt, x, beta: float, grad_clip: float, guard: Guard | None, at: int = 0, last_ckpt=None,
         fault: Fault | None = None) -> tuple[Divergence | None, torch.Tensor, dict, dict]:
    """One training step: forward, backward, the parameters' gradient norm (clipped when grad_clip > 0),
    the divergence guard, then Adam's step. Returns (divergence, loss, loss parts, statistics); on a
    divergence the optimizer did not step, so no non-finite value was written. guard=None skips the
    guard and its one device sync (bench/guard_cost.py measures what it costs)."""
    fault = fault or Fault()
    loss, parts = model(x, beta)
    loss = fault.loss(at, loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    fault.grads(at, model)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
    record, stats = None, {}
    if guard is not None:  # bad data is not divergence: the guard raises a DataError for it, in the same sync
        record, stats = guard.check(at, loss, grad_norm, model.watch, last_ckpt, torch.isfinite(x).all())
    if record is None:
        opt.step()
    return record, loss, parts, stats


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
        restore_training(state, opt, sched, resume_from)
        guard.max_grad_norm, start = state["max_grad_norm"], state["step"]

    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise GopcError(f"{field}: {run_dir} cannot be created ({e.strerror}); choose another folder") from None
    result = Result(O.COMPLETED, start, run_dir=run_dir, checkpoint_step=start if resume_from else None)
    # held from here on: a second run into the folder is refused; a signal, or a full disk, ends this one cleanly
    with locked(run_dir, field), StopOnSignal() as stop, full_disk_ends_the_run(run_dir, field, result):
        C.save(cfg, os.path.join(run_dir, "config.yaml"))  # the file alone reproduces the run
        ckpt_path = os.path.join(run_dir, "checkpoint.pt")
        last_ckpt = resume_from
        hooks.started(cfg, run_dir, n_params(model))
        fault = Fault(t_cfg.inject, t_cfg.seed)
        history = validations(os.path.dirname(resume_from), start) if resume_from else []  # the peak: `degraded`
        last_finite: dict = {}

        bar = tqdm(range(start, t_cfg.steps), initial=start, total=t_cfg.steps, disable=not progress,
                   desc=f"{cfg.model.kind} train", unit="step", dynamic_ncols=True)
        save = lambda at: save_checkpoint(ckpt_path, at, model, opt, sched, guard.max_grad_norm, cfg)  # noqa: E731
        for at in bar:
            fault.before(at, model, stop, hooks.settle)
            if stop.signum:
                break
            t0 = time.perf_counter()
            x = to_float(train_set[batch_indices(t_cfg.seed, len(train_set), t_cfg.batch_size, at)]).to(device)
            beta = stabilizers.kl_anneal(at, cfg.stab.kl_anneal_steps)
            record, loss, parts, stats = step(model, opt, x, beta, t_cfg.grad_clip, guard, at, last_ckpt, fault)
            if record is not None:  # the optimizer did not step: no non-finite value was written
                result.status = result.outcome = O.DIVERGED
                result.divergence, result.step = record, at
                record_divergence(run_dir, record)
                bar.close()
                if last_finite:  # the blow-up's approach: the loss and norms of the last finite step
                    hooks.metrics(at, last_finite, None)
                hooks.diverged(record, run_dir)
                hooks.finished(result)
                return result
            sched.step()
            result.step = at + 1
            result.losses.append(stats.pop("loss"))
            last_finite = {"loss": result.losses[-1], **stats}

            saved = None
            if (at + 1) % t_cfg.ckpt_every == 0 or at + 1 == t_cfg.steps:
                saved = last_ckpt = save(at + 1)
                result.checkpoint_step = at + 1
            if (at + 1) % t_cfg.log_every == 0 or saved or at == 0:  # .item() syncs: on log steps only
                metrics = {"loss": result.losses[-1], "recon": parts["recon"].item(), "kl": parts["kl"].item(),
                           "beta": beta, "lr": sched.get_last_lr()[0],
                           "seq_per_s": x.shape[0] / (time.perf_counter() - t0),
                           "peak_mem_mb": peak_memory_mb(device), **stats}
                bar.set_postfix(loss=f"{metrics['loss']:.1f}", gnorm=f"{stats['grad_norm']:.2g}")
                hooks.metrics(at + 1, metrics, saved)
            if t_cfg.eval_every and (at + 1) % t_cfg.eval_every == 0 and at + 1 < t_cfg.steps:
                grids = os.path.join(run_dir, "eval") if hooks.grids_at_every_eval else None
                metrics, images = evaluate(model, val_set, cfg, grids)
                add_validation(run_dir, history, at + 1, metrics)
                hooks.evaluated(at + 1, metrics, images)
        bar.close()
        if stop.signum:  # a signal: checkpoint where the run stands and end it as killed; --resume goes on
            if result.checkpoint_step != result.step:
                save(result.step)
                result.checkpoint_step = result.step
            result.status, result.signal = O.KILLED, stop.signum
            hooks.finished(result)
            return result
        result.eval, images = evaluate(model, val_set, cfg, os.path.join(run_dir, "eval"))
        add_validation(run_dir, history, result.step, result.eval)
        with open(os.path.join(run_dir, "eval", "metrics.json"), "w") as f:
            json.dump(result.eval, f, indent=1)
        result.outcome = O.classify(result.eval, t_cfg.learned_margin)
        hooks.evaluated(result.step, result.eval, images)
        hooks.finished(result)
        return result
