"""Compiling kernels side by side in child processes (``flashgen.parallel``), without a GPU: two
small kernels compiled for sm_90 with Triton's own compiler (not the interpreter) in a fresh
process, so that the mechanism is checked on CI. The GPU file checks it on flashgen's kernels."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def scale(x_ptr, n, c, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * c, mask=offs < n)
'''

SCRIPT = '''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from flashgen.parallel import compile_concurrently
import kernels

x = torch.randn(1000)
target = GPUTarget("cuda", 90, 32)

def work(blocks=(128, 128)):
    kernels.add_one[(8,)](x, 1000, BLOCK=blocks[0])
    kernels.scale[(8,)](x, 1000, 2.0, BLOCK=blocks[1])
    return "not run"

before = x.clone()
first = compile_concurrently(work, target)
again = compile_concurrently(work, target)
one_new = compile_concurrently(lambda: work((64, 128)), target)
two_new = compile_concurrently(lambda: work((32, 32)), target)
assert torch.equal(x, before), "a captured launch ran"
print(first, again, one_new, two_new)
'''


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_compile_in_child_processes_into_the_cache(tmp_path):
    (tmp_path / "kernels.py").write_text(KERNELS)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # two new binaries: two children; both built: none; one new binary compiles in the caller
    # (a child would gain nothing); (32, 32) needs two new ones again
    assert done.stdout.split() == ["2", "0", "0", "2"], done.stdout
    assert len(list(tmp_path.glob("triton/*/*.cubin"))) == 4  # the children's binaries are in the cache
