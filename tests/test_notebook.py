"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel, and its outputs are right.

The notebook is executed with nbclient in a temporary directory (outputs never go back into the
repository) by an IPython kernel of *this* interpreter: a temporary kernelspec points at
``sys.executable``, so the kernel sees the same torch, triton and flashgen as pytest, whatever
kernelspecs the machine has installed. On a CPU-only machine the notebook runs its kernels in
Triton's interpreter with small shapes; with a GPU it picks CUDA and bf16.

The checks: no cell errored; every relative error the notebook prints (forward for each variant,
dq/dk/dv) is below the dtype's tolerance; ``fg.Attention`` and ``fg.BlockMask`` displayed as rich
markdown (with the block picture); the printed kernel source is Triton code. The notebook packages
are dev dependencies: if they are missing this test fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600  # per cell; the whole notebook takes seconds on CPU
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}  # as tests/test_gpu_backward.py
EXPECTED_ERRORS = 6  # forward for three variants, then dq, dk, dv
KERNEL_NAME = "flashgen-test-python"


def _notebook_modules():
    """nbformat, nbclient and jupyter_client's KernelSpecManager / KernelManager; ipykernel must be
    importable by this interpreter (the kernel runs it). Fails with the fix when any is missing."""
    missing = [name for name in ("nbformat", "nbclient", "jupyter_client", "ipykernel")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"executing the notebook needs {', '.join(missing)} (dev dependencies): "
                    f"{sys.executable} -m pip install -e '.[dev]'", pytrace=False)
    import nbclient
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    return nbformat, nbclient, KernelSpecManager, KernelManager


def _kernel_manager(tmp: Path, KernelSpecManager, KernelManager):
    """A kernel manager for an IPython kernel run by sys.executable, from a kernelspec in ``tmp``."""
    spec_dir = tmp / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _texts(cell) -> list[tuple[str, str]]:
    """(kind, text) of each output of a code cell: ``stdout``/``stderr`` for streams, the mime type
    for display data and results, ``error`` for errors."""
    found = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            found.append((out["name"], out["text"]))
        elif out["output_type"] in ("display_data", "execute_result"):
            found.extend((mime, data if isinstance(data, str) else json.dumps(data))
                         for mime, data in out["data"].items())
        elif out["output_type"] == "error":
            found.append(("error", f"{out['ename']}: {out['evalue']}"))
    return found


def test_committed_notebook_has_no_outputs():
    nbformat = _notebook_modules()[0]
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{NOTEBOOK.name}: clear the outputs of cells {dirty} before committing"


def test_quickstart_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat, nbclient, KernelSpecManager, KernelManager = _notebook_modules()
    from nbclient.exceptions import CellExecutionError

    # the kernel inherits this environment: import flashgen from this checkout, and keep Jupyter's
    # and IPython's runtime files (connection file, profile) in the temporary directory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                    if os.environ.get("PYTHONPATH") else [])))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    workdir = tmp_path / "run"
    workdir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    km = _kernel_manager(tmp_path, KernelSpecManager, KernelManager)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(workdir)}})
    executed = workdir / NOTEBOOK.name
    start = time.perf_counter()
    failure = None
    try:
        client.execute(cleanup_kc=True)  # a client given a km leaves the kernel running unless told
    except CellExecutionError as e:
        failure = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # IPython's traceback, without its colours
    finally:
        if km.has_kernel:  # startup failed half-way
            km.shutdown_kernel(now=True)
        nbformat.write(nb, executed)  # the executed copy, for a look after a failure
    elapsed = time.perf_counter() - start
    if failure:
        pytest.fail(f"{NOTEBOOK.name} failed in a cell (executed copy: {executed}):\n{failure}", pytrace=False)

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [kind_text for cell in code for kind_text in _texts(cell)]
    errors = [text for kind, text in outputs if kind == "error"]
    assert not errors, f"cells raised: {errors} (executed copy: {executed})"
    assert all(cell.execution_count is not None for cell in code), "some code cells did not run"
    stdout = "".join(text for kind, text in outputs if kind == "stdout")
    markdown = [text for kind, text in outputs if kind == "text/markdown"]

    dtype = re.search(r"dtype: (\w+)", stdout)
    assert dtype and dtype.group(1) in TOLERANCES, f"no known dtype printed by the first cell:\n{stdout[:500]}"
    tol = TOLERANCES[dtype.group(1)]
    errs = re.findall(r"^(.*?)\s*relative error (\S+)", stdout, flags=re.MULTILINE)
    assert len(errs) == EXPECTED_ERRORS, f"expected {EXPECTED_ERRORS} relative errors printed, got {errs}"
    bad = [(label, value) for label, value in errs if not float(value) < tol]  # nan fails too
    assert not bad, f"relative errors above {tol:g} ({dtype.group(1)}): {bad}"
    assert {label.split()[0] for label, _ in errs} >= {"dq", "dk", "dv"}, f"gradient checks missing: {errs}"

    attention_views = [m for m in markdown if "flashgen.Attention" in m]
    assert attention_views, f"no fg.Attention was displayed as markdown: {markdown}"
    assert any("diagonal band" in m for m in attention_views), f"no analysis in the views: {attention_views}"
    assert any("block map of the last call" in m for m in attention_views), \
        f"no Attention view showed the block map of its last call: {attention_views}"
    block_views = [m for m in markdown if "flashgen.BlockMask" in m]
    assert block_views and all(re.search("[░█]", m) for m in block_views), \
        f"the fg.block_mask view has no picture: {block_views or markdown}"
    assert "@triton.jit" in stdout, "the printed kernel source has no @triton.jit"
    assert "captured tensors" in stdout, "explain() output (with the captured doc ids) is missing"
    print(f"{NOTEBOOK.name}: {len(code)} code cells in {elapsed:.1f} s, {dtype.group(1)}, "
          f"worst relative error {max(float(v) for _, v in errs):.1e}")
