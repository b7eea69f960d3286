"""Forward kernels against the float64 reference (CPU: Triton's interpreter)."""

import pytest
import torch
from helpers import check_against_reference, rel_err, requires_interpreter

import flashgen as fg
from flashgen import runtime

pytestmark = requires_interpreter


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def library_variants(H, S):
    slopes = fg.mods.alibi_slopes(H)
    doc_ids = torch.sort(torch.randint(0, 3, (S,))).values
    batch_docs = torch.sort(torch.randint(0, 3, (2, S)), dim=1).values
    table = torch.randn(H, 2 * S - 1)
    return {
        "full": dict(),
        "causal": dict(mask_mod=fg.mods.causal),
        "sliding_window": dict(mask_mod=fg.mods.sliding_window(9)),
        "prefix_lm": dict(mask_mod=fg.mods.prefix_lm(13)),
        "chunked": dict(mask_mod=fg.mods.chunked(16)),
        "chunked_causal": dict(mask_mod=fg.mods.chunked(20) & fg.mods.causal),
        "document": dict(mask_mod=fg.mods.document(doc_ids)),
        "document_batched_causal": dict(mask_mod=fg.mods.document(batch_docs) & fg.mods.causal),
        "alibi_causal": dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal),
        "softcap": dict(score_mod=fg.mods.softcap(2.0)),
        "relative_bias": dict(score_mod=fg.mods.relative_bias(table)),
        "relative_bias_shared": dict(score_mod=fg.mods.relative_bias(torch.randn(2 * S - 1))),
        "bias_fn": dict(bias=lambda b, h, q, kv: (q - kv).abs().float() * -0.1),
        "bias_tensor": dict(bias=torch.randn(1, H, S, S)),
        "not_causal": dict(mask_mod=~fg.mods.causal),
        "window_or_global": dict(mask_mod=fg.mods.sliding_window(5) | (lambda b, h, q, kv: kv < 3)),
    }


@pytest.mark.parametrize("name", list(library_variants(2, 70)))
def test_library_mods(name):
    B, H, S, D = 2, 2, 70, 32
    mods = library_variants(H, S)[name]
    q, k, v = rand(B, H, S, D), rand(B, H, S, D), rand(B, H, S, D)
    check_against_reference(q, k, v, **mods)


@pytest.mark.parametrize("Sq, Skv, below, above", [
    (150, 150, 70, 0),   # a sliding window: edge tiles below, the diagonal's above, full tiles between
    (150, 203, 40, 25),  # both edges partial, ragged lengths, queries fewer than keys
    (203, 150, 90, 37),  # more queries than keys: late rows' bands end past Skv
    (97, 97, 5, 3),      # a band narrower than a tile: nothing full
    (130, 130, 200, 0),  # wider than the sequence: the lower edge never starts
])
def test_both_edges_of_a_band_in_one_loop(Sq, Skv, below, above):
    """A band bounded on both sides visits its two edges' partial tiles in one KV loop."""
    def band(b, h, q, kv):
        return (kv <= q + above) & (kv >= q - below)

    assert "DOT_F32, True)" in fg.compile(mask_mod=band).source()  # the loop with a gap
    q, k, v = rand(1, 2, Sq, 32), rand(1, 2, Skv, 32), rand(1, 2, Skv, 32)
    check_against_reference(q, k, v, mask_mod=band)


