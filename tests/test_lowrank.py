"""Low-rank biases: the exact separation rank of traced biases (``Analysis.bias``), the
``fg.LowRankBias`` path (q' = [scale q, phi_q], k' = [k, phi_k]) against the float64 reference,
and the truncated SVD of ``fg.low_rank``.

The analysis gives the generic rank (coefficients that depend on b, h are symbols), so on a dense
grid the numerical rank of every (b, h) slice is at most the analysed rank, and equal to it for at
least one slice when the coefficients cannot cancel.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from helpers import TOLERANCES, rel_err, requires_interpreter
from hypothesis import given, note, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, examples

import flashgen as fg
from flashgen import api, factors

# per-head coefficients whose values admit no exact cancellation against the dyadic coefficients below
SLOPES = torch.tensor([0.7310585786300049, -1.2599210498948732, 0.3183098861837907], dtype=torch.float64)
W = 5  # columns of the image grid
GRID_S = 40  # positions of the dense grid for numerical ranks
TABLE = torch.randn(2 * GRID_S - 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # distances
NUM_RTOL = 1e-9  # numerical rank: singular values above this fraction of the largest

def _squared_distance(b, h, q, kv):
    return -0.125 * (q - kv) ** 2


def _grid_distance(b, h, q, kv):
    return -0.125 * ((q % W - kv % W) ** 2 + (q // W - kv // W) ** 2)


def _query_only(b, h, q, kv):
    return SLOPES[h] * q


def _key_only(b, h, q, kv):
    return SLOPES[h] * kv


# name -> (compile kwargs, rank, softmax_rank, additive)
EXAMPLES = {
    "alibi": (dict(score_mod=fg.mods.alibi(SLOPES)), 2, 1, True),
    "alibi_causal": (dict(score_mod=fg.mods.alibi(SLOPES), mask_mod=fg.mods.causal), 2, 1, True),
    "squared_distance": (dict(bias=_squared_distance), 3, 2, True),
    "grid_distance": (dict(bias=_grid_distance), 4, 3, True),
    "relative_bias": (dict(score_mod=fg.mods.relative_bias(TABLE)), None, None, True),
    "softcap": (dict(score_mod=fg.mods.softcap(30.0)), None, None, False),
    "plain": (dict(), 0, 0, True),
    "mask_only": (dict(mask_mod=fg.mods.causal), 0, 0, True),
    "query_only": (dict(bias=_query_only), 1, 0, True),
    "key_only": (dict(bias=_key_only), 1, 1, True),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# 1. ranks of the examples


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_ranks(name):
    kwargs, rank, softmax_rank, additive = EXAMPLES[name]
    attn = fg.compile(**kwargs)
    structure = attn.analysis.bias
    assert attn.analysis.bias_rank == rank
    assert structure.rank == rank and structure.softmax_rank == softmax_rank
    assert structure.additive is additive
    if rank is None:
        assert structure.reason and structure.factors == ()
        assert structure.report().startswith("not low-rank (")
    else:
        assert structure.reason == ""
        assert len(structure.factors) >= rank  # at least one (query, key) term per unit of rank
    assert attn.analysis.plain_logits is (name in ("plain", "mask_only"))


def test_explain_shows_the_factors():
    alibi = fg.compile(fg.mods.alibi(SLOPES), fg.mods.causal).explain()
    line = next(ln for ln in alibi.splitlines() if "additive bias:" in ln)
    assert "rank 2 (1 without query-only terms)" in line
    assert "[q_idx]·[1]" in line and "[1]·[kv_idx]" in line
    assert "bias lowering:" in alibi
    grid = fg.compile(bias=_grid_distance).explain()
    assert "rank 4 (3 without query-only terms)" in grid and "Mod(q_idx, 5)" in grid and "floor(kv_idx/5)" in grid
    relative = fg.compile(fg.mods.relative_bias(TABLE)).explain()
    assert "additive bias:  not low-rank (" in relative and "reads q_idx and kv_idx together" in relative
    softcap = fg.compile(fg.mods.softcap(30.0)).explain()
    assert "not low-rank (the logits are not score + a bias" in softcap
    assert "additive bias" not in fg.compile().explain()  # plain logits: nothing to report


# ---------------------------------------------------------------------------------------------
# 2. against the numerical rank of the materialised bias


def dense_bias(score_mod=None, bias=None, *, B=2, H=3, S=GRID_S) -> torch.Tensor:
    """``logits - score`` as a float64 tensor [B, H, S, S], computed eagerly like the reference
    (the score mods here are additive, so the bias is ``score_mod(0) + bias``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # int index * python float must not round to float32
    try:
        b = torch.arange(B).view(B, 1, 1, 1)
        h = torch.arange(H).view(1, H, 1, 1)
        q = torch.arange(S).view(1, 1, S, 1)
        kv = torch.arange(S).view(1, 1, 1, S)
        out = torch.zeros((), dtype=torch.float64)
        if score_mod is not None:
            out = out + score_mod(torch.zeros((), dtype=torch.float64), b, h, q, kv)
        if bias is not None:
            out = out + bias(b, h, q, kv)
    finally:
        torch.set_default_dtype(old)
    return torch.as_tensor(out, dtype=torch.float64).expand(B, H, S, S)


def numerical_rank(m: torch.Tensor, top: float | None = None) -> int:
    """Singular values above NUM_RTOL times ``top`` (default: the largest of ``m``)."""
    s = torch.linalg.svdvals(m)
    top = float(s[0]) if top is None else top
    return 0 if top == 0 else int((s > NUM_RTOL * top).sum())


def check_ranks(structure, dense: torch.Tensor) -> None:
    """Analysed rank >= numerical rank of every (b, h) slice, equal for at least one; the same for
    softmax_rank against the rank after removing per-row constants: min_f rank(A - f 1ᵀ) is the
    rank of A with its row means removed (thresholded against A's own scale, since removing a
    query-only bias leaves only rounding noise)."""
    B, H = dense.shape[:2]
    centred = dense - dense.mean(dim=-1, keepdim=True)
    tops = [float(torch.linalg.svdvals(dense[b, h])[0]) for b in range(B) for h in range(H)]
    ranks = [numerical_rank(dense[b, h]) for b in range(B) for h in range(H)]
    soft = [numerical_rank(centred[b, h], tops[b * H + h]) for b in range(B) for h in range(H)]
    why = f"analysis: {structure}; numerical ranks {ranks}, without row constants {soft}"
    assert structure.rank is not None and structure.softmax_rank is not None, why
    assert all(structure.rank >= r for r in ranks), why
    assert structure.rank in ranks, why
    assert all(structure.softmax_rank >= r for r in soft), why
    assert structure.softmax_rank in soft, why


@pytest.mark.parametrize("name", [n for n, e in EXAMPLES.items() if e[1] is not None])
def test_example_ranks_match_numerical_rank(name):
    kwargs, *_ = EXAMPLES[name]
    dense = dense_bias(kwargs.get("score_mod"), kwargs.get("bias"))
    check_ranks(fg.compile(**kwargs).analysis.bias, dense)


def test_relative_bias_is_numerically_full_rank():
    """None for the relative-position table is not a missed factorisation: the Toeplitz matrix of
    a random table has full numerical rank."""
    assert numerical_rank(dense_bias(fg.mods.relative_bias(TABLE))[0, 0]) == GRID_S


COEFS = (-3.0, -2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 3.0)  # nonzero, dyadic: exact rank arithmetic
X = "(q * 0.0625)"  # positions scaled by a power of two: moderate values, exact coefficients
Y = "(kv * 0.0625)"
Q_PARTS = ("", X, f"{X} ** 2", f"{X} ** 3", "torch.sin(0.7 * q)", "torch.cos(0.45 * q)")
K_PARTS = ("", Y, f"{Y} ** 2", f"{Y} ** 3", "torch.sin(0.55 * kv)", "torch.cos(0.3 * kv)")
FACTORS = ("", "slopes[h]", "(b + 1)")
MIXED = ("torch.exp(q * kv * 0.01)", "table[q - kv + 39]")

terms = st.lists(st.tuples(st.sampled_from(COEFS), st.sampled_from(Q_PARTS), st.sampled_from(K_PARTS),
                           st.sampled_from(FACTORS)), min_size=1, max_size=6)


def bias_source(drawn, mixed=None) -> str:
    parts = []
    for coef, fq, fk, factor in drawn:
        parts.append(" * ".join([repr(coef)] + [p for p in (factor, fq, fk) if p]))
    if mixed:
        parts.append(f"0.5 * {mixed}")
    return "lambda b, h, q, kv: " + " + ".join(parts)


@settings(FUZZ, max_examples=examples(100))
@given(terms)
def test_random_polynomial_bias_rank(drawn):
    src = bias_source(drawn)
    note(src)
    fn = eval(src, {"torch": torch, "slopes": SLOPES})
    structure = fg.compile(bias=fn).analysis.bias
    assert structure.additive
    check_ranks(structure, dense_bias(bias=fn))


@settings(FUZZ, max_examples=examples(20))
@given(terms, st.sampled_from(MIXED))
def test_mixed_terms_are_not_separable(drawn, mixed):
    src = bias_source(drawn, mixed)
    note(src)
    fn = eval(src, {"torch": torch, "slopes": SLOPES, "table": TABLE})
    structure = fg.compile(bias=fn).analysis.bias
    assert structure.additive and structure.rank is None and structure.softmax_rank is None
    assert "reads q_idx and kv_idx together" in structure.reason


def _score_dependent_step(s, b, h, q, kv):
    return s + torch.where(s > 0, 0.5, 0.0)


def test_score_in_a_condition_is_not_additive():
    structure = fg.compile(_score_dependent_step).analysis.bias
    assert not structure.additive and structure.rank is None


# ---------------------------------------------------------------------------------------------
# 3. the LowRankBias path against the float64 reference


def rand(*shape, scale=1.0):
    return torch.randn(*shape) * scale


def run_grads(fn, leaves, dout, dlse):
    for t in leaves:
        t.grad = None
    out, lse = fn()
    ((out.double() * dout).sum() + (lse.double() * dlse).sum()).backward()
    return out.detach(), lse.detach(), [t.grad.clone() if t.grad is not None else None for t in leaves]


def check_low_rank(q, k, v, phi_q, phi_k, score_mod=None, mask_mod=None, *, enable_gqa=False, captured=(),
                   tol=1e-4, ref_phi_k=lambda t: t):
    """Forward (out, lse) and backward (q, k, v, phi_q, phi_k and captured tensors) of the kernel
    against torch.autograd through the float64 reference with float64 copies of the factors
    (``ref_phi_k`` maps the key factors to the reference's layout)."""
    ours = [t.detach().clone().requires_grad_() for t in (q, k, v, phi_q, phi_k)]
    theirs = [t.detach().double().requires_grad_() for t in (q, k, v, phi_q, phi_k)]
    B, Hq, Sq, _ = q.shape
    dout = torch.randn(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    dlse = torch.randn(B, Hq, Sq, dtype=torch.float64)
    attn = fg.compile(score_mod, mask_mod, fg.LowRankBias(ours[3], ours[4]))
    out, lse, got = run_grads(lambda: attn(*ours[:3], enable_gqa=enable_gqa, return_lse=True),
                              ours + list(captured), dout, dlse)
    ref_bias = fg.LowRankBias(theirs[3], ref_phi_k(theirs[4]))
    ref, ref_lse, want = run_grads(
        lambda: fg.attention_reference(*theirs[:3], score_mod, mask_mod, ref_bias, enable_gqa=enable_gqa,
                                       return_lse=True), theirs + list(captured), dout, dlse)
    assert out.shape == ref.shape and out.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert rel_err(out, ref) < tol, f"out: {rel_err(out, ref):.2e}"
    assert rel_err(lse, ref_lse) < tol, f"lse: {rel_err(lse, ref_lse):.2e}"
    names = ["dq", "dk", "dv", "dphi_q", "dphi_k"] + [f"dcaptured{i}" for i in range(len(captured))]
    for name, g, w, leaf in zip(names, got, want, ours + list(captured)):
        assert g is not None and w is not None, name
        assert g.shape == leaf.shape, name
        assert not torch.isnan(g).any(), name
        assert rel_err(g, w) < tol, f"{name}: {rel_err(g, w):.2e}"
    return attn


B, H, S, D, R = 2, 2, 24, 16, 3
MASKS = {"none": None, "causal": fg.mods.causal, "prefix_lm": fg.mods.prefix_lm(8)}


@requires_interpreter
@pytest.mark.parametrize("mask", MASKS)
def test_low_rank_bias_masks(mask):
    check_low_rank(rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, R, scale=0.7),
                   rand(B, H, S, R, scale=0.7), mask_mod=MASKS[mask])


@requires_interpreter
@pytest.mark.parametrize("shapes", [((1, H), (B, 1)), ((B, 1), (1, H)), ((1, 1), (B, H)), ((B, H), (1, 1))],
                         ids=lambda s: f"q{list(s[0])}k{list(s[1])}")
def test_low_rank_bias_broadcast_factors(shapes):
    (bq, hq), (bk, hk) = shapes
    check_low_rank(rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D), rand(bq, hq, S, R, scale=0.7),
                   rand(bk, hk, S, R, scale=0.7), mask_mod=fg.mods.causal)


