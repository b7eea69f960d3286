"""ruff is part of the test suite, so the README's one test command checks the style too."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "flashgen", "tests", "examples", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_demo_help_runs():
    result = subprocess.run([sys.executable, "-m", "flashgen", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
