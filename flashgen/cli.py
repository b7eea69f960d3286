"""The ``flashgen`` command line (also ``python -m flashgen``)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    import flashgen as fg

    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if cuda:
        B, H, S, D, dtype = 4, 16, 4096, 128, torch.bfloat16
    else:
        B, H, S, D, dtype = 1, 2, 128, 64, torch.float32
    torch.manual_seed(0)
    slopes = fg.mods.alibi_slopes(H, device=device)
    doc_ids = (torch.arange(S, device=device) * 4) // S  # 4 documents
    window = 256 if cuda else 32
    variants = {
        "full": dict(),
        "causal": dict(mask_mod=fg.mods.causal),
        f"sliding window {window}": dict(mask_mod=fg.mods.sliding_window(window)),
        "alibi + causal": dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal),
        "softcap 30 + causal": dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal),
        "document + causal": dict(mask_mod=fg.mods.document(doc_ids) & fg.mods.causal),
    }
    print(f"flashgen {fg.__version__} demo on {device} ({'compiled Triton' if cuda else 'Triton interpreter'}); "
          f"q, k, v [{B}, {H}, {S}, {D}] {str(dtype).removeprefix('torch.')}\n")
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3))
    rows = []
    for i, (label, mods) in enumerate(variants.items()):
        attn = fg.compile(**mods)
        if i < 2 or label.startswith("alibi"):
            print(f"== {label} ==")
            print(attn.explain())
            head = [line for line in attn.source("fwd").splitlines() if line.strip()][:6]
            print("generated source (head):\n  " + "\n  ".join(head) + "\n  ...\n")
        t0 = time.perf_counter()
        out = attn(q, k, v)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ref_slice = slice(0, 1)  # check one batch entry densely against the float64 reference
        ref = fg.attention_reference(q[ref_slice], k[ref_slice], v[ref_slice], **mods)
        err = ((out[ref_slice].double() - ref).norm() / ref.norm()).item()
        ms = _time(lambda attn=attn: attn(q, k, v), cuda)
        rows.append((label, err, first, ms))
    print(f"{'variant':<22} {'rel err vs fp64':>16} {'first call s':>13} {'time ms':>9}")
    ok = True
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for label, err, first, ms in rows:
        flag = "" if err < tol else "  <-- above tolerance"
        ok &= err < tol
        print(f"{label:<22} {err:>16.2e} {first:>13.2f} {ms:>9.3f}{flag}")
    return 0 if ok else 1


def _time(fn, cuda: bool) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashgen", description="flashgen: an attention compiler for Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a few variants, explain them, check and time them")
    demo.add_argument("--cpu", action="store_true", help="run on the CPU interpreter even if a GPU is present")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"flashgen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
