"""Each GOPC-2 stabilizer, one function per `stab.` field (which models: gopc/config.py; why: gopc/gopc2.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Stays finite (the defaults diverge at once), for benches and tests: the thesis' sigmoid fix, a smaller r^H step
STAYS_FINITE = {"stab.out_act": "sigmoid", "stab.inner_lr_h": 0.1}
_ACT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "softmax": lambda w: w.softmax(-1)}


def variance(raw: torch.Tensor, law: str) -> torch.Tensor:
    """A head's raw output as a log-variance: exp (the thesis), clamped, or softplus (std = softplus + eps:
    bounded below, grows linearly, never exp-explodes)."""
    if law == "clamped":
        return raw.clamp(-10.0, 10.0)
    return 2.0 * torch.log(F.softplus(raw) + 1e-4) if law == "softplus" else raw


def free_bits(kl_per_dim: torch.Tensor, floor: float) -> torch.Tensor:
    """Sum over dims, mean over batch; each dim's batch-mean KL floored at `floor` nats (`free_bits_h`: r^H)."""
    per_dim = kl_per_dim.mean(0)
    return (per_dim.clamp(min=floor) if floor > 0 else per_dim).sum()


def inner_reduction(per_elem: torch.Tensor, how: str) -> torch.Tensor:
    """The inner loss summed (the thesis, variational GON) or averaged over each sample's elements. The
    batch is always averaged, as in the reference code, which scales the per-sample step by 1/B."""
    flat = per_elem.flatten(1)
    return (flat.sum(1) if how == "sum" else flat.mean(1)).mean()


def kl_anneal(step: int, steps: int) -> float:
    return min(1.0, (step + 1) / steps) if steps else 1.0  # beta: a linear warm-up from 0 to 1 over `steps`


def mixture_act(h: torch.Tensor, how: str) -> torch.Tensor:
    return _ACT.get(how, lambda w: w)(h)  # on the hypernetwork's K mixture weights


def basis_norm(bases: torch.Tensor, how: str) -> torch.Tensor:
    """Unit Frobenius norm (every basis a contraction), or largest singular value at most 1."""
    if how == "normalize":
        return bases / bases.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
    if how == "spectral":
        return bases / torch.linalg.matrix_norm(bases, ord=2).clamp_min(1.0)[:, None, None]
    return bases


def weight_act(V: torch.Tensor, how: str) -> torch.Tensor:
    """On the generated r x r transition weights, per sample."""
    if how == "layernorm":
        return F.layer_norm(V.flatten(1), (V.shape[1] * V.shape[2],)).view_as(V)
    return _ACT.get(how, lambda v: v)(V)


def out_act(out: torch.Tensor, how: str, norm: torch.nn.Module | None) -> torch.Tensor:
    """On the transition's output V r_{t-1}; `norm` is the model's LayerNorm when how == 'layernorm'."""
    return norm(out) if norm is not None else _ACT.get(how, lambda o: o)(out)


def residual(r_prev: torch.Tensor, out: torch.Tensor, on: bool) -> torch.Tensor:
    return r_prev + out if on else out  # r_hat = r_{t-1} + f(V r_{t-1}): the transition learns a change


def weight_penalty(V: torch.Tensor) -> torch.Tensor:
    return V.pow(2).sum((1, 2)).mean()  # ||V||_F^2 per sample, averaged; the loss weighs it by stab.weight_penalty


def rh_truncate(rh: torch.Tensor, t: int, every: int) -> torch.Tensor:
    """Truncated backpropagation through the r^H path: cut it every `every` frames (1: always; 0: never)."""
    return rh.detach() if every and t % every == 0 else rh


def h_grad(g: torch.Tensor, how: str, limit: float) -> torch.Tensor:
    """Clip, or normalise to a fixed length (a trust region), the inner r^H gradient."""
    if how == "clip_value":
        return g.clamp(-limit, limit)
    norm = g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if how == "clip_norm":
        return g * (limit / norm).clamp(max=1.0)
    return g * (limit / norm) if how == "normalize" else g
