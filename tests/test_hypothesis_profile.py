"""The hypothesis profile of tests/conftest.py: fixed draws by default (CI tests the inputs every
local run tests), fresh draws under ``--hypothesis-profile=explore``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]


def test_profile_in_effect(request):
    profile = request.config.getoption("hypothesis_profile", default=None) or "pycnn"
    assert profile in ("pycnn", "explore"), profile
    assert settings.default.derandomize is (profile == "pycnn")
    assert settings.default.deadline is None
    # A test module's own settings object inherits the profile's draw mode (the @given tests of the
    # backends build theirs at import, after the profile is loaded).
    assert settings(max_examples=5).derandomize is (profile == "pycnn")


def test_explore_profile_draws_fresh_examples():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--hypothesis-profile=explore", f"{Path(__file__).name}::test_profile_in_effect"],
        cwd=REPO / "tests", capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
