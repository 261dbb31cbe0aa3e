"""Files written atomically get the permissions of a plain open(); output directories are
checked, not created, before the work that fills them."""
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
