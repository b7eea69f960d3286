"""The benchmark suite of issue #7: flashgen next to FlexAttention and SDPA over the variant matrix.

From the repository root, on a CUDA machine::

    PYTHONPATH=. python3 benchmarks/suite.py run --out docs/benchmarks [--shapes 4x16x8192x128,8x16x4096x64]
                 [--variants full,causal,...] [--passes fwd,fwd+bwd] [--bias-dtype bf16|fp32]
    PYTHONPATH=. python3 benchmarks/suite.py report docs/benchmarks
    PYTHONPATH=. python3 benchmarks/suite.py run --smoke --out /tmp/suite     # CPU-only machine: the plumbing

Variants (--variants keys): full, causal, sliding (window 1024), document (causal, 16 documents), prefix_lm
(1024), dilated (causal window 2048, every 2nd key), alibi_causal, softcap_causal (cap 30), rel_table
(relative-position table [H, 2S-1], frozen), rel_table_learnable (the table requiring grad; fwd+bwd only),
t5_bias (T5's bucketed relative positions, ``fg.mods.t5_bias``: 32 buckets, max distance 128, frozen),
t5_bias_learnable (its table requiring grad; fwd+bwd only),
dense_bias ([H, S, S], frozen, --bias-dtype), dense_bias_learnable (the same requiring grad; fwd+bwd only),
pair_bias_learnable ([B, H, S, S] requiring grad, as AlphaFold's pair bias; fwd+bwd only).
bf16 q, k, v. Masks, mods, document ids and the density count are bench_forward.py's.

Implementations, side by side in one process: flashgen (``fg.compile`` with the ``fg.mods`` library mods),
``torch.compile(flex_attention)`` with equivalent inline mods and a ``create_block_mask`` block mask, and SDPA
with the cuDNN and flash backends (full and causal only). fwd times ``attn(q, k, v)``, fwd+bwd
``attn(q, k, v).backward(dout)`` (gradients reset between calls): median of ``triton.testing.do_bench``.
TF/s counts only unmasked entries (kept, counted exactly): 4·B·H·kept·D forward, 3.5× that fwd+bwd.

Before timing, flashgen's output (fwd+bwd: also dq, dk, dv and the learnable table's gradient) is compared
with FlexAttention's (or SDPA's where flex failed) on the full shape, and with ``fg.attention_reference``
(float64) on a slice (B=H=1, the first 256 queries and keys); the relative errors ‖a−b‖/‖b‖ go into
flashgen's record. A peer that fails (out of memory, compile error) is recorded with its error; the run goes on.

Each ``run`` writes ``DIR/suite-<UTC timestamp>.json``: a header (date, GPU, torch, triton and flashgen
versions) and one record per (variant, shape, pass, implementation): ms, TF/s, density, peak memory, checks
or the error. A full matrix takes several GPU calls: run subsets (--variants, --shapes) into one DIR;
``report`` merges every suite-*.json there (the newest run wins per variant, shape, pass and implementation)
into ``DIR/suite.md`` (a table per shape and pass, stamped with its runs) and ``DIR/suite.png``
(flashgen/flex per variant against #7's 1.2× target; needs matplotlib, the ``bench`` extra).

``--ab-tma``: also flashgen with pointer loads instead of TMA (``flashgen-ptr``, one more implementation in the
JSON; the report's table leaves it out). Its records scatter as any other's (up to 4% for identical kernels):
``ab_loads.py`` interleaves the two for a finer comparison.

``--ab-ws``: also flashgen with its Triton kernels only (``flashgen-triton``: the warp-specialised Gluon kernels
off for its calls), for the Gluon kernels' gain on every variant in one run; the report leaves it out too.

``--rounds N``: the implementations are timed in turn, N rounds; each record keeps every round's time and its ``ms``
is their median, and the report's flashgen/flex column adds the range of the per-round ratios. A single pass
(the default) scattered by up to 4% for identical kernels on the H200 (PERFLOG, tenth session).

``--smoke``: a tiny shape (1x2x128x32), flashgen only (Triton's interpreter without a GPU), timed with
``time.perf_counter`` where there is no CUDA; the same checks and files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import flashgen as fg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import (  # noqa: E402 - one definition of the masks, document ids and density counting
    REP_MS,
    WARMUP_MS,
    Variant,
    attempt,
    build_variants,
    compiled_flex,
    count_kept,
    free_memory,
    parse_shape,
    rel_err,
    sync,
    tflops,
)

DEFAULT_SHAPES = "4x16x8192x128,8x16x4096x64"
SMOKE_SHAPES = "1x2x128x32"
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("flashgen", "flex", "cudnn", "flash", "flashgen-ptr", "flashgen-triton")
# --ab-tma: also time flashgen with its streamed tiles through pointer loads ("flashgen-ptr";
# flashgen.runtime.TMA = False for that implementation's calls), against its TMA loads, same process
AB_TMA = False
# --ab-ws: also time flashgen with its Triton kernels only ("flashgen-triton"; runtime.WS_FORWARD and
# WS_BACKWARD off for that implementation's calls), against the warp-specialised Gluon ones
AB_WS = False
# --rounds: time the implementations in turn this many times (each record keeps every round's time;
# the report gives the range of the per-round flashgen/flex ratios next to the ratio of medians)
ROUNDS = 1
VARIANTS = ("full", "causal", "sliding", "document", "prefix_lm", "dilated", "alibi_causal", "softcap_causal",
            "rel_table", "rel_table_learnable", "t5_bias", "t5_bias_learnable", "dense_bias",
            "dense_bias_learnable", "pair_bias_learnable")
BIAS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHECK_LEN = 256  # queries and keys of the float64 reference slice
CPU_REPS = 3  # timed calls without CUDA (median)
TARGET = 1.2  # issue #7: every variant at least 1.2x FlexAttention


# --- the variants and the records


@dataclass(frozen=True)
class Case:
    """One variant at one shape: bench_forward's Variant (label, flashgen and flex mods, SDPA's is_causal),
    the captured tensors that require grad (by gradient name), flashgen's kwargs for an n x n slice
    where they differ from the full shape's, and peers not run, with the reason recorded as their error."""

    variant: Variant
    learnable: dict[str, torch.Tensor] = field(default_factory=dict)
    sliced: Callable[[int], dict] | None = None
    not_run: dict[str, str] = field(default_factory=dict)
    # the learnable tensors of the slice's kwargs, where they are not ``learnable`` (whose full-size
    # gradients the float64 reference would otherwise allocate: 32 GiB for a [4, 16, 8192, 8192] bias)
    sliced_learnable: dict[str, torch.Tensor] | None = None

    def slice_kwargs(self, n: int) -> dict:
        return self.sliced(n) if self.sliced else self.variant.fg_kwargs


