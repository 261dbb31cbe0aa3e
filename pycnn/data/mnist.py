"""MNIST from IDX files: lookup, download, integrity checks and normalization.

An explicit ``root`` (the CLI's ``--data-dir``) is the only directory looked at, and a split
missing there is downloaded into it (as torchvision's ``root``). Without one the files are looked
for in ``$PYCNN_DATA``, then in ``~/.cache/pycnn/mnist``, and downloaded into the cache when
neither holds them. Each file may be gzip-compressed (``name.gz``) or raw (``name``). Integrity
is checked on the DECOMPRESSED bytes: the IDX header (magic number, dimensions, byte count) and
the md5 sum of the canonical distribution, so a truncated or corrupted file is an error, never a
silently short data set.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from pycnn.fileio import temp_file_beside

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistNotFoundError",
    "MnistIntegrityError",
    "load_mnist",
    "normalize",
    "default_cache_dir",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

ENV_VAR = "PYCNN_DATA"

# split -> (images file, labels file, number of samples)
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}

# md5 of the DECOMPRESSED bytes of the canonical distribution (the .gz wrappers differ between
# mirrors, the payload does not).
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

DOWNLOAD_TIMEOUT_S = 30


class MnistNotFoundError(FileNotFoundError):
    """The MNIST files are in none of the searched directories and could not be downloaded."""


class MnistIntegrityError(ValueError):
    """An MNIST file exists but is truncated, corrupt or not the expected file."""


def default_cache_dir() -> Path:
    """The download cache, ``~/.cache/pycnn/mnist`` (read at call time so HOME may change)."""
    return Path.home() / ".cache" / "pycnn" / "mnist"


def _search_dirs(root) -> list[Path]:
    if root is not None:
        if not Path(root).expanduser().is_dir():  # (a typo: never train on other data without a word)
            raise MnistNotFoundError(f"load_mnist: root {str(root)!r} is not a directory (the directory "
                                     f"given for the MNIST files, e.g. --data-dir)")
        # Only there: $PYCNN_DATA's or the cache's copy was taken without a word, while the run
        # recorded the directory it was given (metrics.json's "data_dir").
        return [Path(root).expanduser()]
    dirs = []
    env = os.environ.get(ENV_VAR)
    if env:
        # A typo there meant the cache or a download instead of the user's copy, without a word.
        if not Path(env).expanduser().is_dir():
            raise MnistNotFoundError(f"load_mnist: {ENV_VAR}={env!r} is not a directory (the directory "
                                     f"holding the MNIST files; unset it to use the cache)")
        dirs.append(Path(env).expanduser())
    dirs.append(default_cache_dir())
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _find_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` or ``directory/name.gz``, preferring the raw file (faster to read)."""
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_decompressed(path: Path, shown=None) -> bytes:
    """The file's bytes, gunzipped when it is gzip data (detected by its magic, not its name).

    ``shown``: what the error names instead of ``path`` (the URL of a download being verified).
    """
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"\x1f\x8b":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as exc:
        if shown is not None:
            raise MnistIntegrityError(f"MNIST file {shown} is a damaged gzip file ({type(exc).__name__}: {exc})") from exc
        raise MnistIntegrityError(
            f"MNIST file {path} is a damaged gzip file ({type(exc).__name__}: {exc}); "
            "delete it so that it can be downloaded again, or replace it with a good copy"
        ) from exc


