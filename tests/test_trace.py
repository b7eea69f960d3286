"""Tracing mods into IR: the mod language, captured tensors, roles and errors."""

import math

import pytest
import torch

import flashgen as fg
from flashgen import ir
from flashgen.ir import Op
from flashgen.trace import Captures, trace_mod


def trace(fn, role="score_mod"):
    captures = Captures()
    return trace_mod(fn, role, captures).expr, captures.tensors


def test_arithmetic_and_torch_functions_trace():
    def mod(score, b, h, q_idx, kv_idx):
        x = torch.where(q_idx > kv_idx, score * 2 - 1, -score / 3)
        x = torch.minimum(x, torch.maximum(score, score * 0.5))
        x = torch.clamp(x, -5, 5) + abs(q_idx - kv_idx) ** 2 + (q_idx // 3) % 4 + (kv_idx << 1) + (q_idx >> 1)
        x = x + torch.exp(torch.tanh(score)) + torch.sigmoid(score) + torch.sqrt(torch.abs(score) + 1)
        x = x + torch.log(torch.exp2(torch.sin(score)) + torch.cos(score) + 2)
        x = x + torch.log2(torch.rsqrt(score * score + 1))
        x = x + torch.floor(score) + torch.ceil(score) + torch.sign(score) + math.pi + (q_idx ^ kv_idx).float()
        return x + (q_idx & 3).to(torch.float32) + (kv_idx | 1).long() + h.int()

    expr, captured = trace(mod)
    assert expr.dtype is ir.DType.FLOAT and not captured
    ops = {n.op for n in expr.toposort()}
    for op in (Op.WHERE, Op.MIN, Op.MAX, Op.ABS, Op.POW, Op.FLOORDIV, Op.MOD, Op.SHL, Op.SHR, Op.EXP, Op.TANH,
               Op.SIGMOID, Op.SQRT, Op.LOG, Op.EXP2, Op.SIN, Op.COS, Op.LOG2, Op.RSQRT, Op.FLOOR, Op.CEIL, Op.SIGN,
               Op.XOR, Op.AND, Op.OR, Op.CAST):
        assert op in ops, op


def test_captured_tensors_become_loads_with_one_slot_each():
    slopes = torch.rand(4)
    table = torch.rand(4, 31)
    dist = torch.randint(0, 31, (16, 16))

    def mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx) + table[h, dist[q_idx, kv_idx]] + slopes[h]

    expr, captured = trace(mod)
    assert len(captured) == 3 and {id(t) for t in captured} == {id(slopes), id(table), id(dist)}
    loads = [n for n in expr.toposort() if n.op is Op.LOAD]
    assert {n.arg for n in loads} == {0, 1, 2}
    assert sum(n.arg == 0 for n in loads) == 1  # slopes[h] read twice is one node


def test_zero_dim_tensor_and_python_scalars():
    temperature = torch.tensor(0.5)
    window = 7

    def mod(score, b, h, q_idx, kv_idx):
        return score * temperature + torch.where(q_idx - kv_idx < window, 0.0, -1.0)

    expr, captured = trace(mod)
    assert captured == [temperature]
    assert any(n.op is Op.CONST and n.arg == 7 for n in expr.toposort())


def test_role_comes_from_the_argument_not_the_parameter_count():
    expr, _ = trace(lambda b, h, q, kv: q >= kv, role="mask_mod")
    assert expr.dtype is ir.DType.BOOL
    with pytest.raises(fg.TraceError, match="pass it as mask_mod="):
        trace(lambda b, h, q, kv: q >= kv, role="score_mod")
    with pytest.raises(fg.TraceError, match="score_mod"):
        trace(lambda s, b, h, q, kv: s, role="mask_mod")


def test_control_flow_names_mod_file_and_line_with_a_fix():
    def bad_mask(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return True
        return False

    with pytest.raises(fg.TraceError) as info:
        trace(bad_mask, role="mask_mod")
    message = str(info.value)
    assert "bad_mask" in message and "test_trace.py" in message and "if q_idx > kv_idx:" in message
    assert "torch.where" in message


def test_and_or_keywords_are_rejected_with_a_hint():
    with pytest.raises(fg.TraceError, match="&"):
        trace(lambda b, h, q, kv: (q >= kv) and (q - kv < 4), role="mask_mod")


def test_wrong_return_kinds():
    with pytest.raises(fg.TraceError, match="must return a boolean"):
        trace(lambda b, h, q, kv: q - kv, role="mask_mod")
    with pytest.raises(fg.TraceError, match="mask_mod="):
        trace(lambda s, b, h, q, kv: q > kv, role="score_mod")
    with pytest.raises(fg.TraceError, match="returned"):
        trace(lambda s, b, h, q, kv: "nope", role="score_mod")
    with pytest.raises(fg.TraceError, match="shape"):
        trace(lambda s, b, h, q, kv: torch.zeros(3), role="score_mod")


def test_bad_captured_tensor_use():
    table = torch.rand(4, 4)
    with pytest.raises(fg.TraceError, match="index it"):
        trace(lambda s, b, h, q, kv: s + table)
    with pytest.raises(fg.TraceError, match="exactly 2"):
        trace(lambda s, b, h, q, kv: s + table[q])
    with pytest.raises(fg.TraceError, match="no slices"):
        trace(lambda s, b, h, q, kv: s + table[q, :])
    with pytest.raises(fg.TraceError, match="integers"):
        trace(lambda s, b, h, q, kv: s + table[q, s])


def test_unsupported_torch_function_is_named():
    with pytest.raises(fg.TraceError, match="erf"):
        trace(lambda s, b, h, q, kv: torch.erf(s))


def test_python_math_on_traced_values_is_explained():
    with pytest.raises(fg.TraceError, match="math"):
        trace(lambda s, b, h, q, kv: math.exp(s))


def test_user_exceptions_are_reported_with_location():
    def broken(s, b, h, q, kv):
        return s + undefined_name  # noqa: F821

    with pytest.raises(fg.TraceError, match="NameError"):
        trace(broken)


def test_equivalent_mods_share_one_program_key():
    a = fg.compile(score_mod=lambda s, b, h, q, kv: s + (q - q), mask_mod=lambda b, h, q, kv: q >= kv)
    b = fg.compile(mask_mod=fg.mods.causal)
    c = fg.compile(mask_mod=lambda b, h, q, kv: ~(q < kv))
    assert a.program.key == b.program.key == c.program.key
    assert fg.compile(mask_mod=lambda b, h, q, kv: q > kv).program.key != b.program.key


def test_decorators_and_mask_combinators():
    @fg.mask_mod
    def even_kv(b, h, q_idx, kv_idx):
        return kv_idx % 2 == 0

    combined = (fg.mods.causal & even_kv) | ~fg.mods.sliding_window(4)
    assert isinstance(combined, fg.spec.MaskMod)
    expr, _ = trace(combined, role="mask_mod")
    assert expr.dtype is ir.DType.BOOL
    keep = combined(0, 0, torch.arange(6)[:, None], torch.arange(6)[None, :])  # still callable eagerly
    assert keep.shape == (6, 6)

    @fg.score_mod(name="double")
    def twice(score, b, h, q_idx, kv_idx):
        return score * 2

    assert twice.name == "double" and isinstance(twice, fg.spec.ScoreMod)


def test_decorated_mods_get_the_signature_hint_too():
    @fg.mask_mod
    def looks_like_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    with pytest.raises(fg.TraceError, match="pass it as mask_mod="):
        trace(looks_like_mask, role="score_mod")
