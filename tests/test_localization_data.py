"""Localization canvases: targets match the pixels, determinism, caching and bad input."""
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pycnn.data import localization as loc
from pycnn.data.localization import (
    ABSENT_LABEL,
    INK_THRESHOLD,
    load_canvases,
    make_canvases,
    resample_matrix,
    save_canvases,
)
from synthetic_data import synthetic_digits

DATA_DIR = os.environ.get("PYCNN_DATA")
HAVE_DATA = bool(DATA_DIR) and (Path(DATA_DIR) / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="module")
def digits():
    if HAVE_DATA:
        from pycnn.data import load_mnist

        x, y = load_mnist("test", download=False)
        return x[:2000], y[:2000]
    return synthetic_digits()


def ink_bbox(img, threshold=INK_THRESHOLD):
    """Independent reference: (x0, y0, x1, y1) pixel edges of the pixels > threshold, or None."""
    ys, xs = np.nonzero(img > threshold)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def test_shapes_dtypes_and_ranges(digits):
    d = make_canvases(*digits, n=300, canvas_size=(48, 64), scale_range=(14, 30), seed=1)
    assert d["images"].shape == (300, 1, 48, 64) and d["images"].dtype == np.float32
    assert d["present"].shape == (300,) and d["present"].dtype == np.float32
    assert d["labels"].shape == (300,) and d["labels"].dtype == np.int64
    assert d["boxes"].shape == (300, 4) and d["boxes"].dtype == np.float32
    assert d["images"].min() >= 0 and d["images"].max() <= 1
    p = d["present"] == 1
    assert set(np.unique(d["present"])) <= {0.0, 1.0}
    assert np.all((d["labels"][p] >= 0) & (d["labels"][p] <= 9))
    assert np.all(d["labels"][~p] == ABSENT_LABEL)
    assert np.all(d["boxes"][~p] == 0)
    b = d["boxes"][p]
    assert np.all((b >= 0) & (b <= 1)) and np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    # ink box sides never exceed the largest digit size
    assert (b[:, 2] - b[:, 0]).max() * 64 <= 30 and (b[:, 3] - b[:, 1]).max() * 48 <= 30


def test_box_matches_the_ink(digits):
    n, size = 400, 64
    d = make_canvases(*digits, n=n, canvas_size=size, clutter=False, seed=2)
    checked = 0
    for i in range(n):
        ref = ink_bbox(d["images"][i, 0])
        if d["present"][i] == 0:
            assert ref is None  # nothing but the digit is drawn without clutter
            continue
        np.testing.assert_allclose(d["boxes"][i] * size, ref, atol=1e-4)
        checked += 1
    assert checked > 300


def test_clutter_never_moves_or_hides_the_digit(digits):
    plain = make_canvases(*digits, n=200, clutter=False, seed=3)
    cluttered = make_canvases(*digits, n=200, clutter=6, seed=3)
    for key in ("present", "labels", "boxes"):
        np.testing.assert_array_equal(plain[key], cluttered[key])
    assert np.all(cluttered["images"] >= plain["images"])  # pasted with max()
    assert cluttered["images"].sum() > plain["images"].sum() * 1.05
    # empty canvases do get clutter, so "any ink" does not mean "a digit"
    empty = plain["present"] == 0
    assert empty.any() and (cluttered["images"][empty].reshape(empty.sum(), -1).max(axis=1) > 0).mean() > 0.5


def test_labels_follow_their_digit():
    # digit k is a filled block of intensity 100 + 15 k: resampling a constant keeps the
    # constant inside, so the canvas's brightest pixel names the class that was pasted.
    images = np.zeros((10, 28, 28), np.uint8)
    for k in range(10):
        images[k, 6:22, 8:20] = 100 + 15 * k
    d = make_canvases(images, np.arange(10), n=300, clutter=False, empty_prob=0.2, seed=4)
    p = d["present"] == 1
    brightest = np.rint(d["images"][p].reshape(p.sum(), -1).max(axis=1) * 255)
    np.testing.assert_array_equal(brightest, 100 + 15 * d["labels"][p])
    assert 0.1 < 1 - p.mean() < 0.3


def test_deterministic_by_seed(digits):
    a = make_canvases(*digits, n=100, noise=0.05, seed=11)
    b = make_canvases(*digits, n=100, noise=0.05, seed=11)
    c = make_canvases(*digits, n=100, noise=0.05, seed=12)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images"], c["images"])
    assert not np.array_equal(a["boxes"], c["boxes"])


def test_noise_and_empty_prob_extremes(digits):
    clean = make_canvases(*digits, n=50, clutter=False, seed=5)
    noisy = make_canvases(*digits, n=50, clutter=False, noise=0.1, seed=5)
    np.testing.assert_array_equal(clean["boxes"], noisy["boxes"])
    assert noisy["images"].min() >= 0 and noisy["images"].max() <= 1
    assert 0.05 < np.std(noisy["images"] - clean["images"]) < 0.1
    none = make_canvases(*digits, n=20, empty_prob=1.0, seed=6)
    assert none["present"].sum() == 0 and np.all(none["labels"] == -1) and np.all(none["boxes"] == 0)
    full = make_canvases(*digits, n=20, empty_prob=0.0, seed=6)
    assert full["present"].sum() == 20