@requires_interpreter
@pytest.mark.parametrize("key_heads", [1, 2, 4], ids=lambda n: f"phi_k_heads{n}")
def test_low_rank_bias_gqa(key_heads):
    """Hq=4, Hkv=2: key factors shared by all heads, per kv head (query head h uses kv head h // 2,
    like k and v), or per query head (k, v repeated to the query heads)."""
    per_kv_head = key_heads == 2
    check_low_rank(rand(B, 4, S, D), rand(B, 2, S, D), rand(B, 2, S, D), rand(B, 4, S, R, scale=0.7),
                   rand(B, key_heads, S, R, scale=0.7), mask_mod=fg.mods.causal, enable_gqa=True,
                   ref_phi_k=(lambda t: t.repeat_interleave(2, dim=1)) if per_kv_head else (lambda t: t))


@requires_interpreter
def test_factor_columns_stay_within_float16_where_phi_q_over_the_scale_would_not():
    """phi_q / scale alone is past float16's range here (3e4 * 16 ** 0.5 = 1.2e5) while the bias's
    terms are small: the columns the kernels read are balanced by powers of two (the bias exactly
    unchanged), so the output is finite and within float16's tolerance, without gradients (the
    factors beside q and k) and with them (as q's and k's last columns)."""
    q, k, v = rand(1, 2, S, D), rand(1, 2, S, D), rand(1, 2, S, D)
    phi_q, phi_k = rand(1, 2, S, R) * 3e4, rand(1, 2, S, R) * 1e-4
    ref = fg.attention_reference(q.double(), k.double(), v.double(), bias=fg.LowRankBias(phi_q.double(),
                                                                                         phi_k.double()))
    attn = fg.compile(bias=fg.LowRankBias(phi_q, phi_k))
    fq, fk = api._factor_columns(attn.low_rank_bias, q.half(), k.half(), D**-0.5)
    assert fq.abs().max() < 100 and fk.abs().max() < 100
    with torch.no_grad():
        out = attn(q.half(), k.half(), v.half())
    q16 = q.half().requires_grad_()
    for got in (out, attn(q16, k.half(), v.half())):
        assert torch.isfinite(got).all() and rel_err(got, ref) < TOLERANCES[torch.float16]