@dataclass(frozen=True)
class Record:
    variant: str
    label: str
    shape: str
    pass_name: str
    impl: str
    density: float
    ms: float | None = None
    tflops: float | None = None
    peak_gib: float | None = None
    checks: dict[str, float | str] = field(default_factory=dict)  # flashgen's relative errors
    error: str | None = None
    rounds_ms: list[float] | None = None  # --rounds: each round's time (``ms`` is their median)
    kernels: dict[str, str] = field(default_factory=dict)  # flashgen's: attn.last_tiles after the timing


def build_cases(heads: int, seq_len: int, device: str, bias_dtype: torch.dtype, wanted: list[str],
                batch: int = 1) -> dict[str, Case]:
    """The wanted variants at one (B, H, S) (B: the per-batch-entry bias's). The dense biases are only
    allocated when wanted (GiBs at S=8192)."""
    cases = {var.key: Case(var) for var in build_variants(fg, heads, device, seq_len=seq_len) if var.key in wanted}
    gen = torch.Generator(device=device).manual_seed(0)
    table = 0.1 * torch.randn(heads, 2 * seq_len - 1, device=device, generator=gen)
    learnable = table.clone().requires_grad_()
    offset = seq_len - 1  # an int: dynamo keeps it static

    def flex_table(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + offset]

    def flex_learnable(score, b, h, q_idx, kv_idx):
        return score + learnable[h, q_idx - kv_idx + offset]

    def relative(key: str, label: str, t: torch.Tensor, flex_mod: Callable) -> Variant:
        return Variant(key, label, {"score_mod": fg.mods.relative_bias(t)}, flex_mod, None, None, "full")

    cases["rel_table"] = Case(relative("rel_table", "relative table (frozen)", table, flex_table))
    cases["rel_table_learnable"] = Case(relative("rel_table_learnable", "relative table (learnable)", learnable,
                                                 flex_learnable), {"dtable": learnable})
    t5_table = 0.5 * torch.randn(heads, 32, device=device, generator=gen)
    buckets = fg.mods.t5_buckets(torch.arange(-128, 129, device=device), 32, 128, True)

    def flex_t5(score, b, h, q_idx, kv_idx):
        return score + t5_table[h, buckets[torch.clamp(kv_idx - q_idx, -128, 128) + 128]]

    cases["t5_bias"] = Case(Variant("t5_bias", "T5 buckets (32, 128)", {"score_mod": fg.mods.t5_bias(t5_table)},
                                    flex_t5, None, None, "full"))
    t5_learnable = t5_table.clone().requires_grad_()

    def flex_t5_learnable(score, b, h, q_idx, kv_idx):
        return score + t5_learnable[h, buckets[torch.clamp(kv_idx - q_idx, -128, 128) + 128]]

    cases["t5_bias_learnable"] = Case(Variant("t5_bias_learnable", "T5 buckets (learnable)",
                                              {"score_mod": fg.mods.t5_bias(t5_learnable)}, flex_t5_learnable, None,
                                              None, "full"), {"dtable": t5_learnable})
    if "dense_bias" in wanted:
        bias = torch.randn(heads, seq_len, seq_len, device=device, dtype=bias_dtype, generator=gen)

        def flex_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

        name = str(bias_dtype).removeprefix("torch.")
        cases["dense_bias"] = Case(Variant("dense_bias", f"dense bias [H, S, S] {name}", {"bias": bias}, flex_bias,
                                           None, None, "full"),
                                   sliced=lambda n: {"bias": bias[:1, :n, :n].contiguous()})
    if "dense_bias_learnable" in wanted:
        learned = torch.randn(heads, seq_len, seq_len, device=device, dtype=bias_dtype, generator=gen)
        learned.requires_grad_()

        def flex_learned(score, b, h, q_idx, kv_idx):
            return score + learned[h, q_idx, kv_idx]

        name = str(bias_dtype).removeprefix("torch.")
        cases["dense_bias_learnable"] = Case(
            Variant("dense_bias_learnable", f"dense bias [H, S, S] {name} (learnable)", {"bias": learned},
                    flex_learned, None, None, "full"),
            {"dbias": learned}, sliced=lambda n: {"bias": learned[:1, :n, :n]})
    if "pair_bias_learnable" in wanted:
        pair = torch.randn(batch, heads, seq_len, seq_len, device=device, dtype=bias_dtype, generator=gen)
        pair.requires_grad_()
        corner = pair[:1, :1, :CHECK_LEN, :CHECK_LEN].detach().clone().requires_grad_()  # (the reference's slice)

        def flex_pair(score, b, h, q_idx, kv_idx):
            return score + pair[b, h, q_idx, kv_idx]

        name = str(bias_dtype).removeprefix("torch.")
        cases["pair_bias_learnable"] = Case(
            Variant("pair_bias_learnable", f"dense bias [B, H, S, S] {name} (learnable)", {"bias": pair},
                    flex_pair, None, None, "full"),
            {"dbias": pair}, sliced=lambda n: {"bias": corner[:, :, :n, :n]}, sliced_learnable={"dbias": corner},
            # H200, torch 2.11, 2026-11-29: at 4x16x8192x128 (4.3e9 bias entries) flex's backward faulted
            # (illegal memory access), which ends the process; past 2^31 entries it is not run
            not_run={"flex": "not run: its backward faulted with an illegal memory access at 4x16x8192 "
                             "(4.3e9 bias entries; H200, torch 2.11)"} if pair.numel() >= 2 ** 31 else {})
    return {key: cases[key] for key in wanted}


