"""The Gluon backward's side passes at their launch parameters: delta's row dots (``runtime._row_dots``:
rows per program, warps) and dQ's cast (``runtime._cast``: elements per program, warps), each against
the copy ceiling measured in the same process (a device-to-device copy of the same bytes).

    PYTHONPATH=. python3 benchmarks/sweep_side_passes.py [--shape 4x16x8192x128]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.testing

from flashgen import runtime


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # µs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4x16x8192x128")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_side_passes: no CUDA device")
        return 0
    B, H, S, D = (int(x) for x in args.shape.split("x"))
    dout, out = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dlse = torch.randn(B, H, S, device="cuda")
    rows = B * H * S
    delta = torch.empty(B, H, S, device="cuda")
    want = (dout.float() * out.float()).sum(-1) - dlse
    src = torch.randn(B, H, S, D, device="cuda")
    dst = torch.empty(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    table = []
    big = torch.empty(2 * dout.numel(), dtype=torch.bfloat16, device="cuda")
    copy = torch.empty_like(big)
    t = bench(lambda: copy.copy_(big))
    table.append(("copy bf16 (read + write)", "", t, 2 * big.numel() * 2 / t / 1e6))
    for block in (32, 64, 128):
        for warps in (4, 8):
            def dots(block=block, warps=warps):
                runtime.kept_launch(runtime._row_dots, (triton.cdiv(rows, block),), (dout, out, dlse, delta, rows),
                                    dict(D=D, BLOCK=block, SUB=True, num_warps=warps))
            dots()
            assert torch.allclose(delta, want, rtol=1e-3, atol=1e-2)
            t = bench(dots)
            table.append(("row dots", f"BLOCK={block} warps={warps}", t, 2 * dout.numel() * 2 / t / 1e6))
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            def cast(block=block, warps=warps):
                runtime.kept_launch(runtime._cast, (triton.cdiv(src.numel(), block),), (src, dst, src.numel()),
                                    dict(BLOCK=block, num_warps=warps))
            cast()
            assert torch.equal(dst, src.to(torch.bfloat16))
            t = bench(cast)
            table.append(("cast f32 -> bf16", f"BLOCK={block} warps={warps}", t, src.numel() * 6 / t / 1e6))
    t = bench(lambda: torch.zeros(B, H, S, D, device="cuda"))
    table.append(("zeros f32 (torch)", "", t, src.numel() * 4 / t / 1e6))
    print(f"\n# {args.shape}: µs (median of do_bench), TB/s")
    for name, cfg, us, tbs in table:
        print(f"{name:<26} {cfg:<22} {us:8.1f} {tbs:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
