"""The ``flashgen`` command line (also ``python -m flashgen``)."""

from __future__ import annotations

import argparse
import os
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


# ---------------------------------------------------------------------------------------------
# SPEC: a library variant (``causal``, ``sliding_window:512``) or ``path/to/file.py:name``

LIBRARY = {
    # name: (what it is, default argument)
    "full": ("no mask, no score_mod", None),
    "causal": ("causal mask", None),
    "sliding_window": ("causal sliding window of W keys (sliding_window:W)", 256),
    "prefix_lm": ("prefix LM: the first N keys are visible to every query (prefix_lm:N)", 256),
    "chunked": ("attention within chunks of C positions (chunked:C)", 256),
    "document": ("causal document mask, N documents of equal length (document:N)", 4),
    "alibi": ("ALiBi + causal", None),
    "softcap": ("soft-capping tanh(s / cap) * cap + causal (softcap:CAP)", 30.0),
    "relative_bias": ("learnable-style relative-position table + causal", None),
    "t5_bias": ("T5's bucketed relative-position bias, 32 buckets up to distance D (t5_bias:D)", 128),
}


class CliError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise CliError(f"--shape {text!r}: expected four positive integers B,H,S,D (e.g. 4,16,8192,128)")
    return dims  # type: ignore[return-value]


def resolve(spec: str, shape: tuple[int, int, int, int], device: str) -> tuple[str, dict]:
    """(label, keyword arguments of fg.compile) for a SPEC at a shape."""
    import torch

    import flashgen as fg

    B, H, S, D = shape
    if ".py:" in spec or spec.endswith(".py"):
        return _from_file(spec)
    name, _, arg = spec.partition(":")
    if name not in LIBRARY:
        raise CliError(f"unknown SPEC {spec!r}: use one of {', '.join(LIBRARY)} (some take :ARG) "
                       "or path/to/file.py:name")
    default = LIBRARY[name][1]
    if arg and default is None:
        raise CliError(f"{name} takes no argument, got {spec!r}")
    try:
        value = type(default)(arg) if arg else default
    except ValueError:
        raise CliError(f"{spec!r}: the argument of {name} must be a {type(default).__name__}") from None
    m = fg.mods
    if name == "full":
        return name, {}
    if name == "causal":
        return name, dict(mask_mod=m.causal)
    if name == "sliding_window":
        return f"{name}:{value}", dict(mask_mod=m.sliding_window(value))
    if name == "prefix_lm":
        return f"{name}:{value}", dict(mask_mod=m.prefix_lm(value))
    if name == "chunked":
        return f"{name}:{value}", dict(mask_mod=m.chunked(value))
    if name == "document":
        doc = (torch.arange(S, device=device) * value) // S
        return f"{name}:{value}", dict(mask_mod=m.document(doc) & m.causal)
    if name == "alibi":
        return name, dict(score_mod=m.alibi(m.alibi_slopes(H, device=device)), mask_mod=m.causal)
    if name == "softcap":
        return f"{name}:{value:g}", dict(score_mod=m.softcap(value), mask_mod=m.causal)
    if name == "t5_bias":
        return f"{name}:{value}", dict(score_mod=m.t5_bias(0.5 * torch.randn(H, 32, device=device), value))
    table = 0.1 * torch.randn(H, 2 * S - 1, device=device)
    return name, dict(score_mod=m.relative_bias(table), mask_mod=m.causal)


