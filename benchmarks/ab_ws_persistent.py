"""The Gluon backward persistent or one program per row of keys (``runtime.WS_PERSISTENT``), A/B:
whole forward+backward calls, arms interleaved for ``--rounds`` rounds on the same buffers, next to
flex (PERFLOG, twenty-first session).

    PYTHONPATH=. python3 benchmarks/ab_ws_persistent.py [--variants document,causal,full]
        [--shape 4x16x8192x128] [--arms never,sparse,all] [--rounds 3]

Arms: ``never`` leaves sparse block maps (a document mask's) to the Triton backward and runs the
Gluon one a program per row elsewhere; ``sparse`` runs sparse maps' backward in the persistent Gluon
kernel (the others as ``never``); ``all`` runs every Gluon backward persistent. Each arm's gradients
are checked against the first arm's (relative error, printed; above 1e-2 fails).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen import runtime  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="document,causal,full", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--arms", default="never,sparse,all")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_ws_persistent: no CUDA device")
        return 0
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    B, H, S, D = suite.parse_shape(args.shape)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    arms = args.arms.split(",")
    saved = runtime.WS_PERSISTENT
    rows = []
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        var = suite.build_cases(H, S, "cuda", torch.bfloat16, [name])[name].variant
        attn = fg.compile(**var.fg_kwargs)
        mask = create_block_mask(var.flex_mask, None, None, S, S, device="cuda") if var.flex_mask else None

        def call(arm: str, attn=attn):
            def run():
                runtime.WS_PERSISTENT = arm  # (read by each backward call)
                try:
                    attn(q, k, v).backward(dout)
                finally:
                    runtime.WS_PERSISTENT = saved
            return run

        grads, errs, kernels = {}, {}, {}
        for arm in arms:
            for t in (q, k, v):
                t.grad = None
            call(arm)()
            kernels[arm] = attn.last_tiles.get("dQ, dK/dV", "Triton")
            grads[arm] = [t.grad.clone() for t in (q, k, v)]
            errs[arm] = max(rel(a, b) for a, b in zip(grads[arm], grads[arms[0]]))
        times: dict[str, list[float]] = {arm: [] for arm in [*arms, "flex"]}
        for _ in range(args.rounds):
            for arm in arms:
                times[arm].append(suite.time_ms(call(arm), [q, k, v], "cuda"))
            times["flex"].append(suite.time_ms(
                lambda var=var, mask=mask: flex(q, k, v, score_mod=var.flex_score, block_mask=mask).backward(dout),
                [q, k, v], "cuda"))
        flops = 3.5 * 4 * B * H * suite.count_kept(var.fg_kwargs.get("mask_mod"), S, S, "cuda") * D
        flex_ms = statistics.median(times["flex"])
        for arm, ts in times.items():
            ms = statistics.median(ts)
            rows.append((name, arm, ms, flops / ms / 1e9, flex_ms / ms, errs.get(arm), kernels.get(arm, "")))
        assert all(e < 1e-2 for e in errs.values()), errs
    print(f"\n# {args.shape} bf16 forward+backward, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<10} {'arm':>7} {'ms':>8} {'TF/s':>7} {'x flex':>7} {'grad err':>9}  backward")
    for name, arm, ms, tf, ratio, err, kern in rows:
        print(f"{name:<10} {arm:>7} {ms:8.3f} {tf:7.1f} {ratio:7.2f} {'' if err is None else f'{err:.1e}':>9}  {kern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