def test_thousands_of_canvases_per_second(digits):
    make_canvases(*digits, n=100, seed=0)  # warm-up
    start = time.perf_counter()
    make_canvases(*digits, n=5000, seed=0)
    elapsed = time.perf_counter() - start
    # measured ~0.1 s here on a shared 2-core machine; the bound leaves room for load
    assert elapsed < 5.0, f"5000 canvases took {elapsed:.2f} s"


def test_resample_matrix():
    r = resample_matrix(28, 14)
    assert r.shape == (14, 28)
    np.testing.assert_allclose(r.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(resample_matrix(28, 28), np.eye(28), atol=1e-7)
    up = resample_matrix(28, 40)
    const = np.full((28, 28), 7.0, np.float32)
    np.testing.assert_allclose(up @ const @ up.T, 7.0, rtol=1e-5)
    # downscale by 2 averages around each output centre (antialiased), not picks every other
    # pixel; at the two edges the filter is truncated and renormalized
    ramp = np.arange(28, dtype=np.float32)
    np.testing.assert_allclose((r @ ramp)[1:-1], np.arange(1, 13) * 2 + 0.5, atol=1e-4)
    assert np.count_nonzero(r[5]) == 4  # support of 2 input pixels each side


def test_save_load_roundtrip(tmp_path, digits):
    d = make_canvases(*digits, n=30, seed=7)
    path = save_canvases(tmp_path / "sub" / "canvases", d)
    assert path.name == "canvases.npz"
    assert [p.name for p in path.parent.iterdir()] == ["canvases.npz"]  # no temp file left
    back = load_canvases(path)
    for key in d:
        np.testing.assert_array_equal(back[key], d[key])
        assert back[key].dtype == d[key].dtype
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable canvas .npz"):
        load_canvases(path)
    np.savez(tmp_path / "partial.npz", images=d["images"], present=d["present"])
    with pytest.raises(ValueError, match=r"missing keys \['labels', 'boxes'\]"):
        load_canvases(tmp_path / "partial.npz")
    with pytest.raises(ValueError, match=r"boxes must have shape \(30, 4\)"):
        save_canvases(tmp_path / "bad.npz", {**d, "boxes": d["boxes"][:5]})
    with pytest.raises(FileNotFoundError):
        load_canvases(tmp_path / "missing.npz")


@pytest.mark.skipif(not HAVE_DATA, reason="real MNIST not found: set PYCNN_DATA (e.g. ../shared/data/mnist)")
def test_load_localization_caches(tmp_path, monkeypatch):
    a = loc.load_localization("test", n=64, seed=9, cache_dir=tmp_path, root=DATA_DIR, canvas_size=48,
                              scale_range=(14, 28))
    assert a["images"].shape == (64, 1, 48, 48)
    assert len(list(tmp_path.glob("test-n64-*.npz"))) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached canvases should have been used")

    monkeypatch.setattr(loc, "make_canvases", no_generation)
    b = loc.load_localization("test", n=64, seed=9, cache_dir=tmp_path, root=DATA_DIR, canvas_size=48,
                              scale_range=(14, 28))
    np.testing.assert_array_equal(a["images"], b["images"])
    with pytest.raises(AssertionError, match="cached"):  # another seed is another file
        loc.load_localization("test", n=64, seed=10, cache_dir=tmp_path, root=DATA_DIR, canvas_size=48,
                              scale_range=(14, 28))
    monkeypatch.undo()
    cached = next(tmp_path.glob("test-n64-*.npz"))
    cached.write_bytes(b"not a zip file")  # a damaged cache is regenerated, not an error
    c = loc.load_localization("test", n=64, seed=9, cache_dir=tmp_path, root=DATA_DIR, canvas_size=48,
                              scale_range=(14, 28))
    np.testing.assert_array_equal(a["boxes"], c["boxes"])
    np.testing.assert_array_equal(load_canvases(cached)["images"], a["images"])


def test_bad_input(digits):
    x, y = digits
    with pytest.raises(ValueError, match="canvas 32x32 is smaller than the largest digit size 40"):
        make_canvases(x, y, n=10, canvas_size=32)
    with pytest.raises(ValueError, match=r"1 <= min <= max, got \(30, 20\)"):
        make_canvases(x, y, n=10, scale_range=(30, 20))
    with pytest.raises(ValueError, match=r"1 <= min <= max, got \(0, 20\)"):
        make_canvases(x, y, n=10, scale_range=(0, 20))
    with pytest.raises(ValueError, match="scale_range must be two integers"):
        make_canvases(x, y, n=10, scale_range=14)
    for bad_n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            make_canvases(x, y, n=bad_n)
    with pytest.raises(TypeError, match="must be uint8"):
        make_canvases(x.astype(np.float32), y, n=10)
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        make_canvases(x, y[:-1], n=10)
    with pytest.raises(ValueError, match=r"images must have shape \(N, h, w\) with N >= 1"):
        make_canvases(x[:0], y[:0], n=10)
    with pytest.raises(ValueError, match="empty_prob must be in"):
        make_canvases(x, y, n=10, empty_prob=1.5)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        make_canvases(x, y, n=10, noise=-0.1)
    with pytest.raises(ValueError, match=r"make_canvases: seed -1 is not a seed NumPy takes"):
        make_canvases(x, y, n=10, seed=-1)
    blank = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"digit \d has no pixel above INK_THRESHOLD"):
        make_canvases(blank, np.arange(3), n=5, empty_prob=0.0)