@requires_interpreter
def test_factor_columns_are_kept_for_calls_with_the_same_factors(monkeypatch):
    calls = []
    build = api._factor_columns
    monkeypatch.setattr(api, "_factor_columns", lambda *a: calls.append(1) or build(*a))
    q, k, v = rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D)
    phi_q, phi_k = rand(B, H, S, R, scale=0.7), rand(1, H, S, R, scale=0.7)
    attn = fg.compile(bias=fg.LowRankBias(phi_q, phi_k))
    first, again = attn(q, k, v), attn(q, k, v)
    assert len(calls) == 1 and torch.equal(first, again)
    attn(q, k, v, scale=0.5)  # another scale: other columns
    assert len(calls) == 2
    phi_q.mul_(-1.0)  # the factors changed in place: built again
    changed = attn(q, k, v)
    assert len(calls) == 3
    ref = fg.attention_reference(q, k, v, bias=fg.LowRankBias(phi_q, phi_k))
    assert rel_err(changed, ref) < 1e-4


def test_reference_accepts_per_kv_head_key_factors():
    q, k, v = rand(1, 4, 8, D), rand(1, 2, 8, D), rand(1, 2, 8, D)
    phi_q, phi_k = rand(1, 4, 8, R), rand(1, 2, 8, R)
    got = fg.attention_reference(q, k, v, bias=fg.LowRankBias(phi_q, phi_k), enable_gqa=True)
    want = fg.attention_reference(q, k, v, bias=fg.LowRankBias(phi_q, phi_k.repeat_interleave(2, dim=1)),
                                  enable_gqa=True)
    assert torch.allclose(got, want)


