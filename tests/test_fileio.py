"""Files written atomically get the permissions of a plain open(); output directories are
checked, not created, before the work that fills them."""
import json
import os
from pathlib import Path
import stat

import numpy as np
import pytest

import pycnn
from pycnn.checkpoint import save_checkpoint
from pycnn.data.localization import save_canvases
import pycnn.fileio as fileio_module
from pycnn.fileio import atomic_write_bytes, atomic_write_json, check_output_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_open_gives(tmp_path, umask, mask):
    """tempfile.mkstemp made every checkpoint, metrics file and plot 0600 (unreadable to the
    owner's group); a plain open() gives 0666 less the umask."""
    umask(mask)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    expected = _mode(plain)
    assert expected == 0o666 & ~mask
    atomic_write_bytes(tmp_path / "a.bin", b"data")
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    save_checkpoint(pycnn.models.LeNet5(), tmp_path / "m.safetensors", {"model": "lenet5"})
    canvases = {"images": np.zeros((2, 1, 4, 4), np.float32), "present": np.zeros(2, np.float32),
                "labels": np.full(2, -1, np.int64), "boxes": np.zeros((2, 4), np.float32)}
    save_canvases(tmp_path / "c.npz", canvases)
    for name in ("a.bin", "a.json", "m.safetensors", "c.npz"):
        assert _mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "c.npz", "m.safetensors", "plain"]


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    atomic_write_json(path, {"b": 2})
    assert _mode(path) == 0o640 and path.read_text().strip().startswith("{")


def test_check_output_dir(tmp_path):
    """It creates nothing (a run that fails for another reason leaves no empty directory)."""
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir '.*file' is a file, not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match=r"--out '.*file/sub/run' cannot hold the results: '.*file' is a file"):
        check_output_dir(tmp_path / "file" / "sub" / "run", "--out")
    if os.geteuid() != 0:  # (root may write anywhere)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match=r"cannot hold the results: no permission to write in '.*locked'"):
            check_output_dir(locked / "run")


def test_check_output_dir_tries_the_write(tmp_path, monkeypatch):
    """Permission bits are not the whole story (root passes os.access, yet cannot make a directory
    in /proc): the check makes the directories and a file, says which step failed, and removes
    what it made."""
    made = []
    real_mkdir = Path.mkdir

    def refuse_second_level(self, *args, **kwargs):
        if self.name == "b":
            raise FileNotFoundError(2, "No such file or directory", str(self))
        made.append(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_second_level)
    with pytest.raises(ValueError, match=r"^--out '.*a/b/c' cannot hold the results: cannot create the "
                                         r"directory '.*a/b': No such file or directory$"):
        check_output_dir(tmp_path / "a" / "b" / "c", "--out")
    assert made == [tmp_path / "a"] and list(tmp_path.iterdir()) == []  # "a" made, then removed

    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    monkeypatch.setattr(fileio_module.os, "open", _raise_read_only)
    with pytest.raises(ValueError, match=r"^out_dir '.*run' cannot hold the results: cannot create a file "
                                         r"in '.*run': Read-only file system$"):
        check_output_dir(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def _raise_read_only(path, *args, **kwargs):
    raise OSError(30, "Read-only file system", str(path))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_check_output_dir_in_proc():
    """The case that slipped through the permission test: the error came after setup, bare."""
    # (as root: "cannot create the directory '/proc/pycnn-x'"; else "no permission to write in")
    with pytest.raises(ValueError, match=r"^out_dir \(--out\) '/proc/pycnn-x/run' cannot hold the results: "):
        check_output_dir(Path("/proc/pycnn-x/run"), "out_dir (--out)")


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from pycnn.fileio import atomic_write_files

    a, b = tmp_path / "model.safetensors", tmp_path / "metrics.json"
    a.write_bytes(b"old model")
    b.write_bytes(b"old metrics")
    real_fdopen = fileio_module.os.fdopen
    calls = []

    def second_write_fails(fd, *args, **kwargs):
        calls.append(fd)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(28, "No space left on device")
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(fileio_module.os, "fdopen", second_write_fails)
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.json'$"):  # the file asked for
        atomic_write_files({a: b"new model", b: b"new metrics"})
    assert a.read_bytes() == b"old model" and b.read_bytes() == b"old metrics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.safetensors"]  # no temps left
    monkeypatch.setattr(fileio_module.os, "fdopen", real_fdopen)
    atomic_write_files({a: b"new model", b: b"new metrics"})
    assert a.read_bytes() == b"new model" and b.read_bytes() == b"new metrics"


def test_a_directory_in_the_way_is_named_not_the_temp_file(tmp_path):
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"Is a directory \(cannot write a file there\): '.*/metrics\.json'$"):
        atomic_write_json(tmp_path / "metrics.json", {})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(ValueError, match=r"'.*metrics\.json' is a directory, where the run writes a file"):
        check_output_dir(tmp_path, "out_dir (--out)", files=("model.safetensors", "metrics.json"))


def test_json_has_no_bare_nan_or_infinity(tmp_path):
    """Python's json writes NaN / Infinity, which JSON parsers (JavaScript's, jq) reject."""
    atomic_write_json(tmp_path / "m.json", {"loss": float("inf"), "x": [1.5, float("nan")], "n": np.float64(2.0)})
    text = (tmp_path / "m.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"loss": None, "x": [1.5, None], "n": 2.0}
