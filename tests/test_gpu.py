"""Compiled (non-interpreted) kernels on a CUDA GPU against the float64 reference.

Skipped without CUDA. References are computed from the same low-precision inputs, upcast to
float64 by ``fg.attention_reference``; tolerances are relative errors ‖out − ref‖ / ‖ref‖:
2e-2 for bf16/fp16 and 1e-4 for fp32 (flashgen's fp32 dots are tf32x3: fp32-level accuracy).
Shapes stay small (B=2, H=4, S <= 1024) so that the file runs in well under two minutes; most
of that time is Triton compiling one kernel per (program, dtype, head dims, specialization).
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

import flashgen as fg
from flashgen import runtime

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
LSE_ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float32: 1e-4}
B, H, S, D = 2, 4, 512, 64  # the library-mod shape


# ---------------------------------------------------------------------------------------------
# helpers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    num, den = (out - ref).norm().item(), ref.norm().item()
    return num / den if den else num


# the warp-specialised (Gluon) kernels' tests: sm_90 only
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="the warp-specialised kernels need a Hopper GPU")


def randn(*shape, dtype=torch.bfloat16, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, device=DEV, dtype=torch.float32, generator=g) * scale).to(dtype)


def make_qkv(b=B, hq=H, sq=S, d=D, *, hkv=None, skv=None, dv=None, dtype=torch.bfloat16, seed=0, scale=1.0):
    hkv = hkv or hq
    skv = sq if skv is None else skv
    dv = dv or d
    q = randn(b, hq, sq, d, dtype=dtype, seed=seed, scale=scale)
    k = randn(b, hkv, skv, d, dtype=dtype, seed=seed + 1, scale=scale)
    v = randn(b, hkv, skv, dv, dtype=dtype, seed=seed + 2)
    return q, k, v


def check(out: torch.Tensor, q, k, v, tol: float | None = None, **kwargs) -> float:
    """Compare ``out`` with the float64 reference of the same call; returns the relative error."""
    with torch.no_grad():
        ref = fg.attention_reference(q, k, v, **kwargs)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == q.dtype
    assert not torch.isnan(out).any(), "NaN in the output"
    err = rel_err(out, ref)
    tol = TOL[q.dtype] if tol is None else tol
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"
    return err


def triton_cache_size(kernel) -> int | None:
    """Compiled specializations held by a @triton.jit function (None where Triton hides them)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        return None
    total = 0
    for entry in caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        if not hasattr(cache, "__len__"):
            return None
        total += len(cache)
    return total


def compile_counts(attn: fg.Attention) -> tuple:
    from flashgen import api, runtime

    kernel = runtime.load_kernel(attn._kernel_source())
    return len(api._sources), len(runtime._modules), triton_cache_size(kernel)


# ---------------------------------------------------------------------------------------------
# every library mod, and combinations