@requires_interpreter
def test_low_rank_bias_different_lengths():
    check_low_rank(rand(1, H, 19, D), rand(1, H, 37, D), rand(1, H, 37, 8), rand(1, H, 19, 2, scale=0.7),
                   rand(1, 1, 37, 2, scale=0.7), mask_mod=fg.mods.causal)


@requires_interpreter
def test_low_rank_bias_with_additive_score_mods():
    slopes = torch.tensor([0.25, -0.5], requires_grad=True)
    check_low_rank(rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, R, scale=0.7),
                   rand(1, H, S, R, scale=0.7), fg.mods.alibi(slopes), fg.mods.causal, captured=(slopes,))
    attn = check_low_rank(rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, R, scale=0.7),
                          rand(B, H, S, R, scale=0.7), lambda s, b, h, q, kv: s + 0.1 * slopes[h] * (q - kv) ** 2,
                          captured=(slopes,))
    assert "low-rank bias:  fg.LowRankBias of rank 3" in attn.explain()
    bound = attn.low_rank_bias.rounding_bound(torch.bfloat16)
    assert f"rounded to bf16 beside q and k, move a logit by at most {bound:.3g}" in attn.explain()


@pytest.mark.parametrize("score_mod", [fg.mods.softcap(30.0), lambda s, b, h, q, kv: 2.0 * s],
                         ids=["softcap", "scaled"])
def test_non_additive_score_mod_with_low_rank_bias_raises(score_mod):
    lr = fg.LowRankBias(rand(1, 1, S, R), rand(1, 1, S, R))
    with pytest.raises(ValueError, match="LowRankBias with a score_mod"):
        fg.compile(score_mod, bias=lr)
    with pytest.raises(ValueError, match="LowRankBias with a score_mod"):
        fg.attention(rand(1, 1, S, D), rand(1, 1, S, D), rand(1, 1, S, D), score_mod, bias=lr)
    fg.compile(score_mod, bias=lambda b, h, q, kv: q * 0.5)  # a traced bias is fine with any score_mod


@requires_interpreter
def test_score_dependent_score_mod_with_low_rank_bias():
    torch.manual_seed(1)
    q, k, v = rand(1, H, S, D), rand(1, H, S, D), rand(1, H, S, D)
    lr = fg.LowRankBias(rand(1, H, S, R), rand(1, H, S, R))
    try:
        attn = fg.compile(_score_dependent_step, bias=lr)
    except ValueError:
        return  # refusing it is correct too
    out = attn(q, k, v)
    ref = fg.attention_reference(q, k, v, _score_dependent_step, bias=lr)
    assert rel_err(out, ref) < 1e-4, f"{rel_err(out, ref):.2e}"


@pytest.mark.parametrize("phi_q, phi_k, named, other", [
    ((B, H, S, 2), (B, H, S, 3), "phi_q and phi_k need the same rank", None),
    ((H, S, R), (B, H, S, R), "phi_q must be a floating-point tensor", "phi_k"),
    ((B, H, S, R), (S, R), "phi_k must be a floating-point tensor", "phi_q"),
    ((B, H, S, R), "int", "phi_k must be a floating-point tensor", "phi_q"),
], ids=["rank_mismatch", "phi_q_3d", "phi_k_2d", "phi_k_int"])
def test_bad_factors_at_construction(phi_q, phi_k, named, other):
    fq = torch.randn(*phi_q)
    fk = torch.randint(0, 3, (B, H, S, R)) if phi_k == "int" else torch.randn(*phi_k)
    with pytest.raises(ValueError, match="LowRankBias") as info:
        fg.LowRankBias(fq, fk)
    assert named in str(info.value)
    if other:
        assert other not in str(info.value)


