"""MNIST loading (lookup, integrity, download fallback), normalization and the batch iterators."""
import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pycnn.data import (
    DataLoader,
    MnistIntegrityError,
    MnistNotFoundError,
    WeightedSampler,
    balanced_class_weights,
    balanced_sample_weights,
    iterate_batches,
    load_mnist,
    normalize,
)
from pycnn.data import mnist as mnist_mod

DATA_DIR = os.environ.get("PYCNN_DATA")
HAVE_DATA = bool(DATA_DIR) and (Path(DATA_DIR) / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="real MNIST not found: set PYCNN_DATA to the directory holding the IDX files "
                          "(e.g. ../shared/data/mnist)"
)

TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No PYCNN_DATA, an empty HOME (so an empty cache) and a download that always fails."""
    monkeypatch.delenv("PYCNN_DATA", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    calls = []

    def offline(url, dest, progress):
        calls.append(url)
        raise OSError(f"network unreachable (test) for {url}")

    monkeypatch.setattr(mnist_mod, "_download_file", offline)
    return calls


def _raw_bytes(name):
    with gzip.open(Path(DATA_DIR) / (name + ".gz"), "rb") as f:
        return f.read()


def _copy_test_split(dst: Path, compress: bool):
    dst.mkdir(parents=True, exist_ok=True)
    for name in TEST_FILES:
        if compress:
            shutil.copy(Path(DATA_DIR) / (name + ".gz"), dst / (name + ".gz"))
        else:
            (dst / name).write_bytes(_raw_bytes(name))


@needs_data
def test_full_mnist_loads_with_checksums():
    x, y = load_mnist("train", download=False)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    # canonical first labels and class histogram of the training set
    assert y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    xt, yt = load_mnist("test", download=False)
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert yt[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert x.flags.writeable and xt.flags.writeable
    # the md5 sums in the module are the ones of the README beside the data
    readme = (Path(DATA_DIR) / "README.md").read_text()
    for name, digest in mnist_mod.MD5.items():
        assert digest in readme and name in readme


@needs_data
@pytest.mark.parametrize("compress", [True, False])
def test_raw_and_gz_both_load(tmp_path, isolated, compress):
    _copy_test_split(tmp_path / "d", compress)
    x, y = load_mnist("test", root=tmp_path / "d")
    ref_x, ref_y = load_mnist("test", root=DATA_DIR)
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)
    assert isolated == []  # nothing was downloaded


@needs_data
def test_lookup_order_root_env_cache(tmp_path, isolated, monkeypatch):
    # Only the cache holds the files: found there.
    cache = Path(os.environ["HOME"]) / ".cache" / "pycnn" / "mnist"
    _copy_test_split(cache, compress=True)
    x, _ = load_mnist("test")
    assert x.shape == (10000, 28, 28)
    # $PYCNN_DATA is searched before the cache: a corrupt copy there is reported (not skipped).
    env_dir = tmp_path / "env"
    _copy_test_split(env_dir, compress=False)
    raw = bytearray((env_dir / TEST_FILES[0]).read_bytes())
    raw[1000] ^= 0xFF
    (env_dir / TEST_FILES[0]).write_bytes(bytes(raw))
    monkeypatch.setenv("PYCNN_DATA", str(env_dir))
    with pytest.raises(MnistIntegrityError, match=str(env_dir)):
        load_mnist("test")
    # An explicit root comes first of all.
    root = tmp_path / "root"
    _copy_test_split(root, compress=True)
    assert load_mnist("test", root=root)[0].shape == (10000, 28, 28)


@needs_data
@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file_is_an_error(tmp_path, isolated, compress):
    d = tmp_path / "d"
    _copy_test_split(d, compress=False)
    raw = _raw_bytes(TEST_FILES[0])
    cut = raw[: len(raw) - 28 * 28 * 3]  # three images short
    if compress:
        (d / TEST_FILES[0]).unlink()
        (d / (TEST_FILES[0] + ".gz")).write_bytes(gzip.compress(cut))
    else:
        (d / TEST_FILES[0]).write_bytes(cut)
    with pytest.raises(MnistIntegrityError) as info:
        load_mnist("test", root=d)
    msg = str(info.value)
    assert TEST_FILES[0] in msg and "truncated" in msg
    assert str(16 + 10000 * 784) in msg and str(len(cut)) in msg  # expected and found


@needs_data
def test_truncated_gzip_stream_is_an_error(tmp_path, isolated):
    d = tmp_path / "d"
    _copy_test_split(d, compress=True)
    gz = d / (TEST_FILES[1] + ".gz")
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(MnistIntegrityError, match="damaged gzip") as info:
        load_mnist("test", root=d)
    assert str(gz) in str(info.value)


@needs_data
def test_byte_flipped_file_is_an_error(tmp_path, isolated):
    d = tmp_path / "d"
    _copy_test_split(d, compress=False)
    path = d / TEST_FILES[0]
    raw = bytearray(path.read_bytes())
    raw[5000] ^= 0x01  # one bit in the pixel data: header still valid, md5 not
    path.write_bytes(bytes(raw))
    found = hashlib.md5(bytes(raw)).hexdigest()
    with pytest.raises(MnistIntegrityError) as info:
        load_mnist("test", root=d)
    msg = str(info.value)
    assert str(path) in msg and mnist_mod.MD5[TEST_FILES[0]] in msg and found in msg


@needs_data
def test_wrong_magic_and_count_are_errors(tmp_path, isolated):
    d = tmp_path / "d"
    _copy_test_split(d, compress=False)
    labels = d / TEST_FILES[1]
    good = labels.read_bytes()
    labels.write_bytes((2051).to_bytes(4, "big") + good[4:])
    with pytest.raises(MnistIntegrityError, match="expected magic number 2049, found 2051"):
        load_mnist("test", root=d)
    labels.write_bytes(good[:4] + (9999).to_bytes(4, "big") + good[8:])
    with pytest.raises(MnistIntegrityError, match="expected 10000 items, header says 9999"):
        load_mnist("test", root=d)


def test_missing_files_offline_says_where_to_put_them(tmp_path, isolated):
    root = tmp_path / "nothing-here"
    root.mkdir()  # (an empty one: a root that does not exist is an error of its own)
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist("test", root=root, progress=False)
    msg = str(info.value)
    assert str(root) in msg
    assert str(Path(os.environ["HOME"]) / ".cache" / "pycnn" / "mnist") in msg
    assert "PYCNN_DATA" in msg and "t10k-images-idx3-ubyte.gz" in msg
    assert "network unreachable" in msg
    assert len(isolated) == len(mnist_mod.MIRRORS)  # every mirror was tried
    # nothing half-written was left in the cache
    cache = Path(os.environ["HOME"]) / ".cache" / "pycnn" / "mnist"
    assert list(cache.glob("*")) == []
    with pytest.raises(MnistNotFoundError, match="download=False"):
        load_mnist("test", root=root, download=False)


@needs_data
def test_download_path_verifies_and_renames(tmp_path, isolated, monkeypatch):
    """The download path with a fake mirror: a bad copy is rejected, the next mirror's is kept."""
    served = []

    def fake_download(url, dest, progress):
        served.append(url)
        name = url.rsplit("/", 1)[-1]
        src = Path(DATA_DIR) / name
        data = src.read_bytes()
        if url.startswith(mnist_mod.MIRRORS[0]):
            data = data[:-100]  # the first mirror serves a truncated file
        Path(dest).write_bytes(data)

    monkeypatch.setattr(mnist_mod, "_download_file", fake_download)
    x, y = load_mnist("test", progress=False)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    cache = Path(os.environ["HOME"]) / ".cache" / "pycnn" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)
    assert len(served) == 4  # two files, each rejected from mirror 0 and taken from mirror 1


