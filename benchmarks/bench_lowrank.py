"""Dense bias tensor vs its low-rank factors (FlashBias), next to FlexAttention, on a GPU.

    PYTHONPATH=. python3 benchmarks/bench_lowrank.py [--seq-len 4096] [--rank 16] [--bias-dtype fp32]
        [--backward]

bf16, B=4, H=16, D=128. The bias [H, S, S] is a smooth rank-R field plus 1% noise (bf16 by default,
as the suite's dense bias; fp32 with ``--bias-dtype fp32``, as before the nineteenth session);
``fg.low_rank(bias, tol=0.05)`` factors it. Timed with ``triton.testing.do_bench`` (median):
flashgen with the dense bias tensor (read tile by tile), flashgen with the factors (plain
attention with head dim D + R), FlexAttention with a score_mod reading the dense bias. Accuracy:
relative error of each against the float64 reference with the *dense* bias on the first 256
queries of (b=0, h=0).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--bias-dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--backward", action="store_true", help="also time forward+backward (q, k, v gradients; the "
                   "bias and factors frozen), at 3.5x the forward's FLOPs")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_lowrank: no CUDA device")
        return 0
    import triton.testing

    import flashgen as fg
    from flashgen.api import _with_factors

    B, H, S, D, R = 4, 16, args.seq_len, 128, args.rank
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(1, H, S, R, device="cuda", generator=g) / R**0.5
    w = torch.randn(1, H, S, R, device="cuda", generator=g) / R**0.5
    bias = u @ w.transpose(-1, -2)
    bias = bias + 0.01 * bias.std() * torch.randn(bias.shape, device="cuda", generator=g)
    bias = bias.to(torch.bfloat16 if args.bias_dtype == "bf16" else torch.float32)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    lr = fg.low_rank(bias, tol=0.05)
    dense = fg.compile(bias=bias)
    factored = fg.compile(bias=lr)
    # the same kernel on q' = [q, phi_q / scale] and k' = [k, phi_k] built once: what building the
    # factors' columns per call costs (forward only: a backward's q' and k' are built each call)
    plain, scale = fg.compile(), D**-0.5
    qx, kx, _ = _with_factors(lr, q, k, v, scale)
    rows = [("flashgen dense bias", lambda: dense(q, k, v)),
            (f"flashgen low-rank R={lr.rank}", lambda: factored(q, k, v)),
            ("  the same, q' k' prebuilt", lambda: plain(qx, kx, v, scale=scale))]
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        def score_mod(score, b, h, qi, ki):
            return score + bias[0, h, qi, ki]

        flex = torch.compile(flex_attention)
        rows.append(("flex dense bias", lambda: flex(q, k, v, score_mod=score_mod)))
    n = 256
    ref = fg.attention_reference(q[:1, :1, :n], k[:1, :1], v[:1, :1], bias=bias[:1, :1, :n])
    flops = 4 * B * H * S * S * D
    print(f"B={B} H={H} S={S} D={D} bf16, bias {args.bias_dtype}; low_rank: rank {lr.rank}, factorisation error "
          f"{lr.error:.2e}")
    for name, fn in rows:
        with torch.no_grad():
            out = fn()
            err = ((out[:1, :1, :n].double() - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"  {name:<26} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TF/s   rel err vs dense reference {err:.2e}")
    if args.backward:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        dout = torch.randn_like(q)
        q, k, v = leaves
        for name, fn in rows[:2] + rows[3:]:
            def step(fn=fn):
                fn().backward(dout)

            ms = triton.testing.do_bench(step, warmup=10, rep=60, grad_to_none=leaves, return_mode="median")
            print(f"  {name + ' fwd+bwd':<34} {ms:8.3f} ms  {3.5 * flops / ms / 1e9:7.1f} TF/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
