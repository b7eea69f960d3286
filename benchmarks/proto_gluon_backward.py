"""Prototype: the attention backward for Hopper in Gluon, in the forward's warp-specialised form
(``proto_gluon_forward.py``, ``attention_fwd_ws.py.jinja``), to learn whether that schedule lifts
the backward as it lifted the forward. Not part of flashgen: full attention only (no mods, no
masks), bf16, S a multiple of 128, head dim 128, Hq == Hkv. Written without a GPU (sixteenth
session, after the device time was spent): compiled for sm_90 here, never run.

    python3 benchmarks/proto_gluon_backward.py --compile-only      # offline: sm_90 registers, spills
    PYTHONPATH=. python3 benchmarks/proto_gluon_backward.py        # on the GPU: check, then time

Two kernels, as flashgen's Triton backward (seven products per tile pair; FlashAttention-3's
five-product form with dQ reduced through TMA is the step after this one):
- ``bwd_dkdv_ws``: one program per 128 keys. A producer warp loads K and V once, then Q_i and
  dO_i (64 query rows each) into a ring of stages. Two consumer warp groups own 64 keys each:
  per query block, Sᵀ = K Q_iᵀ and dPᵀ = V dO_iᵀ, then Pᵀ = exp2(Sᵀ·c - lse_i),
  dSᵀ = Pᵀ (dPᵀ - delta_i), then dV += Pᵀ dO_i and dK += dSᵀ Q_i (Pᵀ and dSᵀ from registers).
- ``bwd_dq_ws``: one program per 128 query rows, as the forward: two consumer groups of 64 rows,
  K_j and V_j streamed; S = Q K_jᵀ, dP = dO V_jᵀ, dS = P (dP - delta), dQ += dS K_j.
In both, the two consumer groups take turns issuing their products (a pair of mbarriers), so one
group's exp2 and elementwise work runs while the other's products occupy the tensor cores.
delta = rowsum(dO · O) comes from torch here (flashgen's dQ pass computes it from its own tiles).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
HALF = gl.constexpr(64)  # rows (dQ) or keys (dK/dV) per consumer warp group: one wgmma M
LOG2E_C = gl.constexpr(LOG2E)


@gluon.jit
def _buffers(once_a, once_b, ring_a, ring_b, STAGES: gl.constexpr):
    """Shared memory of a pass, both kernels alike: the two 64-row halves of two tiles loaded once
    (descriptors ``once_*``), a ring of STAGES tiles of two streamed ones (``ring_*``), and the
    barriers: one for the tiles loaded once, a ready barrier per stage for each streamed tile, an
    empty one per stage (both consumer groups arrive) and the ping-pong's two turn barriers."""
    HEAD_D: gl.constexpr = once_a.block_type.shape[1]
    dtype: gl.constexpr = once_a.dtype
    a = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_D], once_a.layout)
    b = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_D], once_b.layout)
    ra = gl.allocate_shared_memory(dtype, [STAGES] + ring_a.block_type.shape, ring_a.layout)
    rb = gl.allocate_shared_memory(dtype, [STAGES] + ring_b.block_type.shape, ring_b.layout)
    once_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ra_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    rb_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(once_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ra_bars.index(i), count=1)
        mbarrier.init(rb_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    return (a, b, ra, rb), (once_bar, ra_bars, rb_bars, empty_bars, turn_bars)


# ---------------------------------------------------------------------------------------------
# dK, dV: one program per 128 keys


@gluon.jit
def _dkdv_producer(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
                   qk_scale, sm_scale):
    k_smem, v_smem, q_smem, do_smem = smem
    kv_bar, q_bars, do_bars, empty_bars, turn_bars = bars
    STAGES: gl.constexpr = q_smem.type.shape[0]
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [row0 + kv_lo + w * HALF, 0], kv_bar, k_smem.index(w))
        tma.async_copy_global_to_shared(v_desc, [row0 + kv_lo + w * HALF, 0], kv_bar, v_smem.index(w))
    for i in range(S // HALF):
        s = i % STAGES
        mbarrier.wait(empty_bars.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(q_bars.index(s), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row0 + i * HALF, 0], q_bars.index(s), q_smem.index(s))
        mbarrier.expect(do_bars.index(s), do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(do_desc, [row0 + i * HALF, 0], do_bars.index(s), do_smem.index(s))


@gluon.jit
def _dkdv_consumer(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
                   qk_scale, sm_scale, WG: gl.constexpr):
    k_smem, v_smem, q_smem, do_smem = smem
    kv_bar, q_bars, do_bars, empty_bars, turn_bars = bars
    STAGES: gl.constexpr = q_smem.type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HALF, 16])  # [keys, queries]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, HEAD_D, 16])  # [keys, head dim]
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    q_cols: gl.constexpr = gl.SliceLayout(0, st_layout)
    mine = turn_bars.index(WG)
    theirs = turn_bars.index(1 - WG)
    k = k_smem.index(WG)
    v = v_smem.index(WG)
    zero = gl.zeros([HALF, HALF], gl.float32, layout=st_layout)
    dk = gl.zeros([HALF, HEAD_D], gl.float32, layout=acc_layout)
    dv = gl.zeros([HALF, HEAD_D], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_bar, 0)
    turn = 0
    for i in range(S // HALF):
        s = i % STAGES
        phase = (i // STAGES) & 1
        q_pos = row0 + i * HALF + gl.arange(0, HALF, layout=q_cols)
        lse = gl.load(lse_ptr + q_pos) * LOG2E_C
        delta = gl.load(delta_ptr + q_pos)
        mbarrier.wait(q_bars.index(s), phase)
        mbarrier.wait(do_bars.index(s), phase)
        # turn t of group WG waits phase (t & 1) ^ (1 - WG): group 0's first passes at once
        mbarrier.wait(mine, (turn & 1) ^ (1 - WG))
        st_tok = warpgroup_mma(k, q_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v, do_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.arrive(theirs, count=1)
        turn += 1
        st = warpgroup_mma_wait(1, deps=[st_tok])
        pt = gl.exp2(st * qk_scale - lse[None, :])
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok])
        dst = pt * (dpt - delta[None, :])
        pt_op = gl.convert_layout(pt.to(q_desc.dtype), op_layout)
        dst_op = gl.convert_layout(dst.to(q_desc.dtype), op_layout)
        mbarrier.wait(mine, (turn & 1) ^ (1 - WG))
        dv_tok = warpgroup_mma(pt_op, do_smem.index(s), dv, is_async=True)
        dk_tok = warpgroup_mma(dst_op, q_smem.index(s), dk, is_async=True)
        mbarrier.arrive(theirs, count=1)
        turn += 1
        dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok])
        mbarrier.arrive(empty_bars.index(s), count=1)  # Q_i and dO_i consumed by this group
    rows = row0 + kv_lo + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, acc_layout))
    offsets = rows.to(gl.int64)[:, None] * HEAD_D + cols[None, :]
    gl.store(dk_ptr + offsets, (dk * sm_scale).to(q_desc.dtype))
    gl.store(dv_ptr + offsets, dv.to(q_desc.dtype))


