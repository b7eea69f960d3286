"""dK/dV-pass tiles against the default, interleaved: whole forward+backward calls on the suite's
variants, arms timed in turn for several rounds on the same buffers.

    PYTHONPATH=. python3 benchmarks/ab_backward_tiles.py --variants full,causal,dense_bias \
        --shape 4x16x8192x128 --dkdv 64,64,4,2 [--rounds 5]

``profile_backward.py``'s sweep times each configuration once, one after the other; identical
kernels scatter by up to 4% between such timings (PERFLOG, tenth session). Here each round times
the default (``runtime.default_backward_configs``), every ``--dkdv`` configuration (the dQ pass
keeps its default) and every ``--dq`` one (the dK/dV pass keeps its default) with
``suite.time_ms`` (do_bench median, L2 flushed), and the report gives each arm's median and the
median and range of its per-round ratio to the default.
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
from flashgen import api  # noqa: E402
from flashgen.runtime import Config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="full", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--dkdv", nargs="+", default=["64,64,4,2"], help="block_m,block_n,warps,stages")
    p.add_argument("--dq", nargs="*", default=[], help="dQ-pass tiles to time (the dK/dV pass at its default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (the plumbing only)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("ab_backward_tiles: no CUDA device (--smoke runs the plumbing on the CPU)")
        return 0
    B, H, S, D = suite.parse_shape("1x2x64x32" if args.smoke else args.shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    default_configs = api.default_backward_configs
    def config(text: str) -> Config:
        return Config(*(int(x) for x in text.split(",")))

    # arm -> (dK/dV tiles, dQ tiles); None keeps that pass's default
    arms = {"default": (None, None), **{c: (config(c), None) for c in args.dkdv},
            **{f"dq:{c}": (None, config(c)) for c in args.dq}}
    rows = []
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        attn = fg.compile(**suite.build_cases(H, S, device, dtype, [name])[name].variant.fg_kwargs)
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        try:
            for _ in range(args.rounds):
                for arm, (dkdv, dq) in arms.items():
                    api.default_backward_configs = lambda *a, dkdv=dkdv, dq=dq: tuple(
                        mine or theirs for mine, theirs in zip((dkdv, dq), default_configs(*a)))
                    attn._plans.clear()  # (a call signature keeps its first call's tiles)
                    times[arm].append(suite.time_ms(lambda a=attn: a(q, k, v).backward(dout), [q, k, v], device))
                    assert dkdv is None or attn.last_tiles["dK/dV"] == dkdv, (attn.last_tiles, dkdv)
                    assert dq is None or attn.last_tiles["dQ"] == dq, (attn.last_tiles, dq)
        finally:
            api.default_backward_configs = default_configs
        for arm in arms:
            ratios = [a / b for a, b in zip(times[arm], times["default"])]
            rows.append((name, arm, statistics.median(times[arm]), statistics.median(ratios), min(ratios),
                         max(ratios)))
            print(f"{name} {arm}: {rows[-1][2]:.3f} ms, /default {rows[-1][3]:.3f}", flush=True)
    print(f"\nfwd+bwd ms, median of {args.rounds} interleaved rounds, {B}x{H}x{S}x{D}, {dtype} (the other pass: its "
          "default)")
    print(f"{'variant':<16} {'tiles':<18} {'ms':>9} {'/default':>9} {'range':>15}")
    for name, arm, ms, ratio, lo, hi in rows:
        print(f"{name:<16} {arm:<18} {ms:>9.3f} {ratio:>9.3f} [{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