@pytest.mark.parametrize("mask", [
    lambda ids: fg.mods.document(ids) & fg.mods.causal,
    lambda ids: fg.mods.sliding_window(23) & fg.mods.document(ids),
    lambda ids: fg.mask_mod(lambda b, h, q, kv: (kv <= q) & (q - kv < 40) & ((q - kv) % 2 == 0)),  # dilated
])
@pytest.mark.parametrize("config", [None, fg.Config(16, 16)])
@pytest.mark.parametrize("split", [False, True])
def test_a_block_map_with_band_clauses_is_right_on_tiles_below_across_and_inside_the_band(mask, config, split,
                                                                                       monkeypatch):
    """A mask that is a band and more runs over a block map, right on tiles below, across and inside
    the band. The Gluon kernels evaluate its band clauses only across its edges; the Triton kernel
    does where the launch's rule says so (``split``: SPLIT_BAND, forced here both ways)."""
    monkeypatch.setattr(fg.Attention, "_split_band", lambda self, *a: split)
    ids = torch.tensor([0] * 37 + [1] * 50 + [2] * 63)  # (edges inside tiles)
    mods = dict(mask_mod=mask(ids))
    attn = fg.compile(**mods)
    assert ("if SPLIT_BAND:" in attn.source()) == attn.analysis.band_split
    q, k, v = rand(2, 2, 150, 32), rand(2, 2, 150, 32), rand(2, 2, 150, 32)
    out, lse = attn(q, k, v, return_lse=True, config=config)
    ref, ref_lse = fg.attention_reference(q, k, v, **mods, return_lse=True)
    assert rel_err(out, ref) < 1e-4 and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_the_triton_forward_splits_a_band_where_most_partial_tiles_lie_inside_it():
    """``Attention._split_band``: on for a dilated window (its partial tiles fill the band), off for
    chunks along the diagonal (every partial tile crosses it) and for documents (their map is not on
    the host); programs without a band and a rest render no SPLIT_BAND at all."""
    S, tiles = 512, fg.Config(64, 32)

    def dilated(b, h, q, kv):
        return (kv <= q) & (q - kv < 256) & ((q - kv) % 2 == 0)

    def chunks(b, h, q, kv):
        return (q // 128 == kv // 128) & (kv <= q)

    documents = fg.mods.document(torch.arange(S) * 4 // S) & fg.mods.causal
    rule = {name: fg.compile(mask_mod=m)._split_band((1, 1, S, S), tiles, "cpu")
            for name, m in (("dilated", dilated), ("chunks", chunks), ("documents", documents))}
    assert rule == {"dilated": True, "chunks": False, "documents": False}
    attn = fg.compile(mask_mod=dilated)
    q, k, v = rand(1, 1, S, 16), rand(1, 1, S, 16), rand(1, 1, S, 16)
    assert rel_err(attn(q, k, v, config=tiles), fg.attention_reference(q, k, v, mask_mod=dilated)) < 1e-4
    assert "1 forward(s) test the band's clauses only on tiles across its edges" in attn.explain()
    assert "SPLIT_BAND" not in fg.compile(mask_mod=fg.mods.causal).source()
    assert "SPLIT_BAND" not in fg.compile(mask_mod=fg.mods.prefix_lm(16)).source()


def test_power_of_two_floor_division_and_remainder_of_negative_indices():
    """``//`` and ``%`` by powers of two floor like Python's for negative dividends too (q - kv
    below the diagonal, kv - q above it)."""
    def dilated(b, h, q, kv):  # every 4th key of a causal window, and a remainder that goes negative
        return (kv <= q) & ((q - kv) % 4 == 0) | ((kv - q - 3) % 2 == 1) & (kv - q < 9)

    def stepped(score, b, h, q, kv):  # a bias constant on stripes of 8 diagonals, negative ones included
        return score + 0.1 * ((kv - q) // 8).float() - 0.05 * ((q - kv) % 16).float()

    q, k, v = rand(1, 2, 70, 32), rand(1, 2, 83, 32), rand(1, 2, 83, 32)
    check_against_reference(q, k, v, mask_mod=dilated)
    check_against_reference(q, k, v, score_mod=stepped, mask_mod=dilated)


@pytest.mark.parametrize("D", [16, 48, 64, 80, 128])
def test_head_dims(D):
    q, k, v = rand(1, 2, 37, D), rand(1, 2, 45, D), rand(1, 2, 45, D)
    check_against_reference(q, k, v, mask_mod=fg.mods.causal)


@pytest.mark.parametrize("Sq,Skv", [(1, 1), (1, 50), (50, 1), (33, 97), (97, 33), (64, 64), (100, 100)])
def test_lengths(Sq, Skv):
    q, k, v = rand(1, 1, Sq, 32), rand(1, 1, Skv, 32), rand(1, 1, Skv, 32)
    check_against_reference(q, k, v, mask_mod=fg.mods.sliding_window(11))
    check_against_reference(q, k, v, score_mod=fg.mods.softcap(3.0))


def test_value_head_dim_differs():
    q, k, v = rand(1, 2, 40, 32), rand(1, 2, 40, 32), rand(1, 2, 40, 48)
    check_against_reference(q, k, v, mask_mod=fg.mods.causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = (rand(2, 2, 50, 64, dtype=dtype) for _ in range(3))
    check_against_reference(q, k, v, score_mod=fg.mods.softcap(5.0), mask_mod=fg.mods.causal)


def test_gqa_reads_shared_kv_heads():
    q, k, v = rand(2, 6, 40, 32), rand(2, 2, 40, 32), rand(2, 2, 40, 32)
    slopes = torch.rand(6)
    check_against_reference(q, k, v, score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal, enable_gqa=True)


def test_non_contiguous_inputs():
    q = rand(2, 40, 3, 32).transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] tensor
    k = rand(2, 32, 3, 50).permute(0, 2, 3, 1)  # last dim not contiguous
    v = rand(2, 50, 3, 32).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(q, k, v, mask_mod=fg.mods.prefix_lm(7))


def test_custom_scale():
    q, k, v = (rand(1, 2, 30, 32) for _ in range(3))
    check_against_reference(q, k, v, mask_mod=fg.mods.causal, scale=0.3)


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = (rand(1, 2, 40, 16) for _ in range(3))
    # rows q < 10 see nothing; rows q >= 10 see a window behind them
    mask = fg.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= 10) & (kv_idx < q_idx - 5))
    out = check_against_reference(q, k, v, mask_mod=mask)
    assert (out[:, :, :10] == 0).all()
    everything_masked = lambda b, h, q_idx, kv_idx: q_idx < 0  # noqa: E731
    out, lse = fg.attention(q, k, v, mask_mod=everything_masked, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_score_mod_returning_minus_inf_is_a_mask():
    q, k, v = (rand(1, 1, 40, 16) for _ in range(3))
    score = lambda s, b, h, q_idx, kv_idx: torch.where(kv_idx > q_idx, float("-inf"), s)  # noqa: E731
    check_against_reference(q, k, v, score_mod=score)


def test_negative_floor_division_and_modulo_follow_torch():
    q, k, v = (rand(1, 1, 45, 16) for _ in range(3))
    mask = lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) // 4) % 3 != 1  # noqa: E731
    score = lambda s, b, h, q_idx, kv_idx: s + ((kv_idx - q_idx) % 7).float() * 0.1  # noqa: E731
    check_against_reference(q, k, v, score_mod=score, mask_mod=mask)


def test_captured_values_change_without_recompiling():
    slopes = torch.rand(2)
    attn = fg.compile(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)
    q, k, v = (rand(1, 2, 30, 16) for _ in range(3))
    check_against_reference(q, k, v, fg.mods.alibi(slopes), fg.mods.causal, attn=attn)
    modules_before = len(runtime._modules)
    slopes.mul_(-3.0)
    check_against_reference(q, k, v, fg.mods.alibi(slopes), fg.mods.causal, attn=attn)
    assert len(runtime._modules) == modules_before


def test_equivalent_mods_reuse_one_kernel():
    q, k, v = (rand(1, 1, 20, 16) for _ in range(3))
    fg.attention(q, k, v, mask_mod=fg.mods.causal)
    modules_before = len(runtime._modules)
    fg.attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)
    fg.attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: ~(kv_idx > q_idx + 0))
    assert len(runtime._modules) == modules_before


