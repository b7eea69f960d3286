"""ALiBi: a per-head linear penalty on distance, with the library mods.

``fg.mods.alibi(slopes)`` is the score_mod ``score + slopes[h] * (kv_idx - q_idx)``;
``fg.mods.alibi_slopes(H)`` gives the paper's geometric slopes. ``slopes[h]`` depends only on the
head, so the kernel loads it once per program, outside the key loop.

Run: ``PYTHONPATH=. python3 examples/alibi.py``
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

    # captured tensors must be on q's device
    slopes = fg.mods.alibi_slopes(H, device=device)
    score_mod, mask_mod = fg.mods.alibi(slopes), fg.mods.causal

    out = fg.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    ref = fg.attention_reference(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"alibi + causal: relative error {err:.2e} (tolerance {tol:.0e}, {device}, "
          f"{str(dtype).removeprefix('torch.')})")
    return 0 if err <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
