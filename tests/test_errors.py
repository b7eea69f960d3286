"""Bad input fails before any kernel runs, with a message naming the values and the fix."""

import pytest
import torch

import flashgen as fg


def qkv(B=1, H=2, S=16, D=16, dtype=torch.float32):
    return (torch.randn(B, H, S, D, dtype=dtype) for _ in range(3))


def test_non_4d_inputs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D .* got shape \(2, 16, 16\)"):
        fg.attention(q[0], k, v)


def test_non_tensor_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fg.attention(q, k.tolist(), v)


def test_unsupported_dtype():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="float64; supported: float16, bfloat16, float32"):
        fg.attention(q.double(), k.double(), v.double())


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="share a dtype"):
        fg.attention(q, k.half(), v)


def test_shape_mismatches_are_all_listed_at_once():
    q = torch.randn(2, 2, 16, 16)
    k = torch.randn(1, 2, 16, 32)
    v = torch.randn(1, 3, 12, 16)
    with pytest.raises(ValueError) as info:
        fg.attention(q, k, v)
    message = str(info.value)
    for part in ("batch sizes differ", "head dims differ", "lengths differ", "head counts differ"):
        assert part in message


def test_gqa_needs_the_flag_and_divisible_heads():
    q = torch.randn(1, 4, 16, 16)
    k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fg.attention(q, k, v)
    k3, v3 = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="Hq % Hkv == 0, got Hq=4, Hkv=3"):
        fg.attention(q, k3, v3, enable_gqa=True)


def test_head_dim_limits():
    q, k, v = (torch.randn(1, 1, 4, 300) for _ in range(3))
    with pytest.raises(ValueError, match="head dim 300 is not supported"):
        fg.attention(q, k, v)


def test_bad_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fg.attention(q, k, v, scale=float("nan"))


def test_captured_tensor_on_another_device_is_named():
    q, k, v = qkv()
    slopes = torch.rand(2, device="meta")
    with pytest.raises(ValueError, match="captured tensor 0 .* is on meta"):
        fg.attention(q, k, v, score_mod=fg.mods.alibi(slopes))


def test_mod_errors_surface_as_trace_errors():
    q, k, v = qkv()
    with pytest.raises(fg.TraceError, match="score_mod"):
        fg.attention(q, k, v, score_mod=lambda b, h, q_idx, kv_idx: q_idx)
    with pytest.raises(fg.TraceError, match="not callable|must be a function"):
        fg.attention(q, k, v, mask_mod=3)


def test_bad_bias_tensor():
    q, k, v = qkv()
    for bad in (torch.randn(16), torch.randn(1, 1, 1, 16, 16), torch.ones(16, 16, dtype=torch.int64)):
        with pytest.raises(ValueError, match="broadcastable"):
            fg.attention(q, k, v, bias=bad)
    # a bias whose shape does not match the call's would read out of range: refused, never zeros
    for bad in (torch.randn(3, 16, 16), torch.randn(16, 15), torch.randn(2, 1, 1, 16)):
        with pytest.raises(ValueError, match="does not broadcast"):
            fg.attention(q, k, v, bias=bad)


def test_library_mod_arguments_are_checked():
    with pytest.raises(ValueError, match="window must be a positive int"):
        fg.mods.sliding_window(0)
    with pytest.raises(ValueError, match="cap must be a positive number"):
        fg.mods.softcap(-1.0)
    with pytest.raises(ValueError, match="slopes"):
        fg.mods.alibi(torch.rand(2, 2))
    with pytest.raises(ValueError, match="odd"):
        fg.mods.relative_bias(torch.rand(2, 8))
    with pytest.raises(ValueError, match="doc_ids"):
        fg.mods.document(torch.rand(8))
