"""Every script in examples/ runs to completion in a fresh interpreter and exits with status 0.

The examples check themselves against ``fg.attention_reference`` and exit non-zero when the
error is above tolerance, so a zero exit status means "runs and is correct". Files are found by
glob, so a new example is tested without editing this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_examples_exist():
    assert EXAMPLES, f"no examples found under {ROOT / 'examples'}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path):
    # a subprocess, so each example imports flashgen itself (interpreter selection happens at import)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (f"{path.name} exited with {proc.returncode}\n--- stdout\n{proc.stdout}"
                                  f"\n--- stderr\n{proc.stderr}")


def test_the_explain_example_in_writing_mods_prints_what_the_doc_shows(capsys):
    """docs/writing-mods.md shows a mod, ``explain()``'s output for it, and the ``kernels:`` lines
    for ALiBi: run the first and compare, so that the page cannot drift from the code."""
    import torch

    import flashgen as fg

    page = (ROOT / "docs" / "writing-mods.md").read_text()
    section = page[page.index("## Seeing what flashgen made of a mod"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("```text\n", 1)[1].split("```", 1)[0]
    exec(code, {"torch": torch, "fg": fg, "H": 2, "device": "cpu"})  # noqa: S102 - the page's own example
    assert capsys.readouterr().out == shown
    kernels = section.split("```text\n", 2)[2].split("```", 1)[0].splitlines()
    report = fg.compile(score_mod=fg.mods.alibi(torch.ones(2)), mask_mod=fg.mods.causal).explain().splitlines()
    start = report.index("kernels:")
    assert report[start:start + 2] == kernels[:2] and report[start + 2].startswith(kernels[2].removesuffix("...)"))
