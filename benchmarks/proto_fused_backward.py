"""Prototype: the backward of plain attention in one pass over (KV block, query block) pairs, dQ
summed into a float32 buffer by reductions in L2 (FlashAttention-2/3's scheme), against
flashgen's two passes (a dK/dV pass and a dQ pass that recomputes the logits).

Two passes run seven matrix products per pair of tiles (dK/dV pass: S^T, dP^T, dV, dK; dQ pass: S,
dP, dQ); one pass runs five (S^T, dP^T, dV, dK, dQ), and pays for it with dQ's read-add-write in
L2 per pair: [BLOCK_M, D] float32 per pair, ~17 GB at 4x16x8192x128 with (64, 128) tiles.

    python3 benchmarks/proto_fused_backward.py              # GPU: check, then time every form
    python3 benchmarks/proto_fused_backward.py --sass       # offline: registers and SASS mix for sm_90
    TRITON_INTERPRET=1 python3 benchmarks/proto_fused_backward.py --check-only --shape 1,2,128,64

Forms of the reduction (``REDUCE``): 0 a TMA bulk reduction of the tile (``desc.atomic_add``), 1
per-element ``tl.atomic_add`` (relaxed). ``STAGGER`` rotates each KV program's walk over the
query blocks so that programs of one head do not add into the same rows at once. Question (#7):
is the one-pass backward faster than the two passes (prototype 13.38 ms with TMA loads)?
Prediction in PERFLOG (eleventh session).
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proto_tma_backward as two  # noqa: E402  (the forward, the two passes, the reference)

LOG2E = tl.constexpr(1.4426950408889634)
_rows = two._rows


@triton.jit
def bwd_delta(Out, DO, DELTA, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(O * dO), which the two-pass form computes in its dQ pass."""
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_D
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _rows(Out + base, offs_m, S, HEAD_D).to(tl.float32)
    do = _rows(DO + base, offs_m, S, HEAD_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def bwd_fused(Q, K, V, DO, DK, DV, DQACC, LSE, DELTA, sm_scale, S, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, REDUCE: tl.constexpr, STAGGER: tl.constexpr):
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
    q_desc = tl.make_tensor_descriptor(Q + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_M, HEAD_D])
    do_desc = tl.make_tensor_descriptor(DO + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_M, HEAD_D])
    dq_desc = tl.make_tensor_descriptor(DQACC + base, [S, HEAD_D], [HEAD_D, 1], [BLOCK_M, HEAD_D])
    n_m = tl.cdiv(S, BLOCK_M)
    first = (pid_n * STAGGER) % n_m
    for i in range(0, n_m):
        start_m = ((first + i) % n_m) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_in = offs_m < S
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        lse = tl.load(LSE + bh.to(tl.int64) * S + offs_m, mask=q_in, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + bh.to(tl.int64) * S + offs_m, mask=q_in, other=0.0)
        s = tl.dot(k, tl.trans(q)) * (sm_scale * LOG2E)  # [kv, q]
        p = tl.exp2(s - lse[None, :])
        dv = tl.dot(p.to(do.dtype), do, dv)
        dp = tl.dot(v, tl.trans(do))
        ds = (p * (dp - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds, q, dk)
        dq = tl.dot(tl.trans(ds), k)  # [q, D], this KV block's share
        if REDUCE == 0:
            dq_desc.atomic_add([start_m, 0], dq)
        else:
            tl.atomic_add(DQACC + base + offs_m[:, None] * HEAD_D + offs_d[None, :], dq, mask=q_in[:, None],
                          sem="relaxed")
    tl.store(DK + base + offs_n[:, None] * HEAD_D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_in[:, None])
    tl.store(DV + base + offs_n[:, None] * HEAD_D + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_in[:, None])


@triton.jit
def dq_convert(DQACC, DQ, sm_scale, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(DQACC + offs, mask=offs < N)
    tl.store(DQ + offs, (x * sm_scale).to(DQ.dtype.element_ty), mask=offs < N)


def forward(q, k, v, cfg):
    """(o, lse) from the prototype's forward."""
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    two.fwd[(triton.cdiv(S, cfg[0]), B * H)](q, k, v, o, lse, D**-0.5, S, HEAD_D=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1],
                                            TMA=True, EVEN=S % cfg[1] == 0, num_warps=cfg[2], num_stages=cfg[3])
    return o, lse


def launches(q, k, v, do, o, lse, cfg, reduce: int, stagger: int):
    """The one-pass backward as callables: delta, zeroed accumulator + fused pass, convert."""
    B, H, S, D = q.shape
    scale = D**-0.5
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    delta = torch.empty_like(lse)
    dqacc = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    BM, BN, warps, stages = cfg
    N = dqacc.numel()

    def run():
        bwd_delta[(triton.cdiv(S, 128), B * H)](o, do, delta, S, HEAD_D=D, BLOCK_M=128)
        dqacc.zero_()
        bwd_fused[(triton.cdiv(S, BN), B * H)](q, k, v, do, dk, dv, dqacc, lse, delta, scale, S, HEAD_D=D,
                                               BLOCK_M=BM, BLOCK_N=BN, REDUCE=reduce, STAGGER=stagger,
                                               num_warps=warps, num_stages=stages)
        dq_convert[(triton.cdiv(N, 4096),)](dqacc, dq, scale, N, BLOCK=4096)

    def fused_only():
        bwd_fused[(triton.cdiv(S, BN), B * H)](q, k, v, do, dk, dv, dqacc, lse, delta, scale, S, HEAD_D=D,
                                               BLOCK_M=BM, BLOCK_N=BN, REDUCE=reduce, STAGGER=stagger,
                                               num_warps=warps, num_stages=stages)

    return run, fused_only, (dq, dk, dv)


FORMS = [  # (cfg, REDUCE, STAGGER)
    ((64, 128, 8, 2), 0, 0), ((64, 128, 8, 2), 0, 2), ((64, 128, 8, 2), 1, 2),
    ((64, 128, 8, 3), 0, 2), ((64, 64, 4, 2), 0, 1), ((64, 64, 4, 3), 0, 1),
]


def sass_table() -> int:
    print(two.sass_header("form", 28))
    for D in (128, 64):
        for cfg, reduce, stagger in FORMS:
            constants = dict(HEAD_D=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1], REDUCE=reduce, STAGGER=stagger)
            print(two.sass_line(f"D{D} {cfg} r{reduce} s{stagger}", 28,
                                *two.compile_sm90(bwd_fused, two.TYPES, constants, cfg)))
    return 0