def test_empty_inputs():
    q, k, v = rand(1, 2, 0, 16), rand(1, 2, 5, 16), rand(1, 2, 5, 16)
    assert fg.attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = rand(1, 2, 4, 16), rand(1, 2, 0, 16), rand(1, 2, 0, 8)
    out, lse = fg.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 4, 8) and (out == 0).all() and torch.isneginf(lse).all()


@requires_interpreter
def test_reads_out_of_range_give_zero():
    # relative_bias covers distances up to L - 1 = 7; at S = 20 the farther ones read 0, as documented
    # (the launch cannot prove the reads in range, so the kernel keeps its bounds masks)
    L, S = 8, 20
    table = torch.randn(2, 2 * L - 1)
    q, k, v = (rand(1, 2, S, 16) for _ in range(3))
    attn = fg.compile(score_mod=fg.mods.relative_bias(table))
    assert attn._check_reads((1, 2, S, S))
    wide = torch.zeros(2, 2 * S - 1)  # the same table with zeros for the distances it does not cover
    wide[:, S - L:S + L - 1] = table
    ref = fg.attention_reference(q, k, v, fg.mods.relative_bias(wide))
    assert rel_err(attn(q, k, v), ref) < 1e-4
    # at S <= L every read is proved in range: no bounds masks, same results
    q, k, v = (t[:, :, :L] for t in (q, k, v))
    assert not attn._check_reads((1, 2, L, L))
    check_against_reference(q, k, v, fg.mods.relative_bias(table), attn=attn)


