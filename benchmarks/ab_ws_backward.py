"""Where the warp-specialised backward's time goes (``attention_bwd_ws.py.jinja``), per variant: the
whole backward (Gluon, and flashgen's Triton kernels for comparison), and the Gluon kernel alone at
2 or 3 stages of Q/dO buffers with 1 or 2 dQ tiles in flight per consumer group
(``runtime.WS_BACKWARD_STAGES``, ``runtime.WS_DQ_BUFFERS``), also without its TMA reductions of
dQ (a wrong dQ: what the reductions cost).

    PYTHONPATH=. python3 benchmarks/ab_ws_backward.py [--shape 4x16x8192] [--variants full,causal,sliding]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import torch
import triton

import flashgen as fg
from flashgen import runtime

MASKS = {"full": None, "causal": fg.mods.causal, "sliding": fg.mods.sliding_window(1024)}


def changed(source: str, change: str) -> str:
    if change == "no dQ reduction":
        lines = [ln for ln in source.splitlines() if "_tma_reduce_add(dqa_desc" not in ln]
        return "\n".join(lines) + "\n"
    return source


def load(source: str, tag: str):
    path = Path(tempfile.mkdtemp()) / f"ws_bwd_{tag}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"ab_ws_bwd_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_call(module, q, k, v, out, lse, dout, scale, stages, dq_buffers):
    """The Gluon kernel's launch alone, as ``runtime.ws_backward`` makes it (delta and buffers made once)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, Hq, S, D = q.shape
    Hkv = k.shape[1]

    def descriptor(t, block, dtype=gl.bfloat16):
        return TensorDescriptor.from_tensor(t.view(-1, D), block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    delta = runtime.row_dots(dout, out)
    dq_sum = torch.zeros((B, Hq, S, D), dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = (S // 128, B * Hkv)
    def rows(t):
        return TensorDescriptor.from_tensor(t.view(-1), [64], gl.NVMMASharedLayout(0, 32, rank=1))

    args = (descriptor(q, [64, D]), descriptor(k, [64, D]), descriptor(v, [64, D]), descriptor(dout, [64, D]),
            descriptor(dq_sum, [64, 64], gl.float32), dk, dv, rows(lse), rows(delta), Hq, S, scale * runtime.LOG2E,
            scale)
    kw = dict(GROUP_SIZE=Hq // Hkv, STAGES=stages, DQ_BUFFERS=dq_buffers, num_warps=4)
    return lambda: module.attn_bwd_ws[grid](*args, **kw)


def variant_rows(name: str, B: int, H: int, S: int, D: int, scale: float, stages: list[int]) -> list:
    rows = []
    mask = MASKS[name]
    attn = fg.compile(mask_mod=mask)
    q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                     for i in range(4))
    out, lse = attn(q, k, v, return_lse=True)
    grads = {}
    for ws in (True, False):
        runtime.WS_BACKWARD = ws
        attn.last_tiles = {}
        grads[ws] = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        if ("dQ, dK/dV" in attn.last_tiles) != ws:
            print(f"{name}: WS_BACKWARD={ws} but the backward took {attn.last_tiles}")
        ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                     warmup=10, rep=100, return_mode="median")
        rows.append((name, "backward, " + ("Gluon one pass" if ws else "Triton two passes"), ms))
    runtime.WS_BACKWARD = True
    errs = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(grads[True], grads[False])]
    print(f"{name}: Gluon against Triton gradients, relative: " + ", ".join(f"{e:.1e}" for e in errs))
    source = attn.source("bwd_ws")
    tensors = (q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dout)
    configs = [("", n, b) for n in stages for b in (1, 2)] + [("no dQ reduction", runtime.WS_BACKWARD_STAGES, 2)]
    for change, n_stages, dq_buffers in configs:
        module = load(changed(source, change), f"{name}_{n_stages}_{dq_buffers}_{change.replace(' ', '_')}")
        call = kernel_call(module, *tensors, scale, n_stages, dq_buffers)
        try:
            call()
        except triton.runtime.errors.OutOfResources as e:  # (more shared memory than a block has)
            print(f"{name}: {n_stages} stages, {dq_buffers} dQ buffers: {e}")
            continue
        ms = triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median")
        what = f"kernel alone, {n_stages} stages, {dq_buffers} dQ buffers" + (f", {change}" if change else "")
        rows.append((name, what, ms))
    ms = triton.testing.do_bench(lambda: runtime.row_dots(dout, out), warmup=10, rep=100, return_mode="median")
    rows.append((name, "delta (row_dots)", ms))
    buf = torch.zeros((B, H, S, D), dtype=torch.float32, device="cuda")
    ms = triton.testing.do_bench(lambda: buf.zero_(), warmup=10, rep=100, return_mode="median")
    rows.append((name, "zero the dQ buffer", ms))
    ms = triton.testing.do_bench(lambda: buf.to(torch.bfloat16), warmup=10, rep=100, return_mode="median")
    rows.append((name, "dQ buffer to bf16", ms))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x16x8192x128", help="BxHxSxD (D 64 or 128)")
    p.add_argument("--stages", default="2,3", help="the stage counts to time (with 1 and 2 dQ buffers)")
    p.add_argument("--variants", default="full,causal,sliding")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_ws_backward: no CUDA device")
        return 0
    B, H, S, D = (int(x) for x in args.shape.split("x"))
    scale = 1 / math.sqrt(D)
    stages = [int(x) for x in args.stages.split(",")]
    rows = [row for name in args.variants.split(",") for row in variant_rows(name, B, H, S, D, scale, stages)]
    print(f"\n{B}x{H}x{S}x{D} bf16, median ms of do_bench")
    print("| variant | what | ms |\n|---|---|---:|")
    for name, what, ms in rows:
        print(f"| {name} | {what} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