def main(argv=None) -> int:
    args = two.parse_args(__doc__, argv)
    if args.sass:
        return sass_table()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton.set_allocator(two._alloc)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    rows = []
    for shape in args.shapes:
        B, H, S, D = shape
        (q, k, v, do), (qs, ks, vs, dos), ref = two.inputs(shape, dev)
        fwd_cfg = (32, 32, 4, 1) if interp else (128, 64, 8, 3)
        forms = [((32, 32, 4, 1), 1, s) for s in (0, 1)] if interp else FORMS  # (no TMA reductions there)
        for cfg, reduce, stagger in forms:
            if D == 128 and cfg[1] == 64 and cfg[2] == 4 and not interp:
                continue
            if D == 64 and cfg[1] == 128 and cfg[3] == 3:
                continue
            o, lse = forward(qs, ks, vs, fwd_cfg)
            run, _, got = launches(qs, ks, vs, dos, o, lse, cfg, reduce, stagger)
            run()
            errs = [two.rel(g, r) for g, r in zip(got, ref[1:])]
            ok = max(errs) < 2e-2
            print(f"check {shape} {cfg} reduce={reduce} stagger={stagger}: rel err dq/dk/dv "
                  + " ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"), flush=True)
            if not ok:
                return 1
            if args.check_only or dev == "cpu":
                continue
            from triton.testing import do_bench

            o, lse = forward(q, k, v, (128, 64, 8, 3))
            run, fused_only, _ = launches(q, k, v, do, o, lse, cfg, reduce, stagger)
            run()
            t_all, t_fused = do_bench(run), do_bench(fused_only)
            rows.append((shape, cfg, reduce, stagger, t_all, t_fused, 2.5 * 4 * B * H * S * S * D / t_all * 1e-9))
        if not (args.check_only or dev == "cpu"):  # the two-pass prototype, same process
            calls, _ = two.launches(q, k, v, do, True, (128, 64, 8, 3), (128, 64, 8, 3),
                                    (64, 128, 8, 3) if D == 128 else (64, 64, 4, 3))
            for call in calls.values():
                call()
            t2 = do_bench(calls["dq"]) + do_bench(calls["dkdv"])
            rows.append((shape, "two passes", "-", "-", t2, float("nan"), 2.5 * 4 * B * H * S * S * D / t2 * 1e-9))
    if rows:
        print(f"\n{'shape':<17} {'form':<18} {'reduce':>6} {'stagger':>7} {'bwd ms':>8} {'pass ms':>8} {'bwd TF/s':>9}")
        for shape, cfg, reduce, stagger, t_all, t_fused, tf in rows:
            print(f"{str(shape):<17} {str(cfg):<18} {reduce:>6} {stagger:>7} {t_all:8.3f} {t_fused:8.3f} {tf:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
