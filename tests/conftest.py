"""pytest configuration: make tests/helpers.py importable as `helpers`, and import flashgen before
any test module imports Triton, so that on a machine without a GPU flashgen switches Triton's
interpreter on (it must be chosen before Triton is imported) whatever order the files run in."""

import os
import sys

import flashgen  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))
