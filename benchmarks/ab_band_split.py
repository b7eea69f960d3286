"""The Triton forward's band split (``SPLIT_BAND``: a band and a rest over a block map, the band's
clauses tested only on tiles across its edges) on and off, by the launch's rule
(``Attention._split_band``) and forced both ways, next to flex: arms interleaved for ``--rounds``
rounds in one process, forward only, TF/s over the kept entries.

    PYTHONPATH=. python3 benchmarks/ab_band_split.py [--shape 8x16x4096x64] [--variants dilated,document]
        [--rounds 3]

Every arm is checked against the "off" arm (relative error, printed; above 1e-2 fails). At head
dim 64 sparse maps take the Triton forward (``runtime.WS_SPARSE_HEAD_DIMS``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from ab_ws_forward import rel
from bench_forward import build_variants, count_kept, interleaved, parse_shape

import flashgen as fg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8x16x4096x64")
    parser.add_argument("--variants", default="dilated,document")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    B, H, S, D = parse_shape(args.shape)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    rows = []
    for var in (var for var in build_variants(fg, H, "cuda", seq_len=S) if var.key in args.variants.split(",")):
        mask = create_block_mask(var.flex_mask, None, None, S, S, device="cuda")
        attns = {name: fg.compile(**var.fg_kwargs) for name in ("rule", "off", "on")}
        attns["off"]._split_band = lambda *a: False  # (an instance attribute: this arm's launches only)
        attns["on"]._split_band = lambda *a: True
        arms = {name: (lambda attn=attn: attn(q, k, v)) for name, attn in attns.items()}
        arms["flex"] = lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask)
        flops = 4 * B * H * count_kept(var.flex_mask, S, S, "cuda") * D
        with torch.no_grad():
            ref = arms["off"]()
            errs = {name: rel(arms[name](), ref) for name in ("rule", "on")}
            chosen = attns["rule"]._split_band((B, H, S, S), attns["rule"].last_tiles["forward"], "cuda")
            rule = "on" if chosen else "off"
            times = interleaved(arms, args.rounds)
        flex_tf = flops / statistics.median(times["flex"]) / 1e9
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append((var.key, name if name != "rule" else f"rule ({rule})", ms, flops / ms / 1e9,
                         flops / ms / 1e9 / flex_tf, errs.get(name), ", ".join(f"{t:.3f}" for t in ts)))
        assert all(e < 1e-2 for e in errs.values()), errs
    print(f"# {args.shape} bf16 forward (TF/s over kept entries; /flex: of the round medians)")
    print(f"{'variant':>10} {'arm':>10} {'ms':>8} {'TF/s':>7} {'/flex':>6} {'err vs off':>10}  rounds (ms)")
    for key, name, ms, tf, ratio, err, ts in rows:
        print(f"{key:>10} {name:>10} {ms:8.3f} {tf:7.1f} {ratio:6.2f} {'' if err is None else f'{err:.1e}':>10}  {ts}")


if __name__ == "__main__":
    main()
