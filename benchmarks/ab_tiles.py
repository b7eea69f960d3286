"""Forward tiles side by side on the suite's variants, in one process, timed as the suite times
(``suite.time_ms``: do_bench median, L2 flushed between calls).

    PYTHONPATH=. python3 benchmarks/ab_tiles.py --variants causal,full --shape 8x16x4096x64 \
        --configs 128,64,8,3 64,64,4,3

The tuner (``flashgen tune``) times bare kernel launches; this times whole calls, as the suite
does, with each configuration next to the others in one process: a check of a tuned choice
before it becomes a default. The last column is what an untuned call launches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import flashgen as fg  # noqa: E402
from flashgen.runtime import Config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="causal", help=f"of: {', '.join(suite.VARIANTS)}")
    p.add_argument("--shape", default="8x16x4096x64")
    p.add_argument("--configs", nargs="+", default=["128,64,8,3", "64,64,4,3"], help="block_m,block_n,warps,stages")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_tiles: no CUDA device")
        return 0
    B, H, S, D = suite.parse_shape(args.shape)
    configs = [Config(*(int(x) for x in c.split(","))) for c in args.configs]
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(f"forward ms, bf16 {args.shape} (median, L2 flushed)")
    print(f"{'variant':<16}" + "".join(f"{str(tuple(c.__dict__.values())):>20}" for c in configs) + "  default")
    for name in suite.parse_list(args.variants, suite.VARIANTS, "variants"):
        attn = fg.compile(**suite.build_cases(H, S, "cuda", torch.bfloat16, [name])[name].variant.fg_kwargs)
        times = [suite.time_ms(lambda c=c, a=attn: a(q, k, v, config=c), [], "cuda") for c in configs]
        default = attn.forward_config((B, H, S, S), D, D, q.dtype, q.device)
        print(f"{name:<16}" + "".join(f"{t:>20.4f}" for t in times) + f"  {tuple(default.__dict__.values())}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