def library_variants() -> dict[str, dict]:
    """name -> kwargs for fg.attention / fg.attention_reference (captured tensors on the GPU)."""
    m = fg.mods
    lengths = torch.tensor([100, 37, 200, 175])  # 4 documents, 512 positions
    doc_ids = torch.repeat_interleave(torch.arange(4), lengths).to(DEV)
    doc_ids_b = torch.stack([doc_ids, (torch.arange(S) // 96).to(DEV)])  # [B, S], per-sequence packing
    slopes = m.alibi_slopes(H, device=DEV)
    table = randn(H, 2 * S - 1, dtype=torch.float32, seed=7, scale=0.5)
    shared_table = randn(2 * S - 1, dtype=torch.float32, seed=8, scale=0.5)
    dense_bias = randn(1, H, S, S, dtype=torch.float32, seed=9)

    def softcap_alibi(score, b, h, q_idx, kv_idx):  # a user score mod composing two library ideas
        return 20.0 * torch.tanh(score / 20.0) + slopes[h] * (kv_idx - q_idx)

    return {
        "full": {},
        "causal": dict(mask_mod=m.causal),
        "sliding_window": dict(mask_mod=m.sliding_window(64)),
        "prefix_lm": dict(mask_mod=m.prefix_lm(100)),
        "chunked": dict(mask_mod=m.chunked(128)),
        "chunked_odd": dict(mask_mod=m.chunked(100)),
        "document": dict(mask_mod=m.document(doc_ids)),
        "document_batched": dict(mask_mod=m.document(doc_ids_b)),
        "alibi": dict(score_mod=m.alibi(slopes)),
        "softcap": dict(score_mod=m.softcap(20.0)),
        "relative_bias": dict(score_mod=m.relative_bias(table)),
        "relative_bias_shared": dict(score_mod=m.relative_bias(shared_table)),
        "document&causal": dict(mask_mod=m.document(doc_ids) & m.causal),
        "chunked&causal": dict(mask_mod=m.causal & m.chunked(128)),
        "sliding|prefix": dict(mask_mod=m.sliding_window(32) | m.prefix_lm(16)),
        "~causal": dict(mask_mod=~m.causal),  # the last row sees nothing
        "alibi+causal": dict(score_mod=m.alibi(slopes), mask_mod=m.causal),
        "softcap+causal": dict(score_mod=m.softcap(30.0), mask_mod=m.causal),
        "relative_bias+sliding": dict(score_mod=m.relative_bias(table), mask_mod=m.sliding_window(100)),
        "t5_bias+causal": dict(score_mod=m.t5_bias(randn(H, 32, dtype=torch.float32, seed=10, scale=0.5), 100),
                               mask_mod=m.causal),
        "softcap_alibi+document&causal": dict(score_mod=softcap_alibi, mask_mod=m.document(doc_ids_b) & m.causal),
        "dense_bias+causal": dict(bias=dense_bias, mask_mod=m.causal),
    }


LIBRARY_NAMES = [
    "full", "causal", "sliding_window", "prefix_lm", "chunked", "chunked_odd", "document", "document_batched",
    "alibi", "softcap", "relative_bias", "relative_bias_shared", "document&causal", "chunked&causal",
    "sliding|prefix", "~causal", "alibi+causal", "softcap+causal", "relative_bias+sliding", "t5_bias+causal",
    "softcap_alibi+document&causal", "dense_bias+causal",
]
OTHER_DTYPE_NAMES = {
    torch.float16: ["causal", "alibi+causal", "document&causal", "softcap"],
    torch.float32: ["full", "causal", "alibi+causal", "softcap+causal", "relative_bias+sliding"],
}
LIBRARY_CASES = [pytest.param(name, torch.bfloat16, id=f"{name}-bf16") for name in LIBRARY_NAMES] + [
    pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
    for dtype, names in OTHER_DTYPE_NAMES.items() for name in names
]


@pytest.fixture(scope="module")
def variants() -> dict[str, dict]:
    return library_variants()


def test_library_names_cover_every_mod(variants):
    assert set(LIBRARY_NAMES) == set(variants)
    used = {kw[key].name for kw in variants.values() for key in ("score_mod", "mask_mod")
            if isinstance(kw.get(key), fg.spec.Mod)}
    for mod in ("causal", "sliding_window", "prefix_lm", "chunked", "document", "alibi", "softcap", "relative_bias",
                "t5_bias"):
        assert any(mod in name for name in used), f"fg.mods.{mod} is not covered"


@pytest.mark.parametrize("name, dtype", LIBRARY_CASES)
def test_library_mod(variants, name, dtype):
    kwargs = variants[name]
    q, k, v = make_qkv(dtype=dtype, seed=LIBRARY_NAMES.index(name))
    out = fg.attention(q, k, v, **kwargs)
    check(out, q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------
# shapes: head dims, Dv != D, odd and unequal lengths, GQA, strides


HEAD_DIM_CASES = [pytest.param(d, torch.bfloat16, id=f"D{d}-bf16") for d in (16, 48, 64, 80, 96, 128, 192, 256)] + [
    pytest.param(48, torch.float32, id="D48-fp32"),
    pytest.param(256, torch.float32, id="D256-fp32"),
    pytest.param(80, torch.float16, id="D80-fp16"),
]


@pytest.mark.parametrize("d, dtype", HEAD_DIM_CASES)
def test_head_dims(d, dtype):
    q, k, v = make_qkv(sq=256, d=d, dtype=dtype, seed=d)
    out = fg.attention(q, k, v, mask_mod=fg.mods.causal)
    check(out, q, k, v, mask_mod=fg.mods.causal)


@pytest.mark.parametrize("d, dv", [(64, 128), (128, 64), (80, 48), (256, 64), (32, 256)])
def test_value_head_dim_differs(d, dv):
    q, k, v = make_qkv(sq=256, d=d, dv=dv, seed=d + dv)
    slopes = fg.mods.alibi_slopes(H, device=DEV)
    kwargs = dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)
    out = fg.attention(q, k, v, **kwargs)
    assert out.shape == (B, H, 256, dv)
    check(out, q, k, v, **kwargs)


LENGTHS = [(1000, 777), (777, 1000), (256, 1024), (1024, 256), (1, 300)]


@pytest.mark.parametrize("sq, skv", LENGTHS, ids=[f"{a}x{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("mods", ["full", "causal", "sliding"])
def test_lengths(sq, skv, mods):
    kwargs = {"full": {}, "causal": dict(mask_mod=fg.mods.causal),
              "sliding": dict(mask_mod=fg.mods.sliding_window(100))}[mods]
    q, k, v = make_qkv(sq=sq, skv=skv, seed=sq + skv)
    out = fg.attention(q, k, v, **kwargs)
    check(out, q, k, v, **kwargs)


@pytest.mark.parametrize("hq, hkv", [(8, 2), (8, 1), (8, 8)])
@pytest.mark.parametrize("mods", ["full", "causal", "alibi+causal"])
def test_gqa(hq, hkv, mods):
    slopes = fg.mods.alibi_slopes(hq, device=DEV)
    kwargs = {"full": {}, "causal": dict(mask_mod=fg.mods.causal),
              "alibi+causal": dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)}[mods]
    q, k, v = make_qkv(hq=hq, hkv=hkv, sq=384, seed=hq * 10 + hkv)
    out = fg.attention(q, k, v, enable_gqa=True, **kwargs)
    check(out, q, k, v, enable_gqa=True, **kwargs)


def test_gqa_needs_flag():
    q, k, v = make_qkv(hq=8, hkv=2, sq=64)
    with pytest.raises(ValueError, match="enable_gqa"):
        fg.attention(q, k, v)


@pytest.mark.parametrize("layout", ["bshd", "d_strided", "sliced"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_non_contiguous(layout, dtype):
    sq, skv, d = 320, 448, 64
    if layout == "bshd":  # [B, S, H, D] tensors seen as [B, H, S, D]
        q = randn(B, sq, H, d, dtype=dtype, seed=1).transpose(1, 2)
        k = randn(B, skv, H, d, dtype=dtype, seed=2).transpose(1, 2)
        v = randn(B, skv, H, d, dtype=dtype, seed=3).transpose(1, 2)
    elif layout == "d_strided":  # head dim not unit-stride
        q = randn(B, H, d, sq, dtype=dtype, seed=1).transpose(2, 3)
        k = randn(B, H, d, skv, dtype=dtype, seed=2).transpose(2, 3)
        v = randn(B, H, skv, d, dtype=dtype, seed=3)
    else:  # every other query row, and k/v cut out of wider buffers
        q = randn(B, H, 2 * sq, d, dtype=dtype, seed=1)[:, :, ::2]
        k = randn(B, H, skv, 2 * d, dtype=dtype, seed=2)[..., d:]
        v = randn(B, 2 * H, skv, d, dtype=dtype, seed=3)[:, ::2]
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    kwargs = dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal)
    out = fg.attention(q, k, v, scale=0.3, **kwargs)
    check(out, q, k, v, scale=0.3, **kwargs)
    contiguous = fg.attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3, **kwargs)
    assert rel_err(out, contiguous) < TOL[dtype]


# ---------------------------------------------------------------------------------------------
# fully masked rows and the log-sum-exp


def _holes(b, h, q_idx, kv_idx):  # rows with q_idx % 3 == 0 see nothing (a residual mask)
    return (q_idx % 3 != 0) & (kv_idx <= q_idx)


def _strict_upper(b, h, q_idx, kv_idx):  # with Sq > Skv the last rows see nothing (band bounds)
    return kv_idx > q_idx


def _nothing(b, h, q_idx, kv_idx):  # every row sees nothing
    return q_idx < 0


MASKED_CASES = [
    pytest.param(_holes, 256, 256, torch.bfloat16, id="holes-bf16"),
    pytest.param(_holes, 256, 256, torch.float32, id="holes-fp32"),
    pytest.param(_strict_upper, 300, 200, torch.bfloat16, id="strict_upper-bf16"),
    pytest.param(fg.mods.sliding_window(64), 512, 256, torch.bfloat16, id="sliding_past_end-bf16"),
    pytest.param(_nothing, 128, 128, torch.bfloat16, id="nothing-bf16"),
]


@pytest.mark.parametrize("mask, sq, skv, dtype", MASKED_CASES)
def test_fully_masked_rows(mask, sq, skv, dtype):
    q, k, v = make_qkv(sq=sq, skv=skv, dtype=dtype, seed=sq)
    out, lse = fg.attention(q, k, v, mask_mod=mask, return_lse=True)
    ref, ref_lse = fg.attention_reference(q, k, v, mask_mod=mask, return_lse=True)
    dead = torch.isneginf(ref_lse)
    assert dead.any(), "the case must have fully masked rows"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[dead] == 0).all(), "fully masked rows must be exactly 0"
    assert torch.isneginf(lse[dead]).all(), "fully masked rows must have lse = -inf"
    live = ~dead
    assert torch.isfinite(lse[live]).all()
    if live.any():
        assert rel_err(out[live], ref[live]) < TOL[dtype]
        assert (lse[live].double() - ref_lse[live]).abs().max().item() < LSE_ATOL[dtype]


LSE_CASES = [pytest.param("causal", dt, id=f"causal-{str(dt).removeprefix('torch.')}")
             for dt in (torch.bfloat16, torch.float16, torch.float32)] + [
    pytest.param("alibi+causal", torch.bfloat16, id="alibi+causal-bf16"),
    pytest.param("document_batched", torch.bfloat16, id="document_batched-bf16"),
]


@pytest.mark.parametrize("name, dtype", LSE_CASES)
def test_return_lse(variants, name, dtype):
    kwargs = variants[name]
    q, k, v = make_qkv(dtype=dtype, seed=3)
    out, lse = fg.attention(q, k, v, return_lse=True, **kwargs)
    ref, ref_lse = fg.attention_reference(q, k, v, return_lse=True, **kwargs)
    assert lse.shape == (B, H, S) and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    diff = (lse[finite].double() - ref_lse[finite]).abs().max().item()
    assert diff < LSE_ATOL[dtype], f"max |lse - ref| = {diff:.3g}"
    plain = fg.attention(q, k, v, **kwargs)  # the output does not depend on return_lse
    assert rel_err(plain, out) < TOL[dtype] / 10


def test_empty_kv():
    q, k, v = make_qkv(sq=16, skv=0)
    out, lse = fg.attention(q, k, v, mask_mod=fg.mods.causal, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ---------------------------------------------------------------------------------------------
# captured tensors: new values, never a recompile


def test_captured_tensor_update_does_not_recompile():
    slopes = fg.mods.alibi_slopes(H, device=DEV).clone()
    kwargs = dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)
    attn = fg.compile(**kwargs)
    q, k, v = make_qkv(seed=11)
    first = attn(q, k, v)
    check(first, q, k, v, **kwargs)
    before = compile_counts(attn)
    slopes.mul_(8.0)  # in place: the mods read the same tensor, now with new values
    second = attn(q, k, v)
    torch.cuda.synchronize()
    assert compile_counts(attn) == before, "changing a captured tensor's values recompiled"
    assert rel_err(second, first) > 1e-2, "the new slopes had no effect"
    check(second, q, k, v, **kwargs)  # the reference reads the new values too


def test_learnable_parameter_update_does_not_recompile():
    table = torch.nn.Parameter(randn(H, 2 * S - 1, dtype=torch.float32, seed=12, scale=0.5))
    kwargs = dict(score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.causal)
    attn = fg.compile(**kwargs)
    q, k, v = make_qkv(seed=13)
    with torch.no_grad():
        first = attn(q, k, v)
    check(first, q, k, v, **kwargs)
    before = compile_counts(attn)
    with torch.no_grad():  # an optimizer step
        table.add_(randn(H, 2 * S - 1, dtype=torch.float32, seed=14, scale=2.0))
        second = attn(q, k, v)
    torch.cuda.synchronize()
    assert compile_counts(attn) == before, "updating a parameter recompiled"
    assert rel_err(second, first) > 1e-2, "the parameter update had no effect"
    check(second, q, k, v, **kwargs)


def test_equivalent_variants_share_a_kernel():
    from flashgen import api

    a = fg.compile(mask_mod=fg.mods.sliding_window(77))
    b = fg.compile(mask_mod=fg.mods.sliding_window(77))
    q, k, v = make_qkv(sq=128, seed=15)
    a(q, k, v)
    n = len(api._sources)
    out = b(q, k, v)
    assert len(api._sources) == n
    check(out, q, k, v, mask_mod=fg.mods.sliding_window(77))


# ---------------------------------------------------------------------------------------------
# determinism, large logits, host overhead


DETERMINISM_CASES = [pytest.param(name, torch.bfloat16, id=f"{name}-bf16")
                     for name in ("full", "softcap+causal", "document&causal")] + [
    pytest.param("document&causal", torch.float16, id="document&causal-fp16"),
]


@pytest.mark.parametrize("mods, dtype", DETERMINISM_CASES)
def test_deterministic_and_finite(variants, mods, dtype):
    kwargs = variants[mods]
    q, k, v = make_qkv(dtype=dtype, seed=21, scale=8.0)  # logits of several hundred: stresses the online softmax
    attn = fg.compile(**kwargs)
    outs = [attn(q, k, v) for _ in range(3)]
    assert torch.isfinite(outs[0]).all()
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "two runs of the same call differ"
    check(outs[0], q, k, v, **kwargs)


def test_host_overhead():
    q, k, v = make_qkv(1, 1, 128, 64, seed=31)
    attn = fg.compile(mask_mod=fg.mods.causal)
    median = median_host_seconds(attn, q, k, v)
    assert median < 200e-6, f"median host time per call {median * 1e6:.0f} µs (bound 200 µs)"


def median_host_seconds(attn, q, k, v, calls: int = 500) -> float:
    """Median wall time of launching ``attn(q, k, v)`` (after a warm-up), without waiting for the GPU."""
    for _ in range(50):
        attn(q, k, v)
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        attn(q, k, v)
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# block sparsity: the block map follows the captured tensors the mask reads


def test_document_ids_changed_in_place_rebuild_the_block_map():
    doc = torch.repeat_interleave(torch.arange(4, device=DEV), torch.tensor([100, 37, 200, 175], device=DEV))
    mask = fg.mods.document(doc) & fg.mods.causal
    attn = fg.compile(mask_mod=mask)
    q, k, v = make_qkv(seed=41)
    first = attn(q, k, v)
    check(first, q, k, v, mask_mod=mask)
    before = compile_counts(attn)
    doc.copy_(torch.repeat_interleave(torch.arange(8, device=DEV), torch.full((8,), 64, device=DEV)))
    second = attn(q, k, v)
    torch.cuda.synchronize()
    assert compile_counts(attn) == before, "new document ids recompiled"
    assert rel_err(second, first) > 1e-2, "the new document ids had no effect"
    check(second, q, k, v, mask_mod=mask)


@pytest.mark.parametrize("D_", [64, 128])
def test_ids_that_change_every_step_refill_the_kept_runs_without_synchronising(D_):
    """Packed training batches: new ids copied into the captured tensor before every step. The
    kept launches refill their runs on the device (``maps.LiveRuns``; one CUDA graph from the
    second refill on): results stay the reference's, forward and backward, nothing recompiles,
    and no step synchronises with the host (``torch.cuda.set_sync_debug_mode("error")`` raises on
    any operation that would). At head dim 128 on Hopper, the Gluon kernels' hulls (by queries and
    by keys) come from one bounding of the mask at 64 x 64 tiles."""
    B_, H_, S_ = 2, 4, 1024
    doc = torch.zeros(B_, S_, dtype=torch.long, device=DEV)
    mask = fg.mods.document(doc) & fg.mods.causal  # per-batch ids
    attn = fg.compile(mask_mod=mask)
    q, k, v = make_qkv(B_, H_, S_, D_, seed=43)
    dout = randn(B_, H_, S_, D_, seed=44)
    gen = torch.Generator(device=DEV).manual_seed(45)
    for step, docs in enumerate((3, 16, 1, 40, 7)):
        ids = torch.sort(torch.randint(0, docs, (B_, S_), device=DEV, generator=gen), -1).values
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        doc.copy_(ids)
        if step >= 2:  # after the first steps of the signature (forward, backward) chose the tiles
            before = compile_counts(attn)
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = attn(*leaves)
            out.backward(dout)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if step >= 2:
            assert compile_counts(attn) == before, "new ids recompiled"
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = fg.attention_reference(qd, kd, vd, mask_mod=mask)
        ref.backward(dout.double())
        assert rel_err(out, ref) < TOL[torch.bfloat16], f"step {step} ({docs} documents)"
        for name, got, want in zip(("dq", "dk", "dv"), (t.grad for t in leaves), (qd.grad, kd.grad, vd.grad)):
            assert rel_err(got, want) < 3e-2, f"{name}: step {step} ({docs} documents)"
    if D_ == 64:  # (the Triton kernels' kept launches; the Gluon kernels' calls ask for their runs each call)
        assert sum(1 for _, live, _ in attn._plans.values() if live is not None) == 2  # forward, backward
    # from the second refill of a plan's maps on, the refill is one CUDA graph, replayed (steps 2-4 above)
    graphs = [graph for live in attn._live.values() for graph in live._graphs.values()]
    assert any(isinstance(graph, torch.cuda.CUDAGraph) for graph in graphs)


@pytest.mark.parametrize("sort", [True, False])
def test_live_runs_at_thousands_of_programs_match_the_host_maps(sort):
    """With thousands of ``block_states`` programs at once on the GPU (and PDL letting each refill
    kernel launch before the one it reads has ended), the two maps of a training step (128 x 128,
    and 64 x 128 transposed, from one bounding at 64 x 64) and the hulls of 64 x 64 tiles both ways
    (added to by that bounding's atomics) refilled together equal the host's exact maps through many
    versions of the ids, sorted (documents) and not (tiles the entries decide)."""
    from flashgen import blocks

    B_, S_ = 2, 4096
    doc = torch.zeros(B_, S_, dtype=torch.long, device=DEV)
    mask = fg.mods.document(doc) & fg.mods.causal
    attn = fg.compile(mask_mod=mask)
    live = attn._live_runs((B_, 1, S_, S_), DEV)
    keys = [((128, 128), False, False), ((64, 128), True, False)]
    bufs = [live.runs(block, transpose=t, ragged_last=r) for block, t, r in keys]
    hulls = [live.hulls(), live.hulls(transpose=True)]
    gen = torch.Generator(device=DEV).manual_seed(48)
    for step in range(12):
        ids = torch.randint(0, (3, 16, 200)[step % 3], (B_, S_), device=DEV, generator=gen)
        doc.copy_(torch.sort(ids, -1).values if sort else ids)
        live.refresh(live.keys_of(bufs + hulls))  # (all four in one refill; a graph from the second on)
        host = blocks.BlockMask(attn.program.mask, attn.captured, (B_, 1, S_, S_), (64, 64), closed_form=False,
                                exact=True, device=DEV)
        for t, hull in enumerate(hulls):
            assert torch.equal(hull, host.hulls(transpose=bool(t))), f"step {step}: hulls by {('queries', 'keys')[t]}"
        for (block, t, r), runs in zip(keys, bufs):
            host = blocks.BlockMask(attn.program.mask, attn.captured, (B_, 1, S_, S_), block, closed_form=False,
                                    exact=True, device=DEV).runs(transpose=t, ragged_last=r)
            assert torch.equal(runs[..., 0], host[..., 0]), f"step {step}, map {block}: run counts"
            listed = torch.arange(host.shape[-1] - 1, device=DEV) < 2 * host[..., :1]
            assert torch.equal(torch.where(listed, runs[..., 1:host.shape[-1]], 0),
                               torch.where(listed, host[..., 1:], 0)), f"step {step}, map {block}: runs"


@pytest.mark.parametrize("split", [True, False])
def test_the_triton_forward_tests_a_bands_clauses_across_its_edges_only(split, monkeypatch):
    """SPLIT_BAND compiled and run both ways (``Attention._split_band`` forced) on a dilated window
    and on documents within causal attention, at head dim 64 (the Triton forward takes sparse maps
    there), against the reference; the rule itself chooses the split for the dilated window."""
    doc = torch.repeat_interleave(torch.arange(4, device=DEV), torch.tensor([100, 37, 200, 175], device=DEV))

    def dilated(b, h, q, kv):
        return (kv <= q) & (q - kv < 448) & ((q - kv) % 2 == 0)

    assert fg.compile(mask_mod=dilated)._split_band((B, H, S, S), fg.Config(64, 32), DEV)
    monkeypatch.setattr(fg.Attention, "_split_band", lambda self, *a: split)
    for mask in (dilated, fg.mods.document(doc) & fg.mods.causal):
        q, k, v = make_qkv(seed=47)
        attn = fg.compile(mask_mod=mask)
        out = attn(q, k, v)
        assert attn.last_tiles["forward"] != "warp-specialised (Gluon)"
        check(out, q, k, v, mask_mod=mask)


def test_host_overhead_with_a_block_map():
    doc = torch.repeat_interleave(torch.arange(2, device=DEV), torch.tensor([50, 78], device=DEV))
    q, k, v = make_qkv(1, 1, 128, 64, seed=32)
    attn = fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)
    median = median_host_seconds(attn, q, k, v)
    assert median < 200e-6, f"median host time per call {median * 1e6:.0f} µs (bound 200 µs)"


def test_compiled_binaries_persist_in_flashgen_cache(cache, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    width = 1000 + int(torch.randint(0, 10**6, ()))  # a variant no process has compiled
    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = fg.attention(q, k, v, mask_mod=fg.mods.sliding_window(width) & fg.mods.prefix_lm(16))
    out.sum().backward()
    labels = {e.label for e in runtime.cache_entries() if e.kind == "binary"}
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"} <= labels, labels


def test_first_call_compiles_its_kernels_side_by_side(cache, monkeypatch):
    """A new variant's first forward+backward compiles its three kernels (forward, dQ with delta,
    dK/dV) in child processes at once; the call itself then only loads binaries from the cache, and
    its results are the reference's."""
    from triton import knobs

    from flashgen import api

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    in_children: list[int] = []
    real = api.compile_concurrently
    monkeypatch.setattr(api, "compile_concurrently", lambda work: in_children.append(real(work)) or in_children[-1])
    cache_hits: list[bool] = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: cache_hits.append(kw["cache_hit"]))
    width = 1000 + int(torch.randint(0, 10**6, ()))  # a variant no process has compiled
    mods = dict(mask_mod=fg.mods.sliding_window(width) & fg.mods.prefix_lm(16), score_mod=fg.mods.softcap(20.0))
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 256, 64, seed=11))
    out = fg.attention(q, k, v, **mods)
    dout = randn(*out.shape, seed=17)
    out.backward(dout)
    assert in_children == [3, 0], in_children  # the backward's own first use found its two built
    assert cache_hits and all(cache_hits), cache_hits
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fg.attention_reference(qd, kd, vd, **mods)
    ref.backward(dout.double())
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for got, want in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert rel_err(got, want) < 3e-2


