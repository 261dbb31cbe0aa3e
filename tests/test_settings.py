"""pycnn/settings.py: the table of environment variables is complete and current, docs/settings.md
is that table, and a misspelled PYCNN_* variable is named by the CLI instead of silently ignored."""
from __future__ import annotations

import os
import re
from pathlib import Path

from pycnn import cli, settings
from pycnn.backends import cuda

ROOT = Path(__file__).resolve().parent.parent

# Where PYCNN_* variables are read: the package, the build, the benchmarks and the test harness.
READERS = [*sorted((ROOT / "pycnn").rglob("*.py")), ROOT / "setup.py", *sorted((ROOT / "benchmarks").glob("*.py")),
           ROOT / "tests" / "conftest.py", ROOT / "tests" / "gpu" / "conftest.py", ROOT / "tests" / "gpu" / "emu_support.py"]


def _quoted_names() -> set[str]:
    """Every "PYCNN_..." string literal of READERS (settings.py itself left out)."""
    names = set()
    for path in READERS:
        if path.name != "settings.py":
            names |= set(re.findall(r"""["'](PYCNN_[A-Z0-9_]+)["']""", path.read_text()))
    return names


def _kernel_macros() -> set[str]:
    """The PYCNN_* names that are #defines of the CUDA sources (compile-time constants, not variables)."""
    macros = set(cuda.DEFINES)
    for path in (ROOT / "csrc" / "cuda").glob("*.cu*"):
        macros |= set(re.findall(r"#define (PYCNN_[A-Z0-9_]+)", path.read_text()))
    return macros


def test_every_variable_the_code_names_is_in_the_table():
    missing = _quoted_names() - _kernel_macros() - set(settings.BY_NAME)
    assert not missing, f"PYCNN_* names in the code but not in pycnn/settings.py: {sorted(missing)}"


def test_every_variable_in_the_table_is_still_read():
    stale = set(settings.BY_NAME) - _quoted_names()
    assert not stale, f"pycnn/settings.py lists variables no code names any more: {sorted(stale)}"


def test_every_variable_a_script_sets_is_in_the_table():
    assigned = set()
    for path in [ROOT / ".ci" / "run", *(ROOT / "benchmarks").glob("*.sh")]:
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assigned |= set(re.findall(r"\b(PYCNN_[A-Z0-9_]+)=", code))
    assert assigned, "the scripts set no PYCNN_* variable: the pattern above is stale"
    assert assigned <= set(settings.BY_NAME), sorted(assigned - set(settings.BY_NAME))


def test_docs_settings_md_is_the_table():
    assert (ROOT / "docs" / "settings.md").read_text() == settings.markdown(), \
        "docs/settings.md is stale: python -m pycnn.settings > docs/settings.md"


def test_table_entries_are_complete_and_grouped():
    assert len(settings.BY_NAME) == len(settings.SETTINGS)
    for s in settings.SETTINGS:
        assert s.name.startswith(settings.PREFIX) and s.values and s.default and s.meaning, s
        assert s.group in settings.GROUPS, s


def test_unknown_variables_get_the_closest_known_name():
    environ = {"PYCNN_CONV_VERSON": "3", "PYCNN_DATA": "/d", "PYCNN_SOMETHING_ELSE": "1", "HOME": "/h"}
    assert settings.unknown_settings(environ) == [("PYCNN_CONV_VERSON", "PYCNN_CONV_VERSION"),
                                                  ("PYCNN_SOMETHING_ELSE", None)]
    message = settings.unknown_settings_message(environ)
    assert "$PYCNN_CONV_VERSON (did you mean PYCNN_CONV_VERSION?)" in message and "$PYCNN_SOMETHING_ELSE" in message
    assert settings.unknown_settings_message({"PYCNN_DATA": "/d"}) is None


def test_the_cli_warns_about_a_misspelled_variable_and_info_lists_it(monkeypatch, capsys, tmp_path):
    for name in [n for n in list(os.environ) if n.startswith("PYCNN_") and n != "PYCNN_DATA"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYCNN_BAKEND", "numpy")
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "pycnn evaluate: warning: $PYCNN_BAKEND (did you mean PYCNN_BACKEND?): not a pycnn setting" in err
    assert cli.main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "UNKNOWN: $PYCNN_BAKEND (did you mean PYCNN_BACKEND?)" in out and "warning" not in err
    assert "  PYCNN_BAKEND=numpy  (UNKNOWN: see above)" in out
    monkeypatch.delenv("PYCNN_BAKEND")
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "warning" not in capsys.readouterr().err
