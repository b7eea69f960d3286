"""Prototype: the backward passes (and the forward) of plain attention with their streamed tiles
loaded through tensor-memory-accelerator descriptors (``tl.make_tensor_descriptor``) instead of
pointer tensors. Everything else is as flashgen's generated kernels for a mask-free variant
(``attn_bwd_dkdv``: tall KV block, query tiles streamed; ``attn_bwd_dq``: the reverse; exp2 with
log2(e) folded in), so that the A/B isolates the loads.

    python3 benchmarks/proto_tma_backward.py                 # GPU: check, then time both forms
    python3 benchmarks/proto_tma_backward.py --sass          # offline: registers and SASS mix for sm_90
    TRITON_INTERPRET=1 python3 benchmarks/proto_tma_backward.py --check-only --shape 1,2,128,64

Question it answers (#7): does TMA take enough integer work and registers off the streamed loads
to make the backward faster than flex's? Prediction in PERFLOG (tenth session).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import triton
import triton.language as tl

from flashgen import runtime

runtime._patch_interpreter_index()  # the interpreter's scalar loop bounds (--check-only on CPU)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _rows(ptr, offs, S, HEAD_D: tl.constexpr):
    """The [rows, HEAD_D] tile of one head's rows at positions ``offs`` (rows past S read 0)."""
    return tl.load(ptr + offs[:, None] * HEAD_D + tl.arange(0, HEAD_D)[None, :], mask=offs[:, None] < S, other=0.0)


@triton.jit
def fwd(Q, K, V, Out, LSE, sm_scale, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr, EVEN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    q = _rows(Q + base, offs_m, S, HEAD_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    if TMA:
        k_desc = tl.make_tensor_descriptor(K + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_N, HEAD_D])
        v_desc = tl.make_tensor_descriptor(V + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_N, HEAD_D])
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            k = _rows(K + base, offs_n, S, HEAD_D)
            v = _rows(V + base, offs_n, S, HEAD_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if not EVEN:
            s = tl.where(offs_n[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * HEAD_D + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < S)
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=offs_m < S)


@triton.jit
def bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, Out, sm_scale, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    q_in = offs_m < S
    q = _rows(Q + base, offs_m, S, HEAD_D)
    do = _rows(DO + base, offs_m, S, HEAD_D)
    o = _rows(Out + base, offs_m, S, HEAD_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, delta, mask=q_in)
    lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=q_in, other=float("inf")) * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    if TMA:
        k_desc = tl.make_tensor_descriptor(K + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_N, HEAD_D])
        v_desc = tl.make_tensor_descriptor(V + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_N, HEAD_D])
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            kt = tl.trans(k_desc.load([start_n, 0]))
            vt = tl.trans(v_desc.load([start_n, 0]))
        else:  # as the generated kernel: [D, N] tiles through transposed pointers
            kt = tl.load(K + base + offs_n[None, :] * HEAD_D + offs_d[:, None], mask=offs_n[None, :] < S, other=0.0)
            vt = tl.load(V + base + offs_n[None, :] * HEAD_D + offs_d[:, None], mask=offs_n[None, :] < S, other=0.0)
        s = tl.dot(q, kt) * sm_scale * LOG2E
        if not EVEN:
            s = tl.where(offs_n[None, :] < S, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vt)
        ds = (p * (dp - delta[:, None])).to(kt.dtype)
        dq = tl.dot(ds, tl.trans(kt), dq)
    tl.store(DQ + base + offs_m[:, None] * HEAD_D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_in[:, None])


