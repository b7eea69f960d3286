"""First-call latency of a new variant (forward + backward), cold and with a warm disk cache.

    PYTHONPATH=. python3 benchmarks/startup.py [--profile] [--repeat N]

Runs the same new variant (a sliding window of a width not used before, so that no cache holds
it) in two fresh processes one after the other: the first compiles everything (trace, analysis,
code generation, Triton compile), the second finds the generated sources and the compiled
binaries in flashgen's cache. ``--profile`` prints each first call's cProfile (top 30 by
cumulative time). Prints the seconds of each, measured around the first
forward+backward call only; the imports and torch's own first backward (which imports torch.fx
and sympy, whatever the attention) are done before and reported separately. ``--repeat N`` runs
N new variants (each cold, then warm) and prints every run and the medians: the lent GPU hosts'
load moves single runs by a factor of two.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys

CHILD = r"""
import cProfile, io, json, pstats, sys, time
t0 = time.perf_counter()
import torch
import flashgen as fg
t_import = time.perf_counter() - t0
width, profile = int(sys.argv[1]), sys.argv[2] == "1"
q, k, v = (torch.randn(1, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
# torch's own first backward imports torch.fx and sympy (seconds without bytecode caches); any
# training script pays it once, with or without flashgen: done here, timed apart
t0 = time.perf_counter()
(q * 2).backward(torch.ones_like(q))  # a non-scalar output: the path that imports torch.fx
q.grad = None
torch.cuda.synchronize()
t_torch = time.perf_counter() - t0


def first_call():
    attn = fg.compile(mask_mod=fg.mods.sliding_window(width) & fg.mods.prefix_lm(64))
    out = attn(q, k, v)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()


t0 = time.perf_counter()
if profile:
    prof = cProfile.Profile()
    prof.runcall(first_call)
else:
    first_call()
elapsed = time.perf_counter() - t0
if profile:
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    print(text.getvalue())
from flashgen import runtime
print(json.dumps({"import_s": t_import, "torch_first_backward_s": t_torch, "first_call_s": elapsed,
                  "prewarm_wait_s": runtime.prewarm_wait_s}))
"""


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("startup: no CUDA device")
        return 0
    profile = "--profile" in sys.argv[1:]
    repeat = int(sys.argv[sys.argv.index("--repeat") + 1]) if "--repeat" in sys.argv else 1
    labels = ("cold (new variant)", "warm cache, fresh process")
    runs: dict[str, list[float]] = {label: [] for label in labels}
    for width in random.sample(range(1000, 100000), repeat):
        for label in labels:
            out = subprocess.run([sys.executable, "-c", CHILD, str(width), "1" if profile else "0"],
                                 capture_output=True, text=True, check=True)
            if profile:
                print(f"--- {label}: the first call's profile (cumulative)\n" + "\n".join(out.stdout.splitlines()[:-1]))
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[label].append(r["first_call_s"])
            print(f"{label:<28} first fwd+bwd call {r['first_call_s']:.3f} s, of which waiting for the prewarm "
                  f"thread {r['prewarm_wait_s']:.3f} s   (import torch + flashgen {r['import_s']:.2f} s, torch's "
                  f"first backward {r['torch_first_backward_s']:.2f} s)", flush=True)
    if repeat > 1:
        for label in labels:
            print(f"{label:<28} median of {repeat}: {statistics.median(runs[label]):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
