"""The library of common attention variants, written in the same mod language users write.

Masks are :class:`~flashgen.spec.MaskMod` objects (combine them with ``&``, ``|``, ``~``);
score mods are :class:`~flashgen.spec.ScoreMod` objects.
"""

from __future__ import annotations

import math

import torch

from .spec import MaskMod, ScoreMod


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


causal = MaskMod(_causal, "causal")
"""Each query sees keys at or before its own position (top-left aligned when Sq != Skv)."""


def sliding_window(window: int) -> MaskMod:
    """Causal sliding window: query ``i`` sees keys ``i - window < j <= i`` (``window`` keys)."""
    window = _positive_int("window", window)

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return MaskMod(sliding_window_mask, f"sliding_window({window})")


def prefix_lm(prefix: int) -> MaskMod:
    """Bidirectional over the first ``prefix`` keys, causal after them."""
    prefix = _positive_int("prefix", prefix)

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (q_idx >= kv_idx)

    return MaskMod(prefix_lm_mask, f"prefix_lm({prefix})")


def chunked(size: int) -> MaskMod:
    """Queries see only keys of their own chunk of ``size`` positions (combine with causal for
    chunked causal attention, as in Llama 4: ``fg.mods.causal & fg.mods.chunked(8192)``)."""
    size = _positive_int("size", size)

    def chunked_mask(b, h, q_idx, kv_idx):
        return q_idx // size == kv_idx // size

    return MaskMod(chunked_mask, f"chunked({size})")


def document(doc_ids: torch.Tensor) -> MaskMod:
    """Queries see only keys of the same document. ``doc_ids``: integer tensor ``[S]`` (shared by
    the batch) or ``[B, S]``, the document of each position. Not causal by itself: combine with
    ``fg.mods.causal`` for packed causal training."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() not in (1, 2) or doc_ids.is_floating_point():
        raise ValueError("doc_ids must be an integer tensor of shape [S] or [B, S]")
    if doc_ids.dim() == 1:
        def document_mask(b, h, q_idx, kv_idx):
            return doc_ids[q_idx] == doc_ids[kv_idx]
    else:
        def document_mask(b, h, q_idx, kv_idx):
            return doc_ids[b, q_idx] == doc_ids[b, kv_idx]
    return MaskMod(document_mask, "document")


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)``. ``slopes``: float tensor ``[H]``
    (see :func:`alibi_slopes`). Usually combined with ``mask_mod=fg.mods.causal``."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1 or not slopes.is_floating_point():
        raise ValueError("slopes must be a floating-point tensor of shape [H]")

    def alibi_score(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return ScoreMod(alibi_score, "alibi")


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The geometric slopes of the ALiBi paper, ``2^(-8 (i+1) / H)`` for ``i < H``."""
    num_heads = _positive_int("num_heads", num_heads)
    exponents = torch.arange(1, num_heads + 1, dtype=torch.float32, device=device)
    return torch.exp2(-8.0 * exponents / num_heads)


def softcap(cap: float) -> ScoreMod:
    """Soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``."""
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0:
        raise ValueError(f"cap must be a positive number, got {cap!r}")
    cap = float(cap)

    def softcap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return ScoreMod(softcap_score, f"softcap({cap:g})")


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """Learned relative-position bias: ``score + table[h, q_idx - kv_idx + L - 1]``.

    ``table``: float tensor ``[H, 2L - 1]`` (per head) or ``[2L - 1]`` (shared), covering
    distances ``-(L-1) .. L-1``; sequences must be at most ``L`` long."""
    if not isinstance(table, torch.Tensor) or table.dim() not in (1, 2) or not table.is_floating_point():
        raise ValueError("table must be a floating-point tensor of shape [H, 2L-1] or [2L-1]")
    if table.shape[-1] % 2 != 1:
        raise ValueError(f"the table's last dimension must be odd (2L-1 distances), got {table.shape[-1]}")
    offset = (table.shape[-1] - 1) // 2
    if table.dim() == 2:
        def relative_bias_score(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx - kv_idx + offset]
    else:
        def relative_bias_score(score, b, h, q_idx, kv_idx):
            return score + table[q_idx - kv_idx + offset]
    return ScoreMod(relative_bias_score, "relative_bias")


def t5_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """T5's bucket of each relative position ``kv_idx - q_idx`` (an integer tensor), as its paper
    defines them: with ``bidirectional``, half the buckets per direction; in each direction,
    distances below half of them get a bucket each, longer ones share logarithmically wider
    buckets up to ``max_distance``, and farther ones the last."""
    n = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional:
        base, dist = (relative > 0).to(torch.int64) * n, relative.abs()
    else:
        base, dist = torch.zeros_like(relative), (-relative).clamp_min(0)
    exact = n // 2
    scaled = torch.log(dist.clamp_min(1).double() / exact) / math.log(max_distance / exact) * (n - exact)
    far = (exact + scaled.to(torch.int64)).clamp_max(n - 1)
    return base + torch.where(dist < exact, dist, far)


def t5_bias(table: torch.Tensor, max_distance: int = 128, bidirectional: bool = True) -> ScoreMod:
    """T5's bucketed relative-position bias: ``score + table[h, bucket(kv_idx - q_idx)]``.

    ``table``: float tensor ``[H, num_buckets]`` (learned per head; 32 buckets in T5). The buckets
    (:func:`t5_buckets`) of every relative position up to ``max_distance``, beyond which they stay
    the last, are computed here once, so the mod looks them up: ``table[h, buckets[clamp(kv_idx -
    q_idx, -max_distance, max_distance) + max_distance]]``. The kernels read it along the diagonals
    (``Attention.explain()``: "diagonal read"), not per entry."""
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
        raise ValueError("table must be a floating-point tensor of shape [H, num_buckets]")
    num_buckets, reach = table.shape[1], _positive_int("max_distance", max_distance)
    if num_buckets < (4 if bidirectional else 2) or reach < num_buckets:
        raise ValueError(f"t5_bias needs at least {4 if bidirectional else 2} buckets and max_distance >= their "
                         f"number, got {num_buckets} buckets and max_distance={reach}")
    buckets = t5_buckets(torch.arange(-reach, reach + 1, device=table.device), num_buckets, reach, bidirectional)

    def t5_bias_score(score, b, h, q_idx, kv_idx):
        return score + table[h, buckets[torch.clamp(kv_idx - q_idx, -reach, reach) + reach]]

    return ScoreMod(t5_bias_score, f"t5_bias({reach}, {'bidirectional' if bidirectional else 'causal'})")


__all__ = ["causal", "sliding_window", "prefix_lm", "chunked", "document", "alibi", "alibi_slopes",
           "softcap", "relative_bias", "t5_buckets", "t5_bias"]
