"""Tests for gopc.metrics and gopc.images."""

import math

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from gopc import images, metrics


# ---------------------------------------------------------------- independent float64 SSIM reference (numpy)


def _gauss_filter(img: np.ndarray, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(mode="reflect") re-done in numpy: separable, whole image, mirrored borders."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, r, mode="symmetric")  # numpy "symmetric" == scipy "reflect" (edge value repeated)
    p = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, p)


def ref_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1) for 2-D float images, following its algorithm step by step."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    ux, uy = _gauss_filter(x), _gauss_filter(y)
    vx = _gauss_filter(x * x) - ux * ux
    vy = _gauss_filter(y * y) - uy * uy
    vxy = _gauss_filter(x * y) - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (11 - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


def digit_like(rng: np.random.Generator, size: int = 64, glyph: int = 28) -> np.ndarray:
    """A few thick soft strokes inside a glyph x glyph box at a random place: black background, white ink."""
    img = np.zeros((size, size))
    ox, oy = rng.integers(0, size - glyph, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(3):
        (ax, ay), (bx, by) = rng.uniform(4, glyph - 4, (2, 2)) + (ox, oy)
        t = np.clip(((xx - ax) * (bx - ax) + (yy - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2 + 1e-9), 0, 1)
        d = np.hypot(xx - (ax + t * (bx - ax)), yy - (ay + t * (by - ay)))
        img = np.maximum(img, np.clip(2.5 - d, 0, 1))
    return img


def as5d(*frames: np.ndarray) -> torch.Tensor:
    """Frames (H, W) -> (1, len(frames), 1, H, W) float32 tensor."""
    return torch.tensor(np.stack(frames), dtype=torch.float32)[None, :, None]


# ---------------------------------------------------------------- hand-computed metrics


def test_half_prediction_against_binary_target():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 3, 1, 16, 16, generator=g) > 0.5).float()
    m = metrics.frame_metrics(torch.full_like(target, 0.5), target)
    assert set(m) == {"mse", "bce", "psnr", "ssim"}
    for v in m.values():
        assert v.shape == (2, 3)
    torch.testing.assert_close(m["mse"], torch.full((2, 3), 0.25))
    torch.testing.assert_close(m["bce"], torch.full((2, 3), math.log(2)))
    torch.testing.assert_close(m["psnr"], torch.full((2, 3), 10 * math.log10(4)))


def test_values_are_per_frame():
    target = torch.zeros(1, 3, 1, 16, 16)
    pred = target.clone()
    pred[0, 1, 0, :8] = 1.0  # half of frame 1 wrong by 1; frames 0 and 2 perfect
    m = metrics.frame_metrics(pred, target)
    torch.testing.assert_close(m["mse"], torch.tensor([[0.0, 0.5, 0.0]]))
    torch.testing.assert_close(m["psnr"], torch.tensor([[100.0, 10 * math.log10(2), 100.0]]))  # mse floor 1e-10
    assert m["ssim"][0, 0].item() == pytest.approx(1.0) and m["ssim"][0, 1].item() < 0.9


def test_hard_wrong_prediction_bce_is_finite():
    target = torch.ones(1, 1, 1, 16, 16)
    m = metrics.frame_metrics(torch.zeros_like(target), target)
    assert m["bce"].item() == pytest.approx(-math.log(1e-6), rel=1e-4)
    m = metrics.frame_metrics(target.clone(), target)
    assert m["bce"].item() == pytest.approx(-math.log(1 - 1e-6), abs=1e-5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.frame_metrics(torch.zeros(1, 2, 1, 16, 16), torch.zeros(1, 3, 1, 16, 16))
    with pytest.raises(ValueError):
        metrics.frame_metrics(torch.zeros(2, 16, 16), torch.zeros(2, 16, 16))


# ---------------------------------------------------------------- SSIM


def test_ssim_identical_is_one():
    rng = np.random.default_rng(1)
    x = as5d(rng.random((32, 32)), digit_like(rng, size=32, glyph=20))
    torch.testing.assert_close(metrics.ssim(x, x.clone()), torch.ones(1, 2))


def test_reference_filter_matches_scipy():
    # guards the reference itself: its filter must be scipy's, which is what skimage uses
    ndimage = pytest.importorskip("scipy.ndimage")
    img = np.random.default_rng(2).random((20, 23))
    np.testing.assert_allclose(_gauss_filter(img), ndimage.gaussian_filter(img, 1.5, mode="reflect", truncate=3.5))


@pytest.mark.parametrize("kind", ["random", "digit"])
def test_ssim_matches_reference(kind):
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(4):
        if kind == "random":
            x = rng.random((64, 48))
            y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1) if rng.random() < 0.5 else rng.random(x.shape)
        else:
            x = digit_like(rng)
            y = np.clip(np.roll(x, rng.integers(-3, 4), axis=1) + rng.normal(0, 0.05, x.shape), 0, 1)
        pairs.append((x, y))
    got = metrics.ssim(as5d(*[p for p, _ in pairs]), as5d(*[t for _, t in pairs]))[0]
    want = [ref_ssim(p, t) for p, t in pairs]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)