@triton.jit
def bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, TMA: tl.constexpr, EVEN: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    kv_in = offs_n < S
    k = _rows(K + base, offs_n, S, HEAD_D)
    v = _rows(V + base, offs_n, S, HEAD_D)
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    if TMA:
        q_desc = tl.make_tensor_descriptor(Q + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_M, HEAD_D])
        do_desc = tl.make_tensor_descriptor(DO + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_M, HEAD_D])
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_in = offs_m < S
        if TMA:
            q = q_desc.load([start_m, 0])
            do = do_desc.load([start_m, 0])
        else:
            q = _rows(Q + base, offs_m, S, HEAD_D)
            do = _rows(DO + base, offs_m, S, HEAD_D)
        lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=q_in, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=q_in, other=0.0)
        qk = tl.dot(k, tl.trans(q))  # [kv, q]
        s = qk * sm_scale * LOG2E
        p = tl.exp2(s - lse[None, :])
        dv = tl.dot(p.to(do.dtype), do, dv)
        dp = tl.dot(v, tl.trans(do))
        ds = (p * (dp - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds, q, dk)
    tl.store(DK + base + offs_n[:, None] * HEAD_D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_in[:, None])
    tl.store(DV + base + offs_n[:, None] * HEAD_D + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_in[:, None])


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def launches(q, k, v, do, tma: bool, fwd_cfg, dq_cfg, dkdv_cfg) -> tuple[dict, tuple]:
    """The three passes as callables on fresh buffers (run in order: fwd, dq, dkdv), and the
    buffers (o, dq, dk, dv)."""
    B, H, S, D = q.shape
    scale = D**-0.5
    o, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse)

    def kw(cfg, block):
        return dict(HEAD_D=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1], TMA=tma, EVEN=S % cfg[block] == 0,
                    num_warps=cfg[2], num_stages=cfg[3])

    calls = {
        "fwd": lambda: fwd[(triton.cdiv(S, fwd_cfg[0]), B * H)](q, k, v, o, lse, scale, S, **kw(fwd_cfg, 1)),
        "dq": lambda: bwd_dq[(triton.cdiv(S, dq_cfg[0]), B * H)](q, k, v, do, dq, lse, delta, o, scale, S,
                                                                  **kw(dq_cfg, 1)),
        "dkdv": lambda: bwd_dkdv[(triton.cdiv(S, dkdv_cfg[1]), B * H)](q, k, v, do, dk, dv, lse, delta, scale, S,
                                                                        **kw(dkdv_cfg, 1)),
    }
    return calls, (o, dq, dk, dv)


def reference(q, k, v, do):
    q, k, v, do = (t.double().requires_grad_(t is not do) for t in (q, k, v, do))
    o = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def parse_args(doc: str, argv=None):
    """The prototypes' common command line: --shape (repeatable), --check-only, --sass."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shape", action="append", help="B,H,S,D (default: 4,16,8192,128 and 8,16,4096,64)")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--sass", action="store_true", help="offline: compile for sm_90 and print registers")
    args = p.parse_args(argv)
    args.shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or ["4,16,8192,128", "8,16,4096,64"])]
    return args


def inputs(shape, dev: str):
    """Fresh q, k, v, dO of ``shape`` (seed 0) (bf16 on a GPU; float32 in the interpreter, whose bf16 dots are
    wrong), their slice of B = 1, H = 2 and at most 256 positions, and the float64 reference of the
    slice: (o, dq, dk, dv)."""
    B, H, S, D = shape
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    full = tuple(torch.randn(B, H, S, D, dtype=dtype, device=dev) for _ in range(4))
    small = tuple(t[:1, :2, :min(S, 256)].contiguous() for t in full)
    return full, small, reference(*small)


def compile_sm90(kernel, types: dict, constants: dict, cfg):
    """``kernel`` compiled for sm_90 offline: pointer and scalar argument types by name (the rest are
    ``constants``), pointers and ``S`` divisible by 16; returns (registers, spills, SASS mix)."""
    import sass
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = kernel.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n][0] == "*" or n == "S"}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constants.items() if k in names})
    compiled = compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg[2], num_stages=cfg[3]))
    return (*sass.resources(compiled), sass.mix(sass.cuobjdump(compiled, "-sass")))


def sass_header(label: str, width: int) -> str:
    import sass

    groups = " ".join(f"{g:>7}" for g, _ in sass.GROUPS)
    return f"{label:<{width}} {'regs':>5} {'spill':>6} {groups} {'total':>6}"


def sass_line(label: str, width: int, regs, spills, counts) -> str:
    import sass

    return (f"{label:<{width}} {regs:>5} {spills:>6} " + " ".join(f"{counts[g]:>7}" for g, _ in sass.GROUPS)
            + f" {counts['total']:>6}")


TYPES = {**{n: "*bf16" for n in ("Q", "K", "V", "DO", "DQ", "DK", "DV", "Out")},
         **{n: "*fp32" for n in ("LSE", "DELTA", "DQACC")}, "sm_scale": "fp32", "S": "i32"}


CONFIGS = {  # (fwd, dq, dkdv): (BLOCK_M, BLOCK_N, warps, stages), flashgen's dense defaults first
    128: [((128, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3)),
          ((128, 128, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2)),
          ((128, 64, 8, 4), (128, 64, 8, 4), (64, 128, 8, 4))],
    64: [((128, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3)),
         ((128, 128, 8, 3), (128, 128, 8, 3), (128, 128, 8, 3)),
         ((128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 3))],
}


def time_peers(q, k, v, do) -> dict:
    """(fwd ms, fwd+bwd ms) of flashgen's generated kernels, compiled flex_attention and cuDNN SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    import flashgen as fg

    flex = torch.compile(flex_attention)

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    out = {}
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    for name, f in (("flashgen", fg.attention), ("flex", flex), ("cudnn", cudnn)):
        f(qg, kg, vg).backward(do)  # compile and warm up
        out[name] = (do_bench(functools.partial(f, qg, kg, vg)),
                     do_bench(functools.partial(_step, f, qg, kg, vg, do), grad_to_none=[qg, kg, vg]))
    return out


