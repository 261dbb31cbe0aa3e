"""Robustness of the data pipeline and its files: damaged or cut-short MNIST downloads, checkpoints
whose header was damaged, writes that fail midway, canvases and augmentations at their limits, and
arguments that were truncated or failed late with a message that named nothing."""
import gzip
import hashlib
import http.server
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import pycnn.fileio as fileio_module
from pycnn import checkpoint as ck
from pycnn.checkpoint import CheckpointError, load_checkpoint, load_model, read_training_state, save_checkpoint
from pycnn.data import DataLoader, WeightedSampler, iterate_batches, load_mnist
from pycnn.data import localization as loc
from pycnn.data import mnist as mnist_mod
from pycnn.data.augment import Augment
from pycnn.data.localization import INK_THRESHOLD, load_canvases, make_canvases, save_canvases
from synthetic_data import synthetic_digits

DATA_DIR = os.environ.get("PYCNN_DATA")
HAVE_DATA = bool(DATA_DIR) and (Path(DATA_DIR) / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="real MNIST not found: set PYCNN_DATA (e.g. ../shared/data/mnist)")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $PYCNN_DATA and an empty HOME (so an empty cache)."""
    monkeypatch.delenv("PYCNN_DATA", raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# ----------------------------------------------------------------------------- MNIST downloads

class _Mirror(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (name -> bytes) under /good/, cut short under /chunked/ (a chunked response
    whose last chunk never ends) and /short/ (fewer bytes than its Content-Length)."""
    protocol_version = "HTTP/1.1"
    files: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        kind, name = self.path.strip("/").split("/", 1)
        data = self.files[name]
        self.send_response(200)
        if kind == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = data[: len(data) // 2]
            self.wfile.write(b"%x\r\n" % len(half) + half + b"\r\n" + b"%x\r\n" % (1 << 20) + b"cut")
        elif kind == "short":
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
        else:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def mirror():
    """A local HTTP server; yields a function that sets the files it serves and returns its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(files):
        _Mirror.files = files
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    server.shutdown()
    server.server_close()


def _fake_idx(name: str) -> bytes:
    """An IDX file of the right kind, size and count, but all zeros (so its md5 is wrong)."""
    if "images" in name:
        return (2051).to_bytes(4, "big") + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(10000 * 784)
    return (2049).to_bytes(4, "big") + (10000).to_bytes(4, "big") + bytes(10000)


@needs_data
def test_a_chunked_download_cut_short_tries_the_next_mirror(tmp_path, no_env, mirror, monkeypatch):
    """http.client's IncompleteRead is no OSError: it escaped the download loop, the next mirror was
    never tried, and load_mnist raised it raw instead of MnistNotFoundError."""
    base = mirror({n + ".gz": (Path(DATA_DIR) / (n + ".gz")).read_bytes() for n in TEST_FILES})
    monkeypatch.setattr(mnist_mod, "MIRRORS", (f"{base}/chunked/", f"{base}/good/"))
    root = tmp_path / "root"
    root.mkdir()
    x, y = load_mnist("test", root=root, progress=False)
    assert x.shape == (10000, 28, 28) and y[:4].tolist() == [7, 2, 1, 0]
    assert sorted(p.name for p in root.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)  # no partial file


def test_every_mirror_cut_short_is_a_not_found_error_naming_the_urls(tmp_path, no_env, mirror, monkeypatch):
    base = mirror({n + ".gz": gzip.compress(_fake_idx(n)) for n in TEST_FILES})
    monkeypatch.setattr(mnist_mod, "MIRRORS", (f"{base}/chunked/", f"{base}/short/"))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(mnist_mod.MnistNotFoundError) as info:
        load_mnist("test", root=root, progress=False)
    msg = str(info.value)
    assert f"{base}/chunked/t10k-images-idx3-ubyte.gz: IncompleteRead" in msg
    # urllib hands back a short read without a word: the download says how much of what arrived
    total = len(gzip.compress(_fake_idx(TEST_FILES[0])))
    assert f"{base}/short/t10k-images-idx3-ubyte.gz: OSError: the download ended after {total // 2} of the " \
           f"{total} bytes the server announced" in msg
    assert ".part" not in msg  # (the temp file, gone by then, was named, with "delete it")
    assert list(root.iterdir()) == []


def test_a_downloaded_file_with_the_wrong_md5_names_the_url_and_both_sums(tmp_path, no_env, monkeypatch):
    """A download that fails verification named its temp file (already removed) and told the user
    to delete it; now it names the URL, the expected and the found md5, and nothing is kept."""
    def fake_download(url, dest, progress):
        Path(dest).write_bytes(gzip.compress(_fake_idx(url.rsplit("/", 1)[-1][:-3])))

    monkeypatch.setattr(mnist_mod, "_download_file", fake_download)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(mnist_mod.MnistNotFoundError) as info:
        load_mnist("test", root=root, progress=False)
    msg = str(info.value)
    found = hashlib.md5(_fake_idx(TEST_FILES[0])).hexdigest()
    for url in (m + TEST_FILES[0] + ".gz" for m in mnist_mod.MIRRORS):
        assert (f"{url}: the file downloaded is not a good copy: MNIST file {url} is corrupt: md5 of the "
                f"decompressed bytes expected {mnist_mod.MD5[TEST_FILES[0]]}, found {found}") in msg
    assert ".part" not in msg and "delete it" not in msg
    assert list(root.iterdir()) == []


@needs_data
def test_concurrent_downloads_into_one_directory(tmp_path, no_env, monkeypatch):
    """Two loaders downloading into the same empty cache at once: both get the data, and the
    directory ends up with the two files and no temp file."""
    barrier = threading.Barrier(2)

    def fake_download(url, dest, progress):
        data = (Path(DATA_DIR) / url.rsplit("/", 1)[-1]).read_bytes()
        Path(dest).write_bytes(data[: len(data) // 2])
        barrier.wait(timeout=20)  # both are halfway through the same file
        with open(dest, "ab") as f:
            f.write(data[len(data) // 2:])

    monkeypatch.setattr(mnist_mod, "_download_file", fake_download)
    results, errors = [], []

    def run():
        try:
            results.append(load_mnist("test", progress=False))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 2
    np.testing.assert_array_equal(results[0][0], results[1][0])
    cache = Path(os.environ["HOME"]) / ".cache" / "pycnn" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)


def test_damaged_local_files_name_the_file_and_what_was_expected(tmp_path, no_env):
    """(Cases the existing tests leave out: a .gz that is an HTML page, a wrong image size, a file
    too long; none is downloaded again or skipped, each is an error naming the file.)"""
    root = tmp_path / "root"
    root.mkdir()
    images, labels = root / (TEST_FILES[0] + ".gz"), root / (TEST_FILES[1] + ".gz")
    labels.write_bytes(gzip.compress(_fake_idx(TEST_FILES[1])))
    cases = [
        (b"<html>404 Not Found</html>", "is not an IDX images file: expected magic number 2051, found"),
        (gzip.compress(_fake_idx(TEST_FILES[0])[:8] + (32).to_bytes(4, "big") + _fake_idx(TEST_FILES[0])[12:]),
         "expected 28x28 images, header says 32x28"),
        (gzip.compress(_fake_idx(TEST_FILES[0]) + b"\0"), "is too long: expected 7840016 bytes after decompression"),
        (gzip.compress(_fake_idx(TEST_FILES[0]))[:-3], "is a damaged gzip file"),
        (gzip.compress(_fake_idx(TEST_FILES[0])), f"md5 of the decompressed bytes expected {mnist_mod.MD5[TEST_FILES[0]]}"),
    ]
    for data, message in cases:
        images.write_bytes(data)
        with pytest.raises(mnist_mod.MnistIntegrityError, match=message) as info:
            load_mnist("test", root=root, progress=False)
        assert str(images) in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == sorted(n + ".gz" for n in TEST_FILES)


# ----------------------------------------------------------------------------- atomic writes

def test_a_filesystem_that_refuses_chmod_still_gets_the_file(tmp_path, monkeypatch):
    """Replacing a file copies its mode onto the temp file; where the filesystem refuses chmod
    (vfat, some network mounts) the write stopped with EPERM and left the temp file behind,
    although a plain open() writes there."""
    from pycnn.models import LeNet5

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def refuse(fd, mode):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fileio_module.os, "fchmod", refuse)
    save_checkpoint(LeNet5(), path, {"model": "lenet5"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert load_checkpoint(path)[1] == {"model": "lenet5"}


class _HalfWriter(io.FileIO):
    """A file whose write stores half of the bytes, then fails as a full disk does."""

    def write(self, data):
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("what", ["checkpoint", "training state"])
def test_a_checkpoint_write_failing_midway_keeps_the_old_file(tmp_path, monkeypatch, what):
    from pycnn.models import LeNet5
    from pycnn.optim import SGD

    path = tmp_path / "model.safetensors"
    model = LeNet5()
    save_checkpoint(model, path, {"model": "lenet5"})
    old = path.read_bytes()
    monkeypatch.setattr(fileio_module.os, "fdopen", lambda fd, *a, **k: _HalfWriter(fd, "wb"))
    with pytest.raises(OSError, match=rf"No space left on device: '{path}'$"):
        if what == "checkpoint":
            save_checkpoint(model, path, {"model": "lenet5", "epoch": 2})
        else:
            ck.save_training_state(path, model, SGD(model.parameters(), lr=0.1), {"epoch": 2})
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# ----------------------------------------------------------------------------- checkpoints

def _tensors():
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(3, dtype=np.int64)}


def _damage_header(path, old: bytes, new: bytes):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n]
    assert old in header and len(old) == len(new)
    path.write_bytes(data[:8] + header.replace(old, new) + data[8 + n:])


@pytest.mark.parametrize("old, new", [(b'"shape":[3,4]', b'"shape":[4,3]'),  # still covers the bytes
                                      (b'"dtype":"F32"', b'"dtype":"I32"'),   # the floats read as ints
                                      (b'"model":"x"', b'"model":"y"')])      # metadata
def test_damage_to_the_header_is_found(tmp_path, old, new):
    """The checksum covered the tensor bytes only: a header damaged into another valid header (a
    swapped shape, another dtype of the same size, a changed metadata value) loaded without a word."""
    path = tmp_path / "c.safetensors"
    path.write_bytes(ck.safetensors_bytes(_tensors(), {"model": "x"}))
    state, meta = load_checkpoint(path)
    assert meta == {"model": "x"} and state["w"].shape == (3, 4)  # (both checksums are left out)
    _damage_header(path, old, new)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt: its header \(tensor names, dtypes, "
                                              r"shapes or metadata\) does not match the checksum"):
        load_checkpoint(path)


def test_a_training_states_damaged_epoch_is_found(tmp_path):
    from pycnn.models import LeNet5
    from pycnn.optim import SGD

    model = LeNet5()
    path = ck.save_training_state(tmp_path / "state.safetensors", model, SGD(model.parameters(), lr=0.1),
                                  {"epoch": 3})
    assert read_training_state(path)[1]["epoch"] == 3
    _damage_header(path, b'"epoch":"3"', b'"epoch":"7"')
    with pytest.raises(CheckpointError, match="its header .* does not match the checksum"):
        read_training_state(path)


def test_a_checkpoint_without_the_header_checksum_still_loads(tmp_path):
    """Files written before the header checksum (or by safetensors itself) load as before."""
    from safetensors.numpy import save

    path = tmp_path / "plain.safetensors"
    path.write_bytes(save(_tensors(), metadata={"model": "x"}))
    state, meta = load_checkpoint(path)
    assert meta == {"model": "x"} and state["w"].shape == (3, 4)
    data = ck.safetensors_bytes(_tensors(), {"model": "x"})  # strip the new entry: the older format
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    del header["__metadata__"][ck.HEADER_CHECKSUM_KEY]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    assert load_checkpoint(path)[1] == {"model": "x"}


@pytest.mark.parametrize("cut", [0, 7, 8, 40, -1])
def test_truncated_or_foreign_checkpoints_name_the_file(tmp_path, cut):
    path = tmp_path / "c.safetensors"
    data = ck.safetensors_bytes(_tensors(), {"model": "x"})
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt or not a safetensors file "
                                              rf"\({len(data[:cut])} bytes\)"):
        load_checkpoint(path)


def test_metadata_that_no_reader_accepts_is_refused_when_writing(tmp_path):
    """A non-string metadata value, or a tensor named __metadata__, was written, and the file was
    then refused on loading ("invalid type: integer `3`, expected a string")."""
    with pytest.raises(TypeError, match=r"safetensors metadata must map strings to strings, got 'epoch': 3 \(int\)"):
        ck.safetensors_bytes(_tensors(), {"epoch": 3})
    with pytest.raises(ValueError, match="a tensor may not be named '__metadata__'"):
        ck.safetensors_bytes({"__metadata__": np.zeros(2, np.float32)})


def test_a_model_checkpoint_of_integer_tensors_is_refused(tmp_path):
    """Integer tensors for a model's float parameters were cast and loaded without a word."""
    from pycnn.models import LeNet5

    path = tmp_path / "m.safetensors"
    state = {k: v.astype(np.int64) for k, v in LeNet5().state_dict().items()}
    path.write_bytes(ck.safetensors_bytes(state, {"model": "lenet5"}))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: tensor '.*' has dtype int64, but a model's "
                                              "parameters are floating point"):
        load_model(path)
    path.write_bytes(ck.safetensors_bytes({k: v.astype(np.float64) for k, v in state.items()}, {"model": "lenet5"}))
    load_model(path)  # (another float width is fine)


