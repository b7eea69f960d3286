"""Logit soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``, with ``fg.mods.softcap``.

The score_mod receives the already scaled score ``scale * q.k``, so ``cap`` bounds the logits
that enter the softmax. The inputs are scaled up here so that a good share of the logits come
near the cap and the tanh actually changes the result. On a GPU with bf16 inputs the kernel uses
the hardware's approximate tanh (``fast_math``, relative error about 2^-11); both it and the
exact formulas (``fast_math=False``) are checked against the float64 reference here.

Run: ``PYTHONPATH=. python3 examples/softcap.py``
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
    q = 3 * torch.randn(B, H, S, D, device=device, dtype=dtype)  # scaled logits with std ~3
    k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(2))

    cap = 10.0
    score_mod, mask_mod = fg.mods.softcap(cap), fg.mods.causal

    ref = fg.attention_reference(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    worst = 0.0
    for fast_math in (None, False):  # the default (approximate tanh for bf16/fp16 on a GPU), and exact
        out = fg.compile(score_mod=score_mod, mask_mod=mask_mod, fast_math=fast_math)(q, k, v)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        print(f"softcap({cap:g}) + causal, fast_math={fast_math}: relative error {err:.2e} (tolerance {tol:.0e}, "
              f"{device}, {str(dtype).removeprefix('torch.')})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
