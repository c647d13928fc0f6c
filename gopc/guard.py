"""The divergence guard: every step, before the optimizer writes anything, check that the loss, the
parameters' gradient norm and every inner gradient (z0, r^H) are finite, with one device sync."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from gopc.errors import DataError


@dataclass
class Divergence:
    step: int
    quantity: str  # the first non-finite one, in computation order: z0_grad / rh_grad (by frame), loss, param_grad
    frame: int | None  # for inner gradients: the frame whose step went non-finite
    value: float  # the offending norm (nan, inf)
    max_grad_norm_before: float  # the largest finite parameter-gradient norm seen before this step
    last_checkpoint: str | None  # the last checkpoint written, all finite by construction

    def to_dict(self) -> dict:
        return {**asdict(self), "value": str(self.value)}  # JSON has no nan/inf


class Guard:
    def __init__(self, max_grad_norm: float = 0.0):
        self.max_grad_norm = max_grad_norm

    def check(self, step, loss, grad_norm, watch, last_checkpoint, data_finite=None) -> tuple[Divergence | None, dict]:
        """Returns (divergence or None, the step's statistics: loss, gradient norms). `data_finite`, a
        0-d bool tensor, rides along in the same sync; non-finite input is a DataError, not divergence."""
        names = [(site, frame) for site, frame, _ in watch] + [("loss", None), ("param_grad", None)]
        extra = [] if data_finite is None else [data_finite.double()]
        values = torch.stack([n for _, _, n in watch] + [loss.detach().double(), grad_norm.detach().double()] + extra)
        values = values.cpu().tolist()  # the one sync
        if extra and not values.pop():
            raise DataError(f"data: batch at step {step} holds non-finite pixels; check data.source")
        stats = {"loss": values[-2], "grad_norm": values[-1]}
        for site in ("z0_grad", "rh_grad"):
            norms = [v for (s, _), v in zip(names, values) if s == site]
            if norms:
                stats[f"{site}_max"] = max(norms, key=lambda v: v if math.isfinite(v) else math.inf)
        for (site, frame), v in zip(names, values):
            if not math.isfinite(v):
                return Divergence(step, site, frame, v, self.max_grad_norm, last_checkpoint), stats
        self.max_grad_norm = max(self.max_grad_norm, values[-1])
        return None, stats