def test_kept_launches_go_direct_and_follow_alignment_and_streams():
    """After a call signature's first call, its kept launches call the compiled kernels directly
    (``runtime.Launch``, on the Triton releases of ``DIRECT_LAUNCH_TRITON``), skipping Triton's
    argument binding. Triton specialises pointers on 16-byte alignment: calls whose tensors are
    aligned differently (same shapes and strides, hence the same plan) must go through Triton's
    launcher, and results must stay the reference's, forward and backward, on any stream."""
    import triton

    doc = torch.repeat_interleave(torch.arange(2, device=DEV), torch.tensor([100, 156], device=DEV))
    mask = fg.mods.document(doc) & fg.mods.causal
    attn = fg.compile(mask_mod=mask)
    n = 2 * 4 * 256 * 64
    flat = [randn(n + 8, seed=40 + i) for i in range(3)]
    dout = randn(2, 4, 256, 64, seed=50)
    side = torch.cuda.Stream()
    for offset, stream in ((0, None), (0, None), (1, None), (1, None), (0, side), (3, side), (0, None)):
        q, k, v = (t[offset:offset + n].view(2, 4, 256, 64).detach().requires_grad_() for t in flat)
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            out = attn(q, k, v)
            out.backward(dout)
        torch.cuda.synchronize()
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = fg.attention_reference(qd, kd, vd, mask_mod=mask)
        ref.backward(dout.double())
        assert rel_err(out, ref) < TOL[torch.bfloat16], f"offset {offset}, stream {stream}"
        for name, got, want in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
            assert rel_err(got, want) < 3e-2, f"{name}: offset {offset}, stream {stream}"
    # one forward signature: every offset shares its plan; the backward's has two where the GPU
    # takes TMA for aligned data (``runtime.tma_ok``: offsets 1 and 3 are not 16-byte aligned)
    plans = [plan for plan, _, _ in attn._plans.values()]
    launches = [x for plan in plans for x in (plan if isinstance(plan, tuple) else (plan,))]
    assert len(plans) == (3 if runtime.tma_ok(flat[0][:n].view(2, 4, 256, 64)) else 2)
    if ".".join(triton.__version__.split(".")[:2]) in runtime.DIRECT_LAUNCH_TRITON:
        assert all(callable(launch._direct) for launch in launches)