@gluon.jit
def _dkdv_consumer_0(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
                     qk_scale, sm_scale):
    _dkdv_consumer(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
                   qk_scale, sm_scale, 0)


@gluon.jit
def _dkdv_consumer_1(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
                     qk_scale, sm_scale):
    _dkdv_consumer(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
                   qk_scale, sm_scale, 1)


@gluon.jit
def bwd_dkdv_ws(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, S, qk_scale, sm_scale,
                STAGES: gl.constexpr):
    kv_lo = gl.program_id(0) * (2 * HALF)
    row0 = gl.program_id(1) * S  # this (batch, head)'s first row in the [B * H * S, D] views
    smem, bars = _buffers(k_desc, v_desc, q_desc, do_desc, STAGES)  # K, V once; Q_i, dO_i streamed
    common = (q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, smem, bars, row0, kv_lo, S,
              qk_scale, sm_scale)
    gl.warp_specialize([(_dkdv_consumer_0, common), (_dkdv_consumer_1, common), (_dkdv_producer, common)],
                       [4, 1], [232, 40])


# ---------------------------------------------------------------------------------------------
# dQ: one program per 128 query rows


@gluon.jit
def _dq_producer(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
                 sm_scale):
    q_smem, do_smem, k_smem, v_smem = smem
    q_bar, k_bars, v_bars, empty_bars, turn_bars = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    for w in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [row0 + q_lo + w * HALF, 0], q_bar, q_smem.index(w))
        tma.async_copy_global_to_shared(do_desc, [row0 + q_lo + w * HALF, 0], q_bar, do_smem.index(w))
    for j in range(S // BLOCK_N):
        s = j % STAGES
        mbarrier.wait(empty_bars.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], k_bars.index(s), k_smem.index(s))
        mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row0 + j * BLOCK_N, 0], v_bars.index(s), v_smem.index(s))


