"""The Gluon forward against the Triton one and flex, per variant, with the Gluon forward's K/V stages
(``runtime.WS_STAGES``) and consumer warp groups (``runtime.WS_FORWARD_GROUPS``) varied and head dims
it does not take by default switched on (``runtime.WS_FORWARD_HEAD_DIMS``; arms of other than two
groups take every variant those groups render, past ``Attention._ws_launch_source``'s rule): arms interleaved for
``--rounds`` rounds in one process, forward only, TF/s over the kept entries (PERFLOG, nineteenth
and twenty-sixth sessions).

    PYTHONPATH=. python3 benchmarks/ab_ws_forward.py [--shape 8x16x4096x64] [--variants full,causal]
        [--stages 2,3,4] [--groups 2,3] [--rounds 3]

Every Gluon arm is checked against the Triton arm (relative error, printed; above 1e-2 fails).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_forward import build_variants, count_kept, parse_shape
from triton.testing import do_bench

import flashgen as fg
from flashgen import runtime


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8x16x4096x64")
    p.add_argument("--variants", default="full,causal,sliding")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--groups", default="2", help="consumer warp groups of the Gluon arms (each with each stage)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    B, H, S, D = parse_shape(args.shape)
    runtime.WS_FORWARD_HEAD_DIMS = (64, 128)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    wanted = args.variants.split(",")
    rows = []
    for var in build_variants(fg, H, "cuda", seq_len=S):
        if var.key not in wanted:
            continue
        attn = fg.compile(**var.fg_kwargs)
        mask = create_block_mask(var.flex_mask, B, H, S, S, device="cuda") if var.flex_mask else None

        def arm(ws: bool, stages: int = 3, groups: int = 2, attn=attn):
            def call():
                runtime.WS_FORWARD, runtime.WS_STAGES, runtime.WS_FORWARD_GROUPS[D] = ws, stages, groups
                if groups != 2:  # (the launch's rule bypassed: the groups take whatever they render)
                    attn._ws_launch_source = lambda backward, extra, q, v, skv: attn._ws_source(
                        backward, extra, True, 2 if backward else groups)
                try:
                    return attn(q, k, v)
                finally:
                    runtime.WS_FORWARD, runtime.WS_STAGES = True, 3
                    attn.__dict__.pop("_ws_launch_source", None)
            return call

        arms = {"triton": arm(False)}
        arms.update({f"gluon g{g} s{n}": arm(True, int(n), int(g)) for g in args.groups.split(",")
                     for n in args.stages.split(",")})
        arms["flex"] = lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask)
        flops = 4 * B * H * count_kept(var.flex_mask, S, S, "cuda") * D
        with torch.no_grad():
            ref = arms["triton"]()
            errs = {name: rel(fn(), ref) for name, fn in arms.items() if name.startswith("gluon")}
            kernels = {name: str(attn.last_tiles) for name, fn in arms.items() if name != "flex" and fn() is not None}
            times: dict[str, list[float]] = {name: [] for name in arms}
            for _ in range(args.rounds):
                for name, fn in arms.items():
                    times[name].append(do_bench(fn, warmup=50, rep=200))
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append((var.key, name, ms, flops / ms / 1e9, errs.get(name), kernels.get(name, "")))
        flex_tf = flops / statistics.median(times["flex"]) / 1e9
        rows.append((var.key, "(flex TF/s)", 0.0, flex_tf, None, ""))
        assert all(e < 1e-2 for e in errs.values()), errs
    print(f"# {args.shape} bf16 forward (TF/s over kept entries; /flex from the same round medians)")
    flex_of = {r[0]: r[3] for r in rows if r[1] == "(flex TF/s)"}
    print(f"{'variant':>14} {'arm':>13} {'ms':>8} {'TF/s':>7} {'/flex':>6} {'err vs triton':>13}  kernels")
    for key, name, ms, tf, err, kern in rows:
        if name == "(flex TF/s)":
            continue
        print(f"{key:>14} {name:>13} {ms:8.3f} {tf:7.1f} {tf / flex_of[key]:6.2f} "
              f"{'' if err is None else f'{err:.1e}':>13}  {kern[:60]}")


if __name__ == "__main__":
    main()