def _parse_idx(data: bytes, path, name: str, expected_count: int) -> np.ndarray:
    """Check the IDX header and md5 of ``data`` and return its payload as a uint8 array.

    ``path``: the file the errors name (a Path), or the URL of a download being verified (a str).
    """
    is_images = "images" in name
    magic_expected = IMAGES_MAGIC if is_images else LABELS_MAGIC
    header_len = 16 if is_images else 8
    if len(data) < header_len:
        raise MnistIntegrityError(
            f"MNIST file {path} is truncated: expected an IDX header of {header_len} bytes, "
            f"found only {len(data)} bytes"
        )
    magic = int.from_bytes(data[0:4], "big")
    if magic != magic_expected:
        raise MnistIntegrityError(
            f"MNIST file {path} is not an IDX {'images' if is_images else 'labels'} file: "
            f"expected magic number {magic_expected}, found {magic}"
        )
    count = int.from_bytes(data[4:8], "big")
    shape = (count,)
    if is_images:
        rows = int.from_bytes(data[8:12], "big")
        cols = int.from_bytes(data[12:16], "big")
        if (rows, cols) != (28, 28):
            raise MnistIntegrityError(
                f"MNIST file {path}: expected 28x28 images, header says {rows}x{cols}"
            )
        shape = (count, rows, cols)
    if count != expected_count:
        raise MnistIntegrityError(
            f"MNIST file {path}: expected {expected_count} items, header says {count}"
        )
    expected_len = header_len + int(np.prod(shape))
    if len(data) != expected_len:
        what = "truncated" if len(data) < expected_len else "too long"
        raise MnistIntegrityError(
            f"MNIST file {path} is {what}: expected {expected_len} bytes after decompression "
            f"({count} items), found {len(data)} bytes"
        )
    digest = hashlib.md5(data).hexdigest()
    if digest != MD5[name]:
        raise MnistIntegrityError(
            f"MNIST file {path} is corrupt: md5 of the decompressed bytes expected "
            f"{MD5[name]}, found {digest}"
            + ("; delete it so that it can be downloaded again, or replace it with a good copy"
               if isinstance(path, Path) else "")  # (not for a download: its temp file is gone)
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _load_file(path: Path, name: str, expected_count: int) -> np.ndarray:
    return _parse_idx(_read_decompressed(path), path, name, expected_count)


def _download_file(url: str, dest: Path, progress: bool) -> None:
    """Stream ``url`` into ``dest`` (a temp file the caller renames), with a tqdm bar.

    Raises:
        OSError: the connection ended before the ``Content-Length`` the server announced (urllib
            returns the short read without a word).
    """
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url.rsplit('/', 1)[-1]}")
        received = 0
        try:
            while True:
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and received != total:
            raise OSError(f"the download ended after {received} of the {total} bytes the server announced")


