"""Property tests of the kernels' lowering of additive terms (``rewrite.recentred_differences``,
``render._row_terms``): index differences next to the score measured from a tile origin, and
terms constant along a row left out of the per-entry logits for the log-sum-exp.

Random sums of such terms (ALiBi-style ``f[h] * (kv_idx - q_idx)`` either way round, plain
differences, per-row reads, ``q_idx`` ramps, per-head offsets) over random masks, including
masks that empty whole rows, against the float64 reference: the output and the lse (forward),
and with a random gradient on both, dq, dk, dv and the slopes' gradient (backward).
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err, requires_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st

import flashgen as fg

pytestmark = requires_interpreter

DISTANCES = {  # index differences next to the score
    "alibi": lambda slopes: (lambda b, h, q, kv: slopes[h] * (kv - q)),
    "alibi_flipped": lambda slopes: (lambda b, h, q, kv: -((q - kv) * slopes[h])),
    "plain": lambda slopes: (lambda b, h, q, kv: (kv - q) * 0.03),
}
ROWS = {  # terms constant along a row
    "ramp": lambda rows, heads: (lambda b, h, q, kv: 0.02 * q),
    "read": lambda rows, heads: (lambda b, h, q, kv: rows[q]),
    "head": lambda rows, heads: (lambda b, h, q, kv: heads[h]),
    "head_ramp": lambda rows, heads: (lambda b, h, q, kv: heads[h] * q * 0.01),
}
MASKS = {
    "none": None,
    "causal": fg.mods.causal,
    "window": fg.mods.sliding_window(9),
    "late_rows": fg.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= 11) & (kv_idx <= q_idx)),  # rows < 11 empty
}


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(distance=st.sampled_from(sorted(DISTANCES)), rows=st.sets(st.sampled_from(sorted(ROWS)), max_size=2),
       mask=st.sampled_from(sorted(MASKS)), B=st.integers(1, 2), H=st.integers(1, 2), S=st.integers(20, 70),
       backward=st.booleans(), seed=st.integers(0, 2**16))
def test_row_terms_and_tile_origins_match_the_reference(distance, rows, mask, B, H, S, backward, seed):
    g = torch.Generator().manual_seed(seed)
    slopes = (torch.rand(H, generator=g) + 0.05).requires_grad_(backward)
    row_values, head_values = torch.randn(S, generator=g), torch.randn(H, generator=g) * 3
    terms = [DISTANCES[distance](slopes)] + [ROWS[r](row_values, head_values) for r in sorted(rows)]
    mod = fg.score_mod(lambda s, b, h, q, kv: s + sum(t(b, h, q, kv) for t in terms))
    q, k, v = (torch.randn(B, H, S, 16, generator=g).requires_grad_(backward) for _ in range(3))
    out, lse = fg.attention(q, k, v, score_mod=mod, mask_mod=MASKS[mask], return_lse=True)
    leaves = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ref, ref_lse = fg.attention_reference(*leaves, score_mod=mod, mask_mod=MASKS[mask], return_lse=True)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-4
    assert (lse.double()[~empty] - ref_lse[~empty]).abs().max() < 1e-4
    if backward:
        dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
        ((out * dout).sum() + (lse.masked_fill(empty, 0) * dlse).sum()).backward()
        got = [t.grad.clone() for t in (q, k, v, slopes)]
        slopes.grad = None
        ((ref * dout.double()).sum() + (ref_lse.masked_fill(empty, 0) * dlse.double()).sum()).backward()
        for name, mine, want in zip(("dq", "dk", "dv", "dslopes"), got, [*(t.grad for t in leaves), slopes.grad]):
            assert torch.isfinite(mine).all(), name
            assert rel_err(mine, want) < 1e-4 or (want.abs().max() < 1e-6 and mine.abs().max() < 1e-4), name


@pytest.mark.parametrize("mask", ["none", "late_rows"])
def test_a_row_term_alone_does_not_change_the_output(mask):
    """A score_mod that only adds row terms gives plain attention's output, and an lse shifted by them."""
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    shift = torch.randn(40)
    mod = fg.score_mod(lambda s, b, h, q_idx, kv_idx: s + shift[q_idx] + 0.5 * q_idx)
    out, lse = fg.attention(q, k, v, score_mod=mod, mask_mod=MASKS[mask], return_lse=True)
    plain, plain_lse = fg.attention(q, k, v, mask_mod=MASKS[mask], return_lse=True)
    assert rel_err(out, plain) < 1e-5
    finite = torch.isfinite(plain_lse)
    expected = plain_lse + (shift + 0.5 * torch.arange(40)).expand_as(plain_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - expected[finite]).abs().max() < 1e-4


def test_a_row_term_of_minus_inf_masks_its_row():
    """A per-row read that is -inf (an additive padding mask on queries) is a row term like any
    other; the kernels still give that row out = 0, lse = -inf and zero gradients, never NaN."""
    q, k, v = (torch.randn(2, 2, 50, 16).requires_grad_() for _ in range(3))
    pad = torch.zeros(50)
    pad[[0, 7, 33, 49]] = float("-inf")
    slopes = torch.tensor([0.3, 0.1])
    mod = fg.score_mod(lambda s, b, h, q_idx, kv_idx: s + pad[q_idx] + slopes[h] * (kv_idx - q_idx))
    assert "per row:" in fg.compile(score_mod=mod).explain()  # (the case this test is about)
    out, lse = fg.attention(q, k, v, score_mod=mod, return_lse=True)
    with torch.no_grad():
        plain = fg.attention(q, k, v, score_mod=mod)  # no lse stored: the same rows masked
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = fg.attention_reference(*leaves, score_mod=mod, return_lse=True)
    rows = pad == float("-inf")
    assert (out[:, :, rows] == 0).all() and (plain[:, :, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
    assert not torch.isnan(out).any() and rel_err(out[:, :, ~rows], ref[:, :, ~rows]) < 1e-4
    dout = torch.randn(out.shape)
    (out * dout).sum().backward()
    # the reference's backward gives NaN through a softmax of all -inf: it gets the masked rows
    # as rows that pass no gradient instead (pad 0 there, dout 0), which is what they should do
    live = torch.where(rows, 0.0, pad)
    unmasked = fg.score_mod(lambda s, b, h, q_idx, kv_idx: s + live[q_idx] + slopes[h] * (kv_idx - q_idx))
    ref = fg.attention_reference(*leaves, score_mod=unmasked)
    (ref * dout.double().masked_fill(rows[:, None], 0.0)).sum().backward()
    for mine, want in zip((q.grad, k.grad, v.grad), (t.grad for t in leaves)):
        assert torch.isfinite(mine).all() and rel_err(mine, want) < 1e-4
    assert (q.grad[:, :, rows] == 0).all()
