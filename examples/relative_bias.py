"""A hand-written relative-position bias: a learned table indexed by the clipped distance.

``table[h, d + max_distance]`` is the bias of head ``h`` for distance ``d = kv_idx - q_idx``,
clipped to ``[-max_distance, max_distance]`` so the table has a fixed size whatever the
sequence length. It is an additive ``bias`` (added after any score_mod) and is combined with
a causal mask.

Run: ``PYTHONPATH=. python3 examples/relative_bias.py``
"""

import sys

import torch

import flashgen as fg


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, H, S, D), tol = "cuda", torch.bfloat16, (2, 8, 2048, 128), 2e-2
        max_distance = 128
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, H, S, D), tol = "cpu", torch.float32, (1, 2, 128, 64), 1e-4
        max_distance = 32
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    table = torch.randn(H, 2 * max_distance + 1, device=device)

    @fg.bias
    def clipped_relative_bias(b, h, q_idx, kv_idx):
        distance = torch.clamp(kv_idx - q_idx, -max_distance, max_distance)
        return table[h, distance + max_distance]  # one integer expression per table dimension

    out = fg.attention(q, k, v, bias=clipped_relative_bias, mask_mod=fg.mods.causal)
    ref = fg.attention_reference(q, k, v, bias=clipped_relative_bias, mask_mod=fg.mods.causal)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"relative bias (clipped at {max_distance}) + causal: relative error {err:.2e} "
          f"(tolerance {tol:.0e}, {device}, {str(dtype).removeprefix('torch.')})")
    return 0 if err <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