@pytest.mark.parametrize("a,b", [(0.5, 0.0), (0.2, 0.6), (0.9, 0.9)])
def test_ssim_of_two_flat_frames_matches_a_hand_computation(a, b):
    """Flat frames have no variance: SSIM is (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2, whatever the filter
    (a check on the constants and the formula that borrows nothing from the reference above)."""
    x = as5d(np.full((32, 32), a), np.full((32, 32), b))
    want = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    torch.testing.assert_close(metrics.ssim(x[:, :1], x[:, 1:]), torch.tensor([[want]]), rtol=1e-4, atol=1e-6)


def test_ssim_degrades_monotonically_with_noise():
    rng = np.random.default_rng(4)
    x = digit_like(rng)
    noise = rng.normal(0, 1, x.shape)
    levels = [0.0, 0.05, 0.1, 0.2, 0.4]
    preds = as5d(*[np.clip(x + s * noise, 0, 1) for s in levels])
    s = metrics.ssim(preds, as5d(*[x] * len(levels)))[0]
    assert s[0].item() == pytest.approx(1.0)
    assert torch.all(s[1:] < s[:-1]), s


def test_ssim_of_negative_is_lower():
    x = np.random.default_rng(5).random((32, 32))
    s = metrics.ssim(as5d(1 - x), as5d(x)).item()
    assert s < 0.0  # anti-correlated everywhere
    assert s == pytest.approx(ref_ssim(1 - x, x), abs=1e-3)


def test_ssim_small_frames_raise():
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(torch.zeros(1, 1, 1, 8, 8), torch.zeros(1, 1, 1, 8, 8))


# ---------------------------------------------------------------- summaries


def test_blank_frame_scores_the_mean_square_of_the_target():
    rng = np.random.default_rng(6)
    target = torch.tensor(np.stack([[digit_like(rng) for _ in range(4)] for _ in range(3)]), dtype=torch.float32)
    target = target[:, :, None]  # (3, 4, 1, 64, 64)
    blank = metrics.mean_and_std(metrics.frame_metrics(torch.zeros_like(target), target))  # as gopc/evaluate.py scores it
    assert blank["mse"] == pytest.approx(target.pow(2).mean().item(), rel=1e-5)  # zero pred: mse = E[target^2]
    assert 0.005 < blank["mse"] < 0.05  # one glyph in 64x64: the ~0.02 scale of the thesis baseline


def test_mean_and_std_across_sequences():
    per_frame = {"mse": torch.tensor([[1.0, 1.0, 1.0], [2.0, 4.0, 6.0]])}  # per-sequence means 1 and 4
    s = metrics.mean_and_std(per_frame)
    assert s == pytest.approx({"mse": 2.5, "mse_std": 1.5})  # population std of [1, 4]
    assert list(metrics.curve(per_frame)) == ["mse"]
    assert metrics.curve(per_frame)["mse"] == pytest.approx([1.5, 2.5, 3.5])
    assert metrics.mean_and_std({"mse": torch.tensor([[1.0, 3.0]])})["mse_std"] == 0.0  # one sequence: 0, not NaN


