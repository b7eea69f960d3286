"""T5's bucketed relative-position bias, learned: one training step through ``fg.mods.t5_bias``.

T5 gives each head a table of ``num_buckets`` values, indexed by a bucket of the relative position
``kv_idx - q_idx``: exact buckets for short distances, logarithmically wider ones up to
``max_distance``. The read depends on the positions only through their difference, so flashgen
reads it from staggered copies along the diagonals (``explain()``: "diagonal read"), and the
table's gradient accumulates on those copies before it is folded into the table's.

Run: ``PYTHONPATH=. python3 examples/t5_bias.py``
"""

import sys

import torch

import flashgen as fg


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, H, S, D), tol = "cuda", torch.bfloat16, (2, 8, 2048, 128), 3e-2
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, H, S, D), tol = "cpu", torch.float32, (1, 2, 96, 32), 1e-4
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    table = (0.5 * torch.randn(H, 32, device=device)).requires_grad_()  # [heads, buckets], learned
    t5 = fg.mods.t5_bias(table, max_distance=64, bidirectional=False)  # a decoder's buckets

    attn = fg.compile(score_mod=t5, mask_mod=fg.mods.causal)
    print(next(line.strip() for line in attn.explain().splitlines() if "diagonal read" in line))
    dout = torch.randn(B, H, S, D, device=device, dtype=dtype)
    (attn(q, k, v) * dout).sum().backward()

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fg.attention_reference(qd, kd, vd, score_mod=t5, mask_mod=fg.mods.causal)
    want = torch.autograd.grad((ref * dout.double()).sum(), [table])[0]
    err = ((table.grad.double() - want).norm() / want.norm()).item()
    print(f"T5 bias + causal, the table's gradient: relative error {err:.2e} "
          f"(tolerance {tol:.0e}, {device}, {str(dtype).removeprefix('torch.')})")
    return 0 if err <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
