"""The refill of a document mask's Gluon maps as hulls (two levels) or as runs (three).

    PYTHONPATH=. python3 benchmarks/ab_hulls.py [--shape 4x16x8192x128] [--docs 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import parse_shape  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen import maps  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_hulls: no CUDA device")
        return 0
    B, H, S, _ = parse_shape(args.shape)
    doc = ((torch.arange(S, device="cuda") + S // (3 * args.docs)) * args.docs // S).clamp(max=args.docs - 1)
    attn = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)
    shape = (B, H, S, S)
    live = attn._live_runs(shape, "cuda")
    other = maps.LiveRuns(live.source, live.mask, live.captured, shape, live.device, live._constants["CHECK_READS"])
    live.hulls()
    live.hulls(transpose=True)
    other.runs((128, 128))
    other.runs((64, 128), transpose=True)
    maps_of = {"hulls": live, "runs": other}
    keys = {name: tuple(lr._runs) for name, lr in maps_of.items()}
    bm = attn.block_mask(*shape, (64, 64), "cuda")
    for name, lr in maps_of.items():
        def refill(lr=lr, k=keys[name]):
            torch.autograd.graph.increment_version(doc)
            lr.refresh(k)
        maps_of[name] = refill
        for _ in range(3):
            refill()
    torch.cuda.synchronize()
    same = torch.equal(live.hulls(), bm.hulls()) and torch.equal(live.hulls(transpose=True), bm.hulls(transpose=True))
    print(f"refilled hulls equal the host's: {same}")
    times = {name: [] for name in maps_of}
    from torch.nn.attention.flex_attention import create_block_mask

    build = torch.compile(create_block_mask)

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    times["flex create_block_mask"] = []
    fns = dict(maps_of, **{"flex create_block_mask": lambda: build(mask, None, None, S, S, device="cuda")})
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median") * 1e3)
    flex = statistics.median(times["flex create_block_mask"])
    for name, us in times.items():
        med = statistics.median(us)
        print(f"{name:24s} {med:7.1f} us  ({', '.join(f'{x:.1f}' for x in us)})  flex/this {flex / med:5.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
