"""Biases as extra head dims (FlashBias): a dense bias, its low-rank factors, and a traced bias.

Three ways to give attention an additive bias, on the same data:

1. a dense tensor ``[H, S, S]``: read tile by tile, exact;
2. ``fg.low_rank(bias, tol)``: factors φ_q, φ_k with ``bias ≈ φ_q φ_kᵀ`` by truncated SVD (approximate:
   you choose the tolerance), run as plain attention on ``[scale·q, φ_q]``, ``[k, φ_k]``;
3. a traced bias function: flashgen finds its exact separation rank by symbolic algebra
   (``attn.analysis.bias_rank``), and ``bias_lowering="factors"`` runs it through exact factors.

Each is checked against the float64 reference with the dense bias.

Run: ``PYTHONPATH=. python3 examples/low_rank_bias.py``
"""

import sys

import torch

import flashgen as fg


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, H, S, D), tol = "cuda", torch.bfloat16, (2, 8, 2048, 128), 2e-2
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, H, S, D), tol = "cpu", torch.float32, (1, 2, 96, 32), 1e-4
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))

    # a smooth pairwise bias: the squared distance between positions on a 2-D grid of width W
    # (an image or a board), scaled; as a function it separates into rank 4 exactly
    W = 16

    def grid_distance(b, h, q_idx, kv_idx):
        dy, dx = q_idx // W - kv_idx // W, q_idx % W - kv_idx % W
        return -0.01 * (dy * dy + dx * dx)

    pos = torch.arange(S, device=device)
    dense = grid_distance(0, 0, pos[:, None], pos[None, :]).float().expand(H, S, S).contiguous()
    ref = fg.attention_reference(q, k, v, bias=dense)
    worst = 0.0

    out = fg.attention(q, k, v, bias=dense)
    print(f"dense bias [H, S, S]:         relative error {rel_err(out, ref):.2e}")
    worst = max(worst, rel_err(out, ref))

    factors = fg.low_rank(dense, tol=1e-3)
    out = fg.attention(q, k, v, bias=factors)
    print(f"fg.low_rank (rank {factors.rank}, factorisation error {factors.error:.1e}): "
          f"relative error {rel_err(out, ref):.2e}")
    worst = max(worst, rel_err(out, ref))

    attn = fg.compile(bias=grid_distance, bias_lowering="factors")
    out = attn(q, k, v)
    print(f"traced bias, exact rank {attn.analysis.bias_rank} as factors: relative error {rel_err(out, ref):.2e}")
    worst = max(worst, rel_err(out, ref))
    print(f"tolerance {tol:.0e} ({device}, {str(dtype).removeprefix('torch.')})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
