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
def broken(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.dot(tl.load(x_ptr + offs), tl.load(x_ptr + offs)))  # 1-D dot: a compile error


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

from triton.runtime.jit import JITFunction
run_before = JITFunction.run
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

def with_a_broken_kernel():
    kernels.add_one[(8,)](x, 1000, BLOCK=256)
    kernels.broken[(1,)](x, BLOCK=16)

one_of_two = compile_concurrently(with_a_broken_kernel, target)  # the broken child fails, alone

def raising():
    kernels.add_one[(8,)](x, 1000, BLOCK=512)
    raise ValueError("the caller's own error")

nothing = compile_concurrently(raising, target)  # the real call will raise it where it is expected
from triton import knobs
knobs.compilation.always_compile = True  # the caller compiles anyway: no children
always = compile_concurrently(lambda: work((16, 16)), target)
knobs.compilation.always_compile = False
os.environ["FLASHGEN_COMPILE_JOBS"] = "1"  # one after another, in the caller
serial = compile_concurrently(lambda: work((8, 8)), target)
os.environ["FLASHGEN_COMPILE_JOBS"] = "2"

def three():
    kernels.add_one[(1,)](x, 1000, BLOCK=1024)
    kernels.scale[(1,)](x, 1000, 2.0, BLOCK=1024)
    kernels.add_one[(1,)](x, 1000, BLOCK=2048)

queued = compile_concurrently(three, target)  # two children at a time, a third when one ends
from triton.runtime.jit import JITFunction
assert JITFunction.run is run_before, "the capture was not undone"
print(first, again, one_new, two_new, one_of_two, nothing, always, serial, queued)
'''


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kernels_compile_in_child_processes_into_the_cache(tmp_path):
    (tmp_path / "kernels.py").write_text(KERNELS)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # two new binaries: two children; both built: none; one new binary compiles in the caller
    # (a child would gain nothing); (32, 32) needs two new ones again; of a valid and a broken
    # kernel only the valid one compiles (the broken one is left to the caller, which reports
    # the error); a call that raises compiles nothing, nor one that Triton would compile anyway,
    # nor with FLASHGEN_COMPILE_JOBS=1; with 2, three binaries compile two at a time
    assert done.stdout.split() == ["2", "0", "0", "2", "1", "0", "0", "0", "3"], done.stdout
    assert len(list(tmp_path.glob("triton/*/*.cubin"))) == 8  # the children's binaries are in the cache


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_past_its_time_is_killed_and_counted_as_failed():
    import time

    from flashgen.parallel import _wait

    pids = []
    for seconds in (0.0, 30.0):
        pid = os.fork()
        if pid == 0:  # a child that finishes at once, and one that would hang
            time.sleep(seconds)
            os._exit(0)
        pids.append(pid)
    started = time.monotonic()
    assert _wait(pids, timeout_s=0.5) == 1
    assert time.monotonic() - started < 10
    for pid in pids:  # both reaped: nothing left to wait for
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
