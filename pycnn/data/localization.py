"""Digit localization canvases: one real MNIST digit (or none) at a random position and scale.

Each canvas (default 64x64) holds one MNIST digit resized to ``s x s`` pixels, ``s`` drawn
uniformly from ``scale_range``, pasted at a random position wholly inside the canvas; with
probability ``empty_prob`` it holds no digit. Optional clutter pastes small crops of other
digits anywhere (on empty canvases too, so that "present" cannot be learned from "any ink");
optional Gaussian noise is added last.

Targets, per canvas:
- ``present``: 1.0 when a digit was pasted, else 0.0.
- ``labels``: the digit's class 0-9; ``ABSENT_LABEL`` (-1) on empty canvases, so that a loss
  or metric that forgets to mask absent rows fails loudly instead of learning class 0.
- ``boxes``: the tight box of the digit's INK after resizing, normalized to [0, 1] as
  ``(x0, y0, x1, y1)`` in pixel-edge coordinates: a digit whose ink occupies columns
  ``c0..c1`` (inclusive) of a W-wide canvas has ``x0 = c0 / W`` and ``x1 = (c1 + 1) / W``.
  A pixel is ink when its value exceeds ``INK_THRESHOLD`` (in [0, 1] units); the faint
  anti-aliasing halo below that does not count. All zeros on empty canvases.

Generation is vectorized: digits are resized in groups of one target size with separable
antialiased-bilinear resampling matrices (two batched matmuls per group) and pasted with fancy
indexing, so tens of thousands of canvases take about a second. A seed fixes everything.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import zipfile
from pathlib import Path

import numpy as np

from pycnn.fileio import temp_file_beside

__all__ = [
    "INK_THRESHOLD",
    "ABSENT_LABEL",
    "make_canvases",
    "save_canvases",
    "load_canvases",
    "load_localization",
    "ink_boxes",
    "resample_matrix",
]

INK_THRESHOLD = 0.25
ABSENT_LABEL = -1
FRAGMENT_SIZE = 8  # clutter crops are 8x8 pixels of another digit, too small to read as a digit
CANVAS_KEYS = ("images", "present", "labels", "boxes")
_FORMAT_VERSION = 1  # bump when generation changes, so cached .npz files are not reused


def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix that resizes a 1-D signal with antialiased bilinear.

    Row ``i`` holds the weights of output pixel ``i``: a triangle filter centred on the output
    pixel's position in input coordinates, widened by the scale factor when shrinking (so a
    downscale averages, like PIL's antialiased BILINEAR, instead of skipping pixels). Rows sum
    to 1. ``R @ img @ R.T`` resizes a square image.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale - 0.5  # output pixel centres in input index units
    j = np.arange(in_size)
    w = np.clip(1.0 - np.abs(j[None, :] - centers[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def ink_boxes(images, threshold: float = INK_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Tight normalized boxes of the pixels above ``threshold``, one per image.

    Args:
        images: (N, H, W) or (N, 1, H, W) array of values in [0, 1].
        threshold: a pixel is ink when its value is > threshold.

    Returns:
        ``(boxes, has_ink)``: (N, 4) float32 boxes (x0, y0, x1, y1) in pixel-edge
        coordinates divided by W and H (zeros where there is no ink), and (N,) bool.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images.max(axis=1)
    if images.ndim != 3:
        raise ValueError(f"ink_boxes: expected images of shape (N, H, W) or (N, C, H, W), got {images.shape}")
    n, h, w = images.shape
    ink = images > threshold
    rows = ink.any(axis=2)
    cols = ink.any(axis=1)
    has_ink = rows.any(axis=1)
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0 / w, y0 / h, x1 / w, y1 / h], axis=1).astype(np.float32)
    boxes[~has_ink] = 0.0
    return boxes, has_ink


def _int_pair(value):
    """``value`` as two ints when it is a pair of integers (NumPy's too), else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        items = list(value)
    except TypeError:
        return None
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        return None
    return int(items[0]), int(items[1])


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"make_canvases: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# Sides (pixels) between which a digit is scaled on a canvas; the larger one is also the smallest
# canvas that holds every digit (LocalizeConfig.validate).
DIGIT_SCALE_RANGE = (14, 40)


def make_canvases(images, labels, n: int, canvas_size=64, scale_range=DIGIT_SCALE_RANGE, empty_prob: float = 0.1,
                  clutter=True, noise: float = 0.0, seed=0) -> dict:
    """Generate ``n`` localization canvases from MNIST digits.

    Args:
        images: (N, h, w) uint8 digits (as from :func:`pycnn.data.load_mnist`); each is resized
            to a square ``s x s``.
        labels: (N,) integer classes of ``images``.
        n: number of canvases (>= 1).
        canvas_size: an int (square) or ``(height, width)``.
        scale_range: ``(smin, smax)`` inclusive range of the digit's side in pixels; smax must
            fit the canvas.
        empty_prob: probability that a canvas holds no digit (present = 0).
        clutter: False for none; True for 0 to 4 clutter fragments per canvas (uniformly); an
            int k for 0 to k fragments. A fragment is an 8x8 crop of a random digit.
        noise: standard deviation of Gaussian pixel noise added last (then clipped to [0, 1]).
        seed: anything ``np.random.default_rng`` accepts; the same seed and arguments give the
            same canvases.

    Returns:
        A dict with ``"images"`` float32 (n, 1, H, W) in [0, 1], ``"present"`` float32 (n,),
        ``"labels"`` int64 (n,) (``ABSENT_LABEL`` = -1 where absent) and ``"boxes"`` float32
        (n, 4), normalized ink boxes (zeros where absent). See the module docstring.

    Raises:
        ValueError: n < 1, bad or empty images/labels, an invalid scale range, a canvas smaller
            than the largest digit size, empty_prob outside [0, 1], noise < 0, a digit with
            no ink above ``INK_THRESHOLD`` after resizing.
        TypeError: images not uint8.
    """
    n = _check_int(n, "n", 1)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"make_canvases: images must have shape (N, h, w) with N >= 1, got {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"make_canvases: images must be uint8 pixel values 0-255, got dtype {images.dtype}")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"make_canvases: labels must be integers of shape ({images.shape[0]},), "
                         f"got shape {labels.shape} dtype {labels.dtype}")
    # (int() of each value truncated (64.7, 64) to a 64x64 canvas and scale_range=(14.9, 40) to
    # 14 without a word; a canvas_size of 64.0 or (64,) stopped with a bare unpacking error, and
    # "64" made a "canvas 6x4")
    if isinstance(canvas_size, numbers.Integral) and not isinstance(canvas_size, bool):
        canvas_h = canvas_w = int(canvas_size)
    else:
        pair = _int_pair(canvas_size)
        if pair is None:
            raise ValueError(f"make_canvases: canvas_size must be an integer or a (height, width) pair of "
                             f"integers, got {canvas_size!r}")
        canvas_h, canvas_w = pair
    if canvas_h < 1 or canvas_w < 1:
        raise ValueError(f"make_canvases: canvas_size must be >= 1, got {canvas_size!r}")
    pair = _int_pair(scale_range)
    if pair is None:
        raise ValueError(f"make_canvases: scale_range must be two integers (min, max), got {scale_range!r}")
    smin, smax = pair
    if not (1 <= smin <= smax):
        raise ValueError(f"make_canvases: scale_range must satisfy 1 <= min <= max, got {tuple(scale_range)}")
    if canvas_h < smax or canvas_w < smax:
        raise ValueError(f"make_canvases: canvas {canvas_h}x{canvas_w} is smaller than the largest digit "
                         f"size {smax} (scale_range={tuple(scale_range)}); enlarge the canvas or lower the scale")
    if not 0.0 <= empty_prob <= 1.0:
        raise ValueError(f"make_canvases: empty_prob must be in [0, 1], got {empty_prob}")
    if not (noise >= 0.0 and np.isfinite(noise)):  # (inf was taken: every pixel 0 or 1)
        raise ValueError(f"make_canvases: noise must be >= 0 and finite, got {noise}")
    if clutter is True:
        max_fragments = 4
    elif clutter is False or clutter is None:
        max_fragments = 0
    else:
        max_fragments = _check_int(clutter, "clutter (number of fragments)", 0)

    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"make_canvases: seed {seed!r} is not a seed NumPy takes ({exc})") from None
    # All random draws up front, in a fixed order, so that the result depends only on the seed.
    src = rng.integers(0, images.shape[0], size=n)
    sizes = rng.integers(smin, smax + 1, size=n)
    present = rng.random(n) >= empty_prob
    pos_u = rng.random((n, 2))
    n_frag = rng.integers(0, max_fragments + 1, size=n) if max_fragments else np.zeros(n, np.int64)
    frag_src = rng.integers(0, images.shape[0], size=(n, max_fragments))
    frag_crop = rng.integers(0, 1 << 30, size=(n, max_fragments, 2))
    frag_pos = rng.integers(0, 1 << 30, size=(n, max_fragments, 2))
    noise_seed = rng.integers(0, 1 << 63)

    canvas = np.zeros((n, canvas_h, canvas_w), dtype=np.uint8)

    # Clutter first; the digit is pasted over it with max() so neither erases the other.
    h_src, w_src = images.shape[1:]
    fs = min(FRAGMENT_SIZE, h_src, w_src, canvas_h, canvas_w)
    ar = np.arange(fs)
    for slot in range(max_fragments):
        idx = np.flatnonzero(n_frag > slot)
        if idx.size == 0:
            continue
        # crop from the middle half of the source, where the strokes are
        lo_y, hi_y = h_src // 4 - fs // 2, 3 * h_src // 4 - fs // 2
        lo_x, hi_x = w_src // 4 - fs // 2, 3 * w_src // 4 - fs // 2
        lo_y, lo_x = max(lo_y, 0), max(lo_x, 0)
        hi_y, hi_x = max(min(hi_y, h_src - fs), lo_y), max(min(hi_x, w_src - fs), lo_x)
        cy = lo_y + frag_crop[idx, slot, 0] % (hi_y - lo_y + 1)
        cx = lo_x + frag_crop[idx, slot, 1] % (hi_x - lo_x + 1)
        frag = images[frag_src[idx, slot][:, None, None], (cy[:, None] + ar)[:, :, None], (cx[:, None] + ar)[:, None, :]]
        py = frag_pos[idx, slot, 0] % (canvas_h - fs + 1)
        px = frag_pos[idx, slot, 1] % (canvas_w - fs + 1)
        ii, rr, cc = idx[:, None, None], (py[:, None] + ar)[:, :, None], (px[:, None] + ar)[:, None, :]
        canvas[ii, rr, cc] = np.maximum(canvas[ii, rr, cc], frag)

    boxes = np.zeros((n, 4), dtype=np.float32)
    for s in np.unique(sizes[present]):
        idx = np.flatnonzero(present & (sizes == s))
        s = int(s)
        rh, rw = resample_matrix(h_src, s), resample_matrix(w_src, s)
        patch = np.matmul(np.matmul(rh, images[src[idx]].astype(np.float32)), rw.T)
        patch = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
        # The box is taken from the pasted (rounded) pixels, so it matches the canvas exactly.
        pbox, has_ink = ink_boxes(patch.astype(np.float32) / 255.0)
        if not has_ink.all():
            bad = int(src[idx[np.flatnonzero(~has_ink)[0]]])
            raise ValueError(f"make_canvases: digit {bad} has no pixel above INK_THRESHOLD={INK_THRESHOLD} "
                             f"after resizing to {s}x{s}; it cannot have a box")
        oy = (pos_u[idx, 0] * (canvas_h - s + 1)).astype(np.int64)
        ox = (pos_u[idx, 1] * (canvas_w - s + 1)).astype(np.int64)
        ar_s = np.arange(s)
        ii, rr, cc = idx[:, None, None], (oy[:, None] + ar_s)[:, :, None], (ox[:, None] + ar_s)[:, None, :]
        canvas[ii, rr, cc] = np.maximum(canvas[ii, rr, cc], patch)
        # patch-normalized box -> canvas-normalized box
        boxes[idx, 0] = (ox + pbox[:, 0] * s) / canvas_w
        boxes[idx, 1] = (oy + pbox[:, 1] * s) / canvas_h
        boxes[idx, 2] = (ox + pbox[:, 2] * s) / canvas_w
        boxes[idx, 3] = (oy + pbox[:, 3] * s) / canvas_h

    out = canvas.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    if noise > 0:
        out += np.random.default_rng(noise_seed).normal(0.0, noise, size=out.shape).astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
    out_labels = np.where(present, labels[src].astype(np.int64), ABSENT_LABEL)
    return {
        "images": out[:, None, :, :],
        "present": present.astype(np.float32),
        "labels": out_labels,
        "boxes": boxes,
    }