# ---------------------------------------------------------------------------------------------
# the warp-specialised forward (Gluon, Hopper)

def assert_like_the_triton_forward(attn, out, q, k, v, **kwargs) -> None:
    """``out``, from the Gluon forward, against the Triton forward of the same call."""
    runtime.WS_FORWARD = False
    try:
        triton_out = attn(q, k, v, **kwargs)
        assert attn.last_tiles["forward"] != "warp-specialised (Gluon)"
    finally:
        runtime.WS_FORWARD = True
    assert rel_err(out, triton_out) < 1e-2


def assert_like_the_reference_and_the_triton_backward(mods: dict, dtype, hkv: int, d: int, seed: int,
                                                     gluon: bool = True) -> None:
    """A call's gradients through out and lse (dlse too) take the Gluon backward (or, ``gluon=False``,
    leave it to the Triton kernels) and match float64 and the Triton backward of the same call."""
    q, k, v = make_qkv(2, 4, 384, d, hkv=hkv, dtype=dtype, seed=seed)
    attn = fg.compile(**mods)
    gqa = hkv != 4
    dout, dlse = randn(2, 4, 384, d, dtype=dtype, seed=seed + 1), randn(2, 4, 384, seed=seed + 2)

    def grads(fn, *qkv):
        leaves = [t.detach().clone().requires_grad_() for t in qkv]
        out, lse = fn(*leaves, enable_gqa=gqa, return_lse=True)
        torch.autograd.backward((out, lse), (dout.to(out.dtype), dlse.to(lse.dtype)))
        return [t.grad for t in leaves]

    got = grads(attn, q, k, v)
    assert (attn.last_tiles.get("dQ, dK/dV") == "warp-specialised (Gluon), one pass") == gluon
    want = grads(lambda *a, **kw: fg.attention_reference(*a, **mods, **kw), *(t.double() for t in (q, k, v)))
    runtime.WS_BACKWARD = False
    try:
        triton_grads = grads(attn, q, k, v)
        assert "dQ, dK/dV" not in attn.last_tiles
    finally:
        runtime.WS_BACKWARD = True
    for name, g, w, t in zip(("dq", "dk", "dv"), got, want, triton_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < 3e-2, name
        assert rel_err(g, t) < 1e-2, name


WS_CASES = [
    pytest.param(None, torch.bfloat16, 4, id="full-bf16"),
    pytest.param(fg.mods.causal, torch.bfloat16, 2, id="causal-gqa-bf16"),
    pytest.param(fg.mods.causal, torch.float16, 4, id="causal-fp16"),
    pytest.param(fg.mods.sliding_window(200), torch.bfloat16, 4, id="sliding200-bf16"),
    pytest.param(fg.mods.causal, torch.bfloat16, 1, id="causal-mqa"),
]


@hopper
@pytest.mark.parametrize("mask, dtype, hkv", WS_CASES)
def test_warp_specialised_forward_matches_the_reference_and_the_triton_kernel(mask, dtype, hkv, monkeypatch):
    """Full, causal and sliding-window forwards at D = 128 take the Gluon kernel on Hopper: out and
    lse against float64, and against the Triton kernel of the same mods; gradients through its lse."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)  # (these shapes are below its size rule)
    q, k, v = make_qkv(2, 4, 384, 128, hkv=hkv, dtype=dtype, seed=61)
    attn = fg.compile(mask_mod=mask)
    gqa = hkv != 4
    out, lse = attn(q, k, v, return_lse=True, enable_gqa=gqa)
    assert attn.last_tiles["forward"] == "warp-specialised (Gluon)"
    check(out, q, k, v, mask_mod=mask, enable_gqa=gqa)
    with torch.no_grad():
        _, ref_lse = fg.attention_reference(q, k, v, mask_mod=mask, enable_gqa=gqa, return_lse=True)
    assert (lse.double() - ref_lse).abs().max() < LSE_ATOL[dtype]
    assert_like_the_triton_forward(attn, out, q, k, v, enable_gqa=gqa)


WS_MOD_CASES = [  # (mods built inside the test: the ALiBi slopes live on the GPU)
    pytest.param(lambda: dict(score_mod=fg.mods.alibi(fg.mods.alibi_slopes(4, device=DEV)), mask_mod=fg.mods.causal),
                 torch.bfloat16, 2, id="alibi-causal-gqa-bf16"),
    pytest.param(lambda: dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal), torch.float16, 4,
                 id="softcap-causal-fp16"),
    pytest.param(lambda: dict(score_mod=fg.mods.softcap(20.0)), torch.bfloat16, 4, id="softcap-full-bf16"),
    pytest.param(lambda: dict(score_mod=fg.score_mod(lambda s, b, h, q, kv: torch.where(q == 5, -math.inf, s * 1.5))),
                 torch.bfloat16, 4, id="a-row-all-inf"),
    pytest.param(lambda: dict(score_mod=fg.score_mod(lambda s, b, h, q, kv: torch.where(q == 5, -math.inf, s)
                                                     + 0.01 * q)),  # (a row term, left to the lse: -inf stays)
                 torch.bfloat16, 4, id="a-row-all-inf-and-a-row-term"),
]


@hopper
@pytest.mark.parametrize("mods, dtype, hkv", WS_MOD_CASES)
def test_warp_specialised_forward_with_a_score_mod(mods, dtype, hkv, monkeypatch):
    """Score_mods that read per (batch, head) at most run in the Gluon forward: out and lse against
    float64 and against the Triton kernel; a row whose every logit is -inf gives 0 and -inf."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_forward(mods(), dtype, hkv, seed=81)


def assert_like_the_reference_and_the_triton_forward(mods: dict, dtype, hkv: int, seed: int,
                                                    scale: float | None = None, s: int = 384, d: int = 128) -> None:
    """A call (at D = 128 unless ``d``) takes the Gluon forward: out and lse against float64 and the
    Triton kernel; rows whose every logit is -inf give 0 and an lse of -inf."""
    q, k, v = make_qkv(2, 4, s, d, hkv=hkv, dtype=dtype, seed=seed)
    attn = fg.compile(**mods)
    gqa = hkv != 4
    out, lse = attn(q, k, v, return_lse=True, enable_gqa=gqa, scale=scale)
    assert attn.last_tiles["forward"] == "warp-specialised (Gluon)"
    assert torch.isfinite(out).all()
    check(out, q, k, v, **mods, enable_gqa=gqa, scale=scale)
    with torch.no_grad():
        _, ref_lse = fg.attention_reference(q, k, v, **mods, enable_gqa=gqa, return_lse=True, scale=scale)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double() - ref_lse)[finite].abs().max() < LSE_ATOL[dtype]
    assert_like_the_triton_forward(attn, out, q, k, v, enable_gqa=gqa, scale=scale)


