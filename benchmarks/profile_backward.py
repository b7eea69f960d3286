"""Where the backward time goes for one masked variant, and how it moves with the tile sizes.

    PYTHONPATH=. python3 benchmarks/profile_backward.py [--mask document|causal|prefix_lm|full|dense_bias|softcap]

bf16, B=4, H=16, S=8192, D=128. Prints (1) the CUDA kernels of one forward+backward of flashgen
and of torch.compile(flex_attention) (torch.profiler, µs per call), (2) flashgen's fwd+bwd time
for a few (dK/dV, dQ) configurations, next to flex's from the same process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = [((64, 128, 8, 3), (128, 64, 8, 3)), ((64, 64, 4, 3), (64, 64, 4, 3)), ((32, 128, 4, 3), (128, 32, 4, 3)),
           ((64, 128, 8, 2), (128, 64, 8, 2)), ((128, 128, 8, 2), (128, 128, 8, 2)), ((64, 64, 4, 2), (128, 64, 8, 3))]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mask", default="document", choices=("document", "causal", "prefix_lm", "full", "dense_bias",
                                                            "softcap"),
                   help="a mask, or full attention with a dense bias [H, S, S] (bf16) or soft-cap 30 + causal")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_backward: no CUDA device")
        return 0
    import triton
    from bench_backward import document_ids
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import flashgen as fg
    import flashgen.api as api
    from flashgen.runtime import Config

    B, H, S, D = 4, 16, 8192, 128
    doc, _ = document_ids(S, 16, "cuda")
    if args.mask == "document":
        mask = fg.mods.causal & fg.mods.document(doc)
        def flex_mask(b, h, q, kv):
            return (doc[q] == doc[kv]) & (kv <= q)
    elif args.mask == "causal":
        mask = fg.mods.causal
        def flex_mask(b, h, q, kv):
            return kv <= q
    elif args.mask == "prefix_lm":
        mask = fg.mods.prefix_lm(1024)
        def flex_mask(b, h, q, kv):
            return (kv < 1024) | (kv <= q)
    else:  # full attention, plain or with a score_mod
        mask = flex_mask = None
    mods, flex_mod = {}, None
    if args.mask == "dense_bias":
        bias = torch.randn(H, S, S, device="cuda", dtype=torch.bfloat16)
        mods = {"bias": bias}
        def flex_mod(score, b, h, q, kv):
            return score + bias[h, q, kv]
    elif args.mask == "softcap":
        mods, mask = {"score_mod": fg.mods.softcap(30.0)}, fg.mods.causal
        def flex_mod(score, b, h, q, kv):
            return 30.0 * torch.tanh(score / 30.0)
        def flex_mask(b, h, q, kv):
            return kv <= q
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    attn = fg.compile(mask_mod=mask, **mods)
    bm = create_block_mask(flex_mask, None, None, S, S, device="cuda") if flex_mask else None
    flex = torch.compile(flex_attention)

    def step_fg():
        attn(q, k, v).backward(dout)

    def step_flex():
        flex(q, k, v, score_mod=flex_mod, block_mask=bm).backward(dout)

    for fn in (step_fg, step_flex):
        fn()
    torch.cuda.synchronize()
    for name, fn in (("flashgen", step_fg), ("flex", step_flex)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(f"== {name}: CUDA kernels, µs per fwd+bwd ==")
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]
        for e in rows:
            print(f"  {e.device_time_total / 3:9.0f}  {e.key[:90]}")
    flex_ms = triton.testing.do_bench(step_flex, warmup=25, rep=100, return_mode="median")
    print(f"flex fwd+bwd {flex_ms:.3f} ms")
    original = api.default_backward_configs
    for dkdv, dq in CONFIGS:
        api.default_backward_configs = lambda *a, dkdv=dkdv, dq=dq: (Config(*dkdv), Config(*dq))
        attn._plans.clear()  # a call signature keeps the tiles of its first launch: choose them again
        try:
            ms = triton.testing.do_bench(step_fg, warmup=25, rep=100, return_mode="median")
            print(f"flashgen dkdv {dkdv} dq {dq}: {ms:.3f} ms  ({flex_ms / ms:.2f}x flex)")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"flashgen dkdv {dkdv} dq {dq}: failed {type(exc).__name__}: {str(exc)[:100]}")
    api.default_backward_configs = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
