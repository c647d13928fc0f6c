import gzip
import os

import numpy as np
import pytest
import torch

from gopc.config import DataConfig
from gopc.data import (build_datasets, load_digits, make_sequences, make_trajectories, read_idx, render,
                       resize_digits, split_indices, to_float)
from gopc.errors import DataError

LAWS = ["bounce", "smooth", "stochastic"]


# ---------------------------------------------------------------- helpers

def write_idx(path, array, gz=False, magic=None):
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else (0x0803 if array.ndim == 3 else 0x0801)
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return raw


def synthetic_digits(n):
    """Digit i is a 12x12 square of intensity i+1: every pixel value names the digit it came from."""
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 8:20, 8:20] = (np.arange(n) + 1)[:, None, None]
    return images, np.arange(n) % 10


def mnist_folder(root, n_train=80, n_test=20, gz=False):
    images, labels = synthetic_digits(n_train + n_test)
    sfx = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{sfx}", images[:n_train], gz)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", labels[:n_train], gz)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", images[n_train:], gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", labels[n_train:], gz)
    return images, labels


def small_cfg(**kw):
    base = dict(n_train=40, n_val=8, n_test=8, seq_len=10)
    return DataConfig(**{**base, **kw})


def at_wall(pos, hi):
    return (pos == 0.0) | (pos == hi)


# ---------------------------------------------------------------- IDX files and sources

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = synthetic_digits(7)
    write_idx(tmp_path / "img", images, gz)
    write_idx(tmp_path / "lab", labels, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)


def test_idx_gzip_detected_by_bytes_not_name(tmp_path):
    images, _ = synthetic_digits(3)
    write_idx(tmp_path / "plain.gz", images, gz=False)
    write_idx(tmp_path / "packed", images, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), images)


def test_idx_wrong_magic(tmp_path):
    write_idx(tmp_path / "bogus-idx", np.zeros((2, 28, 28)), magic=0x0802)
    with pytest.raises(DataError, match="bogus-idx"):
        read_idx(tmp_path / "bogus-idx")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    raw = write_idx(tmp_path / "full", np.ones((5, 28, 28)))
    cut = raw[:1000]
    (tmp_path / "cut").write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataError, match=r"cut is truncated \(expected 3936 bytes, got 1000\)"):
        read_idx(tmp_path / "cut")


@pytest.mark.parametrize("gz", [False, True])
def test_folder_source_concatenates_train_and_t10k(tmp_path, gz):
    images, labels = mnist_folder(tmp_path, gz=gz)
    x, y = load_digits(str(tmp_path))
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="data.source"):
        load_digits(str(tmp_path / "nowhere"))
    mnist_folder(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="data.source.*t10k-labels-idx1-ubyte"):
        load_digits(str(tmp_path))


def test_image_label_count_mismatch(tmp_path):
    mnist_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(79))
    with pytest.raises(DataError, match="80 images but .* 79 labels"):
        load_digits(str(tmp_path))


def test_embedded_source():
    x, y = load_digits("embedded")
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and x.max() == 255
    assert y.shape == (5000,) and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)
    assert load_digits("embedded")[0] is x  # cached: the second call is free


# ---------------------------------------------------------------- splits