# ----------------------------------------------------------------------------- localization canvases

def _digits():
    return synthetic_digits(60)


@pytest.mark.parametrize("kwargs, message", [
    (dict(canvas_size=(64.7, 64)), r"canvas_size must be an integer or a \(height, width\) pair of integers, got \(64.7, 64\)"),
    (dict(canvas_size=64.0), r"canvas_size must be an integer or a \(height, width\) pair of integers, got 64.0"),
    (dict(canvas_size="64"), r"canvas_size must be an integer or a \(height, width\) pair of integers, got '64'"),
    (dict(canvas_size=(64,)), r"canvas_size must be .* got \(64,\)"),
    (dict(canvas_size=(64, 64, 1)), r"canvas_size must be .* got \(64, 64, 1\)"),
    (dict(canvas_size=(0, 64)), r"canvas_size must be >= 1, got \(0, 64\)"),
    (dict(scale_range=(14.9, 40)), r"scale_range must be two integers \(min, max\), got \(14.9, 40\)"),
    (dict(scale_range=(14, 40.5)), r"scale_range must be two integers \(min, max\), got \(14, 40.5\)"),
    (dict(noise=float("inf")), "noise must be >= 0 and finite, got inf"),
])
def test_canvas_arguments_are_not_truncated(kwargs, message):
    """int() of each value made (64.7, 64) a 64x64 canvas and scale_range=(14.9, 40) a 14 without a
    word; 64.0 and (64,) stopped with bare unpacking errors, and "64" made a "canvas 6x4"."""
    with pytest.raises(ValueError, match="make_canvases: " + message):
        make_canvases(*_digits(), n=4, **kwargs)