@requires_interpreter
@pytest.mark.parametrize("fast_math", [None, True, False])
def test_fast_math_option(fast_math):
    attn = fg.compile(score_mod=fg.mods.softcap(5.0), mask_mod=fg.mods.causal, fast_math=fast_math)
    assert "_tanh(" in attn.source() and "FAST_MATH" in attn.source() and "tanh.approx.f32" in attn.source()
    assert {None: "bf16/fp16", True: "fast_math=True", False: "exact"}[fast_math] in attn.explain()
    assert not attn._fast_math(torch.bfloat16)  # the interpreter cannot run the GPU's instruction: exact
    q, k, v = (rand(1, 2, 30, 16) for _ in range(3))
    check_against_reference(q, k, v, fg.mods.softcap(5.0), fg.mods.causal, attn=attn)
    out = fg.attention(q, k, v, score_mod=fg.mods.softcap(5.0), fast_math=fast_math)
    assert rel_err(out, fg.attention_reference(q, k, v, fg.mods.softcap(5.0))) < 1e-4
    assert "tanh, sigmoid" not in fg.compile(mask_mod=fg.mods.causal).explain()  # only where they occur
    with pytest.raises(ValueError, match="fast_math='yes'"):
        fg.compile(score_mod=fg.mods.softcap(5.0), fast_math="yes")


def test_generated_source_and_explain():
    table = torch.randn(2, 39)
    attn = fg.compile(score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.sliding_window(8))
    source = attn.source("fwd")
    compile(source, "<generated>", "exec")  # valid Python
    assert "@triton.jit" in source and "hook: score_mod" in source and "hook: mask_mod" in source
    report = attn.explain()
    assert "captured0" in report and "-7 <= kv_idx - q_idx <= 0" in report
    with pytest.raises(ValueError, match="'fwd', 'fwd_ws', 'bwd' or 'bwd_ws'"):
        attn.source("dq")


def test_attention_reuses_traces_but_sees_changed_closure_scalars():
    q, k, v = (rand(1, 1, 40, 16) for _ in range(3))
    window = 4

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    out4 = fg.attention(q, k, v, mask_mod=mask)
    assert fg.api._fingerprint((None, mask, None, False, None)) in fg.api._recent
    window = 9  # noqa: F841 - read by the mask's closure
    out9 = fg.attention(q, k, v, mask_mod=mask)
    ref9 = fg.attention_reference(q, k, v, mask_mod=mask)
    assert not torch.allclose(out4, out9)
    assert rel_err(out9, ref9) < 1e-4


def test_dense_bias_broadcasts_over_every_size_one_dimension():
    q, k, v = rand(2, 2, 20, 16), rand(2, 2, 24, 16), rand(2, 2, 24, 16)
    for shape in [(1, 1, 20, 24), (2, 1, 1, 24), (1, 2, 20, 1), (1, 1, 1, 1), (2, 20, 24), (20, 1)]:
        check_against_reference(q, k, v, bias=torch.randn(*shape))


def test_mods_reading_user_module_attributes_are_retraced():
    import types

    cfg = types.ModuleType("user_cfg")
    cfg.W = 3
    mask = eval("lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < cfg.W)", {"cfg": cfg})
    q, k, v = (rand(1, 1, 30, 16) for _ in range(3))
    fg.attention(q, k, v, mask_mod=mask)
    cfg.W = 11
    out = fg.attention(q, k, v, mask_mod=mask)
    assert rel_err(out, fg.attention_reference(q, k, v, mask_mod=mask)) < 1e-4


