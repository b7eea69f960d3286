"""Causal sliding-window attention with ``fg.mods.sliding_window(window)``.

Query ``i`` attends to keys ``i - window < j <= i``. The mask is the band
``-(window - 1) <= kv_idx - q_idx <= 0``: each query block visits only the key blocks that
overlap its window, so the cost grows with ``S * window`` rather than ``S * S``.

Run: ``PYTHONPATH=. python3 examples/sliding_window.py``
"""

import sys

import torch

import flashgen as fg


def main() -> int:
    if torch.cuda.is_available():
        device, dtype, (B, H, S, D), tol = "cuda", torch.bfloat16, (2, 8, 2048, 128), 2e-2
        window = 256
    else:
        # CPU tensors run in Triton's interpreter, which is slow: keep the shapes small
        device, dtype, (B, H, S, D), tol = "cpu", torch.float32, (1, 2, 128, 64), 1e-4
        window = 32
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))

    mask = fg.mods.sliding_window(window)
    attn = fg.compile(mask_mod=mask)
    # the analysis found the band; nothing of the mask is left to evaluate inside it
    assert (attn.analysis.band.lo, attn.analysis.band.hi) == (-(window - 1), 0), attn.analysis.band

    out = attn(q, k, v)
    ref = fg.attention_reference(q, k, v, mask_mod=mask)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"sliding_window({window}): relative error {err:.2e} "
          f"(tolerance {tol:.0e}, {device}, {str(dtype).removeprefix('torch.')})")
    return 0 if err <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