@requires_interpreter
@pytest.mark.parametrize("phi_q, phi_k, hq, hkv, named, other", [
    ((B, H, S + 1, R), (B, H, S, R), H, H, "phi_q has length 25, expected 24", "phi_k"),
    ((B, H, S, R), (B, H, S - 1, R), H, H, "phi_k has length 23, expected 24", "phi_q"),
    ((B, 3, S, R), (B, H, S, R), H, H, "phi_q of shape [2, 3, 24, 3] does not broadcast", "phi_k"),
    ((B, H, S, R), (3, H, S, R), H, H, "phi_k of shape [3, 2, 24, 3] does not broadcast", "phi_q"),
    ((B, 2, S, R), (B, 4, S, R), 4, 2, "phi_q of shape [2, 2, 24, 3] does not broadcast", "phi_k"),
    ((B, 4, S, R), (B, 3, S, R), 4, 2, "phi_k of shape [2, 3, 24, 3] does not broadcast", "phi_q"),
], ids=["phi_q_length", "phi_k_length", "phi_q_heads", "phi_k_batch", "gqa_phi_q_kv_heads", "gqa_phi_k_heads"])
def test_bad_factors_at_call(phi_q, phi_k, hq, hkv, named, other):
    lr = fg.LowRankBias(torch.randn(*phi_q), torch.randn(*phi_k))
    q, k, v = rand(B, hq, S, D), rand(B, hkv, S, D), rand(B, hkv, S, D)
    with pytest.raises(ValueError, match="LowRankBias") as info:
        fg.attention(q, k, v, bias=lr, enable_gqa=hq != hkv)
    assert named in str(info.value)
    assert other not in str(info.value)


@requires_interpreter
def test_attention_reuses_the_traced_variant_and_sees_new_factor_values(monkeypatch):
    monkeypatch.setattr(api, "_recent", OrderedDict())
    q, k, v = rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D)
    phi_q, phi_k = rand(B, H, S, R, scale=0.7), rand(1, H, S, R, scale=0.7)
    first = fg.attention(q, k, v, bias=fg.LowRankBias(phi_q, phi_k), mask_mod=fg.mods.causal)
    assert len(api._recent) == 1
    attn = next(iter(api._recent.values()))
    again = fg.attention(q, k, v, bias=fg.LowRankBias(phi_q, phi_k), mask_mod=fg.mods.causal)  # a new wrapper
    assert len(api._recent) == 1 and next(iter(api._recent.values())) is attn
    assert torch.equal(first, again)
    with torch.no_grad():
        phi_q.mul_(-2.0)
        phi_k.add_(0.5)
    updated = fg.attention(q, k, v, bias=fg.LowRankBias(phi_q, phi_k), mask_mod=fg.mods.causal)
    assert len(api._recent) == 1 and next(iter(api._recent.values())) is attn
    ref = fg.attention_reference(q, k, v, mask_mod=fg.mods.causal, bias=fg.LowRankBias(phi_q, phi_k))
    assert rel_err(updated, ref) < 1e-4
    assert rel_err(updated, first) > 1e-2
    fg.attention(q, k, v, bias=fg.LowRankBias(phi_q.clone(), phi_k), mask_mod=fg.mods.causal)
    assert len(api._recent) == 2  # other factor tensors: another variant


# ---------------------------------------------------------------------------------------------
# 4. fg.low_rank