def test_split_indices_disjoint_and_complete():
    labels = np.arange(1000) % 10
    s = split_indices(labels, None, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    sets = [set(s[k].tolist()) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set.union(*sets) == set(range(1000))
    other = split_indices(labels, None, seed=4)
    assert not np.array_equal(s["train"], other["train"])


def test_split_classes_filter_and_too_few():
    labels = np.arange(1000) % 10
    s = split_indices(labels, [3, 7], seed=0)
    assert set(np.unique(labels[np.concatenate(list(s.values()))])) == {3, 7}
    assert sum(len(v) for v in s.values()) == 200
    with pytest.raises(DataError, match=r"data.classes: only 9 digits of classes \[3\]"):
        split_indices(np.full(9, 3), [3], seed=0)
    with pytest.raises(DataError, match="data.classes"):
        split_indices(labels[:30], None, seed=0, num_digits=4)  # val/test get 3 digits each


def test_sequences_of_each_split_use_only_their_own_digits(tmp_path):
    images, labels = mnist_folder(tmp_path)
    cfg = small_cfg(source=str(tmp_path), seed=5, n_train=300, n_val=100, n_test=100)
    data = build_datasets(cfg)
    splits = split_indices(labels, None, cfg.seed)
    used = {k: set(np.unique(v.numpy()).tolist()) - {0} for k, v in data.items()}
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    for k in used:  # intensity i+1 <=> digit i: every digit seen belongs to the split
        assert used[k] <= set((splits[k] + 1).tolist()) and used[k]


def test_classes_filter_in_datasets(tmp_path):
    _, labels = mnist_folder(tmp_path)
    data = build_datasets(small_cfg(source=str(tmp_path), classes=[2, 5]))
    seen = np.array(sorted(set(np.unique(torch.cat(list(data.values())).numpy()).tolist()) - {0}))
    assert set(labels[seen - 1].tolist()) == {2, 5}
    with pytest.raises(DataError, match=r"data.classes: only 0 digits of classes \[11\]"):
        build_datasets(small_cfg(source=str(tmp_path), classes=[11]))


def test_too_few_digits_for_num_digits(tmp_path):
    mnist_folder(tmp_path)
    with pytest.raises(DataError, match="data.classes"):
        build_datasets(small_cfg(source=str(tmp_path), classes=[2], num_digits=2))


# ---------------------------------------------------------------- datasets

def test_build_datasets_shapes_and_determinism():
    cfg = small_cfg(seed=1)
    a, b = build_datasets(cfg), build_datasets(cfg)
    for k, n in (("train", 40), ("val", 8), ("test", 8)):
        assert a[k].shape == (n, 10, 64, 64) and a[k].dtype == torch.uint8
        assert torch.equal(a[k], b[k])
    c = build_datasets(small_cfg(seed=2))
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_to_float():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    y = to_float(x)
    assert y.shape == (1, 1, 1, 2, 2) and y.dtype == torch.float32
    torch.testing.assert_close(y.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("digit_size", [14, 28, 32])
def test_single_digit_mass_is_constant(law, digit_size):
    digits = load_digits("embedded")[0][:200]
    cfg = DataConfig(trajectory=law, digit_size=digit_size, seq_len=30, speed_min=3, speed_max=6)
    rng = np.random.default_rng(0)
    video = make_sequences(digits, 300, cfg, rng)
    mass = video.reshape(300, 30, -1).sum(-1, dtype=np.int64)
    chosen = np.random.default_rng(0).integers(200, size=(300, 1))[:, 0]  # replay the draw
    glyph_mass = resize_digits(digits, digit_size)[chosen].reshape(300, -1).sum(-1, dtype=np.int64)
    np.testing.assert_array_equal(mass, np.repeat(glyph_mass[:, None], 30, 1))


@pytest.mark.parametrize("law", LAWS)
def test_two_digits_each_stay_whole(law):
    digits = load_digits("embedded")[0][:200]
    cfg = DataConfig(trajectory=law, num_digits=2, digit_size=32, frame_size=64, seq_len=25, speed_max=7)
    video = make_sequences(digits, 200, cfg, np.random.default_rng(9))
    rng = np.random.default_rng(9)  # replay: digit draws, then trajectories
    glyphs = resize_digits(digits, 32)[rng.integers(200, size=(200, 2))]
    pos = make_trajectories(200, cfg, rng)
    assert pos.min() >= 0 and pos.max() <= 32
    layers = [render(glyphs[:, k:k + 1], pos[:, :, k:k + 1], 64) for k in range(2)]
    np.testing.assert_array_equal(video, np.maximum(*layers))
    for k, layer in enumerate(layers):
        mass = layer.reshape(200, 25, -1).sum(-1, dtype=np.int64)
        np.testing.assert_array_equal(mass, np.repeat(glyphs[:, k].reshape(200, -1).sum(-1)[:, None], 25, 1))


def test_render_places_digit_at_its_position():
    block = np.full((50, 1, 28, 28), 255, np.uint8)
    pos = make_trajectories(50, DataConfig(seq_len=15), np.random.default_rng(2))
    video = render(block, pos, 64)
    corner = np.rint(pos[:, :, 0]).astype(int)
    rows, cols = video.any(3), video.any(2)  # (n, T, S)
    np.testing.assert_array_equal(rows.argmax(-1), corner[..., 0])
    np.testing.assert_array_equal(cols.argmax(-1), corner[..., 1])
    assert (rows.sum(-1) == 28).all() and (cols.sum(-1) == 28).all()
    with pytest.raises(ValueError):
        render(block[:1], np.full((1, 1, 1, 2), 36.6), 64)


# ---------------------------------------------------------------- trajectory laws

def trajectory(law, n=300, T=60):
    cfg = DataConfig(trajectory=law, seq_len=T, speed_min=2, speed_max=4)
    pos = make_trajectories(n, cfg, np.random.default_rng(11))
    return pos, np.diff(pos, axis=1), float(cfg.frame_size - cfg.digit_size)


def test_bounce_reflects_at_walls_only():
    pos, step, hi = trajectory("bounce")
    assert pos.min() == 0 and pos.max() == hi  # walls are reached, never crossed
    wall = at_wall(pos, hi)
    flip = np.sign(step[:, 1:]) != np.sign(step[:, :-1])
    assert flip.sum() > 100
    np.testing.assert_array_equal(flip, wall[:, 1:-1])  # the sign flips exactly at a wall
    # steps that did not end clamped at a wall all move at the same |velocity| per component
    free_speed = np.where(wall[:, 1:], np.nan, np.abs(step))
    assert np.nanmax(free_speed, axis=1) - np.nanmin(free_speed, axis=1) == pytest.approx(0, abs=1e-9)
    speed = np.linalg.norm(step, axis=-1)[~wall[:, 1:].any(-1)]
    assert speed.min() >= 2 - 1e-9 and speed.max() <= 4 + 1e-9


def angle_changes(step, wall):
    """Heading change between consecutive steps that neither touch a wall."""
    ok = ~(wall[:, :-2] | wall[:, 1:-1] | wall[:, 2:]).any(-1)
    a = np.arctan2(step[..., 1], step[..., 0])
    return (np.angle(np.exp(1j * (a[:, 1:] - a[:, :-1]))))[ok]


def test_smooth_turns_gradually():
    pos, step, hi = trajectory("smooth")
    wall = at_wall(pos, hi)
    turn = angle_changes(step, wall)
    assert turn.size > 5000
    assert np.abs(turn).max() < 0.9  # N(0, 0.15): six standard deviations
    assert 0.1 < turn.std() < 0.2  # ... but it does turn
    free = ~(wall[:, :-1] | wall[:, 1:]).any(-1)
    speed = np.linalg.norm(step, axis=-1)
    assert speed[free].min() >= 2 - 1e-9 and speed[free].max() <= 4 + 1e-9
    both = free[:, 1:] & free[:, :-1]
    assert np.abs(np.diff(speed, axis=1))[both].mean() > 0.02  # the speed drifts from frame to frame
    # straight-line bouncing would fail the "does turn" check
    b_pos, b_step, _ = trajectory("bounce")
    assert np.abs(angle_changes(b_step, at_wall(b_pos, hi))).max() < 1e-9


def test_stochastic_changes_velocity_only_at_walls():
    pos, step, hi = trajectory("stochastic")
    wall = at_wall(pos, hi)
    any_wall = wall.any(-1)
    # between walls: the velocity stays exactly the same
    free = ~(any_wall[:, :-2] | any_wall[:, 1:-1] | any_wall[:, 2:])
    assert free.sum() > 3000
    np.testing.assert_allclose(step[:, 1:][free], step[:, :-1][free])
    # leaving a wall: a fresh speed in range, pointing away from the wall that was hit
    leave = any_wall[:, 1:-1] & ~any_wall[:, 2:]
    new, old = step[:, 1:][leave], step[:, :-1][leave]
    assert len(new) > 100
    speed = np.linalg.norm(new, axis=-1)
    assert speed.min() >= 2 - 1e-9 and speed.max() <= 4 + 1e-9
    at = pos[:, 1:-1][leave]
    assert np.all(new[at == 0.0] > 0) and np.all(new[at == hi] < 0)
    # a new draw, not a mirror: the component along the wall changes too (a reflection would keep it)
    one_axis = (at == 0.0) | (at == hi)
    one_axis = one_axis[:, 0] != one_axis[:, 1]
    along = (at[one_axis] != 0.0) & (at[one_axis] != hi)  # the axis of the wall's direction
    kept = np.isclose(np.abs(new[one_axis][along]), np.abs(old[one_axis][along]))
    assert len(kept) > 100 and kept.mean() < 0.05
