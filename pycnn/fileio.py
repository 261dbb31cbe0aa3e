"""Writing files safely: atomic replacement, the permissions a plain ``open`` gives, output
directories checked before the long work that fills them."""
from __future__ import annotations

import json
import math
import os
import secrets
import stat
from pathlib import Path


def temp_file_beside(path, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create an empty file in ``path``'s directory to be written and then renamed over ``path``.

    Returns ``(fd, temp_path)``, the descriptor open for writing. Unlike ``tempfile.mkstemp``,
    whose files are always private (0600), the file gets the mode that ``open(path, "w")``
    would leave ``path`` with: the existing file's mode, else 0666 less the umask. (With
    mkstemp every checkpoint, metrics file and plot came out unreadable to the owner's group.)
    """
    path = Path(path)
    existing_mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(temp, flags, 0o666)  # the kernel applies the umask, as for open()
            break
        except FileExistsError:
            continue
    if existing_mode is not None and hasattr(os, "fchmod"):
        try:
            os.fchmod(fd, existing_mode)
        except OSError:
            # (a filesystem that refuses chmod, e.g. vfat or some network mounts: open() would
            # have written there all the same. This raised and left the temp file behind.)
            pass
    return fd, temp


def _named(exc: OSError, path) -> OSError:
    """The same error, naming ``path`` (the file the caller asked for) instead of the temp file."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def _refuse_directory(path: Path) -> None:
    if path.is_dir():  # (os.replace would fail only after the temp file is written, naming the temp)
        raise IsADirectoryError(21, "Is a directory (cannot write a file there)", str(path))


def _write_temp(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``.

    An interrupted or failed write leaves any previous file at ``path`` untouched; an OSError
    names ``path``, not the temp file.
    """
    atomic_write_files({path: data})


def atomic_write_files(files: dict) -> None:
    """Write several files (path -> bytes) as one set: all of them, or none.

    Every file is first written in full beside its destination, and only then are they renamed
    over the destinations, so a failure while writing (disk full, a directory where a file
    should go, no permission) leaves every previous file as it was: a run's checkpoint, metrics
    and plot never end up from two different runs. (The renames themselves, once the writes
    succeeded, do not fail for these reasons.)
    """
    paths = [Path(p) for p in files]
    temps = []
    try:
        for path, data in zip(paths, files.values()):
            try:
                _refuse_directory(path)
                temps.append(_write_temp(path, data))
            except OSError as exc:
                raise _named(exc, path) from None
        for path, tmp in zip(paths, temps):
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _named(exc, path) from None
    except BaseException:
        for tmp in temps:
            _remove_quietly(tmp)
        raise


def json_bytes(obj) -> bytes:
    """``obj`` as indented JSON that every parser reads: NaN and infinities become null (Python's
    own ``json`` writes them as the bare words NaN and Infinity, which are not JSON)."""
    return (json.dumps(_finite_or_none(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(value) for value in obj]
    return obj


def atomic_write_json(path, obj) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as :func:`json_bytes`."""
    atomic_write_bytes(path, json_bytes(obj))


def check_output_dir(path, argument: str = "out_dir", files: tuple = ()) -> Path:
    """Check that ``path`` is or can be made a directory to write in, leaving nothing behind.

    Called before training (or timing), so that a typo'd or read-only output directory fails in a
    second instead of after the whole run, losing the trained model; a run that fails for another
    reason leaves no empty directory behind. The nearest existing part of the path must be a
    directory this process may write in; then the missing directories are made, an empty file is
    created in the last one, and all of it is removed again (permission bits do not tell the whole
    story: root passes every ``os.access`` test, yet cannot make a directory in ``/proc``).

    ``files``: names the run will write in ``path``; none of them may be a directory.

    Raises:
        ValueError: naming ``argument``, the path and what failed.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise ValueError(f"{argument} {str(path)!r} is a file, not a directory")
        raise ValueError(f"{argument} {str(path)!r} cannot hold the results: {str(existing)!r} is a file, "
                         "not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{argument} {str(path)!r} cannot hold the results: no permission to write in "
                         f"{str(existing)!r}")
    _probe_writable(path, existing, argument)
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{argument} {str(path)!r} cannot hold the results: {str(path / name)!r} is a "
                             "directory, where the run writes a file")
    return path


def _probe_writable(path: Path, existing: Path, argument: str) -> None:
    """Make the directories from ``existing`` down to ``path`` and a file in ``path``, then remove
    them (only what this call made); an OSError on the way becomes a ValueError naming ``argument``."""
    missing = []
    directory = path
    while directory != existing:
        missing.append(directory)
        directory = directory.parent
    made = []
    doing = ""
    try:
        for directory in reversed(missing):
            doing = f"cannot create the directory {str(directory)!r}"
            directory.mkdir()
            made.append(directory)
        doing = f"cannot create a file in {str(path)!r}"
        fd, temp = temp_file_beside(path / "probe", suffix=".probe")
        os.close(fd)
        os.unlink(temp)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"{argument} {str(path)!r} cannot hold the results: {doing}: {reason}") from None
    finally:
        for directory in reversed(made):
            try:
                directory.rmdir()
            except OSError:
                pass


def check_output_file(path, argument: str, what: str = "file") -> Path:
    """Check, before the work that fills it, that a file can be written at ``path``: not empty,
    not a directory, in a directory that is or can be made writable (:func:`check_output_dir`).

    Raises:
        ValueError: naming ``argument``, the path and what is wrong (``what``: the kind of file
            expected, for the message).
    """
    if str(path) == "":
        raise ValueError(f"{argument} is empty; give the {what}'s path")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{argument} {str(path)!r} is a directory; give the {what}'s path")
    check_output_dir(path.parent, f"the directory of {argument}")
    return path
