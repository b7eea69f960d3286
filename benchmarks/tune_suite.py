"""Tune the suite's variants (``benchmarks/suite.py``) with flashgen's own tuner and print, per
kernel family, the best configuration next to the untuned default's time.

    PYTHONPATH=. python3 benchmarks/tune_suite.py --variants rel_table,dense_bias [--shape 4x16x8192x128] [--bwd]

Runs ``Attention.tune`` (the search space of ``flashgen.tuning``, timed with CUDA events) on random
bf16 inputs; the default is the configuration an untuned call launches (``Attention.forward_config``,
``runtime.default_backward_configs``). Results are also stored in the cache, as with ``flashgen tune``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import flashgen as fg  # noqa: E402


def _t(trial: dict) -> tuple:
    return tuple(trial[k] for k in ("block_m", "block_n", "num_warps", "num_stages"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="rel_table", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    p.add_argument("--bwd", action="store_true", help="the backward's two passes too")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_suite: no CUDA device")
        return 0
    B, H, S, D = suite.parse_shape(args.shape)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        case = suite.build_cases(H, S, "cuda", torch.bfloat16, [name])[name]
        attn = fg.compile(**case.variant.fg_kwargs)
        default = attn.forward_config((B, H, S, S), D, D, q.dtype, q.device)
        trials = attn.tune(q, k, v, backward=args.bwd)
        for family, found in trials.items():
            timed = [t for t in found if t.get("ms") is not None]
            best = min(timed, key=lambda t: t["ms"])
            want = (default.block_m, default.block_n, default.num_warps, default.num_stages)
            base = next((t["ms"] for t in timed if _t(t) == want), None) if family == "fwd" else None
            rows.append((name, family, _t(best), best["ms"], base))
            print(f"{name} {family}: best {_t(best)} {best['ms']:.4f} ms; "
                  f"{len(timed)} of {len(found)} configurations ran", flush=True)
    print(f"\nbf16 {args.shape}; configurations as (block_m, block_n, warps, stages); ms of one kernel")
    for name, family, best, ms, base in rows:
        shown = f"default {base:.4f} ms ({base / ms:.2f}x)" if base is not None else ""
        print(f"{name:<20} {family:<5} best {str(best):<18} {ms:.4f} ms  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
