"""Where the Gluon forward with a dense bias loses time against the plain one (PERFLOG, nineteenth
session). Arms, interleaved for ``--rounds`` rounds in one process, forward only:

- ``plain``: no bias (the Gluon forward's ceiling here);
- ``bias``: a bias ``[H, S, S]``, each of its [128 q, 128 kv] tiles read by one (head, query block)
  and the batch entries beside it, so its TMA loads go to HBM (K and V tiles, which every query
  block of a head reads, come from L2);
- ``shared``: a bias ``[1, S, S]`` broadcast over heads, its tiles shared by 64 programs and read
  from L2 mostly: ``bias`` against ``shared`` is what waiting on memory for the tiles costs;
- ``bias triton``: ``bias`` through the Triton forward (``runtime.WS_FORWARD`` off);
- ``flex``: ``torch.compile(flex_attention)`` with the same ``[H, S, S]`` bias read in a score_mod.

``bias`` must match flex (relative error printed).

    PYTHONPATH=. python3 benchmarks/ab_bias_fwd.py [--shape 4,16,8192,128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_forward import interleaved

import flashgen as fg
from flashgen import runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4,16,8192,128")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    B, H, S, D = (int(x) for x in args.shape.split(","))
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
    bias = torch.randn(H, S, S, device=dev, dtype=dt)
    shared = torch.randn(1, S, S, device=dev, dtype=dt).expand(H, S, S)
    plain, with_bias, with_shared = fg.compile(), fg.compile(bias=bias), fg.compile(bias=shared)

    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention)

    def flex_call():
        return flex(q, k, v, score_mod=lambda score, b, h, qi, ki: score + bias[h, qi, ki])

    def triton_bias():
        runtime.WS_FORWARD = False
        try:
            return with_bias(q, k, v)
        finally:
            runtime.WS_FORWARD = True

    arms = {"plain": lambda: plain(q, k, v), "bias": lambda: with_bias(q, k, v),
            "shared": lambda: with_shared(q, k, v), "bias triton": triton_bias, "flex": flex_call}
    with torch.no_grad():
        ref = with_bias(q, k, v)
        kernels = dict(with_bias.last_tiles)
        err = ((ref.double() - flex_call().double()).norm() / flex_call().double().norm()).item()
        times = interleaved(arms, args.rounds, rep=300)
    flops = 4 * B * H * S * S * D
    print(f"# {B}x{H}x{S}x{D} bf16 forward; bias kernels: {kernels}; bias vs flex rel. err. {err:.1e}")
    print(f"{'arm':>12} {'ms (median)':>12} {'TF/s':>8} {'/flex':>6}  rounds")
    base = statistics.median(times["flex"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:>12} {m:12.3f} {flops / m / 1e9:8.1f} {base / m:6.2f}  {' '.join(f'{t:.3f}' for t in ts)}")


if __name__ == "__main__":
    main()
