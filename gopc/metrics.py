"""Per-frame video metrics (MSE, BCE, PSNR, SSIM) in torch, plus the summaries the thesis tables report.

Every function takes predictions and targets of shape (B, T, 1, H, W) with values in [0, 1]; predictions are
probabilities, not logits. All heavy work stays on the tensors' device; only the final summaries become Python floats.

NaN is deliberately *not* masked anywhere: a diverged GOPC-2 run produces NaN predictions and the sweep must see
that. Callers that know a frame has no prediction (the prior at t=0) slice it off before summarising."""
from __future__ import annotations

import torch
import torch.nn.functional as F

BCE_EPS = 1e-6  # pred is clamped to [eps, 1-eps] so a hard 0/1 prediction gives a large but finite BCE
MSE_FLOOR = 1e-10  # PSNR of a perfect frame is 100 dB instead of inf

# SSIM as skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
# data_range=1.0): scipy's gaussian_filter (truncate=3.5: radius 5, an 11x11 window), then the mean of the SSIM map
# cropped by 5 px at each border, where the window never touches the padding: a "valid" convolution matches it.
SSIM_SIGMA = 1.5
SSIM_WIN = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_CHUNK = 1024  # frames per conv2d call: bounds memory at ~5 * chunk * H * W floats

METRICS = ("mse", "bce", "psnr", "ssim")


def _check(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape or pred.dim() != 5 or pred.shape[2] != 1:
        raise ValueError(f"pred and target must both be (B, T, 1, H, W); got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    # half precision loses too much in E[x^2] - E[x]^2; float64 inputs keep their precision
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    return pred.detach().to(dtype), target.detach().to(pred.device, dtype)


def _gaussian_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(SSIM_WIN, device=device, dtype=dtype) - SSIM_WIN // 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)  # separable and already normalised: sums to 1


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM, (B, T), matching skimage's Gaussian-window SSIM with data range 1."""
    pred, target = _check(pred, target)
    B, T, _, H, W = pred.shape
    if H < SSIM_WIN or W < SSIM_WIN:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WIN}x{SSIM_WIN} px; got {H}x{W}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K * data_range)^2 with data_range 1
    window = _gaussian_window(pred.device, pred.dtype).expand(5, 1, SSIM_WIN, SSIM_WIN)
    out = []
    for x, y in zip(pred.reshape(-1, 1, H, W).split(SSIM_CHUNK), target.reshape(-1, 1, H, W).split(SSIM_CHUNK)):
        # one grouped conv filters all five local moments at once
        mx, my, exx, eyy, exy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y], 1), window, groups=5).unbind(1)
        vx, vy, vxy = exx - mx * mx, eyy - my * my, exy - mx * my  # population (co)variances
        s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean(dim=(-2, -1)))
    return torch.cat(out).reshape(B, T)


@torch.no_grad()
def frame_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame mse, bce, psnr and ssim, each a (B, T) tensor on the inputs' device."""
    pred, target = _check(pred, target)
    dims = (2, 3, 4)
    mse = (pred - target).pow(2).mean(dims)
    p = pred.clamp(BCE_EPS, 1 - BCE_EPS)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean(dims)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))
    return {"mse": mse, "bce": bce, "psnr": psnr, "ssim": ssim(pred, target)}


def mean_and_std(per_frame: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over all frames and sequences, plus `<metric>_std`: the std across sequences of each sequence's mean, the
    population std (ddof=0, like numpy), so a single sequence gives 0 rather than NaN."""
    out: dict[str, float] = {}
    for name, values in per_frame.items():
        per_seq = values.detach().double().mean(dim=1)  # (B,)
        out[name] = per_seq.mean().item()  # equal T per sequence, so this is also the mean over all frames
        out[f"{name}_std"] = per_seq.std(correction=0).item()
    return out


def curve(per_frame: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Mean over sequences at each time step: {metric: [value at t=0, t=1, ...]}."""
    return {name: values.detach().double().mean(dim=0).tolist() for name, values in per_frame.items()}


# Trivial predictions and skill: a model is judged against what predicting nothing already scores.

SKILL_METRICS = ("mse", "bce", "ssim")  # PSNR is a transform of MSE, so it gets no skill of its own


def last_frame_prediction(x: torch.Tensor, first: int, context: int | None = None) -> torch.Tensor:
    """Copy-last-frame prediction of frames first..T-1 of x (B, T, 1, H, W), the standard trivial baseline of
    video prediction: one-step, each frame is predicted by the true frame before it; in a rollout after
    `context` frames, every future frame is predicted by the last context frame (all the model saw)."""
    if first < 1:
        raise ValueError("the copy-last-frame prediction needs a frame before the first predicted one")
    return x[:, first - 1:-1] if context is None else x[:, context - 1:context].expand_as(x[:, first:])


def skill(metric: str, model: float, *references: float) -> float:
    """`model` against the best of the references as a skill score: 1 - m/ref for errors, (m - ref) / (1 - ref) for
    SSIM. Above 0: better than every reference; 1: perfect; below 0: worse than predicting nothing."""
    if metric == "ssim":
        ref = max(references)
        return (model - ref) / (1 - ref) if ref < 1 else float("nan")
    ref = min(references)
    return 1 - model / ref if ref > 0 else float("nan")