# --- one (variant, shape, pass): set up, check, time


def implementations(case: Case, q, k, v, device: str, peers: bool, flex) -> tuple[dict[str, Callable], dict[str, str]]:
    """Forward callables of the implementations that apply, and the set-up errors of those that failed."""
    var = case.variant
    calls: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    attn, err = attempt(lambda: fg.compile(**var.fg_kwargs))
    if err:
        errors["flashgen"] = err
    else:
        calls["flashgen"] = lambda: attn(q, k, v)
        calls["flashgen"].attn = attn  # (its last_tiles name the kernels timed)
        if AB_TMA:
            calls["flashgen-ptr"] = lambda: attn(q, k, v)
        if AB_WS:
            other = fg.compile(**var.fg_kwargs)  # (its own last_tiles)
            calls["flashgen-triton"] = lambda: other(q, k, v)
            calls["flashgen-triton"].attn = other
    if not peers:
        return calls, errors
    if flex is None:
        errors["flex"] = "flex_attention is not available"
    elif "flex" in case.not_run:
        errors["flex"] = case.not_run["flex"]
    else:
        import torch._dynamo as dynamo
        from torch.nn.attention.flex_attention import create_block_mask

        attempt(dynamo.reset)  # each variant compiles flex afresh (as bench_forward)
        S = q.shape[2]
        block_mask, err = (None, None) if var.flex_mask is None else attempt(
            lambda: create_block_mask(var.flex_mask, None, None, S, S, device=device))
        if err:
            errors["flex"] = f"create_block_mask: {err}"
        else:
            calls["flex"] = lambda: flex(q, k, v, score_mod=var.flex_score, block_mask=block_mask)
    if var.sdpa_causal is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            def call_sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return sdpa(q, k, v, is_causal=var.sdpa_causal)

            calls[name] = call_sdpa
    return calls, errors


