"""TMA against pointer loads, interleaved: the A/B the suite's scatter cannot settle.

    PYTHONPATH=. python3 benchmarks/ab_loads.py --variants sliding,document --shape 4x16x8192x128 \
        [--passes fwd+bwd] [--rounds 7]

The suite times each implementation once, one after the other; identical kernels there scattered
by up to 4% (PERFLOG, tenth session), which hides the 2-5% effects of a load form. This times
the arms in rounds, ABAB..., on the same buffers (``suite.time_ms`` each: do_bench median, L2
flushed), and reports each arm's median and the median of the per-round ratios tma / ptr with
their range. Arms: ``tma`` (``flashgen.runtime.TMA = True``: every variant, heads up to 128),
``ptr`` (``False``) and ``default`` (``None``: the rule of ``runtime.backward_tma``). Only the
backward has a TMA form; the forward is timed to show the arms' scatter on identical kernels.
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

ARMS = {"tma": True, "ptr": False, "default": None}


def timed(attn, q, k, v, dout, backward: bool, arm: str, device: str) -> float:
    """One timing of ``attn`` under ``arm`` (the switch is module state: autograd's backward thread
    sees it too)."""
    saved, runtime.TMA = runtime.TMA, ARMS[arm]
    try:
        if backward:
            return suite.time_ms(lambda: attn(q, k, v).backward(dout), [q, k, v], device)
        return suite.time_ms(lambda: attn(q, k, v), [], device)
    finally:
        runtime.TMA = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="full,sliding", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (the plumbing only)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("ab_loads: no CUDA device (--smoke runs the plumbing on the CPU)")
        return 0
    B, H, S, D = suite.parse_shape("1x2x64x32" if args.smoke else args.shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    base = [torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3)]
    dout = torch.randn_like(base[0])
    rows = []
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        case = suite.build_cases(H, S, device, dtype, [name])[name]
        attn = fg.compile(**case.variant.fg_kwargs)
        for pass_name in suite.parse_list(args.passes, suite.PASSES, "passes"):
            backward = pass_name == "fwd+bwd"
            q, k, v = (t.detach().requires_grad_(backward) for t in base)
            times: dict[str, list[float]] = {arm: [] for arm in ARMS}
            for _ in range(args.rounds):
                for arm in ARMS:
                    times[arm].append(timed(attn, q, k, v, dout, backward, arm, device))
            ratios = [a / b for a, b in zip(times["tma"], times["ptr"])]
            rows.append((name, pass_name, *(statistics.median(times[arm]) for arm in ARMS),
                         statistics.median(ratios), min(ratios), max(ratios)))
            print(f"{name} {pass_name}: " + ", ".join(f"{arm} {statistics.median(t):.4f}" for arm, t in times.items())
                  + f"; tma/ptr {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]", flush=True)
    print(f"\nms, median of {args.rounds} interleaved rounds, {'x'.join(map(str, (B, H, S, D)))}, {dtype}")
    print(f"{'variant':<16} {'pass':<8} {'tma':>9} {'ptr':>9} {'default':>9} {'tma/ptr':>8} {'range':>15}")
    for name, pass_name, tma, ptr, default, ratio, lo, hi in rows:
        print(f"{name:<16} {pass_name:<8} {tma:>9.4f} {ptr:>9.4f} {default:>9.4f} {ratio:>8.3f} "
              f"[{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