# ---------------------------------------------------------------- images


def _sequences(b=2, t=6, size=32, seed=7):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.random((b, t, 1, size, size)), dtype=torch.float32)


def _expected_size(n_seq, rows_per_seq, t, extra=0.0):
    rows = n_seq * rows_per_seq
    w = images.LEFT + t * images.CELL + (t - 1) * images.PAD + extra + images.RIGHT
    h = images.TOP + rows * images.CELL + (rows - n_seq) * images.PAD + (n_seq - 1) * images.SEQ_GAP + images.BOTTOM
    return w * images.DPI, h * images.DPI


def test_inference_grid_png(tmp_path):
    truth = _sequences(b=4)
    prior = _sequences(b=4, seed=8)
    prior[:, 0] = float("nan")  # no prior prediction at t=0
    path = images.inference_grid(truth, prior, _sequences(b=4, seed=9), tmp_path / "sub" / "inf.png", n=3)
    assert path.exists() and path.stat().st_size > 0
    img = mpimg.imread(path)
    w, h = _expected_size(3, 4, 6)  # n caps the 4 sequences at 3
    assert img.shape[1] == pytest.approx(w, abs=2) and img.shape[0] == pytest.approx(h, abs=2)
    assert img.shape[1] / img.shape[0] == pytest.approx(w / h, rel=0.02)
    # prior row, t=0 (NaN) is blank white; the truth cell above it holds noise, so it is not
    cx = int((images.LEFT + images.CELL / 2) * images.DPI)
    row_y = lambda r: int((images.TOP + r * (images.CELL + images.PAD) + images.CELL / 2) * images.DPI)  # noqa: E731
    assert np.all(img[row_y(1) - 5 : row_y(1) + 5, cx - 5 : cx + 5, :3] > 0.99)
    assert img[row_y(0) - 5 : row_y(0) + 5, cx - 5 : cx + 5, :3].std() > 0.05
    assert plt.get_fignums() == []  # figure closed


def test_rollout_grid_png_has_red_context_line(tmp_path):
    truth = _sequences(b=2, t=8)
    path = images.rollout_grid(truth, _sequences(b=2, t=8, seed=10), tmp_path / "roll.png", context=3)
    img = mpimg.imread(path)
    w, h = _expected_size(2, 2, 8, extra=images.CONTEXT_GAP)
    assert img.shape[1] / img.shape[0] == pytest.approx(w / h, rel=0.02)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    red = (r > 0.8) & (g < 0.2) & (b < 0.2)
    assert red.any()
    # the red line sits between frame 2 and frame 3
    cols = np.nonzero(red.any(axis=0))[0]
    x2_end = (images.LEFT + 3 * images.CELL + 2 * images.PAD) * images.DPI
    x3_start = x2_end + (images.PAD + images.CONTEXT_GAP) * images.DPI
    assert x2_end - 2 <= cols.min() and cols.max() <= x3_start + 2
    assert plt.get_fignums() == []


def test_rollout_grid_without_line_and_short_prediction(tmp_path):
    truth = _sequences(b=1, t=6)
    # prediction covers only the 3 future frames; context=0 draws no line
    img = mpimg.imread(images.rollout_grid(truth, _sequences(b=1, t=3), tmp_path / "r.png", context=0))
    red = (img[..., 0] > 0.8) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)
    assert not red.any()
    with pytest.raises(ValueError):
        images.rollout_grid(truth, _sequences(b=1, t=7), tmp_path / "bad.png")
    assert plt.get_fignums() == []


def test_curves_plot_png(tmp_path):
    path = images.curves_plot({"prior": [0.03, 0.02, 0.025], "blank": 0.021}, tmp_path / "c.png", "rollout mse")
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert plt.get_fignums() == []
