"""Backward kernels against torch.autograd through the float64 reference (CPU: the interpreter)."""

import pytest
import torch
from helpers import rel_err, requires_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, examples

import flashgen as fg

pytestmark = requires_interpreter


def grads_of(fn, q, k, v, captured, dout, dlse=None):
    """Gradients of sum(out * dout) (+ sum(lse * dlse)) for q, k, v and the captured tensors."""
    for t in (q, k, v, *captured):
        t.grad = None
    out, lse = fn(q, k, v)
    loss = (out.double() * dout).sum()
    if dlse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse.double(), 0.0) * dlse).sum()
    loss.backward()
    return [t.grad.clone() if t.grad is not None else None for t in (q, k, v, *captured)]


def check_backward(q, k, v, score_mod=None, mask_mod=None, bias=None, *, captured=(), enable_gqa=False,
                   with_lse=False, tol=1e-4):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    B, Hq, Sq, _ = q.shape
    dout = torch.randn(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    dlse = torch.randn(B, Hq, Sq, dtype=torch.float64) if with_lse else None
    attn = fg.compile(score_mod, mask_mod, bias)
    got = grads_of(lambda a, b, c: attn(a, b, c, enable_gqa=enable_gqa, return_lse=True), q, k, v, captured, dout,
                   dlse)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = grads_of(lambda a, b, c: fg.attention_reference(a, b, c, score_mod, mask_mod, bias, enable_gqa=enable_gqa,
                                                           return_lse=True), qd, kd, vd, captured, dout, dlse)
    names = ["dq", "dk", "dv"] + [f"d captured{i}" for i in range(len(captured))]
    for name, g, w in zip(names, got, want):
        assert g is not None and w is not None, name
        assert not torch.isnan(g).any(), f"{name} has NaN"
        assert rel_err(g, w) < tol, f"{name}: relative error {rel_err(g, w):.2e}"


def rand(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("name", ["full", "causal", "sliding_window", "prefix_lm", "chunked", "document", "softcap",
                                  "not_causal"])
def test_library_masks_and_score_mods(name):
    S = 45
    doc_ids = torch.sort(torch.randint(0, 3, (S,))).values
    mods = {
        "full": dict(),
        "causal": dict(mask_mod=fg.mods.causal),
        "sliding_window": dict(mask_mod=fg.mods.sliding_window(7)),
        "prefix_lm": dict(mask_mod=fg.mods.prefix_lm(10)),
        "chunked": dict(mask_mod=fg.mods.chunked(16) & fg.mods.causal),
        "document": dict(mask_mod=fg.mods.document(doc_ids)),
        "softcap": dict(score_mod=fg.mods.softcap(1.5), mask_mod=fg.mods.causal),
        "not_causal": dict(mask_mod=~fg.mods.causal),  # the last row sees nothing
    }[name]
    check_backward(rand(2, 2, S, 32), rand(2, 2, S, 32), rand(2, 2, S, 32), **mods)


def test_odd_lengths_and_value_dim():
    check_backward(rand(1, 2, 37, 48), rand(1, 2, 53, 48), rand(1, 2, 53, 24), mask_mod=fg.mods.sliding_window(20))


@pytest.mark.parametrize("d, dv, mods", [
    (48, 40, dict(mask_mod=fg.mods.causal)),  # head blocks 32 + 16
    (80, 64, dict(mask_mod=fg.mods.document(torch.arange(45) // 12), score_mod=fg.mods.softcap(4.0))),  # 64 + 16
    (144, 32, dict(bias=torch.randn(1, 4, 45, 45))),  # 128 + 16: a head widened by rank-16 factors
])
def test_head_dims_in_two_blocks(d, dv, mods):
    from flashgen.lowrank import head_blocks

    assert head_blocks(d)[1] > 0  # q·kᵀ runs as two dots, and dq, dk come out in two blocks
    check_backward(rand(1, 4, 45, d), rand(1, 2, 45, d), rand(1, 2, 45, dv), enable_gqa=True, **mods)


def test_power_of_two_division_in_the_backward():
    def stepped(score, b, h, q, kv):
        return score * (1.0 + 0.25 * ((kv - q) // 4 % 2).float())

    check_backward(rand(1, 2, 45, 32), rand(1, 2, 45, 32), rand(1, 2, 45, 32), score_mod=stepped,
                   mask_mod=lambda b, h, q, kv: (q - kv) % 2 == 0)


def test_gqa_accumulates_over_the_group():
    check_backward(rand(2, 6, 40, 16), rand(2, 2, 40, 16), rand(2, 2, 40, 16), mask_mod=fg.mods.causal,
                   enable_gqa=True)


def test_lse_gradient():
    check_backward(rand(1, 2, 33, 16), rand(1, 2, 33, 16), rand(1, 2, 33, 16), mask_mod=fg.mods.causal,
                   with_lse=True)


def test_score_mod_derivative_from_the_ir():
    def gated(score, b, h, q_idx, kv_idx):
        return torch.sigmoid(score) * score * 2.0 + torch.exp(-torch.abs(score)) - 0.1 * score * score

    check_backward(rand(1, 2, 40, 16), rand(1, 2, 40, 16), rand(1, 2, 40, 16), score_mod=gated)


def test_learnable_relative_table():
    table = (0.5 * torch.randn(2, 79)).requires_grad_()
    check_backward(rand(1, 2, 40, 16), rand(1, 2, 40, 16), rand(1, 2, 40, 16),
                   score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.causal, captured=(table,))


def test_learnable_alibi_slopes_and_zero_dim_temperature():
    slopes = torch.rand(2).requires_grad_()
    temperature = torch.tensor(0.7).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return score * temperature + slopes[h] * (kv_idx - q_idx)

    check_backward(rand(1, 2, 40, 16), rand(1, 2, 40, 16), rand(1, 2, 40, 16), score_mod=mod,
                   mask_mod=fg.mods.causal, captured=(slopes, temperature))


@pytest.mark.parametrize("scale", [-0.3, 0.0])
@pytest.mark.parametrize("mods", ["plain", "causal", "bias"])
def test_negative_and_zero_scales(scale, mods):
    # the kernels take sm_scale > 0 (the forward scales the row max of the raw q·kᵀ by it):
    # Attention.__call__ passes -q and -scale, or 0 * q and scale 1, the same scores
    kw = {"plain": {}, "causal": {"mask_mod": fg.mods.causal}, "bias": {"bias": rand(2, 30, 30)}}[mods]
    q, k, v = (rand(2, 2, 30, 16).requires_grad_() for _ in range(3))
    out, lse = fg.attention(q, k, v, scale=scale, return_lse=True, **kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    (out * dout).sum().add((lse * dlse).sum()).backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = fg.attention_reference(qd, kd, vd, scale=scale, return_lse=True, **kw)
    (ref * dout.double()).sum().add((ref_lse * dlse.double()).sum()).backward()
    assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    for got, want in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert (rel_err(got, want) < 1e-4) if want.norm() > 0 else not got.any()


def test_captured_tensor_read_twice():
    gate = torch.rand(2).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return score * gate[h] + gate[h] * gate[h] * 0.5 + torch.tanh(gate[(h + 1) % 2])

    check_backward(rand(1, 2, 30, 16), rand(1, 2, 30, 16), rand(1, 2, 30, 16), score_mod=mod, captured=(gate,))


def test_dense_bias_gradient():
    bias = torch.randn(1, 2, 30, 30).requires_grad_()
    check_backward(rand(2, 2, 30, 16), rand(2, 2, 30, 16), rand(2, 2, 30, 16), bias=bias, mask_mod=fg.mods.causal,
                   captured=(bias,))


def test_dense_bias_without_leading_dims_gets_its_gradient():
    bias = torch.randn(2, 30, 30).requires_grad_()  # [H, Sq, Skv], broadcast over the batch
    check_backward(rand(3, 2, 30, 16), rand(3, 2, 30, 16), rand(3, 2, 30, 16), bias=bias, captured=(bias,))
    # at B = 3, fp32, per-batch-entry buffers would take 3x a float32 copy: the dK/dV pass adds, and
    # launches the batch entries that add into one gradient tile side by side
    attn = fg.compile(bias=bias)
    attn(*(rand(3, 2, 30, 16) for _ in range(3))).sum().backward()
    assert "b = launched % nb" in attn.source("bwd") and "gcap0_lead0" not in attn.source("bwd")
    assert "b = launched % nb" not in fg.compile(bias=bias.detach()).source("bwd")
    # (that order's program ids, with KV heads shared by query heads and a block map)
    gqa_bias = torch.randn(4, 30, 30).requires_grad_()
    check_backward(rand(3, 4, 30, 16), rand(3, 2, 30, 16), rand(3, 2, 30, 16), bias=gqa_bias,
                   mask_mod=fg.mods.sliding_window(9), enable_gqa=True, captured=(gqa_bias,))


@pytest.mark.parametrize("mask", [None, fg.mods.causal, fg.mods.sliding_window(9)], ids=["full", "causal", "window"])
def test_batch_shared_bias_gradient_is_stored_per_batch_entry_and_summed(mask):
    # [H, Sq, Skv] at B = 2, fp32, no mask: the dQ pass stores [B, H, Sq, Skv] (twice a float32 copy,
    # the most allowed) and runtime.sum_leading sums it over b; under a mask the dK/dV pass adds;
    # [1, Sq, Skv] broadcast over heads too (B * H * 4 bytes > 8: added)
    bias = torch.randn(2, 30, 30).requires_grad_()
    check_backward(rand(2, 2, 30, 16), rand(2, 2, 30, 16), rand(2, 2, 30, 16), bias=bias, mask_mod=mask,
                   captured=(bias,))
    attn = fg.compile(bias=bias, mask_mod=mask)
    attn(*(rand(2, 2, 30, 16) for _ in range(3))).sum().backward()
    source = attn.source("bwd")
    assert ("gcap0_lead0" in source) is (mask is None) and ("tl.atomic_add(gcap0" in source) is (mask is not None)
    assert ("summed in float32" in attn.explain()) is (mask is None)
    heads = torch.randn(1, 30, 30).requires_grad_()  # (b and h left out: B * H * 4 bytes > 8, so added)
    check_backward(rand(2, 2, 30, 16), rand(2, 2, 30, 16), rand(2, 2, 30, 16), bias=heads, mask_mod=mask,
                   captured=(heads,))


def test_batch_shared_half_bias_gradient_is_its_rounded_parts_summed():
    # fp16 [H, S, S] at B = 4: the dQ pass stores each batch entry's part in fp16, then they are summed
    # in float32 and rounded once more; GQA and a partial last tile. (fp16, not bf16: the interpreter
    # truncates to bf16 where GPUs round to nearest; test_gpu_backward checks bf16.)
    B, Hq, Hkv, S, D = 4, 4, 2, 40, 16
    bias = (0.5 * torch.randn(Hq, S, S)).half().requires_grad_()
    q, k, v = (torch.randn(B, h, S, D, requires_grad=True) for h in (Hq, Hkv, Hkv))
    attn = fg.compile(bias=bias)
    out = attn(q, k, v, enable_gqa=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert "gcap0_lead0" in attn.source("bwd") and bias.grad.dtype == torch.float16
    parts = []  # each batch entry's exact gradient (float64)
    for b in range(B):
        bd = bias.detach().double().requires_grad_()
        fg.attention_reference(*(t[b:b + 1].detach().double() for t in (q, k, v)), bias=bd,
                               enable_gqa=True).backward(dout[b:b + 1].double())
        parts.append(bd.grad)
    exact = sum(parts)
    rounded = sum(p.half().float() for p in parts).half()  # what storing the parts and summing them gives
    assert rel_err(bias.grad, exact) < 2 * rel_err(rounded, exact) < 1e-2


@pytest.mark.parametrize("mask", [None, fg.mods.causal, fg.mods.sliding_window(9)], ids=["full", "causal", "window"])
def test_dense_bias_per_batch_entry_gradient_is_stored_by_the_dq_pass(mask):
    # [B, H, Sq, Skv]: each score entry reads its own bias entry, so the dQ pass stores its gradient
    # (no atomics, in the bias's dtype); 30 is not a multiple of the tiles (padding rows and keys)
    bias = torch.randn(2, 2, 30, 30).requires_grad_()
    attn = fg.compile(bias=bias, mask_mod=mask)
    assert "tl.store(gcap0 +" in attn.source("bwd") and "tl.atomic_add(gcap0" not in attn.source("bwd")
    assert "captured0 (stored by the dQ pass" in attn.explain()
    check_backward(rand(2, 2, 30, 16), rand(2, 2, 30, 16), rand(2, 2, 30, 16), bias=bias, mask_mod=mask,
                   captured=(bias,))
    # and with KV heads shared by query heads
    gqa_bias = torch.randn(3, 4, 30, 30).requires_grad_()
    check_backward(rand(3, 4, 30, 16), rand(3, 2, 30, 16), rand(3, 2, 30, 16), bias=gqa_bias, mask_mod=mask,
                   enable_gqa=True, captured=(gqa_bias,))


def test_stored_gradient_of_a_larger_tensor_is_zero_where_it_is_not_read():
    # a score_mod reading pair[b, h, q_idx, kv_idx] of a tensor longer than the sequence: the entries
    # past it get no gradient (the buffer starts at zero), and a bf16 tensor gets a bf16 gradient
    pair = torch.randn(2, 2, 40, 40).requires_grad_()
    half = torch.randn(2, 2, 30, 30, dtype=torch.bfloat16).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return score + pair[b, h, q_idx, kv_idx] + half[b, h, q_idx, kv_idx]

    check_backward(rand(2, 2, 30, 16), rand(2, 2, 30, 16), rand(2, 2, 30, 16), score_mod=mod, captured=(pair,))
    assert (pair.grad[:, :, 30:] == 0).all() and (pair.grad[:, :, :, 30:] == 0).all()
    assert half.grad.dtype == torch.bfloat16
    pd = pair.detach().double().requires_grad_()
    hd = half.detach().double().requires_grad_()
    q, k, v = (rand(2, 2, 30, 16).requires_grad_() for _ in range(3))
    dout = rand(2, 2, 30, 16)
    got = _learnable_grads(fg.compile(score_mod=mod), q, k, v, (half,), dout)[-1]
    ref = fg.attention_reference(*(t.detach().double() for t in (q, k, v)),
                                 lambda s, b, h, i, j: s + pd[b, h, i, j] + hd[b, h, i, j])
    want = torch.autograd.grad((ref * dout.double()).sum(), hd)[0]
    assert rel_err(got.double(), want) < 1e-2  # (bf16 storage)


def test_stored_gradient_of_an_expanded_bias_flows_back_to_its_base():
    # a [B, H, S, S] view with stride 0 along b: read at [b, h, q_idx, kv_idx], so the dQ pass stores
    # into a dense [B, H, S, S] buffer, and autograd sums it into the base's [H, S, S] gradient
    base = torch.randn(2, 30, 30).requires_grad_()
    bias = base.expand(3, 2, 30, 30)
    assert "tl.store(gcap0" in fg.compile(bias=bias, mask_mod=fg.mods.causal).source("bwd")
    check_backward(rand(3, 2, 30, 16), rand(3, 2, 30, 16), rand(3, 2, 30, 16), bias=bias,
                   mask_mod=fg.mods.causal, captured=(base,))


def test_deterministic_mode_stores_what_it_can_and_fixes_the_rest():
    # a per-entry bias (stored by the dQ pass) next to a table (fixed-point atomics in the dK/dV pass)
    bias = torch.randn(1, 2, 40, 40).requires_grad_()
    table = (0.3 * torch.randn(2, 79)).requires_grad_()

    def mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx] + table[h, q_idx - kv_idx + 39]

    q, k, v = (rand(1, 2, 40, 16).requires_grad_() for _ in range(3))
    dout = rand(1, 2, 40, 16)
    fixed = fg.compile(score_mod=mod, mask_mod=fg.mods.causal, deterministic=True)
    report = fixed.explain()
    assert "captured0 (stored by the dQ pass" in report and "captured1 (int64 fixed-point" in report
    first = _learnable_grads(fixed, q, k, v, (bias, table), dout)
    second = _learnable_grads(fixed, q, k, v, (bias, table), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    plain = _learnable_grads(fg.compile(score_mod=mod, mask_mod=fg.mods.causal), q, k, v, (bias, table), dout)
    for name, g, p in zip(["dq", "dk", "dv", "dbias", "dtable"], first, plain):
        assert rel_err(g, p) < 1e-4, f"{name} differs from the non-deterministic version: {rel_err(g, p):.2e}"
    check_backward(q, k, v, score_mod=mod, mask_mod=fg.mods.causal, captured=(bias, table))
    # with only stored gradients, deterministic mode runs one dK/dV pass
    only = fg.compile(score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[b, h, q_idx, kv_idx],
                      deterministic=True)
    assert "fixed-point" not in only.explain()
    got = _learnable_grads(only, q, k, v, (bias,), dout)
    assert all(torch.equal(a, b) for a, b in zip(got, _learnable_grads(only, q, k, v, (bias,), dout)))


def test_fully_masked_rows_have_zero_gradient_and_no_nan():
    mask = fg.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= 8) & (kv_idx <= q_idx))
    q, k, v = (rand(1, 1, 24, 16).requires_grad_() for _ in range(3))
    out = fg.attention(q, k, v, mask_mod=mask)
    out.sum().backward()
    assert not torch.isnan(q.grad).any() and not torch.isnan(k.grad).any() and not torch.isnan(v.grad).any()
    assert (q.grad[:, :, :8] == 0).all()
    check_backward(q, k, v, mask_mod=mask)


def test_half_precision_backward():
    q, k, v = (torch.randn(1, 2, 40, 32, dtype=torch.bfloat16) for _ in range(3))
    check_backward(q, k, v, mask_mod=fg.mods.causal, tol=3e-2)


def test_q_k_v_gradients_are_bitwise_deterministic():
    q, k, v = (rand(1, 2, 40, 16).requires_grad_() for _ in range(3))
    attn = fg.compile(mask_mod=fg.mods.causal, deterministic=True)
    runs = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).square().sum().backward()
        runs.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _learnable_grads(attn, q, k, v, tensors, dout):
    for t in (q, k, v, *tensors):
        t.grad = None
    (attn(q, k, v) * dout).sum().backward()
    return [t.grad.clone() for t in (q, k, v, *tensors)]


def test_deterministic_learnable_gradients_are_fixed_point_and_correct():
    # a table read per element, a 0-d temperature and per-head gates (uniform reads), all learnable.
    # Seeded: dtemperature sums terms of both signs, and an unseeded draw once summed to 0.018 from
    # terms near 10, where float32 rounding (1e-7 of the terms) read as 2.2e-4 of the sum
    torch.manual_seed(3)
    table = (0.3 * torch.randn(2, 79)).requires_grad_()
    temperature = torch.tensor(1.3, requires_grad=True)
    gates = torch.rand(2, requires_grad=True)

    def mod(score, b, h, q_idx, kv_idx):
        return score * temperature + gates[h] * table[h, q_idx - kv_idx + 39]

    q, k, v = (rand(1, 2, 40, 16).requires_grad_() for _ in range(3))
    dout = rand(1, 2, 40, 16)
    fixed = fg.compile(score_mod=mod, mask_mod=fg.mods.causal, deterministic=True)
    atomic = fg.compile(score_mod=mod, mask_mod=fg.mods.causal)
    assert "int64 fixed-point" in fixed.explain() and "GRAD_PASS == 2" in fixed.source("bwd")
    first = _learnable_grads(fixed, q, k, v, (table, temperature, gates), dout)
    second = _learnable_grads(fixed, q, k, v, (table, temperature, gates), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    plain = _learnable_grads(atomic, q, k, v, (table, temperature, gates), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    td, tempd, gd = (t.detach().double().requires_grad_() for t in (table, temperature, gates))

    def mod64(score, b, h, q_idx, kv_idx):
        return score * tempd + gd[h] * td[h, q_idx - kv_idx + 39]

    ref = fg.attention_reference(qd, kd, vd, mod64, fg.mods.causal)
    want = torch.autograd.grad((ref * dout.double()).sum(), (qd, kd, vd, td, tempd, gd))
    for name, g, p, w in zip(["dq", "dk", "dv", "dtable", "dtemperature", "dgates"], first, plain, want):
        assert rel_err(g, w) < 1e-4, f"{name}: {rel_err(g, w):.2e}"
        assert rel_err(g, p) < 1e-4, f"{name} differs from the atomic version: {rel_err(g, p):.2e}"


def test_deterministic_mode_with_gradients_that_are_all_zero():
    table = torch.randn(2, 39, requires_grad=True)

    def mod(score, b, h, q_idx, kv_idx):  # the table is read only where the mask removes the entry
        return score + torch.where(kv_idx > q_idx, table[h, kv_idx - q_idx], 0.0)

    attn = fg.compile(score_mod=mod, mask_mod=fg.mods.causal, deterministic=True)
    q, k, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    attn(q, k, v).sum().backward()
    assert table.grad is not None and torch.equal(table.grad, torch.zeros_like(table))


def test_reference_passes_gradcheck():
    # the float64 reference every gradient test compares with is itself checked against finite
    # differences (torch.autograd.gradcheck), with a learnable table and a 0-d temperature
    table = torch.randn(2, 11, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def mod(score, b, h, q_idx, kv_idx):
        return 3.0 * torch.tanh(score * temp / 3.0) + table[h, q_idx - kv_idx + 5]

    def f(q, k, v, table, temp):
        return fg.attention_reference(q, k, v, mod, fg.mods.causal)

    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(f, (q, k, v, table, temp))


@pytest.mark.parametrize("name", ["softcap", "relative_table", "alibi_learnable"])
def test_kernel_directional_derivatives_match_central_differences(name):
    # gradcheck's idea on the fp32 kernels themselves: for a random direction d, the analytic
    # <grad f, d> against (f(x + e d) - f(x - e d)) / 2e, the outputs computed by the kernels in
    # float32. With e = 1e-2 the truncation error is O(e^2) ~ 1e-4 relative; the outputs' fp32
    # rounding (~1e-7 each, ~4e-6 over the sum) contributes ~2e-4 after dividing by 2e.
    torch.manual_seed(1)
    slopes = torch.rand(2, requires_grad=True)
    table = torch.randn(2, 39, requires_grad=True)
    mods = {"softcap": (dict(score_mod=fg.mods.softcap(2.0), mask_mod=fg.mods.causal), []),
            "relative_table": (dict(score_mod=fg.mods.relative_bias(table)), [table]),
            "alibi_learnable": (dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.sliding_window(7)), [slopes])}
    kwargs, captured = mods[name]
    attn = fg.compile(**kwargs)
    leaves = [rand(1, 2, 20, 16).requires_grad_() for _ in range(3)] + captured
    weight = torch.randn(1, 2, 20, 16, dtype=torch.float64)  # the loss sums in float64: no summation error
    loss = (attn(*leaves[:3]).double() * weight).sum()
    grads = torch.autograd.grad(loss, leaves)
    directions = [torch.randn_like(t) for t in leaves]
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
    eps = 1e-2
    originals = [t.detach().clone() for t in leaves]

    def f(sign: float) -> float:  # the loss at x + sign * eps * d; captured tensors are moved in place
        moved = [x + sign * eps * d for x, d in zip(originals, directions)]
        with torch.no_grad():
            for t, m in zip(captured, moved[3:]):
                t.copy_(m)
            return (attn(*moved[:3]).double() * weight).sum().item()

    plus, minus = f(1.0), f(-1.0)
    with torch.no_grad():
        for t, x in zip(captured, originals[3:]):
            t.copy_(x)
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_gradcheck_float64_inputs_through_float32_kernels_is_refused_cleanly():
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="float64"):
        fg.attention(q, q, q)


def test_source_bwd_is_generated():
    table = torch.randn(2, 39, requires_grad=True)
    attn = fg.compile(score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.causal)
    src = attn.source("bwd")
    assert "def attn_bwd_dkdv(" in src and "def attn_bwd_dq(" in src and "tl.atomic_add(gcap0" in src


def test_lengths_that_fill_whole_blocks():
    check_backward(rand(1, 2, 64, 32), rand(1, 2, 96, 32), rand(1, 2, 96, 32), mask_mod=fg.mods.prefix_lm(20))


def test_max_min_clamp_and_float_remainder_gradients():
    def mod(score, b, h, q_idx, kv_idx):
        x = torch.maximum(score, 0.3 * score) + torch.minimum(score, -0.2 * score)
        return x + torch.clamp(score, min=-0.5, max=0.8) + torch.remainder(score, 0.7)

    check_backward(rand(1, 2, 30, 16), rand(1, 2, 30, 16), rand(1, 2, 30, 16), score_mod=mod)


def test_in_place_change_of_a_saved_captured_tensor_is_refused():
    table = torch.randn(2, 39, requires_grad=True)
    q, k, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    out = fg.attention(q, k, v, score_mod=fg.mods.relative_bias(table))
    with torch.no_grad():
        table.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_tensors_read_only_by_the_mask_get_no_gradient():
    threshold = torch.tensor([0.5, -0.5], requires_grad=True)
    q, k, v = (rand(1, 2, 20, 16).requires_grad_() for _ in range(3))
    mask = fg.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) | (threshold[h] > 0))
    fg.attention(q, k, v, mask_mod=mask).sum().backward()
    assert threshold.grad is None and q.grad is not None


def test_tile_uniform_gradient_atomics_are_bounds_checked():
    slopes = torch.rand(2, requires_grad=True)
    src = fg.compile(score_mod=fg.mods.alibi(slopes)).source("bwd")
    line = next(x for x in src.splitlines() if "tl.atomic_add(gcap0" in x)
    assert "tl.sum(" in line and "mask=(h < cap0_size0)" in line


def test_explain_names_the_gradients():
    table = torch.randn(2, 39, requires_grad=True)
    report = fg.compile(score_mod=fg.mods.relative_bias(table)).explain()
    assert "gradients: q, k, v (deterministic); captured0 (fp32 atomic adds)" in report
    assert fg.compile(mask_mod=fg.mods.causal, deterministic=True).explain().endswith(
        "gradients: q, k, v (deterministic)")
    assert fg.compile(mask_mod=fg.mods.causal).explain().endswith(  # (the warp-specialised backward's dq)
        "gradients: k, v (deterministic), q (float32 TMA reductions on Hopper GPUs, in no fixed order; "
        "deterministic=True avoids them)")


def test_explain_shows_the_tiles_of_the_last_call():
    from flashgen.runtime import Config

    attn = fg.compile(mask_mod=fg.mods.sliding_window(8))
    q, k, v = (rand(1, 2, 40, 16).requires_grad_() for _ in range(3))
    assert "tiles of the last call" not in attn.explain()
    attn(q, k, v).sum().backward()
    line = next(x for x in attn.explain().splitlines() if x.startswith("tiles of the last call"))
    assert "forward (32, 32, 4, 1), dQ (32, 32, 4, 1), dK/dV (32, 32, 4, 1)" in line  # the interpreter's tiles
    with torch.no_grad():
        attn(q, k, v, config=Config(16, 16, 4, 1))
    assert attn.last_tiles == {"forward": Config(16, 16, 4, 1)}  # a forward alone: its own tiles only
    # three signatures kept (the training forward, its backward, the forward with config=); the
    # interpreter has no compiled kernels to call directly
    assert ("launches kept for 3 call signature(s): 0 of 4 call the compiled kernel directly"
            in attn.explain())


def test_row_terms_left_out_of_the_logits_give_the_reference_gradients():
    """The backward subtracts the row terms from the loaded lse instead of computing them per
    entry (ALiBi measured from the tile origin); gradients, learnable slopes' too, match."""
    slopes = torch.tensor([0.7, 0.05], requires_grad=True)
    row_bias = torch.randn(70)
    mod = fg.score_mod(lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx) + row_bias[q_idx])
    q, k, v = (rand(1, 2, 70, 16).requires_grad_() for _ in range(3))
    out, lse = fg.attention(q, k, v, score_mod=mod, mask_mod=fg.mods.causal, return_lse=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    got = [t.grad.clone() for t in (q, k, v, slopes)]
    for t in (q, k, v, slopes):
        t.grad = None
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = fg.attention_reference(qd, kd, vd, score_mod=mod, mask_mod=fg.mods.causal, return_lse=True)
    ((ref * dout.double()).sum() + (ref_lse * dlse.double()).sum()).backward()
    for name, g, w in zip("q k v slopes".split(), got, [qd.grad, kd.grad, vd.grad, slopes.grad]):
        assert rel_err(g, w) < 1e-4, (name, rel_err(g, w))


def test_kept_launches_follow_head_dims_that_strides_do_not_show():
    """A call signature's kept launches (``Attention._plans``) must not be found again for a call
    whose strides match but whose head dims differ: heads sliced from a wider tensor."""
    torch.manual_seed(5)
    attn = fg.compile(mask_mod=fg.mods.causal)
    wide = [torch.randn(1, 2, 40, 32, dtype=torch.float64).float() for _ in range(3)]
    for d in (32, 16, 32, 24):  # the sliced heads have the strides of the wide ones
        q, k, v = (t[..., :d].detach().requires_grad_() for t in wide)
        dout = torch.randn(1, 2, 40, d, dtype=torch.float64)
        got = grads_of(lambda a, b, c: attn(a, b, c, return_lse=True), q, k, v, (), dout)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = grads_of(lambda a, b, c: fg.attention_reference(a, b, c, mask_mod=fg.mods.causal, return_lse=True),
                        qd, kd, vd, (), dout)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert rel_err(g, w) < 1e-4, f"D={d} {name}: relative error {rel_err(g, w):.2e}"
    assert len(attn._plans) == 6  # three layouts, forward and backward each


@pytest.mark.parametrize("case", ["ragged_window_two_blocks", "gqa_document_softcap", "dilated_window"])
def test_tiles_through_tma_descriptors(case, monkeypatch):
    """The TMA form of the backward's streamed loads (the GPU's default on Hopper for dense masks;
    forced here for any), run in the interpreter's emulation of descriptors: rows past the sequence
    and columns past the head dim must come back as zeros, as the masked pointer loads give them."""
    from flashgen import runtime

    monkeypatch.setattr(runtime, "TMA", True)
    if case == "ragged_window_two_blocks":  # head blocks 32 + 16, a padded value dim, a window's two edges
        q, k, v, mods = rand(1, 2, 37, 48), rand(1, 2, 53, 48), rand(1, 2, 53, 24), dict(
            mask_mod=fg.mods.sliding_window(20))
    elif case == "gqa_document_softcap":
        q, k, v = rand(2, 4, 45, 80), rand(2, 2, 45, 80), rand(2, 2, 45, 64)
        mods = dict(mask_mod=fg.mods.document(torch.arange(45) // 12), score_mod=fg.mods.softcap(4.0),
                    enable_gqa=True)
    else:
        q, k, v = rand(1, 2, 70, 32), rand(1, 2, 70, 32), rand(1, 2, 70, 32)
        mods = dict(mask_mod=fg.mods.causal & fg.mask_mod(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 2 == 0))
    assert runtime.tma_ok(q, k, v, torch.randn_like(q[..., :v.shape[-1]]))
    check_backward(q, k, v, **mods)
    gqa = mods.pop("enable_gqa", False)
    attn = fg.compile(**mods)
    out = attn(*(t.detach().requires_grad_() for t in (q, k, v)), enable_gqa=gqa)
    out.backward(torch.randn_like(out))  # (out.sum()'s gradient is expanded: strides of 0, no TMA)
    assert "2 of them load their streamed tiles through TMA descriptors" in attn.explain()


@pytest.mark.parametrize("case", ["bias_causal_ragged", "pair_bias_window", "score_mod_two_tiles"])
def test_bias_tiles_through_tma_descriptors(case, monkeypatch):
    """[q, kv] tiles of a dense bias through TMA descriptors (``runtime.tile_tma_ok``; the GPU's
    default on Hopper for aligned layouts, forced here): forward, the dQ pass's tiles and the dK/dV
    pass's transposed ones, rows and keys past the sequence included (S = 72: ragged tiles)."""
    from flashgen import runtime

    monkeypatch.setattr(runtime, "TMA", True)
    q, k, v = rand(2, 2, 72, 16), rand(2, 2, 72, 16), rand(2, 2, 72, 16)
    if case == "bias_causal_ragged":
        bias = torch.randn(2, 72, 72).requires_grad_()
        mods, captured = dict(bias=bias, mask_mod=fg.mods.causal), (bias,)
    elif case == "pair_bias_window":  # the dQ pass stores this one's gradient
        bias = torch.randn(2, 2, 72, 72).requires_grad_()
        mods, captured = dict(bias=bias, mask_mod=fg.mods.sliding_window(20)), (bias,)
    else:  # two tensors in tiles, one read at [h, kv, q] in a [kv, q] plane (its q not contiguous: pointers)
        a, t = torch.randn(2, 72, 72).requires_grad_(), torch.randn(2, 72, 72)

        def mod(score, b, h, q_idx, kv_idx):
            return score + a[h, q_idx, kv_idx] * t[h, kv_idx, q_idx]

        mods, captured = dict(score_mod=mod), (a,)
    attn = fg.compile(**{m: x for m, x in mods.items()})
    for kernel in ("fwd", "bwd"):
        assert "tile0 = tl.make_tensor_descriptor(" in attn.source(kernel)
    tma = case != "score_mod_two_tiles"
    assert runtime.tile_tma_ok(attn.captured, attn._kernel_source().tile_reads) is tma
    check_backward(q, k, v, captured=captured, **mods)
    out = attn(*(t.detach().requires_grad_() for t in (q, k, v)))
    out.backward(torch.randn_like(out))
    assert ("3 of them read [q, kv] tiles of a captured tensor through TMA" in attn.explain()) is tma

def test_tma_only_for_layouts_it_can_read(monkeypatch):
    from flashgen import runtime

    x = torch.randn(2, 4, 64, 32)
    assert not runtime.tma_ok(x)  # no GPU here: the pointer loads, unless told
    monkeypatch.setattr(runtime, "TMA", True)
    assert runtime.tma_ok(x, x.transpose(1, 2))  # [B, S, H, D] storage: rows 4 * 32 apart
    assert not runtime.tma_ok(x.transpose(-1, -2))  # the head dim not contiguous
    assert not runtime.tma_ok(torch.randn(2, 4, 64, 6, dtype=torch.float16))  # rows 12 bytes apart
    assert not runtime.tma_ok(torch.randn(2 * 4 * 64 * 32 + 1)[1:].view(2, 4, 64, 32))  # data not 16-byte aligned
    assert runtime.tma_ok(torch.randn(64).as_strided((1, 1, 2, 32), (7, 5, 32, 1)))  # strides of sizes 1: unused
    assert not runtime.tma_ok(torch.randn(1, 1, 1, 37)[..., :8])  # the row stride counts (148 bytes), even for S = 1
    assert not runtime.tma_ok(torch.randn(2, 4, 1, 32).expand(2, 4, 64, 32))  # rows 0 apart: no descriptor
    monkeypatch.setattr(runtime, "TMA", False)
    assert not runtime.tma_ok(x)


def test_backward_tma_by_mask_and_head_dims(monkeypatch):
    from flashgen import runtime

    assert runtime.backward_tma("dense", 128, 128, False) and runtime.backward_tma("dense", 96, 64, False)
    assert not runtime.backward_tma("dense", 128, 128, True)  # a bias, a table: slower with TMA
    assert not runtime.backward_tma("window", 64, 64, False) and not runtime.backward_tma("sparse", 128, 128, False)
    assert not runtime.backward_tma("dense", 192, 128, False) and not runtime.backward_tma("dense", 64, 256, False)
    monkeypatch.setattr(runtime, "TMA", True)  # forced: any variant, still not past 128
    assert runtime.backward_tma("window", 64, 64, True) and not runtime.backward_tma("sparse", 144, 128, False)


def test_descriptor_scratch_allocator_keeps_a_users():
    """TMA descriptors need Triton's allocator: flashgen sets its own only where none is set."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from flashgen import runtime

    def users(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def check():
        runtime.ensure_allocator()
        assert _allocation._allocator.get() is runtime._scratch  # none was set: flashgen's
        triton.set_allocator(users)
        runtime.ensure_allocator()
        assert _allocation._allocator.get() is users

    contextvars.Context().run(check)  # (a fresh context: this thread's allocator stays as it was)


def test_the_tma_switch_is_part_of_a_kept_backward(monkeypatch):
    """A kept backward launch was planned under one value of ``runtime.TMA``: under another (an A/B
    run's arms) the same signature plans anew, here for a window whose default is pointer loads."""
    from flashgen import api, runtime

    monkeypatch.setattr(api, "tma_ok", lambda *tensors: True)  # (the layout check a Hopper GPU passes)
    attn = fg.compile(mask_mod=fg.mods.sliding_window(20))
    q, k, v = (rand(1, 2, 64, 32).requires_grad_() for _ in range(3))
    used = []
    for switch in (True, None):
        monkeypatch.setattr(runtime, "TMA", switch)
        out = attn(q, k, v)
        out.backward(torch.randn_like(out))
        used.append({launch.kwargs["TMA"] for plan, _, _ in attn._plans.values() if isinstance(plan, tuple)
                     for launch in plan})
    assert used == [{True}, {True, False}]  # forced, then the window's default kept next to it


def test_a_dense_bias_takes_its_own_dkdv_tiles_on_the_gpu():
    """Logits that read a captured tensor in 2-D tiles (``analysis.tile_reads``: a dense bias, not
    ALiBi's slopes[h] nor a relative table's table[h, q - kv]) take (64, 64, 4, 2) dK/dV tiles at
    head dim 128 on the GPU (H200: 3.4% faster fwd+bwd); other logits keep the dense pair."""
    from flashgen import runtime
    from flashgen.analysis import tile_reads
    from flashgen.runtime import Config

    def reads(**mods):
        return len(tile_reads([fg.compile(**mods).program.logits]))

    assert reads(bias=torch.randn(2, 64, 64)) == 1
    assert reads(score_mod=fg.mods.alibi(torch.rand(2))) == 0
    assert reads(score_mod=fg.mods.relative_bias(torch.randn(2, 127))) == 0
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert runtime.default_backward_configs(cuda, 128, 128, bf16, "dense", True) == (Config(64, 64, 4, 2),
                                                                                    Config(128, 64, 8, 3))
    assert runtime.default_backward_configs(cuda, 128, 128, bf16, "dense", False) == (Config(64, 128, 8, 3),
                                                                                     Config(128, 64, 8, 3))
    assert runtime.default_backward_configs(cuda, 64, 64, bf16, "dense", True)[0] == Config(64, 128, 8, 3)
    assert runtime.default_backward_configs(cuda, 128, 128, bf16, "sparse", True)[0] == Config(32, 64, 4, 3)


@settings(FUZZ, max_examples=examples(12))
@given(B=st.integers(1, 3), H=st.integers(1, 3), Sq=st.integers(2, 70), Skv4=st.integers(1, 18),
       full=st.tuples(st.booleans(), st.booleans()), mask=st.sampled_from(["none", "causal", "window"]),
       seed=st.integers(0, 2**31 - 1))
def test_bias_tiles_by_tma_agree_with_pointers(B, H, Sq, Skv4, full, mask, seed):
    """Random shapes (tiles cut by the sequence's ends, Sq < Skv and the reverse, broadcast batch and
    head dims): a learnable dense bias read through TMA tiles (forced; the interpreter emulates the
    descriptors) gives the outputs and gradients of the pointer form, to float32 rounding."""
    from flashgen import runtime

    Skv = 4 * Skv4  # (float32 rows 16-byte aligned: TMA can read them)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, s, 16, generator=gen) for s in (Sq, Skv, Skv))
    bias = torch.randn(B if full[0] else 1, H if full[1] else 1, Sq, Skv, generator=gen).requires_grad_()
    mods = {"none": {}, "causal": {"mask_mod": fg.mods.causal}, "window": {"mask_mod": fg.mods.sliding_window(9)}}
    dout = torch.randn(B, H, Sq, 16, generator=gen)
    results = []
    for tma in (True, False):
        runtime.TMA = tma
        try:
            attn = fg.compile(bias=bias, **mods[mask])
            assert runtime.tile_tma_ok(attn.captured, attn._kernel_source().tile_reads) is tma
            results.append(_learnable_grads(attn, *(t.clone().requires_grad_() for t in (q, k, v)), (bias,), dout)[-1:]
                           + [attn(q, k, v)])
        finally:
            runtime.TMA = None
    for got, want in zip(*results):
        assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("layout", ["h", "b", "hT", "shared", "bh"])
@settings(FUZZ, max_examples=examples(5))
@given(B=st.integers(1, 3), H=st.integers(1, 2), S=st.integers(2, 50), causal=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_entrywise_bias_gradients_stored_or_added_agree_with_float64(layout, B, H, S, causal, seed):
    """A learnable bias read once per score entry, in each layout the dQ pass may store (per batch
    entry and summed where b or h is left out, by ``Attention._stored_slots``'s rule) or the dK/dV
    pass adds: [H, S, S], [B, 1, S, S] read at [b, 0, q, kv], [H, S, S] read transposed at
    [h, kv, q], [S, S] shared by b and h, and [B, H, S, S]."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"h": (H, S, S), "b": (B, 1, S, S), "hT": (H, S, S), "shared": (S, S), "bh": (B, H, S, S)}
    bias = torch.randn(*shapes[layout], generator=gen).requires_grad_()
    reads = {"h": lambda b, h, q, kv: bias[h, q, kv], "b": lambda b, h, q, kv: bias[b, 0, q, kv],
             "hT": lambda b, h, q, kv: bias[h, kv, q], "shared": lambda b, h, q, kv: bias[q, kv],
             "bh": lambda b, h, q, kv: bias[b, h, q, kv]}
    read = reads[layout]

    def mod(score, b, h, q_idx, kv_idx):
        return score + read(b, h, q_idx, kv_idx)

    q, k, v = (torch.randn(B, H, S, 16, generator=gen) for _ in range(3))
    check_backward(q, k, v, score_mod=mod, mask_mod=fg.mods.causal if causal else None, captured=(bias,))