def gluon_forward_groups(monkeypatch) -> list[int]:
    """The consumer groups of each Gluon forward launched from now on (``runtime.ws_forward``'s module)."""
    groups = []
    launch = fg.api.ws_forward
    monkeypatch.setattr(fg.api, "ws_forward", lambda module, *a, **kw: groups.append(module.GROUPS.value)
                        or launch(module, *a, **kw))
    return groups


@hopper
@pytest.mark.parametrize("s", [384, 512, 640])
@pytest.mark.parametrize("dtype, hkv", [(torch.bfloat16, 4), (torch.float16, 2), (torch.bfloat16, 1)],
                         ids=["bf16", "gqa-fp16", "mqa-bf16"])
def test_the_gluon_forward_at_head_dim_64_in_three_consumer_groups(dtype, hkv, s, monkeypatch):
    """At D = 64 plain logits (no mask, causal, a sliding window, prefix LM's block map) take the Gluon
    forward in 192-row query blocks, three consumer groups of 64 taking turns (FlashAttention-3's
    schedule there): out and lse against float64 and the Triton kernel. 512 and 640 are no multiples
    of 192: the last block passes the sequence's end by one group's rows or two, which only keep the
    barriers' turns, and stores none of it. A score_mod, or a mask that reads tensors, at D = 64 leaves
    the forward to the Triton kernel."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    groups = gluon_forward_groups(monkeypatch)
    for seed, mods in enumerate([{}, dict(mask_mod=fg.mods.causal), dict(mask_mod=fg.mods.sliding_window(200)),
                                 dict(mask_mod=fg.mods.prefix_lm(100))]):
        assert_like_the_reference_and_the_triton_forward(mods, dtype, hkv, seed=89 + seed, s=s, d=64)
    assert groups == [3, 3, 3, 3]
    ids = torch.arange(s, device=DEV) // 100
    for mods in (dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal),
                 dict(mask_mod=fg.mods.document(ids) & fg.mods.causal)):
        attn = fg.compile(**mods)
        attn(*make_qkv(2, 4, s, 64, dtype=dtype, seed=95))
        assert attn.last_tiles["forward"] != "warp-specialised (Gluon)" and groups == [3, 3, 3, 3]


@hopper
@pytest.mark.parametrize("s", [640, 1152])
@pytest.mark.parametrize("mods, dtype, hkv", [
    pytest.param(lambda: dict(mask_mod=fg.mods.causal), torch.bfloat16, 2, id="causal-gqa-bf16"),
    pytest.param(lambda: dict(mask_mod=fg.mods.sliding_window(200)), torch.float16, 4, id="sliding200-fp16"),
    pytest.param(lambda: dict(mask_mod=fg.mods.sliding_window(300)), torch.bfloat16, 1, id="sliding300-mqa-bf16"),
    *WS_MOD_CASES])
def test_the_three_group_gluon_forward_with_a_band_and_score_mods(mods, dtype, hkv, s, monkeypatch):
    """The three-group forward renders bands and score_mods too (which the launch leaves to the Triton
    kernel at D = 64, measured faster there): forced, out and lse against float64 and the Triton
    kernel, at 640 rows (a last query block two groups past the end) and 1152 (six whole blocks). A
    band's groups visit their own tiles of the block's: fewer at its edges, skipped ones first or last."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    source = fg.Attention._ws_source
    monkeypatch.setattr(fg.Attention, "_ws_launch_source",  # (the backward's own groups: 2)
                        lambda self, backward, extra, q, v, skv: source(self, backward, extra, True, 3 - backward))
    groups = gluon_forward_groups(monkeypatch)
    assert_like_the_reference_and_the_triton_forward(mods(), dtype, hkv, seed=91, s=s, d=64)
    assert groups == [3]