def _step(f, q, k, v, do):
    f(q, k, v).backward(do)


def sass_table() -> int:
    """Registers, spills and the SASS mix of each kernel in both forms, compiled for sm_90 offline."""
    print(sass_header("kernel      D tma", 17))
    for D, cfgs in CONFIGS.items():
        for kernel, cfg in zip((fwd, bwd_dq, bwd_dkdv), cfgs[0]):
            for tma in (False, True):
                constants = dict(HEAD_D=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1], TMA=tma, EVEN=True)
                print(sass_line(f"{kernel.fn.__name__:<10} {D:>3} {str(tma):<5}", 17,
                                *compile_sm90(kernel, TYPES, constants, cfg)))
    return 0


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    if args.sass:
        return sass_table()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton.set_allocator(_alloc)
    rows, peers = [], []
    for shape in args.shapes:
        B, H, S, D = shape
        (q, k, v, do), (qs, ks, vs, dos), ref = inputs(shape, dev)
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        for i, cfgs in enumerate(CONFIGS[D][:1] if interp else CONFIGS[D]):
            if interp:
                cfgs = tuple((32, 32, 4, 1) for _ in cfgs)
            for tma in (False, True):
                calls, got = launches(qs, ks, vs, dos, tma, *cfgs)
                for call in calls.values():
                    call()
                errs = [rel(g, r) for g, r in zip(got, ref)]
                ok = max(errs) < 2e-2
                print(f"check {shape} cfg{i} tma={tma}: rel err o/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs)
                      + ("" if ok else "  FAIL"), flush=True)
                if not ok:
                    return 1
                if args.check_only or dev == "cpu":
                    continue
                from triton.testing import do_bench

                calls, _ = launches(q, k, v, do, tma, *cfgs)
                for call in calls.values():
                    call()  # (lse and delta for the backward passes)
                times = {name: do_bench(call) for name, call in calls.items()}
                flops = 4 * B * H * S * S * D
                rows.append((shape, i, cfgs, tma, times, flops / times["fwd"] * 1e-9,
                             2.5 * flops / (times["dq"] + times["dkdv"]) * 1e-9))
        if not (args.check_only or dev == "cpu"):
            peers.append((shape, time_peers(q, k, v, do)))
    if rows:
        print("\npeers, same process (fwd ms, bwd ms = fwd+bwd - fwd, fwd TF/s, bwd TF/s):")
        for shape, found in peers:
            B, H, S, D = shape
            flops = 4 * B * H * S * S * D
            for name, (f, fb) in found.items():
                print(f"  {str(shape):<17} {name:<9} {f:7.3f} {fb - f:7.3f}  {flops / f * 1e-9:7.1f} "
                      f"{2.5 * flops / (fb - f) * 1e-9:7.1f}")
        print("\nshape             cfg  tma    fwd ms  dq ms  dkdv ms  fwd TF/s  bwd TF/s")
        for shape, i, cfgs, tma, t, ftf, btf in rows:
            print(f"{str(shape):<17} {i:>3}  {str(tma):<5} {t['fwd']:7.3f} {t['dq']:6.3f} {t['dkdv']:8.3f}"
                  f"  {ftf:8.1f}  {btf:8.1f}   {cfgs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