def with_loads(name: str, fn: Callable) -> Callable:
    """``fn``, run with flashgen's pointer loads for the "flashgen-ptr" implementation, with its
    Triton kernels only for "flashgen-triton" (module switches, so that the backward, which autograd
    runs on a thread of its own, sees them too)."""
    if name not in ("flashgen-ptr", "flashgen-triton"):
        return fn
    switches = ("TMA",) if name == "flashgen-ptr" else ("WS_FORWARD", "WS_BACKWARD")

    def run():
        from flashgen import runtime

        saved = [getattr(runtime, s) for s in switches]
        for s in switches:
            setattr(runtime, s, False)
        try:
            return fn()
        finally:
            for s, value in zip(switches, saved):
                setattr(runtime, s, value)

    return run


def outputs(call: Callable, leaves: dict[str, torch.Tensor], dout: torch.Tensor, device: str) -> dict:
    """{"out": the forward output} and, with ``leaves`` (gradient name -> tensor), their gradients for dout."""
    for t in leaves.values():
        t.grad = None
    out = call()
    if leaves:
        out.backward(dout)
    result = {"out": out.detach(), **{name: t.grad.clone() for name, t in leaves.items()}}
    sync(device)
    return result


def slice_check(case: Case, q, k, v, dout, learnable: dict, grads: bool, n: int, device: str) -> dict[str, float]:
    """flashgen against fg.attention_reference (float64) on b = h = 0, the first n queries and keys."""
    kwargs = case.slice_kwargs(n)
    parts = [t[:1, :1, :n].detach().contiguous() for t in (q, k, v)]
    names = ("dq", "dk", "dv")
    mine = dict(zip(names, (t.clone().requires_grad_(grads) for t in parts)))
    ref = dict(zip(names, (t.double().requires_grad_(grads) for t in parts)))
    d = dout[:1, :1, :n]
    got = outputs(lambda: fg.attention(*mine.values(), **kwargs), {**mine, **learnable} if grads else {}, d, device)
    want = outputs(lambda: fg.attention_reference(*ref.values(), **kwargs), {**ref, **learnable} if grads else {},
                   d.double(), device)
    return {f"{name}_vs_reference{n}": rel_err(got[name], want[name], torch.float64) for name in got}


