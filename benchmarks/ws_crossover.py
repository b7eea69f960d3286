"""Where the warp-specialised (Gluon) kernels start to pay: per-call time of flashgen's forward and
forward+backward with the Gluon kernels and with the Triton ones, from small shapes up, in one
process. Two clocks: the GPU's (``do_bench``'s median) and the caller's (wall time per call of 50
back-to-back calls, host work included: what a training loop sees when the GPU waits on the host).
``runtime.WS_MIN_FLOPS`` is set to 0 here, so both arms run at every shape; its default should sit
where the Gluon arm stops losing on both clocks.

    PYTHONPATH=. python3 benchmarks/ws_crossover.py [--shapes 1x16x512x128,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

import flashgen as fg
from flashgen import runtime

SHAPES = "1x16x512x128,1x16x1024x128,1x16x2048x128,2x16x2048x128,1x16x4096x128,4x16x1024x128"


def wall(fn, calls: int = 50) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls, host work included."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def one_call(attn, q, k, v, g):
    def call():
        out = attn(q, k, v)
        if g is not None:
            out.backward(g)
    return call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--json")
    args = p.parse_args()
    runtime.WS_MIN_FLOPS = 0
    rows = []
    for shape in args.shapes.split(","):
        B, H, S, D = (int(x) for x in shape.split("x"))
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        for name, mask in (("full", None), ("causal", fg.mods.causal)):
            attn = fg.compile(mask_mod=mask)
            for mode in ("fwd", "fwd+bwd"):
                call = one_call(attn, q, k, v, g if mode == "fwd+bwd" else None)
                row = dict(shape=shape, variant=name, mode=mode)
                for arm, on in (("gluon", True), ("triton", False)):
                    runtime.WS_FORWARD = runtime.WS_BACKWARD = on
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        call()
                        row[arm] = dict(gpu=triton.testing.do_bench(call), wall=wall(call),
                                        tiles={name_: str(c) for name_, c in attn.last_tiles.items()})
                runtime.WS_FORWARD = runtime.WS_BACKWARD = True
                rows.append(row)
    print(f"{'shape':>16} {'variant':>7} {'mode':>8} | {'gluon gpu':>9} {'triton gpu':>10} | "
          f"{'gluon wall':>10} {'triton wall':>11} | ms")
    for r in rows:
        g_, t_ = r["gluon"], r["triton"]
        faster = "gluon" if max(g_["gpu"], g_["wall"]) < max(t_["gpu"], t_["wall"]) else "triton"
        print(f"{r['shape']:>16} {r['variant']:>7} {r['mode']:>8} | {g_['gpu']:9.4f} {t_['gpu']:10.4f} | "
              f"{g_['wall']:10.4f} {t_['wall']:11.4f} | {faster}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
