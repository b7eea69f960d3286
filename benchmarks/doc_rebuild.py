"""A training step whose document ids change every step, next to one whose ids stay put.

    PYTHONPATH=. python3 benchmarks/doc_rebuild.py [--shape 4x16x8192x128] [--docs 16] [--profile]

Causal document mask, bf16, forward+backward. flashgen: the same ``Attention`` each step; with
"ids change" an in-place update (``doc.add_(0)``) bumps the id tensor's version before the step,
so the step rebuilds its block maps (and its kept launches) as it would for a new batch; once
with the maps analysed on host copies of the ids (the default) and once where the ids live
(``blocks.ANALYSIS_ON_HOST = False``).
FlexAttention (``torch.compile(flex_attention)``): the block mask built once, against
``torch.compile(create_block_mask)`` called every step, as its documentation suggests for
masks that change. Median milliseconds of ``triton.testing.do_bench`` per step; the
difference between the two rows of an implementation is what changing ids costs it per step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen import blocks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="also a cProfile of flashgen's steps whose ids change")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("doc_rebuild: no CUDA device")
        return 0
    B, H, S, D = suite.parse_shape(args.shape)
    doc = torch.arange(S, device="cuda") * args.docs // S
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def bench(step) -> float:
        return float(triton.testing.do_bench(step, warmup=5, rep=100, return_mode="median"))

    attn = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)

    def fg_step(change: bool):
        if change:
            doc.add_(0)  # a new version of the ids: the block maps are rebuilt
        attn(q, k, v).backward(dout)

    rows = [("flashgen, ids stay put", bench(lambda: fg_step(False))),
            ("flashgen, ids change every step", bench(lambda: fg_step(True)))]
    if args.profile:  # where a rebuilding step's host time goes (by own time)
        print(suite.own_time_profile(lambda: ([fg_step(True) for _ in range(10)], torch.cuda.synchronize())))
    blocks.ANALYSIS_ON_HOST = False  # the experiment: block maps analysed on the GPU, no host copy
    attn = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)
    try:
        rows.append(("flashgen, ids change, maps analysed on the GPU", bench(lambda: fg_step(True))))
    except Exception as exc:  # noqa: BLE001 - an experiment that fails is a finding
        print(f"maps analysed on the GPU: {type(exc).__name__}: {str(exc)[:200]}")
    blocks.ANALYSIS_ON_HOST = True
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        create_block_mask = None
    if create_block_mask is not None:
        flex, build = torch.compile(flex_attention), torch.compile(create_block_mask)

        def mask(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        fixed = create_block_mask(mask, None, None, S, S, device="cuda")
        rows.append(("flex, block mask built once", bench(lambda: flex(q, k, v, block_mask=fixed).backward(dout))))
        def flex_step():
            flex(q, k, v, block_mask=build(mask, None, None, S, S, device="cuda")).backward(dout)

        rows.append(("flex, compiled create_block_mask every step", bench(flex_step)))
    print(f"causal document mask ({args.docs} documents), {args.shape}, bf16, fwd+bwd, median ms per step")
    for name, ms in rows:
        print(f"  {name:<46} {ms:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