def test_canvases_at_their_limits_have_boxes_on_the_ink():
    x, y = _digits()
    # the canvas exactly as large as the largest digit; a tiny one with clutter; all empty
    for kwargs in (dict(canvas_size=40, scale_range=(40, 40), clutter=False),
                   dict(canvas_size=(12, 10), scale_range=(10, 10), clutter=True),
                   dict(canvas_size=np.int64(20), scale_range=[14, 20], clutter=3)):
        d = make_canvases(x, y, n=50, empty_prob=0.0, seed=3, **kwargs)
        assert np.all(d["present"] == 1) and np.isfinite(d["images"]).all()
        assert np.all((d["boxes"] >= 0) & (d["boxes"] <= 1))
        if not kwargs["clutter"]:  # (clutter may add ink beside the digit; its box is the digit's)
            ref, _ = loc.ink_boxes(d["images"])
            np.testing.assert_array_equal(ref, d["boxes"])
    d = make_canvases(x, y, n=20, canvas_size=28, scale_range=(14, 28), empty_prob=1.0, seed=1)
    assert np.all(d["present"] == 0) and np.all(d["labels"] == -1) and np.all(d["boxes"] == 0)


def test_save_canvases_failing_midway_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """A full disk said "[Errno 28] No space left on device" without a file name; a directory in
    the way named the temp file."""
    d = make_canvases(*_digits(), n=6, canvas_size=28, scale_range=(14, 28), seed=0)
    path = save_canvases(tmp_path / "c.npz", d)
    old = path.read_bytes()

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loc.np, "savez", full_disk)
    with pytest.raises(OSError, match=rf"No space left on device: '{path}'$"):
        save_canvases(path, d)
    monkeypatch.undo()
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["c.npz"]
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=rf"Is a directory.*: '{tmp_path / 'dir.npz'}'$"):
        save_canvases(tmp_path / "dir.npz", d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "dir.npz"]