def correctness(case: Case, q, k, v, dout, leaves: dict, results: dict, device: str) -> dict[str, float | str]:
    checks: dict[str, float | str] = {}
    peer = next((name for name in ("flex", "cudnn", "flash") if name in results), None)
    if peer:
        for name, mine in results["flashgen"].items():
            checks[f"{name}_vs_{peer}"] = rel_err(mine, results[peer][name])
    n = min(CHECK_LEN, q.shape[2])
    learnable = case.learnable if case.sliced_learnable is None else case.sliced_learnable
    value, err = attempt(lambda: slice_check(case, q, k, v, dout, learnable, bool(leaves), n, device))
    checks.update({f"vs_reference{n}": err} if err else value)
    return checks


def time_ms(fn: Callable, grads: list[torch.Tensor], device: str) -> float:
    """Median milliseconds per call: do_bench on CUDA (L2 flushed, grads reset), else a few timed calls."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grads or None,
                                             return_mode="median"))
    times = []
    for _ in range(CPU_REPS):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(case: Case, q, k, v, dout, pass_name: str, device: str, peers: bool, flex) -> list[Record]:
    var = case.variant
    B, H, S, D = q.shape
    kept = count_kept(var.fg_kwargs.get("mask_mod"), S, S, device)
    flop = 4.0 * B * H * kept * D * (3.5 if pass_name == "fwd+bwd" else 1.0)
    leaves = {"dq": q, "dk": k, "dv": v, **case.learnable} if pass_name == "fwd+bwd" else {}
    calls, errors = implementations(case, q, k, v, device, peers, flex)
    results, peaks = {}, {}
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0  # inputs (q, k, v, dout, captured)
    for name, call in calls.items():  # first calls: compile, outputs (and gradients), peak memory
        if device == "cuda":  # the peak above what is held now (earlier results), plus the inputs
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        value, err = attempt(with_loads(name, lambda call=call: outputs(call, leaves, dout, device)))
        if err:
            errors[name] = err
            continue
        results[name] = value
        if device == "cuda":
            peaks[name] = (torch.cuda.max_memory_allocated() - held + resident) / 2**30
    checks = correctness(case, q, k, v, dout, leaves, results, device) if "flashgen" in results else {}
    results.clear()
    free_memory()
    common = {"variant": var.key, "label": var.label, "shape": "x".join(map(str, (B, H, S, D))),
              "pass_name": pass_name, "density": kept / (S * S)}
    timed = [name for name in IMPLS if name in calls and name not in errors]
    rounds: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(ROUNDS):  # the implementations in turn, round after round (ROUNDS > 1: --rounds)
        for name in timed:
            if name in errors:
                continue
            fn = with_loads(name, calls[name] if not leaves else (lambda call=calls[name]: call().backward(dout)))
            ms, err = attempt(lambda fn=fn: time_ms(fn, list(leaves.values()), device))
            if err:
                errors[name] = err
            else:
                rounds[name].append(ms)
    records = []
    for name in IMPLS:
        attn = getattr(calls.get(name), "attn", None)
        kernels = {k: str(v) for k, v in attn.last_tiles.items()} if attn is not None else {}
        mine = checks if name == "flashgen" else {}
        if name in errors:
            records.append(Record(**common, impl=name, checks=mine, error=errors[name]))
        elif name in calls:
            ms = statistics.median(rounds[name])
            records.append(Record(**common, impl=name, ms=ms, tflops=tflops(flop, ms), peak_gib=peaks.get(name),
                                  checks=mine, rounds_ms=rounds[name] if ROUNDS > 1 else None,
                                  kernels=kernels))
    return records


# --- run: every (shape, variant, pass) asked for, into DIR/suite-<UTC timestamp>.json


def own_time_profile(fn: Callable[[], object], rows: int = 25) -> str:
    """The top ``rows`` functions of a cProfile of ``fn()``, by own time (the benchmarks' ``--profile``)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def parse_list(text: str, known: tuple[str, ...], what: str) -> list[str]:
    wanted = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return [item for item in known if item in wanted]


def make_header(device: str, smoke: bool, now: datetime.datetime) -> dict:
    import triton

    return {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "timestamp": now.isoformat(timespec="microseconds"),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "triton": triton.__version__, "flashgen": fg.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "smoke": smoke, "argv": sys.argv[1:]}


def summary(records: list[Record]) -> str:
    cells = [f"{r.impl} error: {r.error}" if r.error else f"{r.impl} {r.ms:.4g} ms {r.tflops:.4g} TF/s"
             for r in records]
    checks = next((r.checks for r in records if r.impl == "flashgen"), {})
    kernels = next((r.kernels for r in records if r.impl == "flashgen"), {})
    return "  " + " | ".join(cells) + "\n  checks: " + ", ".join(
        f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in checks.items()) + (
        "\n  kernels: " + "; ".join(f"{k} {v}" for k, v in kernels.items()) if kernels else "")


def run_shape(shape, variants: list[str], passes: list[str], device: str, peers: bool, flex,
              bias_dtype: torch.dtype) -> list[Record]:
    B, H, S, D = shape
    torch.manual_seed(0)
    base = [torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16) for _ in range(3)]
    dout = torch.randn_like(base[0])
    cases = build_cases(H, S, device, bias_dtype, variants, batch=B)
    records: list[Record] = []
    for case in cases.values():
        for pass_name in passes:
            if case.learnable and pass_name == "fwd":
                print(f"== {case.variant.label}, {pass_name}: skipped (a learnable table needs fwd+bwd) ==")
                continue
            print(f"== {case.variant.label}, {'x'.join(map(str, shape))}, {pass_name} ==", flush=True)
            q, k, v = (t.detach().requires_grad_(pass_name == "fwd+bwd") for t in base)
            new = measure(case, q, k, v, dout, pass_name, device, peers, flex)
            print(summary(new), flush=True)
            records += new
            free_memory()
    return records


