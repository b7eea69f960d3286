"""ALiBi's accuracy at long sequence lengths, on a GPU: flashgen's output and log-sum-exp for
sampled query rows against a float64 reference of those rows (all keys), bf16 inputs.

    PYTHONPATH=. python3 benchmarks/alibi_accuracy.py [--lengths 8192,32768,131072]

The kernels measure ``kv_idx - q_idx`` from a tile origin and move the row term to the
log-sum-exp (``rewrite.recentred_differences``); a plain split into ``slope * kv_idx`` and
``slope * q_idx`` would lose ~ulp(slope * S) per logit, 8e-3 at 128k tokens. This prints the
relative error of the sampled rows' outputs and the largest lse error per length.
"""

from __future__ import annotations

import argparse

import torch

import flashgen as fg


def reference_rows(q, k, v, slopes, rows, scale):
    """float64 causal ALiBi attention for query ``rows`` only: (out [B, H, R, D], lse [B, H, R])."""
    qr = q[:, :, rows].double()
    logits = torch.einsum("bhrd,bhnd->bhrn", qr, k.double()) * scale
    kv = torch.arange(k.shape[2], device=q.device)
    dist = (kv[None, :] - rows[:, None]).double()
    logits = logits + slopes.double()[None, :, None, None] * dist
    logits = logits.masked_fill(kv[None, :] > rows[:, None], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    return torch.einsum("bhrn,bhnd->bhrd", torch.softmax(logits, -1), v.double()), lse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,32768,131072")
    args = p.parse_args()
    H, D = 4, 64
    slopes = fg.mods.alibi_slopes(H).cuda()
    attn = fg.compile(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)
    print(f"{'S':>8} {'out rel err':>12} {'max |lse err|':>14}")
    for S in (int(s) for s in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(S)
        q, k, v = (torch.randn(1, H, S, D, device="cuda", generator=g).bfloat16() for _ in range(3))
        out, lse = attn(q, k, v, return_lse=True)
        rows = torch.cat([torch.arange(0, 64), torch.arange(S // 2, S // 2 + 64), torch.arange(S - 128, S)]).cuda()
        ref, ref_lse = reference_rows(q, k, v, slopes, rows, D ** -0.5)
        got = out[:, :, rows].double()
        rel = ((got - ref).norm() / ref.norm()).item()
        lse_err = (lse[:, :, rows].double() - ref_lse).abs().max().item()
        print(f"{S:>8} {rel:>12.2e} {lse_err:>14.2e}")


if __name__ == "__main__":
    main()