@gluon.jit
def _dq_consumer(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
                 sm_scale, WG: gl.constexpr):
    q_smem, do_smem, k_smem, v_smem = smem
    q_bar, k_bars, v_bars, empty_bars, turn_bars = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, HEAD_D, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    mine = turn_bars.index(WG)
    theirs = turn_bars.index(1 - WG)
    q = q_smem.index(WG)
    do = do_smem.index(WG)
    q_pos = row0 + q_lo + WG * HALF + gl.arange(0, HALF, layout=rows_s)
    lse = gl.load(lse_ptr + q_pos) * LOG2E_C
    delta = gl.load(delta_ptr + q_pos)
    zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([HALF, HEAD_D], gl.float32, layout=acc_layout)
    mbarrier.wait(q_bar, 0)
    turn = 0
    for j in range(S // BLOCK_N):
        s = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_bars.index(s), phase)
        mbarrier.wait(v_bars.index(s), phase)
        mbarrier.wait(mine, (turn & 1) ^ (1 - WG))
        s_tok = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.arrive(theirs, count=1)
        turn += 1
        scores = warpgroup_mma_wait(1, deps=[s_tok])
        p = gl.exp2(scores * qk_scale - lse[:, None])
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds_op = gl.convert_layout((p * (dp - delta[:, None])).to(q_desc.dtype), op_layout)
        mbarrier.wait(mine, (turn & 1) ^ (1 - WG))
        dq_tok = warpgroup_mma(ds_op, k_smem.index(s), dq, is_async=True)
        mbarrier.arrive(theirs, count=1)
        turn += 1
        dq = warpgroup_mma_wait(0, deps=[dq_tok])
        mbarrier.arrive(empty_bars.index(s), count=1)  # K_j and V_j consumed by this group
    rows = row0 + q_lo + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, acc_layout))
    gl.store(dq_ptr + rows.to(gl.int64)[:, None] * HEAD_D + cols[None, :], (dq * sm_scale).to(q_desc.dtype))


@gluon.jit
def _dq_consumer_0(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
                   sm_scale):
    _dq_consumer(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
                 sm_scale, 0)


@gluon.jit
def _dq_consumer_1(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
                   sm_scale):
    _dq_consumer(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
                 sm_scale, 1)


@gluon.jit
def bwd_dq_ws(q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, S, qk_scale, sm_scale,
              STAGES: gl.constexpr):
    q_lo = gl.program_id(0) * (2 * HALF)
    row0 = gl.program_id(1) * S
    smem, bars = _buffers(q_desc, do_desc, k_desc, v_desc, STAGES)  # Q, dO once; K_j, V_j streamed
    common = (q_desc, k_desc, v_desc, do_desc, dq_ptr, lse_ptr, delta_ptr, smem, bars, row0, q_lo, S, qk_scale,
              sm_scale)
    gl.warp_specialize([(_dq_consumer_0, common), (_dq_consumer_1, common), (_dq_producer, common)],
                       [4, 1], [232, 40])


# ---------------------------------------------------------------------------------------------
# host side


def _descriptor(t: torch.Tensor, rows: int):
    D = t.shape[-1]
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], dtype)
    return TensorDescriptor.from_tensor(t.reshape(-1, D), [rows, D], layout)