def cmd_run(args) -> int:
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("suite run: no CUDA GPU visible; --smoke exercises the plumbing on CPU")
        return 1
    device = "cuda" if cuda else "cpu"
    shapes = [parse_shape(s) for s in (args.shapes or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)).split(",")]
    variants = parse_list(args.variants or ",".join(VARIANTS), VARIANTS, "variants")
    passes = parse_list(args.passes, PASSES, "passes")
    now = datetime.datetime.now(datetime.timezone.utc)
    header = make_header(device, args.smoke, now)
    print(f"flashgen suite: {header['gpu']}, torch {header['torch']}, triton {header['triton']}, {header['date']}")
    peers = not (args.smoke or getattr(args, "flashgen_only", False))
    flex = compiled_flex() if peers else None
    global AB_TMA, AB_WS, ROUNDS
    AB_TMA = getattr(args, "ab_tma", False)  # (a Namespace built by hand has no such field)
    AB_WS = getattr(args, "ab_ws", False)
    ROUNDS = max(1, getattr(args, "rounds", 1))
    records = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"suite-{now:%Y%m%dT%H%M%S.%fZ}.json"
    for shape in shapes:
        for variant in variants:  # written after each variant: a run cut short keeps what it measured
            records += run_shape(shape, [variant], passes, device, peers, flex, BIAS_DTYPES[args.bias_dtype])
            path.write_text(json.dumps({"header": header, "records": [asdict(r) for r in records]}, indent=1) + "\n")
    print(f"wrote {path} ({len(records)} records); `suite.py report {out}` merges the runs there")
    return 0


# --- report: merge DIR/suite-*.json, write DIR/suite.md and DIR/suite.png


def load_runs(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("suite-*.json"))]


def merge(runs: list[dict]) -> dict[tuple, tuple[dict, dict]]:
    """(variant, shape, pass, implementation) -> (record, header of its run): the newest run wins."""
    merged: dict[tuple, tuple[dict, dict]] = {}
    for run in sorted(runs, key=lambda r: r["header"]["timestamp"]):
        for record in run["records"]:
            merged[record["variant"], record["shape"], record["pass_name"], record["impl"]] = record, run["header"]
    return merged


