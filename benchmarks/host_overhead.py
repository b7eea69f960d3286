"""Host time per call of cached variants at a tiny shape (the launch path, not the GPU).

    PYTHONPATH=. python3 benchmarks/host_overhead.py [--profile]

B=1, H=1, S=128, D=64, bf16, no grad: causal (closed-form band) and a causal document mask
(block-map runs). Median wall time of ``attn(q, k, v)`` over 2000 calls, without waiting for the
GPU; then the same for a training step of each (``attn(q, k, v).backward(dout)``, q, k, v
requiring grad), to compare with the GPU time of a step at the suite's shapes (a step whose host
time exceeds its GPU time measures the host); then the same through ``torch.compile(flex_attention)``
for the peer's figure. ``--profile`` prints the top of a cProfile of the document variant's
training steps by own time.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402


def median_us(fn, calls: int = 2000) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def flex_peer(q, k, v, doc, leaves, dout) -> None:
    """The same calls and steps through ``torch.compile(flex_attention)``, block masks built
    beforehand (as a model reuses them): the peer's host time per call."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("flex       flex_attention is not available")
        return
    flex = torch.compile(flex_attention)
    masks = {"causal": lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
             "document": lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)}
    S = q.shape[2]
    for name, mask in masks.items():
        block_mask = create_block_mask(mask, None, None, S, S, device="cuda")
        with torch.no_grad():
            print(f"flex {name:<5} {median_us(lambda bm=block_mask: flex(q, k, v, block_mask=bm)):7.1f} µs per call")

        def step(bm=block_mask):
            flex(*leaves, block_mask=bm).backward(dout)
            for t in leaves:
                t.grad = None
        print(f"flex {name:<5} {median_us(step, calls=500):7.1f} µs per forward+backward step")


def main() -> int:
    if not torch.cuda.is_available():
        print("host_overhead: no CUDA device")
        return 0
    import flashgen as fg

    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(2, device="cuda"), torch.tensor([50, 78], device="cuda"))
    variants = {"causal": fg.compile(mask_mod=fg.mods.causal),
                "document": fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)}
    with torch.no_grad():
        for name, attn in variants.items():
            print(f"{name:<10} {median_us(lambda attn=attn: attn(q, k, v)):7.1f} µs per call (median)")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    for name, attn in variants.items():
        def step(attn=attn):
            attn(*leaves).backward(dout)
            for t in leaves:
                t.grad = None
        print(f"{name:<10} {median_us(step, calls=500):7.1f} µs per forward+backward step (median)")
    flex_peer(q, k, v, doc, leaves, dout)
    if "--profile" in sys.argv[1:]:
        attn = variants["document"]

        def steps():
            for _ in range(500):
                attn(*leaves).backward(dout)
                for t in leaves:
                    t.grad = None

        print(suite.own_time_profile(steps, 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