def test_canvas_files_of_the_wrong_kind_are_refused(tmp_path):
    """An object array was saved (pickled) and then refused on loading; uint8 images and 3-channel
    images loaded as if they were canvases."""
    d = make_canvases(*_digits(), n=6, canvas_size=28, scale_range=(14, 28), seed=0)
    with pytest.raises(ValueError, match="save_canvases: labels must be integer, got dtype object"):
        save_canvases(tmp_path / "o.npz", {**d, "labels": np.array([None] * 6)})
    assert list(tmp_path.iterdir()) == []
    np.savez(tmp_path / "u8.npz", **{**d, "images": (d["images"] * 255).astype(np.uint8)})
    with pytest.raises(ValueError, match=rf"load_canvases: images must be floating point, got dtype uint8 "
                                         rf"\(file {tmp_path / 'u8.npz'}\)"):
        load_canvases(tmp_path / "u8.npz")
    np.savez(tmp_path / "rgb.npz", **{**d, "images": np.repeat(d["images"], 3, axis=1)})
    with pytest.raises(ValueError, match=r"images must have shape \(n, 1, H, W\), got \(6, 3, 28, 28\)"):
        load_canvases(tmp_path / "rgb.npz")
    path = save_canvases(tmp_path / "good", {**d, "present": d["present"] > 0})  # (bool presence is fine)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: the zip's CRC finds it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is not a readable canvas .npz .*CRC"):
        load_canvases(path)