def _rank(known: tuple[str, ...], item: str) -> int:
    return known.index(item) if item in known else len(known)


def grid(merged: dict) -> dict[tuple[str, str], dict[str, dict[str, tuple[dict, dict]]]]:
    """(shape, pass) -> variant -> implementation -> (record, header), in the suite's order."""
    def order(key):
        variant, shape, pass_name, impl = key
        return shape, _rank(PASSES, pass_name), _rank(VARIANTS, variant), variant, _rank(IMPLS, impl)

    out: dict = {}
    for key in sorted(merged, key=order):
        variant, shape, pass_name, impl = key
        out.setdefault((shape, pass_name), {}).setdefault(variant, {})[impl] = merged[key]
    return out


def ratio(impls: dict) -> float | None:
    mine, flex = (impls.get(name, ({}, None))[0].get("tflops") for name in ("flashgen", "flex"))
    return mine / flex if mine and flex else None


def ratio_range(impls: dict) -> tuple[float, float] | None:
    """(lowest, highest) flashgen/flex speed ratio over the rounds both were timed in turn (--rounds)."""
    mine, flex = (impls.get(name, ({}, None))[0].get("rounds_ms") for name in ("flashgen", "flex"))
    if not mine or not flex or len(mine) != len(flex) or len(runs_of({0: impls})) > 1:
        return None
    ratios = [f / m for m, f in zip(mine, flex)]
    return min(ratios), max(ratios)


def runs_of(rows: dict) -> dict[str, dict]:
    """timestamp -> header of the runs the records of ``rows`` (variant -> impl -> (record, header)) came from."""
    return {h["timestamp"]: h for impls in rows.values() for _, h in impls.values()}


def stamp(header: dict) -> str:
    return (f"{header['date']}: {header['gpu']}, torch {header['torch']}, triton {header['triton']}, "
            f"flashgen {header['flashgen']}" + (" (smoke)" if header.get("smoke") else ""))


def table(shape: str, pass_name: str, rows: dict) -> list[str]:
    B, H, S, D = shape.split("x")
    # (the A/B implementations, flashgen-ptr and flashgen-triton, stay in the JSON only)
    rows = {variant: {i: r for i, r in impls.items() if i in ("flashgen", "flex", "cudnn", "flash")}
            for variant, impls in rows.items()}
    rows = {variant: impls for variant, impls in rows.items() if impls}
    out = [f"## B={B} H={H} S={S} D={D}, {pass_name}", "", *(f"- run {stamp(h)}" for h in runs_of(rows).values()), "",
           "| variant | density | flashgen TF/s | flex TF/s | flashgen/flex | cuDNN TF/s | flash TF/s | "
           "checks (rel. err.) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    errors, mixed = [], False

    def cell(impl: str, impls: dict) -> str:
        record = impls.get(impl, (None,))[0]
        if record is None or record["tflops"] is None:
            return "error" if record and record["error"] else "—"
        return f"{record['tflops']:.4g}"

    for impls in rows.values():
        some = next(iter(impls.values()))[0]
        checks = impls.get("flashgen", ({}, None))[0].get("checks", {})
        check_text = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} `{v}`" for k, v in checks.items())
        r, spread = ratio(impls), ratio_range(impls)
        mark = " †" if len(runs_of({0: impls})) > 1 else ""
        mixed = mixed or bool(mark)
        out.append(f"| {some['label']}{mark} | {some['density']:.3f} | {cell('flashgen', impls)} | "
                   f"{cell('flex', impls)} | {'—' if r is None else f'{r:.2f}'}"
                   f"{'' if spread is None else f' ({spread[0]:.2f}-{spread[1]:.2f})'} | {cell('cudnn', impls)} | "
                   f"{cell('flash', impls)} | "
                   f"{check_text or '—'} |")
        errors += [f"- {some['label']} / {impl}: `{rec['error']}`" for impl, (rec, _) in impls.items() if rec["error"]]
    note = ["", "† this row's records come from different runs (#7's targets compare within one run)."]
    return out + (note if mixed else []) + (["", "Errors:", "", *errors] if errors else []) + [""]


