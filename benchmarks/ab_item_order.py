"""The three-group Gluon forward's order of work items, A/B in one process: rounds of programs take
items from chunks of heads whose keys and values take ``runtime.WS_CHUNK_BYTES`` (each chunk's last
query blocks first; ``all``: one chunk of every head). Arms interleaved for ``--rounds`` rounds next to
flex and the Triton kernel; forward only, TF/s over the kept entries (PERFLOG, twenty-eighth session).

    PYTHONPATH=. python3 benchmarks/ab_item_order.py [--shape 8x16x4096x64] [--variants causal,sliding]
        [--mib 8,16,32,all] [--rounds 3]

Every arm is checked against the Triton arm (relative error above 1e-2 fails).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_forward import build_variants, count_kept, interleaved, parse_shape, rel_err

import flashgen as fg
from flashgen import runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8x16x4096x64")
    p.add_argument("--variants", default="causal,sliding,prefix_lm")
    p.add_argument("--mib", default="8,16,32,all")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    B, H, S, D = parse_shape(args.shape)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    rows = []
    for var in build_variants(fg, H, "cuda", seq_len=S):
        if var.key not in args.variants.split(","):
            continue
        mask = create_block_mask(var.flex_mask, B, H, S, S, device="cuda") if var.flex_mask else None
        attn = fg.compile(**var.fg_kwargs)
        arms = {}
        for mib in args.mib.split(","):
            def call(chunk=1 << 60 if mib == "all" else int(mib) << 20, attn=attn):
                runtime.WS_CHUNK_BYTES = chunk
                try:
                    return attn(q, k, v)
                finally:
                    runtime.WS_CHUNK_BYTES = default
            arms[f"{mib} MiB"] = call

        def triton(attn=attn):
            runtime.WS_FORWARD = False
            try:
                return attn(q, k, v)
            finally:
                runtime.WS_FORWARD = True

        arms["triton"] = triton
        arms["flex"] = lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask)
        flops = 4 * B * H * count_kept(var.flex_mask, S, S, "cuda") * D
        with torch.no_grad():
            ref = triton()
            errs = {name: rel_err(fn(), ref, torch.float64) for name, fn in arms.items() if name.endswith("MiB")}
            assert attn.last_tiles["forward"] == "warp-specialised (Gluon)", attn.last_tiles
            times = interleaved(arms, args.rounds)
        flex_tf = flops / statistics.median(times["flex"]) / 1e9
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append((var.key, name, ms, flops / ms / 1e9, flops / ms / 1e9 / flex_tf, errs.get(name)))
        assert all(e < 1e-2 for e in errs.values()), errs
    print(f"# {args.shape} bf16 forward, the three-group Gluon forward's items by chunks of heads (TF/s over kept "
          "entries)")
    print(f"{'variant':>10} {'arm':>10} {'ms':>8} {'TF/s':>7} {'/flex':>6} {'err':>8}")
    for key, name, ms, tf, x, err in rows:
        print(f"{key:>10} {name:>10} {ms:8.3f} {tf:7.1f} {x:6.2f} {'' if err is None else f'{err:.1e}':>8}")


default = runtime.WS_CHUNK_BYTES

if __name__ == "__main__":
    main()
