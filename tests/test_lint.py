"""ruff (lint + format) and mypy are part of the suite; generated docs must not drift."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

PATHS = ["obd", "commands", "tests", "bench", "scripts"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_lint():
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    p = _run("ruff", "check", *PATHS)
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_format():
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    p = _run("ruff", "format", "--check", *PATHS)
    assert p.returncode == 0, p.stdout + p.stderr


def test_mypy():
    p = _run(sys.executable, "-m", "mypy")
    if "No module named mypy" in p.stderr:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    assert p.returncode == 0, p.stdout + p.stderr


def test_man_pages_and_completions_are_current():
    p = _run(sys.executable, "scripts/gen_docs.py", "--check")
    assert p.returncode == 0, p.stdout + p.stderr
