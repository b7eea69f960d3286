"""Prototype, not library code: a plain-attention forward whose K/V tiles come through tensor
descriptors (TMA) and whose KV loop asks Triton for warp specialisation, to decide whether the
generated kernels should take that path (#7: 0.9x cuDNN on full and causal attention).

    PYTHONPATH=. python3 benchmarks/proto_ws_forward.py                 # H200: time next to flashgen, cuDNN
    PYTHONPATH=. python3 benchmarks/proto_ws_forward.py --compile-only  # any machine: sm_90 registers, spills
    TRITON_INTERPRET=1 python3 benchmarks/proto_ws_forward.py --check   # CPU: the interpreter against float64

Full and causal attention, bf16, sequence lengths that are multiples of the tiles (a prototype:
no masks beyond the causal diagonal, no score_mod, no padding). ANCHORS.md notes that on this
Triton `tl.range(..., warp_specialize=True)` compiles on sm_90 only when the loop's loads are
descriptor loads: hence the descriptors. Each configuration is (BLOCK_M, BLOCK_N, warps, stages,
warp_specialize). Prediction before the first run: the loop's loads move to a producer warp, so
the softmax of one tile overlaps the next tile's loads and matrix products; full attention at
4x16x8192x128 from 486 TF/s (flashgen now) toward cuDNN's 608, causal from 460 toward 550.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# Triton 3.6 specialises warps only at num_warps=4 (the partitions add 8 more); at 8 it compiles the
# loop as if warp_specialize were False (checked offline: identical SASS)
CONFIGS = [(128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True), (128, 128, 8, 2, False),
           (128, 64, 8, 3, False), (128, 64, 4, 3, False)]


@triton.jit
def _tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, q_lo, lo, hi, qk_scale,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, WS: tl.constexpr):
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([row0 + start_n, 0])
        s = tl.dot(q, k.T) * qk_scale
        if DIAGONAL:
            s = tl.where(offs_m[:, None] >= start_n + tl.arange(0, BLOCK_N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([row0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_ws(q_desc, k_desc, v_desc, Out, S, sm_scale, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # long rows first
    row0 = tl.program_id(1) * S  # this (batch, head)'s first row in the [B*H*S, D] views
    q_lo = pid_m * BLOCK_M
    q = q_desc.load([row0 + q_lo, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    qk_scale = sm_scale * LOG2E
    if CAUSAL and WS:  # one loop, the mask on every tile: a second loop after a specialised one fails
        # Triton 3.6's warp-specialisation pass
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, q_lo, 0, q_lo + BLOCK_M, qk_scale,
                               BLOCK_M, BLOCK_N, True, WS)
    elif CAUSAL:  # tiles left of the diagonal block without a mask, then the diagonal block's tiles
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, q_lo, 0, q_lo, qk_scale,
                               BLOCK_M, BLOCK_N, False, False)
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, q_lo, q_lo, q_lo + BLOCK_M, qk_scale,
                               BLOCK_M, BLOCK_N, True, False)
    else:
        acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_desc, v_desc, row0, q_lo, 0, S, qk_scale,
                               BLOCK_M, BLOCK_N, False, WS)
    # a pointer store: a descriptor store after the specialised loop fails Triton 3.6's warp-specialisation pass
    rows = row0 + q_lo + tl.arange(0, BLOCK_M)
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + rows[:, None] * HEAD_D + tl.arange(0, HEAD_D)[None, :], out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, cfg: tuple) -> torch.Tensor:
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, warps, stages, ws = cfg
    B, H, S, D = q.shape
    assert S % block_m == 0 and S % block_n == 0 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    out = torch.empty_like(q)

    def desc(t, rows):
        flat = t.view(B * H * S, D)
        return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, D])

    attn_fwd_ws[(S // block_m, B * H)](desc(q, block_m), desc(k, block_n), desc(v, block_n), out, S,
                                       1.0 / math.sqrt(D), HEAD_D=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                                       WS=ws, num_warps=warps, num_stages=stages)
    return out


def check_on_cpu() -> int:
    import flashgen as fg
    from flashgen import runtime

    runtime._patch_interpreter_index()  # NumPy >= 2.4 and Triton 3.6's interpreter: as flashgen's kernels need
    torch.manual_seed(0)
    worst = 0.0
    for causal in (False, True):
        q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
        for cfg in ((32, 16, 4, 2, True), (32, 32, 4, 1, False)):
            out = attention(q, k, v, causal, cfg)
            ref = fg.attention_reference(q, k, v, mask_mod=fg.mods.causal if causal else None)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            print(f"causal={causal} {cfg}: rel. err. {err:.2e}")
    return 0 if worst < 1e-4 else 1


def compile_only() -> int:
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sass

    from flashgen import parallel

    q, k, v = (torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16) for _ in range(3))
    print(f"{'config':<28} {'causal':>6} {'regs':>5} {'spill':>6}")
    for cfg in CONFIGS:
        for causal in (False, True):
            launches: list = []
            with parallel.captured(launches):
                attention(q, k, v, causal, cfg)
            (kernel, args, kwargs), = launches
            try:
                compiled = sass.compile_sm90(kernel, args, kwargs)
                regs, spills = sass.resources(compiled)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is a finding
                regs, spills = "-", f"{type(exc).__name__}: {str(exc)[:60]}"
            print(f"{str(cfg):<28} {str(causal):>6} {regs:>5} {spills:>6}")
    return 0


def time_on_gpu(shapes: list[tuple[int, int, int, int]]) -> int:
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import flashgen as fg

    def implementations(q, k, v, causal: bool) -> dict:
        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return sdpa(q, k, v, is_causal=causal)

        mask = fg.mods.causal if causal else None
        calls = {"flashgen": lambda: fg.attention(q, k, v, mask_mod=mask), "cudnn": cudnn}
        calls.update({str(cfg): lambda cfg=cfg: attention(q, k, v, causal, cfg) for cfg in CONFIGS})
        return calls

    rows = []
    for B, H, S, D in shapes:
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            flop = 4.0 * B * H * S * S * D * ((S + 1) / (2 * S) if causal else 1.0)
            calls = implementations(q, k, v, causal)
            ref = calls["flashgen"]().float()
            for name, fn in calls.items():
                try:
                    err = ((fn().float() - ref).norm() / ref.norm()).item()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    rows.append((f"{B}x{H}x{S}x{D}", causal, name, f"{flop / ms / 1e9:.1f}", f"{err:.1e}"))
                except Exception as exc:  # noqa: BLE001
                    rows.append((f"{B}x{H}x{S}x{D}", causal, name, "-", f"{type(exc).__name__}: {str(exc)[:60]}"))
                print(*rows[-1], flush=True)
    print("\nshape, causal, implementation, TF/s, rel. err. against flashgen")
    for row in rows:
        print(*row)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="the interpreter against float64 (CPU)")
    p.add_argument("--compile-only", action="store_true", help="sm_90 registers and spills, no GPU needed")
    p.add_argument("--config", type=int, default=None,
                   help="time only CONFIGS[i] (a hang in one configuration then stops only that run)")
    p.add_argument("--shape", default="4,16,8192,128", help="B,H,S,D for --config (default 4,16,8192,128)")
    args = p.parse_args(argv)
    if args.config is not None:
        CONFIGS[:] = [CONFIGS[args.config]]
    if args.check:
        return check_on_cpu()
    if args.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        print("proto_ws_forward: no CUDA device (try --check or --compile-only)")
        return 0
    if args.config is not None:
        return time_on_gpu([tuple(int(x) for x in args.shape.split(","))])
    return time_on_gpu([(4, 16, 8192, 128), (8, 16, 4096, 64)])


if __name__ == "__main__":
    sys.exit(main())
