"""Backward tile configurations per variant: which (dK/dV, dQ) pair is fastest, forward + backward.

    PYTHONPATH=. python3 benchmarks/sweep_backward.py [--variants rel_table,document] [--shape 4x16x8192x128]

For each variant of the suite (``benchmarks/suite.py``), times forward + backward with the default
forward configuration and each candidate dK/dV configuration (dQ at its default), then each dQ
candidate with the best dK/dV one; prints a table and the winner next to the default pair. The
candidates are forced through ``runtime.default_backward_configs`` (what an untuned call uses).
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
from flashgen import api  # noqa: E402
from flashgen.runtime import Config  # noqa: E402

DKDV = [Config(64, 128, 8, 3), Config(64, 64, 4, 3), Config(64, 64, 8, 3), Config(32, 128, 4, 3),
        Config(64, 128, 8, 2), Config(32, 64, 4, 3)]  # the first: the default for D <= 128
DQ = [Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(128, 32, 8, 3), Config(128, 64, 4, 2), Config(64, 32, 4, 4)]


def time_pair(attn, q, k, v, dout, dkdv: Config, dq: Config) -> float:
    api.default_backward_configs = lambda *a, **kw: (dkdv, dq)
    attn._plans.clear()  # a call signature keeps the tiles of its first launch: choose them again

    def step():
        out = attn(q, k, v)
        out.backward(dout)

    try:
        return float(triton.testing.do_bench(step, warmup=10, rep=60, return_mode="median"))
    except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is a finding, not a crash
        print(f"  {dkdv} / {dq}: {type(exc).__name__}: {str(exc)[:100]}")
        return float("inf")


def _t(c: Config) -> tuple:
    return (c.block_m, c.block_n, c.num_warps, c.num_stages)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="rel_table,document", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="4x16x8192x128")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_backward: no CUDA device")
        return 0
    B, H, S, D = suite.parse_shape(args.shape)
    variants = suite.parse_list(args.variants, suite.VARIANTS, "variants")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    rows = []
    for name in variants:
        case = suite.build_cases(H, S, "cuda", torch.bfloat16, [name])[name]
        attn = fg.compile(**case.variant.fg_kwargs)
        default = (DKDV[0], DQ[0])
        results = {}
        for c in DKDV:
            results[(c, DQ[0])] = time_pair(attn, q, k, v, dout, c, DQ[0])
            print(f"{name}: dkdv {c} dq {DQ[0]}: {results[(c, DQ[0])]:.3f} ms", flush=True)
        best_dkdv = min(DKDV, key=lambda c: results[(c, DQ[0])])
        for c in DQ[1:]:
            results[(best_dkdv, c)] = time_pair(attn, q, k, v, dout, best_dkdv, c)
            print(f"{name}: dkdv {best_dkdv} dq {c}: {results[(best_dkdv, c)]:.3f} ms", flush=True)
        best = min(results, key=results.get)
        rows.append((name, default, results[default], best, results[best]))
    print(f"\nfwd+bwd ms, bf16 {args.shape}; configurations as (block_m, block_n, warps, stages)")
    for name, default, t0, best, t1 in rows:
        print(f"{name:<16} default dkdv {_t(default[0])} dq {_t(default[1])} {t0:.3f} ms   "
              f"best dkdv {_t(best[0])} dq {_t(best[1])} {t1:.3f} ms ({t0 / t1:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
