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
    rows.append(_training_step(fg, device, torch.float32))
    print(f"{'variant':<22} {'rel err vs fp64':>16} {'first call s':>13} {'time ms':>9}")
    ok = True
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for label, err, first, ms in rows:
        flag = "" if err < tol else "  <-- above tolerance"
        ok &= err < tol
        print(f"{label:<22} {err:>16.2e} {first:>13.2f} {ms:>9.3f}{flag}")
    return 0 if ok else 1


def _training_step(fg, device: str, dtype):
    """Gradients through a learnable relative-position table, checked against autograd on the
    float64 reference: (label, worst relative error, first-call seconds, fwd+bwd ms)."""
    import torch

    B, H, S, D = 1, 2, 128, 32
    table = (0.1 * torch.randn(H, 2 * S - 1, device=device)).requires_grad_()
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    attn = fg.compile(score_mod=fg.mods.relative_bias(table), mask_mod=fg.mods.causal)
    t0 = time.perf_counter()
    attn(q, k, v).float().square().sum().backward()
    first = time.perf_counter() - t0
    got = [t.grad.clone() for t in (q, k, v, table)]
    table.grad = None
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fg.attention_reference(qd, kd, vd, fg.mods.relative_bias(table), fg.mods.causal)
    ref.square().sum().backward()
    want = [qd.grad, kd.grad, vd.grad, table.grad]
    err = max(((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want))
    t0 = time.perf_counter()
    attn(q, k, v).float().square().sum().backward()
    return "grads, learnable table", err, first, (time.perf_counter() - t0) * 1e3


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
