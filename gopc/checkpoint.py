"""A run's checkpoint: model, optimizer, schedule, RNG state and config, written atomically and read back
with every check that makes a damaged, foreign or other-model file one line instead of a traceback."""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from gopc import config as C
from gopc.errors import GopcError

KEYS = {"step", "model", "opt", "sched", "torch_rng", "max_grad_norm", "config"}


def load_checkpoint(path: str, model, cfg: C.Config, field: str = "--resume") -> dict:
    """Load a checkpoint written by save_checkpoint into `model`, or refuse it in one line: a damaged,
    foreign or other-model checkpoint is bad input. Tensors only (weights_only): never run its pickle."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, a pickle of anything else
        # torch's own messages run to paragraphs; the exception's name is enough to tell them apart
        raise GopcError(f"{field}: {path} is not a readable gopc checkpoint ({type(e).__name__}); "
                        f"it is damaged or not written by gopc train") from None
    if not isinstance(state, dict) or not KEYS <= state.keys():
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


def restore_training(state: dict, opt, sched, path: str) -> None:
    """A loaded checkpoint's optimizer, schedule and RNG state, so a resumed run follows the uninterrupted curve."""
    try:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    except (ValueError, KeyError, TypeError) as e:
        raise GopcError(f"--resume: {path} holds an optimizer state that does not fit this model "
                        f"({type(e).__name__}); give the run folder the checkpoint came from") from None
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def save_checkpoint(path: str, step: int, model, opt, sched, max_grad_norm: float, cfg: C.Config) -> str:
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "max_grad_norm": max_grad_norm, "config": cfg.to_dict()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path + ".tmp"
    try:
        # through a Python file, so a full disk shows as the OSError (ENOSPC) behind torch's uninformative RuntimeError
        with open(tmp, "wb") as f:
            torch.save(state, f)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # the space it took, and no half-written file beside the last good checkpoint
        raise
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a torn checkpoint
    return path
