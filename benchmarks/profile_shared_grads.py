"""Where a learnable bias shared by the batch spends its backward (PERFLOG, fifteenth session).

    PYTHONPATH=. python3 benchmarks/profile_shared_grads.py [--shape 4,16,8192,128] [--sums]

A dense bias [H, S, S] that requires grad costs ~12 ms more per fwd+bwd step than the same bias
frozen at 4x16x8192x128 (fp32 atomic adds from the dK/dV pass), where a bias [B, H, S, S] costs
~2 ms more (its gradient stored by the dQ pass). This prints the CUDA kernels of one step
(torch.profiler, us per step) with the frozen and the learnable bias, for the flashgen on
``PYTHONPATH``. ``--sums`` also times ways to sum a [B, H, S, S] bf16 buffer over b (the step
after the dQ pass stores each batch entry's part), against the bytes they must move. (The first
run's Triton sum, written here before ``runtime.sum_leading``, offset its parts by ``b * n`` in
int32 and summed the wrong entries past 2^31; its time, 2.6 ms, read as many bytes.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flashgen as fg  # noqa: E402


def kernels(step, steps: int = 3) -> list[tuple[str, float]]:
    """(kernel, us per step) of ``step``'s CUDA kernels, largest first."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def sums(B: int, H: int, S: int) -> None:
    from triton.testing import do_bench

    from flashgen.runtime import sum_leading

    parts = torch.randn(B, H, S, S, device="cuda", dtype=torch.bfloat16)
    moved = (B + 1) * parts[0].numel() * 2
    ways = {
        "torch sum(0)": lambda: parts.sum(0),
        "torch sum(0, dtype=float32)": lambda: parts.sum(0, dtype=torch.float32),
        "adds in fp32": lambda: sum(parts[b].float() for b in range(B)),
        "runtime.sum_leading": lambda: sum_leading(parts, 1),
        "torch.empty of the buffer": lambda: torch.empty(B, H, S, S, device="cuda", dtype=torch.bfloat16),
    }
    want = parts.float().sum(0)
    print(f"sum_leading against float32: {((sum_leading(parts, 1).float() - want).norm() / want.norm()).item():.1e}")
    print(f"sum over b of [{B}, {H}, {S}, {S}] bf16: {moved / 1e9:.1f} GB to move at least")
    for name, f in ways.items():
        ms = do_bench(f, warmup=5, rep=50, return_mode="median")
        print(f"  {name:<30} {ms:8.3f} ms  {moved / ms / 1e9:7.2f} TB/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4,16,8192,128")
    p.add_argument("--sums", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_shared_grads: no CUDA device")
        return 0
    B, H, S, D = (int(x) for x in args.shape.replace("x", ",").split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    bias = 0.5 * torch.randn(H, S, S, device="cuda", dtype=torch.bfloat16, generator=gen)
    for name, learnable in (("frozen", False), ("learnable", True)):
        b = bias.clone().requires_grad_(learnable)
        attn = fg.compile(bias=b)

        def step(attn=attn, b=b):
            for t in (q, k, v, b):
                t.grad = None
            attn(q, k, v).backward(dout)

        rows = kernels(step)
        print(f"[H, S, S] bias, {name}, {args.shape}: {sum(us for _, us in rows) / 1e3:.2f} ms of kernels per step")
        for kernel, us in rows[:8]:
            print(f"  {us / 1e3:8.3f} ms  {kernel[:90]}")
        del attn, b
        torch.cuda.empty_cache()
    if args.sums:
        del q, k, v, dout
        torch.cuda.empty_cache()
        sums(B, H, S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