def truncation_error(bias: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error over the whole tensor of keeping ``rank`` singular values per slice."""
    s = torch.linalg.svdvals(bias.double())
    return math.sqrt(float((s[..., rank:] ** 2).sum() / (s**2).sum()))


def exact_rank(shape_q, shape_k, rank, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape_q[:-1], rank, generator=g, dtype=torch.float64)
    b = torch.randn(*shape_k[:-1], rank, generator=g, dtype=torch.float64)
    return (a @ b.transpose(-1, -2)).to(dtype)


@pytest.fixture(params=["exact", "sketched"])
def svd_path(request, monkeypatch):
    """fg.low_rank's two paths on the same small inputs: the full SVD, and the randomized one that
    slices longer than ``factors.EXACT_SVD_MAX`` take (the threshold lowered here)."""
    if request.param == "sketched":
        monkeypatch.setattr(factors, "EXACT_SVD_MAX", 8)
    return request.param


def test_low_rank_picks_the_smallest_rank_within_tol(svd_path):
    bias = exact_rank((2, 2, 32, 1), (2, 2, 24, 1), 3)
    bias = bias + 1e-4 * bias.std() * torch.randn(bias.shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr = fg.low_rank(bias, tol=1e-2)
    assert lr.rank == 3
    assert lr.phi_q.shape == (2, 2, 32, 3) and lr.phi_k.shape == (2, 2, 24, 3)
    assert lr.phi_q.dtype == lr.phi_k.dtype == torch.float32
    assert 0 < lr.error <= 1e-2
    dense_error = ((lr.dense().double() - bias.double()).norm() / bias.double().norm()).item()
    assert abs(dense_error - lr.error) < 1e-6
    assert truncation_error(bias, 3) <= 1e-2 < truncation_error(bias, 2) < truncation_error(bias, 1)
    assert "error=" in repr(lr) and "rank=3" in repr(lr)


def test_low_rank_of_an_exact_rank_2_float32_bias(svd_path):
    bias = exact_rank((2, 3, 30, 1), (2, 3, 20, 1), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lr = fg.low_rank(bias, tol=1e-6)
    assert lr.rank == 2 and lr.error <= 1e-6
    assert rel_err(lr.dense(), bias) < 1e-6


def test_low_rank_of_exact_rank_2_float64_biases_with_a_tiny_tol(svd_path):
    for seed in range(8):
        bias = exact_rank((2, 3, 30, 1), (2, 3, 20, 1), 2, dtype=torch.float64, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lr = fg.low_rank(bias, tol=1e-9)
        assert lr.rank == 2
        assert lr.error <= 1e-9, f"seed {seed}: reported error {lr.error:.2e}, true {rel_err(lr.dense(), bias):.2e}"


def test_low_rank_max_rank_warns(svd_path):
    bias = exact_rank((1, 2, 24, 1), (1, 2, 24, 1), 3)
    with pytest.warns(UserWarning, match=r"max_rank=2 leaves a relative error"):
        lr = fg.low_rank(bias, tol=1e-3, max_rank=2)
    assert lr.rank == 2 and lr.error > 1e-3
    assert abs(lr.error - rel_err(lr.dense(), bias)) < 1e-6
    assert abs(lr.error - truncation_error(bias, 2)) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fg.low_rank(bias, tol=1e-3, max_rank=5).rank == 3  # a cap above the need changes nothing


@pytest.mark.parametrize("lead", [(1, 3), (2, 1)], ids=["1xH", "Bx1"])
def test_low_rank_broadcast_shapes(lead, svd_path):
    bias = exact_rank((*lead, 20, 1), (*lead, 28, 1), 2) + 0.3
    lr = fg.low_rank(bias, tol=1e-5)
    assert lr.phi_q.shape == (*lead, 20, lr.rank) and lr.phi_k.shape == (*lead, 28, lr.rank)
    assert lr.rank == 3  # the constant adds one
    assert rel_err(lr.dense(), bias) <= 1e-5


def test_low_rank_takes_a_bias_without_leading_dims(svd_path):
    # [H, Sq, Skv], as bias= takes it: factors [1, H, S, R], the same as for [1, H, Sq, Skv]
    u, w = torch.randn(3, 20, 2, dtype=torch.float64), torch.randn(3, 24, 2, dtype=torch.float64)
    bias = u @ w.transpose(-1, -2)
    lr = fg.low_rank(bias, tol=1e-8)
    assert lr.rank == 2 and lr.phi_q.shape == (1, 3, 20, 2) and lr.phi_k.shape == (1, 3, 24, 2)
    assert rel_err(lr.dense()[0], bias) <= 1e-8
    assert fg.low_rank(bias[0], tol=1e-8).phi_q.shape == (1, 1, 20, 2)


@pytest.mark.parametrize("rank", [12, 40])
def test_sketched_low_rank_widens_until_it_finds_the_rank(rank, monkeypatch):
    """Slices of 300 x 260 past the threshold: the randomized SVD starts 32 columns wide and doubles
    (rank 40 needs 64); it finds the full SVD's rank, and its reported error is the factors' own."""
    bias = exact_rank((1, 2, 300, 1), (1, 2, 260, 1), rank)
    bias = bias + 1e-3 * bias.std() * torch.randn(bias.shape, generator=torch.Generator().manual_seed(2))
    exact = fg.low_rank(bias, tol=1e-2)
    monkeypatch.setattr(factors, "EXACT_SVD_MAX", 64)
    sketched = fg.low_rank(bias, tol=1e-2)
    assert sketched.rank == exact.rank == rank
    assert sketched.error <= 1e-2 and abs(sketched.error - rel_err(sketched.dense(), bias)) < 1e-9
    assert abs(sketched.error - exact.error) < 1e-6


@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 1, 1, 8, 8),), "bias must be a floating-point tensor"),
    ((torch.randn(8),), "bias must be a floating-point tensor"),
    ((torch.randint(0, 5, (1, 1, 8, 8)),), "bias must be a floating-point tensor"),
    (([[1.0]],), "bias must be a floating-point tensor"),
    ((torch.randn(1, 1, 8, 8), 1.5), "tol must be in"),
    ((torch.randn(1, 1, 8, 8), -0.1), "tol must be in"),
    ((torch.randn(1, 1, 8, 8), 1e-2, 0), "max_rank must be a positive int"),
    ((torch.randn(1, 1, 8, 8), 1e-2, 2.0), "max_rank must be a positive int"),
], ids=["5d", "1d", "int", "list", "tol_1.5", "tol_negative", "max_rank_0", "max_rank_float"])
def test_low_rank_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        fg.low_rank(*args)


@requires_interpreter
@pytest.mark.parametrize("mask", ["none", "causal"])
def test_low_rank_factors_run_within_the_factorisation_error(mask):
    """A smooth bias (not exactly low-rank) through its truncated SVD. Per row, logits perturbed by
    at most eps move every softmax weight by a factor within [e^-2eps, e^2eps], so the output row
    moves by at most (e^2eps - 1) max_j |v_j| and the lse by at most eps."""
    Sq, Skv = 32, 40
    q, k, v = rand(1, H, Sq, D), rand(1, H, Skv, D), rand(1, H, Skv, D)
    i = torch.arange(Sq, dtype=torch.float32).view(1, 1, Sq, 1)
    j = torch.arange(Skv, dtype=torch.float32).view(1, 1, 1, Skv)
    width = torch.tensor([6.0, 12.0]).view(1, H, 1, 1)
    bias = 3.0 * torch.exp(-(((i - j) / width) ** 2))
    lr = fg.low_rank(bias, tol=1e-2)
    assert 1 < lr.rank < 20 and 0 < lr.error <= 1e-2
    mask_mod = MASKS[mask]
    out, lse = fg.attention(q, k, v, mask_mod=mask_mod, bias=lr, return_lse=True)
    exact, exact_lse = fg.attention_reference(q, k, v, mask_mod=mask_mod, bias=lr, return_lse=True)
    assert rel_err(out, exact) < 1e-4 and rel_err(lse, exact_lse) < 1e-4
    ref, ref_lse = fg.attention_reference(q, k, v, mask_mod=mask_mod, bias=bias, return_lse=True)
    eps = (lr.dense().double() - bias.double()).abs().max().item()
    assert eps > 0
    row_bound = math.expm1(2 * eps) * v.double().norm(dim=-1).max().item() + 1e-4
    assert (out.double() - ref).norm(dim=-1).max().item() <= row_bound
    assert (lse.double() - ref_lse).abs().max().item() <= eps + 1e-4


def test_rank_that_makes_the_head_too_wide_is_refused():
    q, k, v = (torch.randn(1, 1, 16, 250) for _ in range(3))
    wide = fg.LowRankBias(torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8))
    with pytest.raises(ValueError, match="exceeds 256"):
        fg.attention(q, k, v, bias=wide)


# ---------------------------------------------------------------------------------------------
# lowering traced separable biases to factors (bias_lowering=)


def _dense(fn, B, H, Sq, Skv):
    idx = (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1), torch.arange(Sq).view(1, 1, Sq, 1),
           torch.arange(Skv).view(1, 1, 1, Skv))
    return torch.as_tensor(fn(*idx)).double().expand(B, H, Sq, Skv)


@pytest.mark.parametrize("name", ["alibi", "squared", "grid"])
def test_factor_bias_is_exact(name):
    from flashgen.factors import factor_bias

    slopes = torch.rand(3, dtype=torch.float64) + 0.5
    fn, rank = {
        "alibi": (lambda b, h, q, kv: slopes[h] * (kv - q), 2),
        "squared": (lambda b, h, q, kv: -0.01 * (q - kv).double() ** 2, 3),
        "grid": (lambda b, h, q, kv: -0.01 * ((q % 7 - kv % 7).double() ** 2 + (q // 7 - kv // 7).double() ** 2), 4),
    }[name]
    lr = factor_bias(fn, rank, 2, 3, 90, 70, "cpu")
    assert lr.rank == rank
    assert rel_err(lr.dense(), _dense(fn, 2, 3, 90, 70)) < 1e-6  # float32 factors of an exact decomposition


@requires_interpreter
@pytest.mark.parametrize("lowering", ["factors", "auto", "loop"])
def test_bias_lowering_matches_the_reference(lowering):
    slopes = torch.rand(2) + 0.2

    def grid(b, h, q_idx, kv_idx):
        return -0.05 * slopes[h] * ((q_idx % 8 - kv_idx % 8) ** 2 + (q_idx // 8 - kv_idx // 8) ** 2)

    mods = dict(bias=grid, mask_mod=fg.mods.prefix_lm(8))
    attn = fg.compile(**mods, bias_lowering=lowering)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 2, 40, 16)
    out, lse = attn(q, k, v, return_lse=True)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = fg.attention_reference(qd, kd, vd, **mods, return_lse=True)
    want = torch.autograd.grad((ref * dout.double()).sum(), (qd, kd, vd))
    assert rel_err(out, ref) < 1e-4 and rel_err(lse, ref_lse) < 1e-4
    for g, w in zip(grads, want):
        assert rel_err(g, w) < 1e-4
    if lowering == "loop":
        assert attn.last_lowering is None and not attn._factored
    else:
        assert attn.last_lowering.startswith("factors") and len(attn._factored) == 1
        assert "bias lowering:  " + lowering in attn.explain()


def test_head_blocks():
    from flashgen.lowrank import head_blocks

    expected = {16: (16, 0), 24: (32, 0), 48: (32, 16), 64: (64, 0), 80: (64, 16), 96: (64, 32), 100: (128, 0),
                128: (128, 0), 144: (128, 16), 192: (128, 64), 200: (256, 0), 256: (256, 0)}
    assert {d: head_blocks(d) for d in expected} == expected
    for d in range(1, 257):  # the blocks cover the head, each a power of two >= 16, never wider than one block
        first, second = head_blocks(d)
        assert first + second >= d and first >= 16 and (second == 0 or second >= 16)
        assert first & (first - 1) == 0 and second & (second - 1) == 0
        assert first + second <= max(16, 1 << (d - 1).bit_length())


def test_cost_model_choices():
    from flashgen.lowrank import lowering_cost

    alibi = fg.compile(score_mod=fg.mods.alibi(torch.rand(2))).program.logits
    # 128 + 2 runs as head blocks 128 + 16: 16 more columns (32 FLOPs) against 7 operations per score
    assert lowering_cost(alibi, 2, 128) == ("factors", "factors: factors add 16 q·k columns (32 bf16 tensor-core "
                                                       "FLOPs per score at bf16), the loop 7 operations (~105)")
    # fp32 dots are tf32x3 (three tf32 products at half bf16's rate): the same 16 columns cost 192
    assert lowering_cost(alibi, 2, 128, "fp32")[0] == "loop" and "192" in lowering_cost(alibi, 2, 128, "fp32")[1]
    assert lowering_cost(alibi, 2, 128, "fp16")[0] == "factors"
    assert lowering_cost(alibi, 2, 80)[0] == "factors"  # 80 + 2 fits the blocks 64 + 32 instead of 64 + 16
    assert lowering_cost(alibi, 2, 96)[0] == "factors"  # 96 + 2: 128, the same 32 columns as 64 + 32
    assert lowering_cost(alibi, 2, 255)[0] == "loop" and "exceeds 256" in lowering_cost(alibi, 2, 255)[1]
    assert lowering_cost(alibi, 40, 128)[0] == "loop"  # 168 needs the blocks 128 + 64: 128 FLOPs against ~105
    quadratic = fg.compile(bias=lambda b, h, q_idx, kv_idx: -0.01 * (q_idx - kv_idx) ** 2).program.logits
    assert "add 0 q·k columns" in lowering_cost(quadratic, 3, 112)[1]  # 115 fits the 128 that 112 is padded to



def test_bias_lowering_refusals():
    table = torch.randn(2, 79)
    with pytest.raises(ValueError, match="'auto', 'loop' or 'factors'"):
        fg.compile(score_mod=fg.mods.alibi(torch.rand(2)), bias_lowering="fast")
    with pytest.raises(ValueError, match="finite rank"):
        fg.compile(score_mod=fg.mods.relative_bias(table), bias_lowering="factors")
    slopes = torch.rand(2, requires_grad=True)
    forced = fg.compile(score_mod=fg.mods.alibi(slopes), bias_lowering="factors")
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    with pytest.raises(ValueError, match="gradients"):
        forced(q, k, v)
    auto = fg.compile(score_mod=fg.mods.alibi(slopes), bias_lowering="auto")
    # learnable: stays in the loop
    assert not auto._lowers_to_factors(80, torch.bfloat16) and "require grad" in auto.last_lowering


def test_rounding_bound_covers_the_rounded_factors():
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 300.0):
        lr = fg.LowRankBias(torch.randn(2, 3, 50, 4) * scale, torch.randn(1, 3, 40, 4))
        for dtype in (torch.bfloat16, torch.float16):
            bound = lr.rounding_bound(dtype)
            moved = (lr.phi_q.to(dtype).double() @ lr.phi_k.to(dtype).double().transpose(-1, -2)
                     - lr.phi_q.double() @ lr.phi_k.double().transpose(-1, -2)).abs().max().item()
            assert moved <= bound < 50 * moved + 1e-12  # sound, and not vacuous
    assert fg.LowRankBias(torch.full((1, 1, 4, 1), 1e5), torch.ones(1, 1, 4, 1)).rounding_bound(torch.float16) \
        == float("inf")  # past float16's range


@requires_interpreter
def test_factors_whose_rounding_moves_logits_are_refused_in_bf16():
    # ALiBi at 512 tokens: exact float32 factors with terms of ~360 that cancel near the diagonal;
    # in bfloat16 they would move those logits by whole units
    slopes = torch.tensor([0.7, 0.5])
    mods = dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    ref = fg.attention_reference(q.double(), k.double(), v.double(), **mods)
    auto = fg.compile(**mods, bias_lowering="auto")
    out = auto(*(t.bfloat16() for t in (q, k, v)))
    assert auto.last_lowering.startswith("loop: the factors in bfloat16 would move logits by up to")
    assert rel_err(out, ref) < TOLERANCES[torch.bfloat16]
    assert auto(q, k, v) is not None and auto.last_lowering.startswith("loop")  # fp32: the cost model's loop
    forced = fg.compile(**mods, bias_lowering="factors")
    with pytest.warns(UserWarning, match="would move logits"):
        forced(*(t.bfloat16() for t in (q, k, v)))
