"""What the warp-specialised kernels cost on the host: a new variant's first forward+backward call
in a fresh process with an empty cache, and the host time per forward call and per training step
(forward and backward) once warm, with the Gluon kernels (``runtime.WS_FORWARD`` and
``runtime.WS_BACKWARD``) and with the Triton ones.

    PYTHONPATH=. python3 benchmarks/ws_host.py [--shape 1x16x4096x128] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, statistics, sys, time
import torch
import flashgen as fg
from flashgen import runtime
runtime.WS_FORWARD = runtime.WS_BACKWARD = sys.argv[1] == "1"
B, H, S, D = (int(x) for x in sys.argv[2].split("x"))
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
(q * 2).backward(torch.ones_like(q))  # torch's own first backward, apart
q.grad = None
torch.cuda.synchronize()
attn = fg.compile(mask_mod=fg.mods.sliding_window(int(sys.argv[3])))
t0 = time.perf_counter()
out = attn(q, k, v)
out.backward(torch.ones_like(out))
torch.cuda.synchronize()
first = time.perf_counter() - t0
kernels = dict(attn.last_tiles)
step = []
g = torch.ones_like(out)
for _ in range(100):
    t0 = time.perf_counter()
    attn(q, k, v).backward(g)
    step.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
if len(sys.argv) > 4:  # --profile: where a warm training step's host time goes
    import cProfile, pstats
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(30):
        attn(q, k, v).backward(g)
        torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)
with torch.no_grad():
    host = []
    for _ in range(300):
        t0 = time.perf_counter()
        attn(q, k, v)
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
print(json.dumps({"first_call_s": first, "host_us": statistics.median(host[50:]) * 1e6,
                  "step_host_us": statistics.median(step[20:]) * 1e6,
                  "kernels": {k: str(v) for k, v in kernels.items()}}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1x16x4096x128")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions of a warm training step")
    args = p.parse_args(argv)
    for width in (777, 778):  # (new variants: nothing cached)
        for ws in ("1", "0"):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, FLASHGEN_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
                done = subprocess.run([sys.executable, "-c", CHILD, ws, args.shape, str(width + int(ws) * 10),
                                       *(["profile"] if args.profile else [])],
                                      env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:])
                    return 1
                lines = done.stdout.strip().splitlines()
                if args.profile:
                    print("\n".join(lines[:-1]))
                r = json.loads(lines[-1])
                print(f"{'gluon' if ws == '1' else 'triton'} kernels ({r['kernels']}): first fwd+bwd call "
                      f"{r['first_call_s']:.2f} s, host per forward call {r['host_us']:.0f} us, per training "
                      f"step {r['step_host_us']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