def _download(name: str, expected_count: int, directory: Path, progress: bool) -> Path:
    """Download ``name.gz`` into ``directory`` from the first mirror that serves a verified copy.

    The bytes go to a temp file in that directory, are verified (header + md5 of the
    decompressed payload), and only then renamed into place, so an interrupted or bad download
    never leaves a file that looks complete.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / (name + ".gz")
    errors = []
    for mirror in MIRRORS:
        url = mirror + name + ".gz"
        fd, tmp = temp_file_beside(final, suffix=".part")
        os.close(fd)
        try:
            _download_file(url, tmp, progress)
            # verify before it becomes visible (a failure names the URL: the temp file is removed)
            _parse_idx(_read_decompressed(tmp, shown=url), url, name, expected_count)
            os.replace(tmp, final)
            return final
        except MnistIntegrityError as exc:
            errors.append(f"{url}: the file downloaded is not a good copy: {exc}")
        # (http.client.HTTPException: a chunked response cut short raises IncompleteRead, which is
        # no OSError; it escaped here, the next mirror was never tried and load_mnist raised it raw)
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as exc:
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise OSError("; ".join(errors))


def _not_found_message(split: str, dirs: list[Path], detail: str, root=None) -> str:
    images, labels, _ = SPLITS[split]
    if root is not None:
        return (
            f"MNIST {split} split not found in {dirs[0]} (the `root` argument / --data-dir): expected "
            f"{images}.gz and {labels}.gz (or the uncompressed files) there. A directory given is the "
            f"only one looked at; without it {ENV_VAR} and then {default_cache_dir()} would be. {detail}"
        )
    searched = "\n".join(f"  - {d}" for d in dirs)
    return (
        f"MNIST {split} split not found. Searched (in order):\n{searched}\n"
        f"Put {images}.gz and {labels}.gz (or the uncompressed files) into one of these "
        f"directories, or point the environment variable {ENV_VAR} (or the `root` argument / "
        f"--data-dir) at the directory that holds them. {detail}"
    )


def load_mnist(split: str = "train", root=None, download: bool = True,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load one MNIST split as NumPy arrays, verified against the canonical md5 sums.

    Args:
        split: ``"train"`` (60,000 samples) or ``"test"`` (10,000 samples).
        root: the directory of the MNIST files (the CLI's ``--data-dir``); it must exist, and it
            is the only one looked at. None: ``$PYCNN_DATA``, then ``~/.cache/pycnn/mnist``. A
            directory is used when it holds both files of the split, each raw or ``.gz``.
        download: when the split is not found, download its missing files into ``root``, or
            without one into ``~/.cache/pycnn/mnist``, from a public mirror (verified before
            they are kept).
        progress: show a tqdm progress bar while downloading.

    Returns:
        ``(images, labels)``: images uint8 of shape (N, 28, 28), labels int64 of shape (N,).

    Raises:
        ValueError: ``split`` is not "train" or "test".
        MnistIntegrityError: a file is truncated, corrupt or of the wrong kind; the message
            names the file, what was expected and what was found.
        MnistNotFoundError: ``root`` is not a directory, or the files are nowhere and could not
            be downloaded; the message names the directories looked at, the files expected there
            and where the download went.
    """
    if split not in SPLITS:
        raise ValueError(f"load_mnist: split must be 'train' or 'test', got {split!r}")
    images_name, labels_name, count = SPLITS[split]
    dirs = _search_dirs(root)
    for directory in dirs:
        images_path = _find_file(directory, images_name)
        labels_path = _find_file(directory, labels_name)
        if images_path is not None and labels_path is not None:
            images = _load_file(images_path, images_name, count)
            labels = _load_file(labels_path, labels_name, count)
            # frombuffer views are read-only; hand out writable arrays the caller owns.
            return images.copy(), labels.astype(np.int64)

    if not download:
        raise MnistNotFoundError(_not_found_message(split, dirs, "Downloading is disabled (download=False).",
                                                    root))
    target = dirs[0] if root is not None else default_cache_dir()  # (the given directory, as torchvision)
    paths = {}
    for name in (images_name, labels_name):
        existing = _find_file(target, name)
        if existing is not None:
            paths[name] = existing
            continue
        try:
            paths[name] = _download(name, count, target, progress)
        except OSError as exc:
            raise MnistNotFoundError(
                _not_found_message(split, dirs, f"Downloading into {target} failed: {exc}", root)
            ) from exc
    images = _load_file(paths[images_name], images_name, count)
    labels = _load_file(paths[labels_name], labels_name, count)
    return images.copy(), labels.astype(np.int64)


def normalize(images, mean: float = MNIST_MEAN, std: float = MNIST_STD, dtype=np.float32) -> np.ndarray:
    """Scale pixel values in [0, 255] to ``(images / 255 - mean) / std`` with a channel axis.

    Args:
        images: (N, H, W) or (N, 1, H, W) array of pixel values in [0, 255] (uint8 from
            :func:`load_mnist`, or any real dtype).
        mean, std: the statistics to normalize with (MNIST's training-set values by default).
        dtype: a floating dtype for the result.

    Returns:
        A new C-contiguous array of shape (N, 1, H, W) and dtype ``dtype``.

    Raises:
        ValueError: wrong number of dimensions, or std <= 0.
        TypeError: a non-numeric input or a non-floating ``dtype``.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif not (images.ndim == 4 and images.shape[1] == 1):
        raise ValueError(
            f"normalize: expected images of shape (N, H, W) or (N, 1, H, W), got shape {images.shape}"
        )
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"normalize: expected integer or floating pixel values, got dtype {images.dtype}")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"normalize: dtype must be a floating dtype, got {dtype}")
    if not std > 0:
        raise ValueError(f"normalize: std must be > 0, got {std}")
    # One multiply-add in the target dtype: x * (1 / (255 std)) - mean / std.
    out = images.astype(dtype)
    out *= dtype.type(1.0 / (255.0 * std))
    out -= dtype.type(mean / std)
    return np.ascontiguousarray(out)