def _from_file(spec: str) -> tuple[str, dict]:
    import importlib.util
    import inspect
    from pathlib import Path

    import flashgen as fg
    from flashgen.spec import Bias, MaskMod, ScoreMod

    path, _, attr = spec.rpartition(":") if not spec.endswith(".py") else (spec, "", "")
    if not attr:
        raise CliError(f"{spec!r}: name the object after the file, as path/to/file.py:name")
    file = Path(path)
    if not file.is_file():
        raise CliError(f"{spec!r}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(f"flashgen_cli_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: report it in one line
        raise CliError(f"{spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise CliError(f"{spec!r}: {path} has no {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, fg.Attention):
        return attr, dict(attention=obj)
    if isinstance(obj, ScoreMod):
        return attr, dict(score_mod=obj)
    if isinstance(obj, MaskMod):
        return attr, dict(mask_mod=obj)
    if isinstance(obj, Bias):
        return attr, dict(bias=obj)
    if isinstance(obj, dict) and set(obj) <= {"score_mod", "mask_mod", "bias"}:
        return attr, dict(obj)
    if callable(obj):
        arity = len(inspect.signature(obj).parameters)
        if arity == 5:
            return attr, dict(score_mod=obj)
        if arity == 4:
            return attr, dict(mask_mod=obj)
    raise CliError(f"{spec!r}: {attr} is a {type(obj).__name__}; expected an fg.Attention, a decorated mod, a dict "
                   "of score_mod/mask_mod/bias, or a function of 5 (score_mod) or 4 (mask_mod) arguments")


def _attention(spec: str, shape, device: str):
    import flashgen as fg

    label, kwargs = resolve(spec, shape, device)
    attn = kwargs.pop("attention", None)
    return label, (attn if attn is not None else fg.compile(**kwargs))


def _dtype(name: str):
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise CliError(f"--dtype {name!r}: choose bf16, fp16 or fp32")
    return table[name]


def _need_gpu(command: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise CliError(f"'flashgen {command}' times kernels and needs a CUDA GPU; none is visible")


def _show(args: argparse.Namespace) -> int:
    _, attn = _attention(args.spec, parse_shape(args.shape), "cpu")
    try:
        print(attn.source(("bwd" if args.bwd else "fwd") + ("_ws" if args.ws else "")), end="")
    except ValueError as e:
        raise CliError(str(e)) from None
    return 0


def _explain(args: argparse.Namespace) -> int:
    import torch

    B, H, S, D = shape = parse_shape(args.shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, attn = _attention(args.spec, shape, device)
    if attn.analysis.has_mask:
        cfg = attn.forward_config((B, H, S, S), D, D, _dtype(args.dtype), device)
        attn.block_mask(B, H, S, S, (cfg.block_m, cfg.block_n), device)
    print(attn.explain())
    return 0


def _inputs(shape, dtype, device: str):
    import torch

    B, H, S, D = shape
    return [torch.randn(B, H, S, D, device=device, dtype=dtype) for _ in range(3)]


def _tune(args: argparse.Namespace) -> int:
    _need_gpu("tune")
    shape = parse_shape(args.shape)
    label, attn = _attention(args.spec, shape, "cuda")
    trials = attn.tune(*_inputs(shape, _dtype(args.dtype), "cuda"), backward=args.bwd)
    for family, rows in trials.items():
        print(f"== {label} {family}: {len(rows)} configurations ==")
        print(f"{'block_m':>8} {'block_n':>8} {'warps':>6} {'stages':>7} {'ms':>10}")
        ok = [r for r in rows if r["ms"] is not None]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        for r in sorted(rows, key=lambda r: (r["ms"] is None, r["ms"] or 0.0)):
            ms = f"{r['ms']:.4f}" if r["ms"] is not None else "failed"
            mark = "  <- best" if r is best else ""
            print(f"{r['block_m']:>8} {r['block_n']:>8} {r['num_warps']:>6} {r['num_stages']:>7} {ms:>10}{mark}")
    print("stored in the cache; later processes reuse it with fg.compile(..., autotune=True)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch
    import triton.testing

    import flashgen as fg

    _need_gpu("bench")
    B, H, S, D = shape = parse_shape(args.shape)
    dtype = _dtype(args.dtype)
    label, kwargs = resolve(args.spec, shape, "cuda")
    attn = kwargs.pop("attention", None) or fg.compile(**kwargs)
    q, k, v = _inputs(shape, dtype, "cuda")
    mask_mod = kwargs.get("mask_mod")
    density = _kept_fraction(mask_mod, S) if mask_mod is not None else 1.0
    flops = 4 * B * H * S * S * D * density
    rows = [("flashgen", lambda: attn(q, k, v))]
    if args.spec in ("full", "causal"):
        rows.append(("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=args.spec == "causal")))
    print(f"{label}: B={B} H={H} S={S} D={D} {args.dtype}, density {density:.4f} (unmasked entries of b=0, h=0)")
    for name, fn in rows:
        with torch.no_grad():
            ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"  {name:<10} {ms:8.3f} ms  {flops / ms / 1e9:8.1f} TFLOP/s")
    print("FlexAttention next to every library variant: benchmarks/bench_forward.py and bench_backward.py")
    return 0


def _kept_fraction(mask_mod, S: int) -> float:
    """Fraction of visible (q, kv) entries at b = h = 0, evaluating the mask 1024 rows at a time."""
    import torch

    kept = 0
    zero = torch.zeros((), dtype=torch.long, device="cuda")
    kv = torch.arange(S, device="cuda")[None, :]
    for start in range(0, S, 1024):
        q = torch.arange(start, min(start + 1024, S), device="cuda")[:, None]
        kept += int(torch.as_tensor(mask_mod(zero, zero, q, kv)).expand(q.shape[0], S).sum())
    return kept / (S * S)


def _cache(args: argparse.Namespace) -> int:
    from flashgen.runtime import cache_dir, cache_entries, clear_cache

    if args.action == "clear":
        print(f"removed {clear_cache()} entries from {cache_dir()}")
        return 0
    entries = cache_entries()
    if args.action == "ls":
        for e in entries:
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))
            print(f"{e.kind:<8} {e.size:>9} B  {stamp}  {e.label or e.path.name}")
        if not entries:
            print(f"(empty: {cache_dir()})")
        return 0
    kinds = {k: [e for e in entries if e.kind == k] for k in ("kernel", "binary", "tuning", "template")}
    print(f"cache directory: {cache_dir()}")
    for k, es in kinds.items():
        print(f"  {k:<8} entries: {len(es):>5}  {sum(e.size for e in es) / 1024:10.1f} KiB")
    if "TRITON_CACHE_DIR" in os.environ:
        print(f"compiled binaries go to TRITON_CACHE_DIR={os.environ['TRITON_CACHE_DIR']} (set by you), not here")
    return 0


def _config(args: argparse.Namespace) -> int:
    from flashgen.settings import settings

    for var, value, meaning in settings().describe():
        print(f"{var:<24} {value:<40} {meaning}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashgen", description="flashgen: an attention compiler for Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a few variants, explain them, check and time them")
    demo.add_argument("--cpu", action="store_true", help="run on the CPU interpreter even if a GPU is present")
    demo.set_defaults(func=_demo)
    spec_help = (f"a library variant ({', '.join(LIBRARY)}; some take :ARG, e.g. sliding_window:512) "
                 "or path/to/file.py:name")
    for name, func, text in (("show", _show, "print the generated Triton source"),
                             ("explain", _explain, "print the analysis report with the block-map picture"),
                             ("tune", _tune, "tune launch configurations and store the winner (GPU)"),
                             ("bench", _bench, "time a variant next to SDPA (GPU)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help=spec_help)
        p.add_argument("--shape", default="1,16,4096,128", help="B,H,S,D (default 1,16,4096,128)")
        p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
        if name in ("show", "tune"):
            p.add_argument("--bwd", action="store_true", help="the backward kernels too" if name == "tune"
                           else "the backward kernels instead of the forward one")
        if name == "show":
            p.add_argument("--ws", action="store_true", help="the warp-specialised Gluon kernel that Hopper GPUs run "
                           "where it fits (plain logits with no mask or a band)")
        p.set_defaults(func=func)
    cache = sub.add_parser("cache", help="list, summarise or clear the disk cache")
    cache.add_argument("action", choices=("ls", "info", "clear"))
    cache.set_defaults(func=_cache)
    config = sub.add_parser("config", help="print the effective FLASHGEN_* settings")
    config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "dtype"):
            _dtype(args.dtype)  # a bad --dtype is an error for every command that takes one
        return args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stderr.close()
        return 0
    except CliError as e:
        print(f"flashgen: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"flashgen: error: {first}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