@hopper
@pytest.mark.parametrize("programs", [1, 5, 37])
@pytest.mark.parametrize("mods, s", [
    pytest.param(dict(), 640, id="full-640"),
    pytest.param(dict(mask_mod=fg.mods.causal), 1152, id="causal-1152"),
    pytest.param(dict(mask_mod=fg.mods.sliding_window(300)), 640, id="sliding300-640"),
    pytest.param(dict(mask_mod=fg.mods.prefix_lm(200)), 640, id="prefix200-640"),
    pytest.param(dict(mask_mod=fg.mask_mod(lambda b, h, q, kv: ((kv // 128) % 3 != 1) & (q % 5 != 2) & (kv % 3 != 0))),
                 640, id="gaps-640")])
@pytest.mark.parametrize("chunk", ["default", "six heads"])
def test_the_three_group_forward_carries_its_rings_from_item_to_item(mods, s, programs, chunk, monkeypatch):
    """The three-group forward runs persistent programs that take (query block, head) items in turn,
    the K/V ring's phases, the groups' turns and Q's two buffers carried across items: with 1, 5 and 37
    programs over 2 x 4 heads' 24 or 48 items (a program's items of different lengths, some with
    groups past the end), out and lse against float64 and the Triton kernel. Under a band bounded above
    or a map, rounds of items come from chunks of heads (``runtime.WS_CHUNK_BYTES``): one chunk of all 8,
    or chunks of 6 and 2 (three KV heads' bytes, two query heads each)."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    monkeypatch.setattr(runtime, "sm_count", lambda device: programs)
    if chunk == "six heads":
        monkeypatch.setattr(runtime, "WS_CHUNK_BYTES", 3 * s * 128 * 2)
    source = fg.Attention._ws_source
    monkeypatch.setattr(fg.Attention, "_ws_launch_source",
                        lambda self, backward, extra, q, v, skv: source(self, backward, extra, True, 3 - backward))
    groups = gluon_forward_groups(monkeypatch)
    assert_like_the_reference_and_the_triton_forward(mods, torch.bfloat16, 2, seed=97, s=s, d=64)
    assert groups == [3]


@hopper
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("mods, dtype, hkv", WS_MOD_CASES)  # (the last: a row whose logits are all -inf)
def test_warp_specialised_backward_with_a_score_mod(mods, dtype, hkv, d, monkeypatch):
    """The Gluon backward of a score_mod (the logits' derivative in the score as a factor of dS), with
    a loss that reads lse too: gradients against float64 and against the Triton kernels'."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_backward(mods(), dtype, hkv, d, seed=91)


def _doc_ids(cuts: list[int], seed: int) -> torch.Tensor:
    """Document ids [2, 384] on the GPU: documents ending at ``cuts`` in batch entry 0, at random
    places (not multiples of 128) in entry 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2, 384, dtype=torch.int32)
    for i, row in enumerate((cuts, sorted(torch.randperm(383, generator=g)[:5].add(1).tolist()))):
        for cut in row:
            ids[i, cut:] += 1
    return ids.to(DEV)


WS_MAP_CASES = [  # (mods built in the test: tensors on the GPU), dtype, KV heads, Gluon backward taken
    pytest.param(lambda: dict(mask_mod=fg.mods.prefix_lm(200)), torch.bfloat16, 4, True, id="prefix200-bf16"),
    pytest.param(lambda: dict(mask_mod=fg.mods.document(_doc_ids([128, 200, 256], 5)) & fg.mods.causal),
                 torch.bfloat16, 2, True, id="document-causal-gqa-bf16"),
    pytest.param(lambda: dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.document(_doc_ids([100, 300], 6))),
                 torch.float16, 4, True, id="softcap-document-fp16"),
    # a band bounded on both sides beside a read: its clauses evaluated only on tiles across its edges
    pytest.param(lambda: dict(mask_mod=fg.mods.sliding_window(150) & fg.mods.document(_doc_ids([200, 300], 7))),
                 torch.bfloat16, 4, True, id="sliding150-document-bf16"),
    # key blocks that no row sees (one inside the others' hull) and rows that see no key
    pytest.param(lambda: dict(mask_mod=fg.mask_mod(lambda b, h, q, kv: ((kv // 128) % 3 != 1) & (q % 5 != 2)
                                                     & (kv % 3 != 0))),
                 torch.bfloat16, 4, True, id="gaps-and-empty-rows-bf16"),
    # a first query block that sees no key: no program of the backward visits it
    pytest.param(lambda: dict(mask_mod=fg.mask_mod(lambda b, h, q, kv: (kv <= q) & (q >= 64))), torch.bfloat16, 4,
                 True, id="first-block-unseen-bf16"),
    # a map that varies by head: the backward's query blocks are shared by a group's heads
    pytest.param(lambda: dict(mask_mod=fg.mask_mod(lambda b, h, q, kv: kv <= q - 100 * h)), torch.bfloat16, 2,
                 False, id="per-head-gqa-bf16"),
]


WS_BIAS_CASES = [  # (built in the test: on the GPU)
    pytest.param(lambda: dict(bias=randn(4, 384, 384, seed=3), mask_mod=fg.mods.causal), torch.bfloat16, 4,
                 id="bias-HSS-causal-bf16"),
    pytest.param(lambda: dict(bias=randn(2, 4, 384, 384, dtype=torch.float16, seed=4)), torch.float16, 2,
                 id="bias-BHSS-gqa-fp16"),
    pytest.param(lambda: dict(bias=randn(384, 384, seed=5).expand(2, 4, 384, 384)), torch.bfloat16, 4,
                 id="bias-broadcast-bf16"),
    pytest.param(lambda: dict(bias=randn(4, 384, 384, seed=6), mask_mod=fg.mods.prefix_lm(100)), torch.bfloat16, 4,
                 id="bias-prefix-bf16"),  # (a block map too)
]


@hopper
@pytest.mark.parametrize("mods, dtype, hkv", WS_BIAS_CASES)
def test_warp_specialised_forward_with_a_dense_bias(mods, dtype, hkv, monkeypatch):
    """A dense bias (bf16 or fp16) in the Gluon forward, its tiles loaded by TMA: out and lse against
    float64 and the Triton kernel."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_forward(mods(), dtype, hkv, seed=85)


WS_LOW_RANK_CASES = [  # (built in the test: on the GPU; fp16, with bf16 factors: exact in fp16)
    pytest.param(lambda: dict(bias=fg.LowRankBias(randn(1, 4, 384, 16, seed=7, scale=0.25),
                                                  randn(1, 4, 384, 16, seed=8, scale=0.25)), mask_mod=fg.mods.causal),
                 torch.float16, 4, id="rank16-causal-fp16"),
    pytest.param(lambda: dict(bias=fg.LowRankBias(randn(2, 4, 384, 5, seed=9), randn(2, 2, 384, 5, seed=10))),
                 torch.float16, 2, id="rank5-gqa-fp16"),  # (key factors per KV head; 11 zero columns)
]


@hopper
@pytest.mark.parametrize("mods, dtype, hkv", WS_LOW_RANK_CASES)
def test_warp_specialised_forward_with_a_low_rank_bias(mods, dtype, hkv, monkeypatch):
    """A LowRankBias's factors as 16 more columns of q and k, a second product per S tile in the Gluon
    forward: out and lse against float64 and the Triton kernel. The scale is a power of two, so
    that phi_q / scale (the columns the kernel reads) is exact and the lse's tolerance measures the
    kernel, not that rounding (in fp16, up to 2.8e-2 with these rank-5 factors at 128 ** -0.5)."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_forward(mods(), dtype, hkv, seed=87, scale=0.125)


@hopper
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("mods, dtype, hkv", WS_LOW_RANK_CASES)
def test_warp_specialised_backward_with_a_low_rank_bias(mods, dtype, hkv, d, monkeypatch):
    """Frozen factors in the Gluon backward (a second product per Sᵀ tile, no gradients for their
    columns): gradients of q, k, v through out and lse against float64 and the Triton kernels."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_backward(mods(), dtype, hkv, d, seed=97)


@hopper
def test_warp_specialised_forward_with_a_low_rank_bias_in_bf16(monkeypatch):
    """The same in bf16: out against float64 (TOL) and the Triton kernel on the same q', k'."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    mods = WS_LOW_RANK_CASES[0].values[0]()
    q, k, v = make_qkv(2, 4, 384, 128, dtype=torch.bfloat16, seed=89)
    attn = fg.compile(**mods)
    out = attn(q, k, v)
    assert attn.last_tiles["forward"] == "warp-specialised (Gluon)"
    check(out, q, k, v, **mods)
    assert_like_the_triton_forward(attn, out, q, k, v)


@hopper
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("mods, dtype, hkv", WS_BIAS_CASES)
def test_warp_specialised_backward_with_a_dense_bias(mods, dtype, hkv, d, monkeypatch):
    """A dense bias in the Gluon backward, its [64 rows, 128 keys] tiles loaded by TMA with Q_i and
    read transposed: gradients through out and lse against float64 and the Triton kernels."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_backward(mods(), dtype, hkv, d, seed=95)


@hopper
@pytest.mark.parametrize("mods, dtype, hkv, gluon_backward", WS_MAP_CASES)
def test_warp_specialised_forward_with_a_block_map(mods, dtype, hkv, gluon_backward, monkeypatch):
    """Masks beyond a band run in the Gluon forward over the tiles of a block map (128 x 128), the
    mask evaluated outside its full runs: out and lse against float64 and the Triton kernel."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_forward(mods(), dtype, hkv, seed=83)


@hopper
@pytest.mark.parametrize("mods, dtype, hkv, gluon_backward", WS_MAP_CASES)
def test_the_three_group_forward_over_a_block_map(mods, dtype, hkv, gluon_backward, monkeypatch):
    """The three-group forward over a block map at 64 x 128, each group's 64 rows on their own row of it
    (their hull of tiles, their full chain; a row of no tile: first-block-unseen's rows 0-63), the masks
    that read tensors too (which the launch leaves to the Triton kernel at D = 64; forced here, their
    reads gathered per entry): out and lse against float64 and the Triton kernel. (Blocks past the
    sequence's end, over a map: the item-to-item test's prefix200-640 and gaps-640.)"""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    monkeypatch.setattr(runtime, "WS_SPARSE_HEAD_DIMS", (64, 128))  # (however few of its tiles a map has)
    source = fg.Attention._ws_source
    monkeypatch.setattr(fg.Attention, "_ws_launch_source",
                        lambda self, backward, extra, q, v, skv: source(self, backward, extra, True, 3 - backward))
    groups = gluon_forward_groups(monkeypatch)
    assert_like_the_reference_and_the_triton_forward(mods(), dtype, hkv, seed=101, d=64)
    assert groups == [3]


@hopper
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("mods, dtype, hkv, gluon_backward", WS_MAP_CASES)
def test_warp_specialised_backward_with_a_block_map(mods, dtype, hkv, gluon_backward, d, monkeypatch):
    """The Gluon backward over the transposed map's tiles (128 keys x 64 rows), with a loss that reads
    lse too: gradients against float64 and the Triton kernels; a map that varies by head leaves a
    grouped call to the Triton kernels."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    assert_like_the_reference_and_the_triton_backward(mods(), dtype, hkv, d, seed=93, gluon=gluon_backward)


@hopper
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("mask, dtype, hkv", WS_CASES)
def test_warp_specialised_backward_matches_the_reference_and_the_triton_kernels(mask, dtype, hkv, d, monkeypatch):
    """The one-pass Gluon backward of full, causal and sliding-window attention at D = 128 and 64,
    with a loss that reads lse too (dlse): gradients against float64, and against the Triton kernels'."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)  # (these shapes are below its size rule)
    assert_like_the_reference_and_the_triton_backward(dict(mask_mod=mask), dtype, hkv, d, seed=71)


@hopper
@pytest.mark.parametrize("d", [128, 64])
def test_sparse_block_maps_take_the_gluon_kernels_at_the_head_dims_listed(d, monkeypatch):
    """A map with under SPARSE_OCCUPANCY of its 128 x 128 tiles non-empty (documents of 64 tokens:
    the diagonal's tiles, 1/16) takes the Gluon kernels where ``runtime.WS_SPARSE_HEAD_DIMS`` lists
    v's head dim (the forward where the Gluon forward takes the mask: at 64, not one that reads tensors)
    and the Triton ones elsewhere:
    both right, and alike."""
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    mods = dict(mask_mod=fg.mods.document(torch.arange(2048, device=DEV) // 64) & fg.mods.causal)
    q, k, v = make_qkv(1, 2, 2048, d, seed=99)
    dout = randn(1, 2, 2048, d, dtype=q.dtype, seed=98)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    fg.attention_reference(*ref, **mods).backward(dout.double())
    attn = fg.compile(**mods)
    got = {}
    for gluon in (True, False):
        monkeypatch.setattr(runtime, "WS_SPARSE_HEAD_DIMS", (d,) if gluon else ())
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        attn(*leaves).backward(dout)
        forward = gluon and d in runtime.WS_FORWARD_HEAD_DIMS and attn._ws_groups(False, 0, d) is not None
        assert (attn.last_tiles["forward"] == "warp-specialised (Gluon)") == forward
        assert (attn.last_tiles.get("dQ, dK/dV") == "warp-specialised (Gluon), one pass") == gluon
        got[gluon] = [t.grad for t in leaves]
    for i, name in enumerate(("dq", "dk", "dv")):
        assert torch.isfinite(got[True][i]).all(), name
        assert rel_err(got[True][i], ref[i].grad) < 3e-2, name
        assert rel_err(got[True][i], got[False][i]) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_is_torchs_rounding_on_the_gpu(dtype):
    """``runtime.cast`` (the Gluon backward's dQ) rounds float32 as torch does: bit for bit."""
    src = torch.randn(3, 5000, device=DEV) * torch.logspace(-8, 4, 5000, device=DEV)
    got, want = runtime.cast(src, dtype), src.to(dtype)
    assert torch.equal(got, want)


def test_warp_specialised_forward_leaves_other_calls_to_the_triton_kernel(monkeypatch):
    """Small calls, lengths that are not multiples of 128, misaligned inputs, mods outside plain
    logits with a band, and sparse maps at head dims outside ``WS_SPARSE_HEAD_DIMS`` go through the
    Triton kernel, still right."""
    causal = fg.compile(mask_mod=fg.mods.causal)
    q, k, v = make_qkv(1, 2, 256, 128, seed=68)  # below runtime.WS_MIN_FLOPS: the launch's host time would bound it
    check(causal(q, k, v), q, k, v, mask_mod=fg.mods.causal)
    assert causal.last_tiles["forward"] != "warp-specialised (Gluon)"
    monkeypatch.setattr(runtime, "WS_MIN_FLOPS", 0)
    q, k, v = make_qkv(1, 2, 200, 128, seed=63)
    check(causal(q, k, v), q, k, v, mask_mod=fg.mods.causal)
    assert causal.last_tiles["forward"] != "warp-specialised (Gluon)"
    n = 2 * 256 * 128
    flat = [randn(n + 8, seed=64 + i) for i in range(3)]
    q, k, v = (t[4:4 + n].view(1, 2, 256, 128) for t in flat)  # 8-byte aligned
    check(causal(q, k, v), q, k, v, mask_mod=fg.mods.causal)
    assert causal.last_tiles["forward"] != "warp-specialised (Gluon)"
    table = randn(2, 511, seed=66)
    other = fg.compile(score_mod=fg.mods.relative_bias(table))  # (a read per entry)
    q, k, v = make_qkv(1, 2, 256, 128, seed=67)
    check(other(q, k, v), q, k, v, score_mod=fg.mods.relative_bias(table))
    assert other.last_tiles["forward"] != "warp-specialised (Gluon)"
    ids = torch.arange(2048, device=DEV) // 128  # 16 documents: 6 % of the tiles non-empty
    sparse = fg.compile(mask_mod=fg.mods.document(ids))
    q, k, v = make_qkv(1, 2, 2048, 128, seed=69)
    monkeypatch.setattr(runtime, "WS_SPARSE_HEAD_DIMS", ())  # (sparse maps take it at the head dims listed)
    check(sparse(q, k, v), q, k, v, mask_mod=fg.mods.document(ids))
    assert sparse.last_tiles["forward"] != "warp-specialised (Gluon)"
