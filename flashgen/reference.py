"""A dense float64 reference for attention with mods, independent of the tracer.

The mods are called directly on broadcast index tensors (``b [B,1,1,1]``, ``h [1,H,1,1]``,
``q_idx [1,1,Sq,1]``, ``kv_idx [1,1,1,Skv]``), exactly as eager PyTorch code would call them, so
a tracing or code-generation bug cannot hide in the reference. O(B·H·Sq·Skv) memory: for tests
and checks on small shapes only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable | None = None,
                        mask_mod: Callable | None = None, bias: Callable | torch.Tensor | None = None, *,
                        scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False):
    """The same contract as :func:`flashgen.attention`, computed densely in float64 on q's device.

    Returns float64 tensors (out, and lse if asked); fully masked rows give out 0 and lse -inf."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    qd, kd, vd = (t.to(torch.float64) for t in (q, k, v))
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError("q and k/v head counts differ; pass enable_gqa=True")
        kd = kd.repeat_interleave(Hq // Hkv, dim=1)
        vd = vd.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * scale
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
    q_idx = torch.arange(Sq, device=dev).view(1, 1, Sq, 1)
    kv_idx = torch.arange(Skv, device=dev).view(1, 1, 1, Skv)
    if score_mod is not None:
        scores = torch.as_tensor(score_mod(scores, b, h, q_idx, kv_idx), dtype=torch.float64, device=dev)
        scores = scores.expand(B, Hq, Sq, Skv)
    if bias is not None:
        if isinstance(bias, torch.Tensor):
            extra = bias
        elif hasattr(bias, "phi_q"):  # fg.LowRankBias (key factors may be given per KV head)
            fk = bias.phi_k.double()
            if fk.shape[1] not in (1, Hq):
                fk = fk.repeat_interleave(Hq // fk.shape[1], dim=1)
            extra = bias.phi_q.double() @ fk.transpose(-1, -2)
        else:
            extra = bias(b, h, q_idx, kv_idx)
        scores = scores + torch.as_tensor(extra, device=dev).to(torch.float64)
    if mask_mod is not None:
        keep = torch.as_tensor(mask_mod(b, h, q_idx, kv_idx), device=dev).expand(B, Hq, Sq, Skv)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vd)
    return (out, lse) if return_lse else out