def launches(q, k, v, o, do, lse, scale=None, stages=2, dq_block_n=64):
    """The two kernels' (kernel, grid, args, kwargs) and the gradients they write (dq, dk, dv)."""
    B, H, S, D = q.shape
    assert S % 128 == 0 and D == 128 and k.shape == q.shape and all(t.is_contiguous() for t in (q, k, v, do))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    delta = (o.float() * do.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rows64 = [_descriptor(t, 64) for t in (q, k, v, do)]
    dkdv = (bwd_dkdv_ws, (S // 128, B * H), (*rows64, dk, dv, lse, delta, S, scale * LOG2E, scale),
            dict(STAGES=stages, num_warps=4))
    dq_descs = (_descriptor(q, 64), _descriptor(k, dq_block_n), _descriptor(v, dq_block_n), _descriptor(do, 64))
    dq_launch = (bwd_dq_ws, (S // 128, B * H), (*dq_descs, dq, lse, delta, S, scale * LOG2E, scale),
                 dict(STAGES=stages, num_warps=4))
    return [dkdv, dq_launch], (dq, dk, dv)


def backward(q, k, v, o, do, lse, scale=None, stages=2, dq_block_n=64):
    runs, grads = launches(q, k, v, o, do, lse, scale, stages, dq_block_n)
    for kernel, grid, args, kwargs in runs:
        kernel[grid](*args, **kwargs)
    return grads


def compile_only(stages: int, dq_block_n: int) -> None:
    """Compile both kernels for sm_90 here (no GPU): registers, spills, shared memory."""
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    import sass
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    from flashgen import parallel

    q, k, v, o, do = (torch.randn(1, 2, 1024, 128, dtype=torch.bfloat16) for _ in range(5))
    lse = torch.randn(1, 2, 1024)
    runs, _ = launches(q, k, v, o, do, lse, None, stages, dq_block_n)
    target = GPUTarget("cuda", 90, 32)
    for kernel, _grid, args, kwargs in runs:
        src, options = parallel.launch_source(kernel, args, kwargs, target)
        compiled = triton_compile(src, target=target, options=options.__dict__)
        regs, spills = sass.resources(compiled)
        print(f"{kernel.fn.__name__} stages {stages} (dQ's BLOCK_N {dq_block_n}): {regs} registers, {spills} bytes "
              f"spilled, shared {compiled.metadata.shared} bytes")


def check(B, H, S, stages, dq_block_n) -> None:
    """The prototype's gradients against float64 autograd at a small shape."""
    D = 128
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    logits = qd @ kd.transpose(-1, -2) / math.sqrt(D)
    out = torch.softmax(logits, -1) @ vd
    out.backward(do.double())
    lse = torch.logsumexp(logits, -1).float().contiguous()
    dq, dk, dv = backward(q, k, v, out.detach().to(q.dtype), do, lse, None, stages, dq_block_n)
    torch.cuda.synchronize()
    for name, got, want in (("dq", dq, qd.grad), ("dk", dk, kd.grad), ("dv", dv, vd.grad)):
        print(f"{B}x{H}x{S}x{D} {name}: relative error against float64 "
              f"{float((got.double() - want).norm() / want.norm()):.2e}")


def timed(B, H, S, stages, dq_block_n) -> None:
    """Backward ms: the prototype (its two kernels and delta) against flashgen's and flex's backward."""
    from torch.nn.attention.flex_attention import flex_attention

    import flashgen as fg

    D = 128
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(4))
    attn, flex = fg.compile(), torch.compile(flex_attention)
    out, lse = attn(q, k, v, return_lse=True)
    dq, dk, dv = backward(q.detach(), k.detach(), v.detach(), out.detach(), do.detach(), lse.detach(), None,
                          stages, dq_block_n)
    ref = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    errs = ", ".join(f"{float((a.float() - b.float()).norm() / b.float().norm()):.1e}"
                     for a, b in zip((dq, dk, dv), ref))
    flex_out = flex(q, k, v)
    rows = {f"gluon, {stages} stages (vs flashgen {errs})":
            lambda: backward(q.detach(), k.detach(), v.detach(), out.detach(), do.detach(), lse.detach(), None,
                             stages, dq_block_n),
            "flashgen backward": lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
            "flex backward": lambda: torch.autograd.grad(flex_out, (q, k, v), do, retain_graph=True)}
    flops = 2.5 * 4 * B * H * S * S * D
    print(f"{B}x{H}x{S}x{D} bf16 backward, median of do_bench")
    for name, fn in rows.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
        print(f"  {name:<60} {ms:8.3f} ms {flops / ms * 1e-9:8.1f} TF/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--dq-block-n", type=int, default=64, choices=(64, 128))
    p.add_argument("--shape", default="4x16x8192", help="BxHxS to time ('' for the checks alone)")
    args = p.parse_args(argv)
    if args.compile_only:
        compile_only(args.stages, args.dq_block_n)
        return 0
    if not torch.cuda.is_available():
        print("proto_gluon_backward: no CUDA device")
        return 0
    check(1, 2, 256, args.stages, args.dq_block_n)
    if args.shape:
        timed(*(int(x) for x in args.shape.split("x")), args.stages, args.dq_block_n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
