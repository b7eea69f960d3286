"""Prototype: the next tile's logits issued before this tile's softmax (FlashAttention-3's
overlap within a warp group), in the forward and in the dQ pass of plain attention.

    python3 benchmarks/proto_overlap.py              # GPU: check, then time next to the plain loops
    python3 benchmarks/proto_overlap.py --sass       # offline: registers and SASS mix for sm_90
    TRITON_INTERPRET=1 python3 benchmarks/proto_overlap.py --check-only --shape 1,2,128,64

The generated kernels' loop, as ``proto_tma_backward.fwd``, waits for q·kᵀ, then runs the softmax
(exp2 on the MUFU unit), then issues p·v: the tensor cores idle during the softmax, because
Triton 3.6 keeps one CTA of two warp groups per SM (~176 registers) and both groups reach the
softmax together. Here the loop carries the logits: iteration j issues q·k_{j+1}ᵀ (asynchronous
wgmma), then computes the softmax of tile j while the tensor cores run it. Offline (sm_90) the
forward's SASS interleaves the next tile's HGMMA with this tile's MUFU.EX2; registers 174 -> 220.
The dQ pass carries s and dP of the next tile (and that tile's kᵀ for dS·k).
Question (#7): how much of the softmax does this hide on the H200? Prediction in PERFLOG
(eleventh session).
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proto_tma_backward as two  # noqa: E402  (the plain loops, the reference, _rows)

LOG2E = tl.constexpr(1.4426950408889634)
_rows = two._rows


@triton.jit
def _online_softmax(qk, v, acc, m_i, l_i, qk_scale):
    s = qk * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def fwd_overlap(Q, K, V, Out, LSE, sm_scale, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Full attention; S a multiple of BLOCK_N (a prototype)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = _rows(Q + base, offs_m, S, HEAD_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    qk = tl.dot(q, tl.trans(_rows(K + base, offs_n, S, HEAD_D)))
    for start_n in range(BLOCK_N, S, BLOCK_N):
        qk_next = tl.dot(q, tl.trans(_rows(K + base, start_n + offs_n, S, HEAD_D)))  # issued, not waited for
        v = _rows(V + base, start_n - BLOCK_N + offs_n, S, HEAD_D)
        acc, m_i, l_i = _online_softmax(qk, v, acc, m_i, l_i, qk_scale)
        qk = qk_next
    acc, m_i, l_i = _online_softmax(qk, _rows(V + base, S - BLOCK_N + offs_n, S, HEAD_D), acc, m_i, l_i, qk_scale)
    tl.store(Out + base + offs_m[:, None] * HEAD_D + tl.arange(0, HEAD_D)[None, :],
             (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=offs_m[:, None] < S)
    tl.store(LSE + bh.to(tl.int64) * S + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=offs_m < S)


@triton.jit
def _dq_step(s, dp, kt, dq, lse, delta, qk_scale):
    p = tl.exp2(s * qk_scale - lse[:, None])
    ds = (p * (dp - delta[:, None])).to(kt.dtype)
    return tl.dot(ds, tl.trans(kt), dq)


@triton.jit
def bwd_dq_overlap(Q, K, V, DO, DQ, LSE, DELTA, Out, sm_scale, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The dQ pass (delta computed here, as flashgen's); S a multiple of BLOCK_N."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    q_in = offs_m < S
    q = _rows(Q + base, offs_m, S, HEAD_D)
    do = _rows(DO + base, offs_m, S, HEAD_D)
    o = _rows(Out + base, offs_m, S, HEAD_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, delta, mask=q_in)
    lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=q_in, other=float("inf")) * LOG2E
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    kt = tl.load(K + base + offs_n[None, :] * HEAD_D + offs_d[:, None])
    vt = tl.load(V + base + offs_n[None, :] * HEAD_D + offs_d[:, None])
    s = tl.dot(q, kt)
    dp = tl.dot(do, vt)
    for start_n in range(BLOCK_N, S, BLOCK_N):
        kt_next = tl.load(K + base + (start_n + offs_n)[None, :] * HEAD_D + offs_d[:, None])
        vt_next = tl.load(V + base + (start_n + offs_n)[None, :] * HEAD_D + offs_d[:, None])
        s_next = tl.dot(q, kt_next)
        dp_next = tl.dot(do, vt_next)
        dq = _dq_step(s, dp, kt, dq, lse, delta, qk_scale)
        s, dp, kt = s_next, dp_next, kt_next
    dq = _dq_step(s, dp, kt, dq, lse, delta, qk_scale)
    tl.store(DQ + base + offs_m[:, None] * HEAD_D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_in[:, None])


CONFIGS = {  # kernel -> (BLOCK_M, BLOCK_N, warps, stages) tried; the plain loops' defaults first
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
}


def launch(name: str, overlap: bool, cfg, q, k, v, do, o, dq, lse, delta):
    B, H, S, D = q.shape
    grid = (triton.cdiv(S, cfg[0]), B * H)
    common = dict(HEAD_D=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
    if name == "fwd":
        if overlap:
            return lambda: fwd_overlap[grid](q, k, v, o, lse, D**-0.5, S, **common)
        return lambda: two.fwd[grid](q, k, v, o, lse, D**-0.5, S, TMA=False, EVEN=True, **common)
    if overlap:
        return lambda: bwd_dq_overlap[grid](q, k, v, do, dq, lse, delta, o, D**-0.5, S, **common)
    return lambda: two.bwd_dq[grid](q, k, v, do, dq, lse, delta, o, D**-0.5, S, TMA=False, EVEN=True, **common)


def sass_table() -> int:
    print(two.sass_header("kernel           config", 34))
    for name, kernels in (("fwd", (two.fwd, fwd_overlap)), ("dq", (two.bwd_dq, bwd_dq_overlap))):
        for cfg in CONFIGS[name]:
            for kernel in kernels:
                constants = dict(HEAD_D=128, BLOCK_M=cfg[0], BLOCK_N=cfg[1], TMA=False, EVEN=True)
                print(two.sass_line(f"{kernel.fn.__name__:<16} {str(cfg)}", 34,
                                    *two.compile_sm90(kernel, two.TYPES, constants, cfg)))
    return 0


def main(argv=None) -> int:
    args = two.parse_args(__doc__, argv)
    if args.sass:
        return sass_table()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    rows = []
    for shape in args.shapes:
        B, H, S, D = shape
        (q, k, v, do), (qs, ks, vs, dos), ref = two.inputs(shape, dev)
        small = qs.shape
        for name in ("fwd", "dq"):
            for cfg in [(32, 32, 4, 1)] if interp else CONFIGS[name]:
                for overlap in (False, True):
                    bufs = [torch.full_like(qs, float("nan")), torch.full_like(qs, float("nan")),
                            torch.empty(small[:3], dtype=torch.float32, device=dev)]
                    bufs.append(torch.empty_like(bufs[2]))
                    if name == "dq":  # (o and lse from the plain forward)
                        launch("fwd", False, (32, 32, 4, 1) if interp else (128, 64, 8, 3), qs, ks, vs, dos, *bufs)()
                    launch(name, overlap, cfg, qs, ks, vs, dos, *bufs)()
                    got, want = (bufs[0], ref[0]) if name == "fwd" else (bufs[1], ref[1])
                    err = two.rel(got, want)
                    ok = err < 2e-2  # (bf16 operands: ~2e-3)
                    print(f"check {shape} {name} {cfg} overlap={overlap}: rel err {err:.1e}" + ("" if ok else "  FAIL"),
                          flush=True)
                    if not ok:
                        return 1
                    if args.check_only or dev == "cpu":
                        continue
                    from triton.testing import do_bench

                    bufs = [torch.empty_like(q), torch.empty_like(q), torch.empty(B, H, S, dtype=torch.float32,
                                                                                    device=dev)]
                    bufs.append(torch.empty_like(bufs[2]))
                    launch("fwd", False, (128, 64, 8, 3), q, k, v, do, *bufs)()
                    f = launch(name, overlap, cfg, q, k, v, do, *bufs)
                    f()
                    ms = do_bench(f)
                    flops = 4 * B * H * S * S * D * (1 if name == "fwd" else 0.75)  # dQ: 3 of the 4 fwd-sized products
                    rows.append((shape, name, cfg, overlap, ms, flops / ms * 1e-9))
    if rows:
        print(f"\n{'shape':<19} {'kernel':<4} {'config':<17} {'overlap':<8} {'ms':>8} {'TF/s':>7}")
        for shape, name, cfg, overlap, ms, tf in rows:
            print(f"{str(shape):<19} {name:<4} {str(cfg):<17} {str(overlap):<8} {ms:8.3f} {tf:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