def test_row_terms_leave_the_per_entry_logits_for_the_log_sum_exp():
    """Terms constant along a row (ALiBi's -slope * q_idx once measured from the tile origin, a
    per-query bias) are left out of the KV loop and added to the stored lse: outputs and lse still
    match the reference, including rows that the mask empties and multiple query blocks."""
    H, S = 2, 150
    slopes, row_bias = torch.tensor([0.7, 0.05]), torch.randn(S)
    alibi_plus_rows = fg.score_mod(lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx)
                                   + row_bias[q_idx] - 0.02 * q_idx)
    q, k, v = (rand(1, H, S, 16) for _ in range(3))
    for mask in (None, fg.mods.causal, fg.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= 70) & (kv_idx <= q_idx))):
        check_against_reference(q, k, v, alibi_plus_rows, mask)
    src = fg.compile(score_mod=alibi_plus_rows).source()
    loop = src[src.index("# ---- hook: score_mod"):src.index("if APPLY_MASK")]
    assert "q_idx" not in loop and "row_bias" not in loop  # no row term inside the KV loop
    assert "row_term" in src
    report = fg.compile(score_mod=alibi_plus_rows).explain()
    assert "per row:" in report and "row_bias" not in report.split("per entry:")[1].split("\n")[0]


def test_a_row_of_minus_inf_from_a_score_mod_stays_masked():
    # -inf row terms are not moved to the lse (the softmax would otherwise see finite logits)
    q, k, v = (rand(1, 1, 40, 16) for _ in range(3))
    rows = fg.score_mod(lambda s, b, h, q_idx, kv_idx: s + torch.where(q_idx < 7, float("-inf"), 0.0)
                        + 0.1 * (kv_idx - q_idx))
    out = check_against_reference(q, k, v, rows)
    assert (out[:, :, :7] == 0).all()


def test_a_bias_shared_by_the_batch_runs_its_batch_entries_side_by_side():
    """A dense bias without a batch dimension makes the forward launch the batch entries of each
    (head, query block) next to each other (so that the bias tiles come from L2); every program
    still covers its own (b, h, query block): outputs and lse match for several of each."""
    B, H, S = 3, 2, 70  # three query blocks in the interpreter's 32-row tiles
    bias = torch.randn(H, S, S)
    assert "launched % nb" in fg.compile(bias=bias).source()
    assert "launch order: the batch entries" in fg.compile(bias=bias).explain()
    q, k, v = (rand(B, H, S, 16) for _ in range(3))
    docs = torch.sort(torch.randint(0, 4, (B, S)), dim=1).values  # per batch entry: the block-map path
    for mask in (None, fg.mods.causal, fg.mods.document(docs) & fg.mods.causal):
        check_against_reference(q, k, v, bias=bias, mask_mod=mask)
    kv = (rand(B, 1, S, 16), rand(B, 1, S, 16))
    check_against_reference(q, *kv, bias=bias, mask_mod=fg.mods.causal, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["plain", "bias", "causal"])
def test_running_max_that_grows_across_tiles(form, dtype):
    """A row's max that grows tile after tile, by small steps and big ones: the online softmax's
    rescaling of the running sums is exact (fp16: a stale max would overflow p)."""
    B, H, S, D = 1, 2, 160, 16
    q, k, v = (rand(B, H, S, D, dtype=dtype) for _ in range(3))
    steps = torch.tensor([0.0, 2.0, 9.0, 1.0, 14.0])  # natural-log units, one per 32-key tile
    ramp = steps.cumsum(0).repeat_interleave(32)[:S]
    if form == "bias":  # logits that jump at each tile boundary
        check_against_reference(q, k, v, bias=(ramp[None, :] + torch.randn(S, S)).to(dtype))
    else:  # keys scaled up tile by tile: q·kᵀ of later tiles outgrows the earlier ones
        k = (k.float() * (1.0 + ramp / 4)[:, None]).to(dtype)
        check_against_reference(q, k, v, mask_mod=fg.mods.causal if form == "causal" else None)