@needs_data
def test_real_download_function_over_file_urls(tmp_path, monkeypatch, capsys):
    """The real streaming download (urllib + tqdm bar), pointed at file:// URLs instead of the web."""
    monkeypatch.delenv("PYCNN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist_mod, "MIRRORS", (Path(DATA_DIR).resolve().as_uri() + "/",))
    x, y = load_mnist("test", progress=True)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    cache = tmp_path / "home" / ".cache" / "pycnn" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)
    assert "download t10k-images-idx3-ubyte.gz" in capsys.readouterr().err  # the progress bar


def test_bad_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_mnist("val")


def test_normalize_values_and_shape():
    imgs = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = normalize(imgs)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    expected = (imgs[:, None].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    out64 = normalize(imgs[:, None], mean=0.5, std=0.5, dtype=np.float64)
    np.testing.assert_allclose(out64, imgs[:, None] / 127.5 - 1.0)
    with pytest.raises(ValueError, match=r"normalize: expected images of shape \(N, H, W\)"):
        normalize(np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(TypeError, match="floating dtype"):
        normalize(imgs, dtype=np.int32)
    with pytest.raises(ValueError, match="std must be > 0"):
        normalize(imgs, std=0.0)


# ---------------------------------------------------------------- batches

def _seen(batches):
    return np.concatenate([yb for _, yb in batches])


def test_iterate_batches_covers_every_sample_once():
    x = np.arange(103 * 2).reshape(103, 2)
    y = np.arange(103)
    for shuffle in (False, True):
        batches = list(iterate_batches(x, y, 10, shuffle=shuffle, seed=3))
        assert [len(yb) for _, yb in batches] == [10] * 10 + [3]
        seen = _seen(batches)
        assert sorted(seen.tolist()) == list(range(103))
        for xb, yb in batches:  # x and y rows stay paired
            np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    ordered = _seen(iterate_batches(x, y, 10, shuffle=False))
    np.testing.assert_array_equal(ordered, y)


@given(n=st.integers(1, 70), batch_size=st.integers(1, 80), shuffle=st.booleans(),
       drop_last=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_iterate_batches_partition_property(n, batch_size, shuffle, drop_last, seed):
    x = np.arange(n) * 10
    y = np.arange(n)
    batches = list(iterate_batches(x, y, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last))
    sizes = [len(yb) for _, yb in batches]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    seen = np.concatenate([yb for _, yb in batches]) if batches else np.zeros(0, int)
    assert len(set(seen.tolist())) == seen.size  # no sample twice in an epoch
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, yb * 10)


def test_iterate_batches_seeded_and_drop_last():
    x = np.random.default_rng(0).normal(size=(50, 1, 3, 3))
    y = np.arange(50)
    a = _seen(iterate_batches(x, y, 8, seed=7))
    b = _seen(iterate_batches(x, y, 8, seed=7))
    c = _seen(iterate_batches(x, y, 8, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, np.random.default_rng(7).permutation(50))
    dropped = list(iterate_batches(x, y, 8, seed=7, drop_last=True))
    assert [len(yb) for _, yb in dropped] == [8] * 6
    np.testing.assert_array_equal(_seen(dropped), a[:48])
    assert list(iterate_batches(x, y, 50, drop_last=True))[0][0].shape == (50, 1, 3, 3)
    assert len(list(iterate_batches(x, y, 51, drop_last=True))) == 0


def test_iterate_batches_structured_targets():
    x = np.arange(12)
    y = {"present": np.arange(12) % 2, "boxes": np.arange(48).reshape(12, 4)}
    for xb, yb in iterate_batches(x, y, 5, seed=1):
        np.testing.assert_array_equal(yb["present"], xb % 2)
        np.testing.assert_array_equal(yb["boxes"][:, 0], 4 * xb)
    for xb, (a, b) in iterate_batches(x, (x * 2, x * 3), 4):
        np.testing.assert_array_equal(a, 2 * xb)
        np.testing.assert_array_equal(b, 3 * xb)


def test_iterate_batches_errors():
    x, y = np.zeros((4, 2)), np.zeros(4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            iterate_batches(x, y, bad)
    with pytest.raises(ValueError, match=r"len\(x\) and len\(y\) must match, got 4 and 3"):
        iterate_batches(x, np.zeros(3), 2)
    with pytest.raises(ValueError, match=r"len\(y\[boxes\]\)"):
        iterate_batches(x, {"boxes": np.zeros((5, 4))}, 2)
    with pytest.raises(ValueError, match="empty"):
        iterate_batches(np.zeros((0, 2)), np.zeros(0), 2)


def test_dataloader_reshuffles_each_epoch_reproducibly():
    x = np.arange(40)
    y = np.arange(40)
    dl = DataLoader(x, y, batch_size=16, seed=5)
    assert len(dl) == 3
    e0, e1 = _seen(dl), _seen(dl)
    assert sorted(e0.tolist()) == list(range(40)) and sorted(e1.tolist()) == list(range(40))
    assert not np.array_equal(e0, e1)
    dl2 = DataLoader(x, y, batch_size=16, seed=5)
    np.testing.assert_array_equal(_seen(dl2), e0)
    dl2.set_epoch(1)
    np.testing.assert_array_equal(_seen(dl2), e1)
    dl3 = DataLoader(x, y, batch_size=16, shuffle=False, drop_last=True)
    assert len(dl3) == 2
    np.testing.assert_array_equal(_seen(dl3), np.arange(32))


def test_weighted_sampler_balances_classes():
    labels = np.array([0] * 900 + [1] * 100)
    w = balanced_sample_weights(labels)
    np.testing.assert_allclose(w[:2], 1 / 900)
    np.testing.assert_allclose(w[-1], 1 / 100)
    sampler = WeightedSampler(w, num_samples=4000, seed=0)
    dl = DataLoader(labels, labels, batch_size=500, sampler=sampler)
    assert len(dl) == 8
    drawn = _seen(dl)
    assert drawn.size == 4000
    frac = (drawn == 1).mean()
    assert 0.45 < frac < 0.55  # ~10% without the sampler
    np.testing.assert_array_equal(sampler.indices(3), WeightedSampler(w, 4000, seed=0).indices(3))
    assert not np.array_equal(sampler.indices(0), sampler.indices(1))
    # zero weight: never drawn; plain iteration works too
    w2 = np.array([0.0, 1.0, 1.0])
    assert 0 not in list(WeightedSampler(w2, 100, seed=1))


def test_balanced_class_weights():
    labels = np.array([0] * 6 + [1] * 3 + [3] * 3)  # class 2 never occurs
    w = balanced_class_weights(labels)
    # N / (C * count): 12 / (4 * 6), 12 / (4 * 3), 0 for the absent class, 12 / (4 * 3)
    np.testing.assert_allclose(w, [0.5, 1.0, 0.0, 1.0])
    assert w.dtype == np.float32
    np.testing.assert_allclose(balanced_class_weights(np.arange(10).repeat(7)), np.ones(10))
    assert balanced_class_weights([0, 1], num_classes=4).shape == (4,)
    with pytest.raises(ValueError, match=r"balanced_class_weights: labels must be < num_classes=2, got 2"):
        balanced_class_weights([0, 2], num_classes=2)
    with pytest.raises(ValueError, match="must be integers"):
        balanced_class_weights([0.0, 1.0])


def test_weighted_sampler_and_loader_errors():
    with pytest.raises(ValueError, match="finite and >= 0, got -1.0 at index 1"):
        WeightedSampler([1.0, -1.0])
    with pytest.raises(ValueError, match="not all be zero"):
        WeightedSampler([0.0, 0.0])
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        WeightedSampler([1.0], num_samples=0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        WeightedSampler(np.ones((2, 2)))
    with pytest.raises(ValueError, match="mutually exclusive"):
        DataLoader(np.zeros(3), np.zeros(3), 2, shuffle=True, sampler=WeightedSampler([1, 1, 1]))
    dl = DataLoader(np.zeros(3), np.zeros(3), 2, sampler=WeightedSampler(np.ones(5), seed=0))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        list(dl)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        balanced_sample_weights([0, -1])


def test_a_root_that_is_not_a_directory_is_an_error(tmp_path, monkeypatch):
    """An explicit root (the CLI's --data-dir) that does not exist is a typo: an error naming it,
    never a silent fall back to $PYCNN_DATA's or the cache's copy."""
    monkeypatch.setenv("PYCNN_DATA", str(DATA_DIR))
    with pytest.raises(MnistNotFoundError, match=r"load_mnist: root '.*no-such' is not a directory"):
        load_mnist("test", root=tmp_path / "no-such", download=False)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(MnistNotFoundError, match="is not a directory"):
        load_mnist("test", root=tmp_path / "a-file", download=False)


def test_a_pycnn_data_that_is_not_a_directory_is_an_error(tmp_path, monkeypatch):
    """A typo in $PYCNN_DATA fell through to the cache or a download of another copy, without a
    word; with an explicit root the variable is not needed, and not checked."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PYCNN_DATA", str(tmp_path / "mnsit"))
    with pytest.raises(MnistNotFoundError, match=r"load_mnist: PYCNN_DATA='.*mnsit' is not a directory"):
        load_mnist("test", download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MnistNotFoundError, match="MNIST test split not found"):  # (the usual search)
        load_mnist("test", root=tmp_path / "empty", download=False)


def test_an_explicit_root_is_the_only_place_looked_at(tmp_path, isolated, monkeypatch):
    """A root (--data-dir) without the files fell back to $PYCNN_DATA's or the cache's copy without a
    word (the run still recorded the root as its data_dir): now only the root is looked at, the
    download goes there, and when that fails the error names it and the files expected in it."""
    full = tmp_path / "full"  # (a directory with the test split, which the root search must not take)
    full.mkdir()
    for name in TEST_FILES:
        (full / name).write_bytes(b"never read")
    monkeypatch.setenv("PYCNN_DATA", str(full))
    cache = Path(os.environ["HOME"]) / ".cache" / "pycnn" / "mnist"
    shutil.copytree(full, cache)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist("test", root=root, download=False)
    msg = str(info.value)
    assert f"MNIST test split not found in {root} (the `root` argument / --data-dir)" in msg
    assert "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz" in msg and "download=False" in msg
    with pytest.raises(MnistNotFoundError) as info:
        load_mnist("test", root=root, progress=False)
    assert f"Downloading into {root} failed" in str(info.value) and "network unreachable" in str(info.value)
    assert len(isolated) == len(mnist_mod.MIRRORS)  # (the images file, from every mirror)
    assert list(root.iterdir()) == []  # nothing half-written


@needs_data
def test_a_split_missing_from_the_root_is_downloaded_into_it(tmp_path, isolated, monkeypatch):
    """As torchvision's root: the missing files go into the directory given, not into the cache."""
    served = []

    def fake_download(url, dest, progress):
        served.append(url.rsplit("/", 1)[-1])
        Path(dest).write_bytes((Path(DATA_DIR) / url.rsplit("/", 1)[-1]).read_bytes())

    monkeypatch.setattr(mnist_mod, "_download_file", fake_download)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(Path(DATA_DIR) / (TEST_FILES[0] + ".gz"), root)  # the images are there already
    x, y = load_mnist("test", root=root, progress=False)
    assert x.shape == (10000, 28, 28) and y[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert served == [TEST_FILES[1] + ".gz"]  # only what was missing
    assert sorted(p.name for p in root.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)
    assert not (Path(os.environ["HOME"]) / ".cache").exists()
    load_mnist("test", root=root, progress=False)
    assert len(served) == 1  # read from the root the second time
