"""Files written atomically get the permissions of a plain open(); output directories are
checked, not created, before the work that fills them."""
import os
import stat

import numpy as np
import pytest

import pycnn
from pycnn.checkpoint import save_checkpoint
from pycnn.data.localization import save_canvases
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
