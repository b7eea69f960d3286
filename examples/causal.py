"""Causal attention with the library mask ``fg.mods.causal``.

Query ``i`` attends to keys ``0..i``. The mask is the diagonal band ``kv_idx - q_idx <= 0``, so
the kernel never visits key blocks above the diagonal and evaluates the mask only on the blocks
that straddle it. A hand-written ``q_idx >= kv_idx`` traces to the same program, hence the same
kernel.

Run: ``PYTHONPATH=. python3 examples/causal.py``
"""

import sys

import torch

import flashgen as fg


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, H, S, D), tol = "cuda", torch.bfloat16, (2, 8, 2048, 128), 2e-2
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, H, S, D), tol = "cpu", torch.float32, (1, 2, 128, 64), 1e-4
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))

    def my_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    # equivalent mods simplify to the same IR, so they share one program key (and one kernel)
    assert fg.compile(mask_mod=my_causal).program.key == fg.compile(mask_mod=fg.mods.causal).program.key

    out = fg.attention(q, k, v, mask_mod=fg.mods.causal)
    ref = fg.attention_reference(q, k, v, mask_mod=fg.mods.causal)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"causal: relative error {err:.2e} (tolerance {tol:.0e}, {device}, {str(dtype).removeprefix('torch.')})")
    return 0 if err <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
