"""Prototype: a warp-specialised plain attention forward for Hopper in Gluon (Triton 3.6's
lower-level language), to learn whether FlashAttention-3's schedule beats the generated Triton
forward on the H200. Not part of flashgen: full attention only (no mods, no masks), bf16,
S a multiple of 128, head dim 64 or 128.

    python3 benchmarks/proto_gluon_forward.py --compile-only        # offline: sm_90 registers, spills
    PYTHONPATH=. python3 benchmarks/proto_gluon_forward.py          # on the GPU: check, then time

Schedule (FlashAttention-3, section 3.1-3.2): one CTA per 128 query rows; three partitions:
- a producer warp issues the TMA loads: both halves of the Q tile once, then K and V tiles into a
  ring of STAGES buffers, each guarded by a "ready" barrier (per K and per V) and an "empty"
  barrier that both consumers arrive on when they are done with the stage;
- two consumer warp groups, 64 query rows each. Each iteration a consumer issues S_j = Q K_jᵀ and
  O += P_{j-1} V_{j-1} (wgmma, asynchronous), waits for S_j alone, runs the softmax of tile j while
  its P V product is still running, then waits for that and rescales O;
- ping-pong: the two consumers take turns issuing their products (two mbarriers passed back and
  forth), so that one group's softmax runs while the other's products occupy the tensor cores.
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
HALF_M = gl.constexpr(64)  # query rows per consumer warp group (one wgmma M)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv,
              qk_scale):
    q_bar, k_bars, v_bars, empty_bars, turn_bars = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + HALF_M, 0], q_bar, q_smem.index(1))
    for j in range(n_kv):
        s = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(empty_bars.index(s), phase ^ 1)  # (fresh barriers pass phase 1 at once)
        mbarrier.expect(k_bars.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_bars.index(s), k_smem.index(s))
        mbarrier.expect(v_bars.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], v_bars.index(s), v_smem.index(s))


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv,
              qk_scale, WG: gl.constexpr):
    q_bar, k_bars, v_bars, empty_bars, turn_bars = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = k_desc.block_type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    q = q_smem.index(WG)
    mine = turn_bars.index(WG)
    theirs = turn_bars.index(1 - WG)
    zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([HALF_M, HEAD_D], gl.float32, layout=o_layout)
    mbarrier.wait(q_bar, 0)

    # tile 0: S_0 alone (no P V yet). Turn t of group WG waits phase (t & 1) ^ (1 - WG): group 0's first
    # wait passes at once (fresh barriers), group 1's waits for group 0's first hand-over.
    mbarrier.wait(k_bars.index(0), 0)
    mbarrier.wait(mine, 1 - WG)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.arrive(theirs, count=1)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)

    for j in range(1, n_kv):
        sj = j % STAGES
        sp = (j - 1) % STAGES
        mbarrier.wait(k_bars.index(sj), (j // STAGES) & 1)
        mbarrier.wait(v_bars.index(sp), ((j - 1) // STAGES) & 1)
        mbarrier.wait(mine, (j & 1) ^ (1 - WG))
        s_tok = warpgroup_mma(q, k_smem.index(sj).permute((1, 0)), zero, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
        mbarrier.arrive(theirs, count=1)
        s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j done; P_{j-1} V_{j-1} may still run
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=[o_tok])
        mbarrier.arrive(empty_bars.index(sp), count=1)  # K_{j-1} and V_{j-1} consumed
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)

    last = (n_kv - 1) % STAGES
    mbarrier.wait(v_bars.index(last), ((n_kv - 1) // STAGES) & 1)
    mbarrier.wait(mine, (n_kv & 1) ^ (1 - WG))
    o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    mbarrier.arrive(theirs, count=1)
    acc = warpgroup_mma_wait(0, deps=[o_tok])
    mbarrier.arrive(empty_bars.index(last), count=1)

    out = acc / gl.convert_layout(l_i, o_rows)[:, None]
    rows = q_row + WG * HALF_M + gl.arange(0, HALF_M, layout=o_rows)
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
    gl.store(o_ptr + rows.to(gl.int64)[:, None] * HEAD_D + cols[None, :], out.to(gl.bfloat16))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(lse_ptr + q_row + WG * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, s_layout)), lse)


@gluon.jit
def _consumer_0(q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv,
                qk_scale):
    _consumer(q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv, qk_scale, 0)


@gluon.jit
def _consumer_1(q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv,
                qk_scale):
    _consumer(q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv, qk_scale, 1)


@gluon.jit
def attn_fwd_ws(q_desc, k_desc, v_desc, o_ptr, lse_ptr, S, qk_scale, STAGES: gl.constexpr):
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = k_desc.block_type.shape[1]
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    q_row = pid_bh * S + pid_m * (2 * HALF_M)
    kv_row = pid_bh * S
    n_kv = S // BLOCK_N
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [2, HALF_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)  # both consumer groups release a stage
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    bars = (q_bar, k_bars, v_bars, empty_bars, turn_bars)
    common = (q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, bars, q_row, kv_row, n_kv, qk_scale)
    gl.warp_specialize([
        (_consumer_0, common),
        (_consumer_1, common),
        (_producer, common),
    ], [4, 1], [232, 40])


def descriptors(q, k, v, block_n: int):
    B, H, S, D = q.shape
    q2, k2, v2 = (t.reshape(B * H * S, D) for t in (q, k, v))
    half = HALF_M.value
    q_layout = gl.NVMMASharedLayout.get_default_for([half, D], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, D], gl.bfloat16)
    return (TensorDescriptor.from_tensor(q2, [half, D], q_layout),
            TensorDescriptor.from_tensor(k2, [block_n, D], kv_layout),
            TensorDescriptor.from_tensor(v2, [block_n, D], kv_layout))


def launch_args(q, k, v, scale=None, block_n=128, stages=2):
    B, H, S, D = q.shape
    assert q.dtype == torch.bfloat16 and S % 128 == 0 and D in (64, 128) and q.is_contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    grid = (S // (2 * HALF_M.value), B * H)
    args = (*descriptors(q, k, v, block_n), out, lse, S, scale * LOG2E)
    return grid, args, dict(STAGES=stages, num_warps=4), out, lse


def forward(q, k, v, scale=None, block_n=128, stages=2):
    grid, args, kwargs, out, lse = launch_args(q, k, v, scale, block_n, stages)
    attn_fwd_ws[grid](*args, **kwargs)
    return out, lse


def compile_only(shape, block_n, stages) -> None:
    """Compile for sm_90 here (no GPU) and print registers and spills per thread."""
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    import sass
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    from flashgen import parallel

    B, H, S, D = shape
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16) for _ in range(3))
    grid, args, kwargs, _, _ = launch_args(q, k, v, None, block_n, stages)
    target = GPUTarget("cuda", 90, 32)

    src, options = parallel.launch_source(attn_fwd_ws, args, kwargs, target)
    compiled = triton_compile(src, target=target, options=options.__dict__)
    regs, spills = sass.resources(compiled)
    counts = sass.mix(sass.cuobjdump(compiled, "-sass"))
    print(f"attn_fwd_ws D{D} BLOCK_N {block_n} stages {stages}: {regs} registers, {spills} bytes spilled, "
          f"shared {compiled.metadata.shared} bytes, {dict(counts)}")


def check(B, H, S, D, stages) -> None:
    """The prototype against float64 at a small shape."""
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = forward(q, k, v, stages=stages)
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    ref = torch.softmax(logits, -1) @ v.double()
    err = float((out.double() - ref).norm() / ref.norm())
    lse_err = float((lse.double() - torch.logsumexp(logits, -1)).abs().max())
    print(f"{B}x{H}x{S}x{D} stages {stages}: relative error against float64 {err:.2e}, lse {lse_err:.1e}")


def timed(B, H, S, D, stages_list) -> None:
    """Forward ms and TF/s: the prototype (per stage count), flashgen, flex and cuDNN, one process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    import flashgen as fg

    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attn, flex = fg.compile(), torch.compile(flex_attention)
    ref = attn(q, k, v).float()
    rows = {}
    for stages in stages_list:
        out, _ = forward(q, k, v, stages=stages)
        err = float((out.float() - ref).norm() / ref.norm())
        rows[f"gluon, {stages} stages (vs flashgen {err:.1e})"] = lambda stages=stages: forward(q, k, v, stages=stages)
    rows["flashgen"] = lambda: attn(q, k, v)
    rows["flex"] = lambda: flex(q, k, v)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    rows["cuDNN SDPA"] = cudnn
    flops = 4 * B * H * S * S * D
    print(f"{B}x{H}x{S}x{D} bf16 forward, median of do_bench")
    for name, fn in rows.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        print(f"  {name:<40} {ms:8.3f} ms {flops / ms * 1e-9:8.1f} TF/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--shapes", default="4x16x8192x128,8x16x4096x64")
    p.add_argument("--stages", default="2", help="comma-separated stage counts to time")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]  # ("": checks only)
    stages_list = [int(s) for s in args.stages.split(",")]
    if args.compile_only:
        for shape in shapes:
            for stages in stages_list:
                compile_only(shape, 128, stages)
        return 0
    if not torch.cuda.is_available():
        print("proto_gluon_forward: no CUDA device")
        return 0
    for shape in [(1, 2, 256, 128), (2, 3, 384, 64)]:
        check(*shape, stages_list[0])
    for shape in shapes:
        timed(*shape, [s for s in stages_list if shape[3] < 128 or s <= 3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
