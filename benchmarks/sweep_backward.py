"""Sweep the backward launch configurations (dK/dV pass, then dQ pass) on a GPU.

    PYTHONPATH=. python3 benchmarks/sweep_backward.py [--head-dim 128]

Times forward+backward of full and causal attention (bf16, B=4, H=16, S=8192) with each dK/dV
config (dQ fixed at the default), then each dQ config with the best dK/dV config. Prints TFLOP/s
(3.5 x 4·B·H·S²·D·density) per config and the best pair per variant.
"""

from __future__ import annotations

import argparse

import torch

DKDV = [(32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 4, 2), (64, 64, 4, 3),
        (64, 64, 4, 4), (32, 64, 4, 3)]
DQ = [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 4)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=8192)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sweep_backward: no CUDA device")
        return 0
    import triton

    import flashgen as fg
    import flashgen.api as api

    B, H, S, D = 4, 16, args.seq_len, args.head_dim
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    default = api.default_backward_configs
    for name, mask in (("full", None), ("causal", fg.mods.causal)):
        attn = fg.compile(mask_mod=mask)
        density = 1.0 if mask is None else (S + 1) / (2 * S)
        flop = 3.5 * 4 * B * H * S * S * D * density

        def measure(dkdv, dq, attn=attn, flop=flop):
            api.default_backward_configs = lambda *a: (fg.Config(*dkdv), fg.Config(*dq))
            try:
                ms = triton.testing.do_bench(lambda: attn(q, k, v).backward(dout), warmup=10, rep=50,
                                             return_mode="median")
                return flop / ms / 1e9
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"  {dkdv} {dq}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                return 0.0

        base_dkdv, base_dq = (tuple(vars(c).values()) for c in default(q.device, D, D, q.dtype))
        results = {}
        for cfg in DKDV:
            results[(cfg, base_dq)] = tf = measure(cfg, base_dq)
            print(f"{name} dkdv={cfg} dq={base_dq}: {tf:.1f} TF/s", flush=True)
        best_dkdv = max(DKDV, key=lambda c: results[(c, base_dq)])
        for cfg in DQ:
            results[(best_dkdv, cfg)] = tf = measure(best_dkdv, cfg)
            print(f"{name} dkdv={best_dkdv} dq={cfg}: {tf:.1f} TF/s", flush=True)
        best = max(results, key=results.get)
        print(f"BEST {name} D={D}: dkdv={best[0]} dq={best[1]} {results[best]:.1f} TF/s "
              f"(default {results.get((base_dkdv, base_dq), 0):.1f})", flush=True)
    api.default_backward_configs = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