def _validate_canvases(data, where: str) -> None:
    missing = [k for k in CANVAS_KEYS if k not in data]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}; expected {list(CANVAS_KEYS)}")
    if data["images"].ndim != 4 or data["images"].shape[1] != 1:  # (a (n, 3, H, W) set passed)
        raise ValueError(f"{where}: images must have shape (n, 1, H, W), got {data['images'].shape}")
    n = data["images"].shape[0]
    expected = {"present": (n,), "labels": (n,), "boxes": (n, 4)}
    for key, shape in expected.items():
        if data[key].shape != shape:
            raise ValueError(f"{where}: {key} must have shape {shape} to match images {data['images'].shape}, "
                             f"got {data[key].shape}")
    # (an object array was saved, pickled, and then refused by load_canvases; uint8 images loaded
    # as 0-255 where every user of the canvases expects [0, 1])
    kinds = {"images": ("floating point", (np.floating,)), "present": ("0/1 numbers", (np.number, np.bool_)),
             "labels": ("integer", (np.integer,)), "boxes": ("floating point", (np.floating,))}
    for key, (kind, dtypes) in kinds.items():
        if not any(np.issubdtype(data[key].dtype, d) for d in dtypes):
            raise ValueError(f"{where}: {key} must be {kind}, got dtype {data[key].dtype}")