def markdown(g: dict) -> str:
    out = ["# flashgen benchmark suite (issue #7)", "",
           "Generated by `benchmarks/suite.py report` from the suite-*.json runs in this folder (newest record per "
           "variant, shape, pass and implementation); do not edit by hand. bf16; TF/s counts only unmasked "
           "entries (4·B·H·kept·D forward, 3.5× for forward+backward), median of `triton.testing.do_bench`. "
           f"Target (#7): flashgen/flex ≥ {TARGET}. Checks: flashgen against flex (or SDPA) on the full shape "
           f"(`out`, `dq`, `dk`, `dv`, `dtable`) and against the float64 reference on a {CHECK_LEN}x{CHECK_LEN} "
           "slice (`*_vs_reference*`).", ""]
    for (shape, pass_name), rows in g.items():
        out += table(shape, pass_name, rows)
    return "\n".join(out)


def chart(g: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("suite report: matplotlib is not installed (pip install -e '.[bench]'); suite.png skipped")
        return False
    fig, axes = plt.subplots(len(g), 1, figsize=(10, 3.4 * len(g)), squeeze=False)
    for ax, ((shape, pass_name), rows) in zip(axes[:, 0], g.items()):
        labels = [next(iter(impls.values()))[0]["label"] for impls in rows.values()]
        values = [ratio(impls) for impls in rows.values()]
        ax.bar(range(len(values)), [v or 0.0 for v in values],
               color=["tab:green" if v and v >= TARGET else "tab:orange" for v in values])
        for x, v in enumerate(values):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (x, v or 0.0), ha="center", va="bottom", fontsize=8)
        ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=1, label=f"#7 target {TARGET}×")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.25 * max([TARGET, *(v for v in values if v)]))
        ax.set_ylabel("flashgen / flex")
        ax.set_title(f"{shape} (BxHxSxD), {pass_name}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    headers = {ts: h for rows in g.values() for ts, h in runs_of(rows).items()}
    fig.suptitle("; ".join(stamp(h) for h in headers.values()), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cmd_report(args) -> int:
    folder = Path(args.dir)
    runs = load_runs(folder)
    if not runs:
        print(f"suite report: no suite-*.json in {folder}")
        return 1
    g = grid(merge(runs))
    (folder / "suite.md").write_text(markdown(g))
    wrote = [folder / "suite.md"] + ([folder / "suite.png"] if chart(g, folder / "suite.png") else [])
    print(f"merged {len(runs)} runs; wrote {', '.join(map(str, wrote))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="time a part of the matrix into DIR/suite-<UTC timestamp>.json")
    r.add_argument("--out", default="docs/benchmarks", help="the results folder (default docs/benchmarks)")
    r.add_argument("--shapes", default="", help=f"comma-separated BxHxSxD (default {DEFAULT_SHAPES}; "
                   f"{SMOKE_SHAPES} with --smoke)")
    r.add_argument("--variants", default="", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    r.add_argument("--passes", default=",".join(PASSES), help="fwd, fwd+bwd or both (default both)")
    r.add_argument("--bias-dtype", choices=sorted(BIAS_DTYPES), default="bf16", help="dense bias dtype")
    r.add_argument("--smoke", action="store_true", help="tiny shapes, flashgen only; runs without a GPU")
    r.add_argument("--flashgen-only", action="store_true", help="time flashgen alone (no flex, no SDPA)")
    r.add_argument("--ab-tma", action="store_true", help="also flashgen with pointer loads (flashgen-ptr)")
    r.add_argument("--ab-ws", action="store_true",
                   help="also flashgen with its Triton kernels only, no Gluon ones (flashgen-triton)")
    r.add_argument("--rounds", type=int, default=1, help="time the implementations in turn, N rounds (default 1)")
    rep = sub.add_parser("report", help="merge DIR/suite-*.json into DIR/suite.md and DIR/suite.png")
    rep.add_argument("dir", nargs="?", default="docs/benchmarks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
