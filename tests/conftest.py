"""pytest configuration: make tests/helpers.py importable as `helpers`, and import flashgen before
any test module imports Triton, so that on a machine without a GPU flashgen switches Triton's
interpreter on (it must be chosen before Triton is imported) whatever order the files run in."""

import os
import sys

import pytest

import flashgen  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory, no other FLASHGEN_* variable set, empty in-process memos."""
    from helpers import FLASHGEN_VARS

    from flashgen import runtime

    for var in FLASHGEN_VARS:
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "cache"
    monkeypatch.setenv("FLASHGEN_CACHE_DIR", str(root))
    monkeypatch.setattr(runtime, "_modules", {})  # else a variant loaded by another test is never rewritten
    monkeypatch.setattr(runtime, "_tuned_in_memory", {})
    from flashgen import api

    monkeypatch.setattr(api, "_sources", {})  # so that sources render (and templates compile) into this cache
    return root