def save_canvases(path, data: dict) -> Path:
    """Write canvases to an uncompressed ``.npz``, atomically (temp file + rename).

    Args:
        path: destination file (``.npz`` is appended if missing).
        data: the dict of :func:`make_canvases`.

    Returns:
        The path written.

    Raises:
        ValueError: missing keys, inconsistent shapes or wrong dtypes.
        OSError: the file cannot be written (naming ``path``); a previous file there is left as it was.
    """
    arrays = {k: np.asarray(data[k]) for k in CANVAS_KEYS if k in data}
    _validate_canvases(arrays, "save_canvases")
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    # (A failure while writing, e.g. a full disk, said "[Errno 28] No space left on device" without
    # a file name, and a directory in the way named the temp file; the data was not fsync'ed before
    # the rename, so a crash could leave an empty file that looked complete.)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory (cannot write a file there)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path, suffix=".part")
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_canvases(path) -> dict:
    """Read canvases written by :func:`save_canvases` (no pickle).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable .npz, or missing keys / inconsistent shapes / wrong dtypes.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"load_canvases: {path} is not a readable canvas .npz ({type(exc).__name__}: {exc})") from exc
    try:
        _validate_canvases(data, "load_canvases")
    except ValueError as exc:
        raise ValueError(f"{exc} (file {path})") from None
    return {k: data[k] for k in CANVAS_KEYS}


def default_cache_dir() -> Path:
    """Where :func:`load_localization` caches canvases: ``~/.cache/pycnn/localization``."""
    return Path.home() / ".cache" / "pycnn" / "localization"


def load_localization(split: str = "train", n: int = 60000, seed=0, root=None, cache: bool = True,
                      cache_dir=None, **canvas_kwargs) -> dict:
    """Canvases from the MNIST ``split``'s digits, cached as .npz keyed by all arguments.

    Training canvases come from the 60k training digits, test canvases from the 10k test
    digits (pass different seeds for training and evaluation).

    Args:
        split: "train" or "test".
        n, seed, **canvas_kwargs: as :func:`make_canvases`.
        root: MNIST directory, as :func:`pycnn.data.load_mnist`.
        cache: read/write the .npz cache.
        cache_dir: cache directory (default ``~/.cache/pycnn/localization``).

    Returns:
        The dict of :func:`make_canvases`. An unreadable cache file is regenerated.
    """
    from .mnist import load_mnist

    key = json.dumps({"v": _FORMAT_VERSION, "split": split, "n": n, "seed": repr(seed),
                      **{k: repr(v) for k, v in sorted(canvas_kwargs.items())}}, sort_keys=True)
    name = f"{split}-n{n}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / name
    if cache and path.is_file():
        try:
            return load_canvases(path)
        except ValueError:
            pass  # a damaged cache file (e.g. from a full disk) is regenerated and replaced below
    images, labels = load_mnist(split, root=root)
    data = make_canvases(images, labels, n, seed=seed, **canvas_kwargs)
    if cache:
        save_canvases(path, data)
    return data