# ----------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("scale", [(1.0, float("inf")), (float("inf"), float("inf")), (1e-300, 1e-300)])
def test_an_unusable_zoom_is_refused_up_front(scale):
    """These stopped inside the warp: "high - low range exceeds valid bounds", or an IndexError of
    a NaN pixel index."""
    with pytest.raises(ValueError, match=r"Augment: scale must be finite and >= 0.001"):
        Augment(scale=scale)
    Augment(scale=(0.001, 1000.0))(np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 4)), rng=0)


def test_boxes_follow_the_ink_when_digits_leave_the_canvas():
    """keep_inside=False: digits pushed partly off the canvas keep boxes clipped to it that still
    hold all the remaining ink (within the ~1.5 pixels a bilinear zoom spreads a halo pixel just below
    the ink threshold, the tolerance of test_augment.py)."""
    d = make_canvases(*_digits(), n=60, canvas_size=40, scale_range=(14, 30), clutter=False, empty_prob=0.2,
                      seed=5)
    aug = Augment(rotate=0, translate=0.45, scale=(0.7, 1.4), brightness=0, contrast=0, keep_inside=False)
    images, boxes = aug(d["images"], d["boxes"], d["present"], np.random.default_rng(2))
    again = aug(d["images"], d["boxes"], d["present"], np.random.default_rng(2))
    np.testing.assert_array_equal(images, again[0])
    np.testing.assert_array_equal(boxes, again[1])
    assert np.isfinite(images).all() and boxes.dtype == np.float32
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, :2] <= boxes[:, 2:])
    assert np.all(boxes[d["present"] == 0] == 0)
    size = np.array([40, 40, 40, 40])
    clipped = 0
    for img, box, present in zip(images[:, 0], boxes, d["present"]):
        ys, xs = np.nonzero(img > INK_THRESHOLD)
        if not present or ys.size == 0:
            continue
        ink = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        px = box * size
        assert np.all(ink[:2] >= px[:2] - 1.6) and np.all(ink[2:] <= px[2:] + 1.6), (ink, px)
        clipped += bool(np.any(px == 0) or np.any(px == 40))
    assert clipped > 5  # (the case asked for did happen)


# ----------------------------------------------------------------------------- batches

@pytest.mark.parametrize("seed", [None, -1, 2.5, "7", True])
def test_a_bad_seed_is_refused_when_the_loader_is_made(seed):
    """A DataLoader took any seed and failed at the first epoch ("object of type 'NoneType' has no
    len()", "expected non-negative integer"); WeightedSampler truncated 2.5 to 2 without a word."""
    x = np.arange(10)
    with pytest.raises(ValueError, match=rf"DataLoader: seed must be an integer >= 0, got {seed!r}"):
        DataLoader(x, x, 4, seed=seed)
    with pytest.raises(ValueError, match=rf"WeightedSampler: seed must be an integer >= 0, got {seed!r}"):
        WeightedSampler(np.ones(10), seed=seed)
    assert len(list(DataLoader(x, x, 4, seed=np.int64(3)))) == 3


def test_batches_larger_than_the_data_and_label_dtypes():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    for dtype in (np.int64, np.int32, np.uint8):
        y = np.arange(10).astype(dtype)
        batches = list(iterate_batches(x, y, 32, seed=1))
        assert len(batches) == 1 and batches[0][1].dtype == dtype and sorted(batches[0][1].tolist()) == list(range(10))
    dl = DataLoader(x, {"a": np.arange(10)}, 32, seed=0)
    assert len(dl) == 1 and [len(b["a"]) for _, b in dl] == [10]
    assert [len(b) for _, b in DataLoader(x, np.arange(10), 4, shuffle=False)] == [4, 4, 2]


def test_an_unused_seed_of_none_is_still_taken():
    """seed=None failed only when the loader shuffles (there it is refused now); an unshuffled or
    sampled loader never reads the seed, and took None before."""
    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int64)
    assert len(list(DataLoader(x, y, 4, shuffle=False, seed=None))) == 3
    assert len(list(DataLoader(x, y, 4, sampler=WeightedSampler(np.ones(10)), seed=None))) == 3
    with pytest.raises(ValueError, match=r"DataLoader: seed must be an integer >= 0, got None"):
        DataLoader(x, y, 4, seed=None)


@pytest.mark.parametrize("epoch", [2.7, -1, None, "3", True])
def test_a_bad_epoch_is_refused_by_set_epoch(epoch):
    """set_epoch(2.7) ran epoch 2's order again (int() truncated it), naming nothing."""
    x = np.arange(10)
    loader, sampler = DataLoader(x, x, 4, seed=1), WeightedSampler(np.ones(10), seed=1)
    with pytest.raises(ValueError, match=rf"DataLoader.set_epoch: epoch must be an integer >= 0, got {epoch!r}"):
        loader.set_epoch(epoch)
    with pytest.raises(ValueError, match=rf"WeightedSampler.set_epoch: epoch must be an integer >= 0, got {epoch!r}"):
        sampler.set_epoch(epoch)
    loader.set_epoch(np.int64(2))
    sampler.set_epoch(np.int64(2))
    assert loader.epoch == 2 and sampler.epoch == 2
