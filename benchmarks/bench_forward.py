"""Forward-pass benchmark: flashgen next to torch.compile(flex_attention) and SDPA (cuDNN, FA2).

One process, one command on a CUDA machine (from the repository root)::

    PYTHONPATH=. python3 benchmarks/bench_forward.py --out docs/benchmarks/
    PYTHONPATH=. python3 benchmarks/bench_forward.py --sweep          # also sweep launch configs
    PYTHONPATH=. python3 benchmarks/bench_forward.py --variants document,prefix_lm,dilated

bf16, B=4, H=16, S=8192, D=128 by default. Variants: full, causal, sliding window 1024,
alibi + causal, softcap 30 + causal, and the block-sparse masks: causal document mask (16
documents of random lengths, fixed seed: ``(doc[q] == doc[kv]) & (kv <= q)``), prefix LM 1024
(``(kv < 1024) | (q >= kv)``) and a dilated sliding window
(``(kv <= q) & (q - kv < 2048) & ((q - kv) % 2 == 0)``). flashgen runs the library mods
(``fg.mods``; the dilated window is an ``@fg.mask_mod`` function written here); FlexAttention
runs equivalent ``score_mod`` / ``mask_mod`` functions written inline here, with a
``create_block_mask`` block mask for the masked variants and default kernel options; SDPA runs the
cuDNN and flash (FA2) backends for full and causal (``is_causal=True``).

Before timing a variant its outputs are checked: flashgen against flex and SDPA on the full shape,
every peer against ``fg.attention_reference`` (float64) on the first queries of (b=0, h=0), and
flashgen on a sliced problem of its own (B=H=1, the first ``--check-len`` queries and keys).
Timing is ``triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")`` (milliseconds
of warm-up and of measurement, not counts). TFLOP/s = 2·B·H·kept·(D + Dv) / time, where kept is the
exact number of unmasked (q, kv) entries (counted by evaluating the mask), i.e. 4·B·H·S²·D·density.

Also measured: host overhead per call of a cached variant at a tiny shape, and the first-call time
(trace + codegen + Triton compile + launch) of a new variant. For the document, prefix LM and
dilated masks, the analysis time (wall, synchronized, median of a few calls): FlexAttention's
``create_block_mask(mask_mod, B, H, S, S)`` (and with B = H = None, broadcast; for the document
mask also ``torch.compile(create_block_mask)``) next to flashgen's block map at its default
forward tile size: the first call (``fg.block_mask``: trace + analysis), and for the document mask
a cached call (``attn.block_mask`` again, same doc tensor) and a rebuilt one (``doc.add_(0)``
bumps the tensor's version, so flashgen analyses again), with and without building the run lists
the kernel reads. ``--sweep`` times every launch config of a grid for full and causal at D=128
and at D=64 (B=8, H=16, S=4096).

A peer that fails (out of memory, compile error, unsupported backend) is recorded with its error
string; the run goes on. Results: ``bench_forward.json`` and ``bench_forward.md`` under ``--out``,
stamped with date, GPU, torch and triton versions; a short table is printed last.
Without CUDA the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_OUT = "docs/benchmarks"
REL_TOL = 2e-2
WARMUP_MS = 25
REP_MS = 100
SWEEP_SHAPES = {128: (4, 16, 8192), 64: (8, 16, 4096)}  # D -> (B, H, S)
SWEEP_VARIANTS = ("full", "causal")
PEERS = ("flashgen", "flex", "cudnn", "fa2")
VARIANT_KEYS = ("full", "causal", "sliding", "alibi_causal", "softcap_causal", "document", "prefix_lm", "dilated")
ANALYSIS_CALLS = 5  # timed calls per analysis measurement (after one warm-up), median reported


# ---------------------------------------------------------------------------------------------
# small helpers (module level so that they can be replaced in a dry run)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"shape {text!r}: write BxHxSxD, e.g. 4x16x8192x128")
    return tuple(int(p) for p in parts)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], warmup: int = WARMUP_MS, rep: int = REP_MS) -> float:
    """Median milliseconds per call of ``fn`` (triton's do_bench: L2 flushed between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def attempt(fn: Callable[[], object]) -> tuple[object | None, str | None]:
    """Run ``fn``; returns (result, None) or (None, error string). Never raises (except Ctrl-C)."""
    try:
        return fn(), None
    except Exception as e:  # every failure of a peer is data, not a crash
        free_memory()
        return None, short_error(e)


def interleaved(arms: dict[str, Callable[[], object]], rounds: int, rep: int = 200) -> dict[str, list[float]]:
    """Each arm's ``bench_ms`` (ms) per round, the arms taken in turn round after round, so that a
    drift of the clocks shows in every arm (the A/B scripts' timing)."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name].append(bench_ms(fn, warmup=50, rep=rep))
    return times


def rel_err(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """‖a − b‖ / ‖b‖ computed in ``dtype``."""
    a, b = a.to(dtype), b.to(dtype)
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def count_kept(mask_mod: Callable | None, sq: int, skv: int, device: str, chunk: int = 1024) -> int:
    """The exact number of (q, kv) entries the mask keeps (for masks that do not depend on b, h)."""
    if mask_mod is None:
        return sq * skv
    zero = torch.zeros((), dtype=torch.long, device=device)
    kv = torch.arange(skv, device=device)[None, :]
    total = 0
    for start in range(0, sq, chunk):
        q = torch.arange(start, min(start + chunk, sq), device=device)[:, None]
        keep = torch.as_tensor(mask_mod(zero, zero, q, kv), device=device).expand(q.shape[0], skv)
        total += int(keep.sum().item())
    return total


def closed_form_kept(kind: str, s: int, window: int | None = None, params: dict | None = None) -> int:
    """Unmasked entries of an S x S mask, in closed form (a cross-check of :func:`count_kept`).
    ``window``: the sliding or dilated window, or the prefix length; ``params``: the variant's
    other parameters (``doc_lengths``, ``dilation``)."""
    params = params or {}
    if kind == "full":
        return s * s
    if kind == "causal":
        return s * (s + 1) // 2  # density (S + 1) / (2 S)
    if kind == "sliding":
        w = min(window, s)
        return w * (w + 1) // 2 + (s - w) * w  # row i keeps min(i + 1, W) keys
    if kind == "document":  # causal inside each document: a triangle per document
        lengths = params["doc_lengths"]
        if sum(lengths) != s:
            raise ValueError(f"document lengths sum to {sum(lengths)}, not S={s}")
        return sum(n * (n + 1) // 2 for n in lengths)
    if kind == "prefix_lm":  # row i keeps max(i + 1, P) keys
        p = min(window, s)
        return p * p + s * (s + 1) // 2 - p * (p + 1) // 2
    if kind == "dilated":  # row i keeps distances 0, d, 2d, ... up to min(i, W - 1)
        d = params["dilation"]
        return sum(min(i, window - 1) // d + 1 for i in range(s))
    raise ValueError(kind)


def document_ids(seq_len: int, num_docs: int, device: str, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A sorted int32 document id per position: ``num_docs`` documents of random lengths (fixed
    seed, every one non-empty) packed into ``seq_len`` positions. Returns (ids on ``device``, lengths)."""
    n = max(1, min(num_docs, seq_len))
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(seq_len - 1, generator=gen)[: n - 1] + 1).values  # distinct, in [1, S)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), seq_len, dtype=torch.long)])
    lengths = bounds.diff()
    ids = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), lengths)
    return ids.to(device), lengths.tolist()


def tflops(flop: float, ms: float | None) -> float | None:
    return None if ms is None or ms <= 0 else flop / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# the variants


@dataclass
class Variant:
    key: str
    label: str
    fg_kwargs: dict  # score_mod / mask_mod for flashgen (fg.mods objects)
    flex_score: Callable | None  # FlexAttention score_mod, written inline
    flex_mask: Callable | None  # FlexAttention mask_mod, written inline
    sdpa_causal: bool | None  # is_causal for SDPA; None: SDPA cannot express the variant
    mask_kind: str  # for the closed-form density check
    window: int | None = None  # sliding / dilated window, prefix length
    extra: dict = field(default_factory=dict)  # closed-form parameters (reported) and the doc tensor
    analysis: bool = False  # also time the block-map analysis (flashgen) and create_block_mask (flex)


def build_variants(fg, heads: int, device: str, window: int = 1024, *, seq_len: int = 8192, prefix: int = 1024,
                   num_docs: int = 16, dilated_window: int = 2048, dilation: int = 2) -> list[Variant]:
    """The benchmark's variants. The flex mods keep Python floats out of their closures (the softcap
    constant is a literal): dynamo may turn a captured float into a dynamic scalar, a different kernel."""
    slopes = fg.mods.alibi_slopes(heads, device=device)
    doc, doc_lengths = document_ids(seq_len, num_docs, device)

    def flex_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def flex_sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    def flex_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def flex_softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    def flex_document(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    def flex_prefix_lm(b, h, q_idx, kv_idx):  # as fg.mods.prefix_lm
        return (kv_idx < prefix) | (q_idx >= kv_idx)

    def flex_dilated(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < dilated_window) & ((q_idx - kv_idx) % dilation == 0)

    @fg.mask_mod
    def dilated(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < dilated_window) & ((q_idx - kv_idx) % dilation == 0)

    causal = fg.mods.causal
    return [
        Variant("full", "full", {}, None, None, False, "full"),
        Variant("causal", "causal", {"mask_mod": causal}, None, flex_causal, True, "causal"),
        Variant("sliding", f"sliding window {window}", {"mask_mod": fg.mods.sliding_window(window)}, None,
                flex_sliding, None, "sliding", window),
        Variant("alibi_causal", "alibi + causal", {"score_mod": fg.mods.alibi(slopes), "mask_mod": causal},
                flex_alibi, flex_causal, None, "causal"),
        Variant("softcap_causal", "softcap 30 + causal", {"score_mod": fg.mods.softcap(30.0), "mask_mod": causal},
                flex_softcap, flex_causal, None, "causal"),
        Variant("document", f"causal document ({len(doc_lengths)} docs)",
                {"mask_mod": causal & fg.mods.document(doc)}, None, flex_document, None, "document",
                extra={"doc": doc, "doc_lengths": doc_lengths}, analysis=True),
        Variant("prefix_lm", f"prefix LM {prefix}", {"mask_mod": fg.mods.prefix_lm(prefix)}, None, flex_prefix_lm,
                None, "prefix_lm", prefix, analysis=True),
        Variant("dilated", f"dilated window {dilated_window} (stride {dilation})", {"mask_mod": dilated}, None,
                flex_dilated, None, "dilated", dilated_window, extra={"dilation": dilation}, analysis=True),
    ]


# ---------------------------------------------------------------------------------------------
# one variant: check, then time every peer


def run_variant(fg, var: Variant, q, k, v, flex_fn, device: str, check_len: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, H, S, D = q.shape
    Dv = v.shape[-1]
    t_start = time.perf_counter()
    entry: dict = {"key": var.key, "label": var.label, "shape": [B, H, S, D],
                   "dtype": str(q.dtype).removeprefix("torch.")}

    # density: counted exactly by evaluating the mask, cross-checked against the closed form
    params = {name: value for name, value in var.extra.items() if not isinstance(value, torch.Tensor)}
    entry.update(params)
    if var.window is not None:
        entry["window"] = var.window
    kept = count_kept(var.fg_kwargs.get("mask_mod"), S, S, device)
    closed = closed_form_kept(var.mask_kind, S, var.window, params)
    entry["kept"] = kept
    entry["density"] = kept / (S * S)
    if kept != closed:
        entry["density_warning"] = f"counted {kept} kept entries, closed form says {closed}"
        print(f"  warning: {entry['density_warning']}")
    flop = 2.0 * B * H * kept * (D + Dv)
    entry["gflop"] = flop / 1e9

    # the peers, as zero-argument callables
    peers: dict[str, Callable | None] = {}
    errors: dict[str, str] = {}
    attn, err = attempt(lambda: fg.compile(**var.fg_kwargs))
    if err:
        errors["flashgen"] = err
        peers["flashgen"] = None
    else:
        peers["flashgen"] = lambda: attn(q, k, v)
    block_mask = None
    if var.flex_mask is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask, err = attempt(lambda: create_block_mask(var.flex_mask, None, None, S, S, device=device))
        if err:
            errors["flex"] = f"create_block_mask: {err}"
    if flex_fn is None:
        errors.setdefault("flex", "flex_attention is not available")
        peers["flex"] = None
    elif "flex" in errors:
        peers["flex"] = None
    else:
        peers["flex"] = lambda: flex_fn(q, k, v, score_mod=var.flex_score, block_mask=block_mask)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        if var.sdpa_causal is None:
            peers[name] = None  # not applicable: no entry in errors
            continue

        def call_sdpa(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=var.sdpa_causal)

        peers[name] = call_sdpa

    # first calls (compile) and outputs. Dynamo is reset first: each variant compiles flex afresh,
    # so that what an earlier variant captured (a tensor, an int) cannot make this one dynamic
    if peers.get("flex") is not None:
        import torch._dynamo as dynamo  # "as": a plain import would make torch a local name of this function

        attempt(dynamo.reset)
    outputs: dict[str, torch.Tensor] = {}
    first_call_s: dict[str, float] = {}
    for name in PEERS:
        fn = peers.get(name)
        if fn is None:
            continue
        t0 = time.perf_counter()
        out, err = attempt(lambda fn=fn: (fn(), sync(device))[0])
        if err:
            errors[name] = err
            peers[name] = None
            print(f"  {name}: failed: {err}")
            continue
        first_call_s[name] = time.perf_counter() - t0
        outputs[name] = out
    entry["first_call_s"] = first_call_s

    # correctness
    checks: dict[str, float] = {}
    sdpa_out = outputs.get("fa2", outputs.get("cudnn"))
    sdpa_name = "fa2" if "fa2" in outputs else "cudnn"
    if "flashgen" in outputs and "flex" in outputs:
        checks["flashgen_vs_flex"] = rel_err(outputs["flashgen"], outputs["flex"])
    if sdpa_out is not None:
        for name in ("flashgen", "flex"):
            if name in outputs:
                checks[f"{name}_vs_{sdpa_name}"] = rel_err(outputs[name], sdpa_out)
        if "cudnn" in outputs and "fa2" in outputs:
            checks["cudnn_vs_fa2"] = rel_err(outputs["cudnn"], outputs["fa2"])
    n = min(check_len, S)
    # (a) rows 0..n-1 of (b=0, h=0) of the full problem, all keys, against the float64 reference
    ref_rows, err = attempt(lambda: fg.attention_reference(q[:1, :1, :n], k[:1, :1], v[:1, :1], **var.fg_kwargs))
    if err:
        errors["reference"] = err
    else:
        for name, out in outputs.items():
            checks[f"{name}_vs_reference_rows{n}"] = rel_err(out[:1, :1, :n], ref_rows, torch.float64)
        del ref_rows
    # (b) flashgen on a sliced problem of its own: B = H = 1, the first n queries and keys
    if peers.get("flashgen") is not None:
        qs, ks, vs = (t[:1, :1, :n].contiguous() for t in (q, k, v))

        def sliced_check():
            ref = fg.attention_reference(qs, ks, vs, **var.fg_kwargs)
            return rel_err(attn(qs, ks, vs), ref, torch.float64)

        value, err = attempt(sliced_check)
        if err:
            errors["flashgen_sliced"] = err
        else:
            checks[f"flashgen_sliced_{n}_vs_reference"] = value
    for name, out in outputs.items():
        if not torch.isfinite(out).all().item():
            checks[f"{name}_nonfinite"] = math.inf
    entry["checks"] = checks
    failed = sorted(name for name, value in checks.items() if not value < REL_TOL)
    entry["checks_ok"] = not failed
    entry["checks_failed"] = failed
    if failed:
        print("  CHECK FAILED: " + ", ".join(f"{name}={checks[name]:.3g}" for name in failed))
    outputs.clear()
    sdpa_out = None
    free_memory()

    # timing
    results: dict[str, dict] = {}
    for name in PEERS:
        if name in errors:
            results[name] = {"error": errors[name]}
            continue
        fn = peers.get(name)
        if fn is None:
            results[name] = {"error": None, "skipped": "not applicable"}
            continue
        ms, err = attempt(lambda fn=fn: bench_ms(fn))
        if err:
            results[name] = {"error": err}
            print(f"  {name}: timing failed: {err}")
        else:
            results[name] = {"ms": ms, "tflops": tflops(flop, ms)}
    entry["results"] = results
    for name in ("reference", "flashgen_sliced"):
        if name in errors:
            entry.setdefault("check_errors", {})[name] = errors[name]
    entry["wall_s"] = time.perf_counter() - t_start
    peers.clear()
    free_memory()
    return entry


# ---------------------------------------------------------------------------------------------
# analysis time: building the block map (flashgen) / create_block_mask (FlexAttention)


def wall_ms(make: Callable[[], object], device: str, calls: int, warmup: int = 1,
            finish: Callable[[object], object] | None = None) -> dict:
    """Wall milliseconds per call of ``make()``, synchronized after each call: median over ``calls``
    calls after ``warmup`` untimed ones, and the very first call. With ``finish``, also the median
    of ``make()`` followed by ``finish(result)`` (``with_runs_ms``)."""
    alone, both = [], []
    first = None
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        value = make()
        sync(device)
        t1 = time.perf_counter()
        if finish is not None:
            finish(value)
            sync(device)
        t2 = time.perf_counter()
        del value
        if first is None:
            first = (t1 - t0) * 1e3
        if i >= warmup:
            alone.append((t1 - t0) * 1e3)
            both.append((t2 - t0) * 1e3)
    out = {"ms": statistics.median(alone), "min_ms": min(alone), "first_ms": first, "calls": calls, "warmup": warmup}
    if finish is not None:
        out["with_runs_ms"] = statistics.median(both)
    return out


def analysis_times(fg, var: Variant, shape: tuple[int, int, int, int], device: str, calls: int = ANALYSIS_CALLS,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per-call analysis time of one masked variant (see the module docstring). flashgen's maps use
    the tile size of its default forward config; ``with_runs_ms`` adds the run lists the forward
    kernel reads (built on the host, copied to the GPU), i.e. what a forward call pays in total."""
    from torch.nn.attention.flex_attention import create_block_mask

    from flashgen.runtime import default_config

    B, H, S, D = shape
    cfg = default_config(torch.device(device), D, D, dtype)
    tile = (cfg.block_m, cfg.block_n)
    ragged = S % cfg.block_n != 0
    mask = var.fg_kwargs["mask_mod"]
    res: dict = {"flashgen_block_size": list(tile), "calls": calls}

    def runs_of(bm):
        return bm.runs(ragged_last=ragged)

    def record(name: str, fn: Callable[[], dict]) -> None:
        value, err = attempt(fn)
        res[name] = value if err is None else {"error": err}
        if err:
            print(f"  analysis {name}: failed: {err}")

    # flashgen, first call: a fresh trace + analysis + block map every call (fg.block_mask keeps no cache)
    record("flashgen_first_call", lambda: wall_ms(
        lambda: fg.block_mask(mask, B, H, S, S, block_size=tile, device=device), device, calls, 0, runs_of))
    value, err = attempt(lambda: fg.block_mask(mask, B, H, S, S, block_size=tile, device=device))
    if err is None:
        res["flashgen_tiles"] = value.counts()
        res["flashgen_method"] = value.method
    doc = var.extra.get("doc")
    if doc is not None:
        attn = fg.compile(**var.fg_kwargs)
        # (a) cached: what a second forward call with the same doc tensor pays
        record("flashgen_cached", lambda: wall_ms(
            lambda: attn.block_mask(B, H, S, S, tile, device), device, 10 * calls, 1, runs_of))

        # (b) rebuilt: the doc tensor's version changed (as after an in-place update), so flashgen analyses again
        def rebuilt():
            doc.add_(0)
            return attn.block_mask(B, H, S, S, tile, device)

        record("flashgen_rebuilt", lambda: wall_ms(rebuilt, device, 2 * calls, 1, runs_of))
    # FlexAttention: create_block_mask evaluates the mask densely (vmap), over B x H unless broadcast
    record("flex_create_block_mask", lambda: wall_ms(
        lambda: create_block_mask(var.flex_mask, B, H, S, S, device=device), device, calls))
    record("flex_create_block_mask_broadcast", lambda: wall_ms(
        lambda: create_block_mask(var.flex_mask, None, None, S, S, device=device), device, calls))
    if doc is not None:  # the per-step case: FlexAttention's docs suggest compiling create_block_mask
        compiled = torch.compile(create_block_mask)
        record("flex_create_block_mask_compiled", lambda: wall_ms(
            lambda: compiled(var.flex_mask, B, H, S, S, device=device), device, calls))

    def flex_summary() -> dict:
        flex_bm = create_block_mask(var.flex_mask, None, None, S, S, device=device)
        return {"flex_block_size": list(getattr(flex_bm, "BLOCK_SIZE", ())),
                "flex_sparsity_pct": float(flex_bm.sparsity())}

    value, err = attempt(flex_summary)
    if err is None:
        res.update(value)
    free_memory()
    return res


# ---------------------------------------------------------------------------------------------
# host overhead and first-call time


def host_overhead(fg, device: str, calls: int = 1000) -> dict:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    res: dict = {"shape": [1, 1, 128, 64], "dtype": "bfloat16", "calls": calls}
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, 1, 128, 64, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))

    def per_call_us(fn: Callable, n: int) -> tuple[float, float]:
        """(mean µs per call over n calls with one synchronize at the end, median of single calls)."""
        for _ in range(20):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        mean = (time.perf_counter() - t0) / n * 1e6
        singles = []
        for _ in range(min(n, 200)):
            t1 = time.perf_counter()
            fn()
            singles.append(time.perf_counter() - t1)
        sync(device)
        singles.sort()
        return mean, singles[len(singles) // 2] * 1e6

    # a cached, compiled variant
    attn = fg.compile(mask_mod=fg.mods.causal)
    attn(q, k, v)
    sync(device)
    res["flashgen_cached_mean_us"], res["flashgen_cached_median_single_us"] = per_call_us(lambda: attn(q, k, v), calls)
    value, err = attempt(lambda: bench_ms(lambda: attn(q, k, v)) * 1e3)
    res["flashgen_do_bench_us"] = value if err is None else err
    # the functional form traces the mods on every call
    res["flashgen_functional_mean_us"], _ = per_call_us(lambda: fg.attention(q, k, v, mask_mod=fg.mods.causal),
                                                        max(calls // 5, 1))
    # SDPA for scale (eager PyTorch op, default backend)
    value, err = attempt(lambda: per_call_us(lambda: sdpa(q, k, v, is_causal=True), calls)[0])
    res["sdpa_mean_us"] = value if err is None else err
    value, err = attempt(lambda: bench_ms(lambda: sdpa(q, k, v, is_causal=True)) * 1e3)
    res["sdpa_do_bench_us"] = value if err is None else err

    # a new variant: unique constant, so neither flashgen's nor Triton's caches can already hold it
    cap = 20.0 + (time.time_ns() // 1000 % 99991) / 1e5
    t0 = time.perf_counter()
    fresh = fg.compile(score_mod=fg.mods.softcap(cap), mask_mod=fg.mods.causal)
    t1 = time.perf_counter()
    fresh.source()
    t2 = time.perf_counter()
    value, err = attempt(lambda: (fresh(q, k, v), sync(device)))
    t3 = time.perf_counter()
    res["first_call"] = {
        "variant": f"softcap({cap:g}) + causal",
        "trace_analyze_ms": (t1 - t0) * 1e3,
        "codegen_ms": (t2 - t1) * 1e3,
        "compile_and_launch_ms": (t3 - t2) * 1e3,
        "total_ms": (t3 - t0) * 1e3,
        "error": err,
    }
    # the same variant traced again: the kernel is shared, only tracing is paid
    t0 = time.perf_counter()
    again = fg.compile(score_mod=fg.mods.softcap(cap), mask_mod=fg.mods.causal)
    again(q, k, v)
    sync(device)
    res["retrace_same_variant_ms"] = (time.perf_counter() - t0) * 1e3
    return res


# ---------------------------------------------------------------------------------------------
# config sweep


def sweep_configs(fg) -> list:
    Config = fg.Config
    return [Config(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]


def _sweep_order(cfg, default, head_dim: int) -> tuple:
    """Likely winners first, so that a time budget cuts the least promising configs."""
    if cfg == default:
        return (0,)
    return (1, cfg.block_m != 128, cfg.num_warps != (8 if head_dim >= 128 else 4),
            {64: 0, 128: 1, 32: 2}.get(cfg.block_n, 3), {3: 0, 2: 1, 4: 2}.get(cfg.num_stages, 3))


def run_sweep(fg, device: str, budget_s: float, dtype=torch.bfloat16) -> dict:
    t_begin = time.perf_counter()
    groups = [(name, d) for d in (128, 64) for name in SWEEP_VARIANTS]
    out: dict = {"budget_s": budget_s, "groups": []}
    for gi, (name, head_dim) in enumerate(groups):
        group_budget = (budget_s - (time.perf_counter() - t_begin)) / (len(groups) - gi)
        out["groups"].append(sweep_group(fg, name, head_dim, device, group_budget, dtype))
        free_memory()
    out["wall_s"] = time.perf_counter() - t_begin
    return out


def sweep_group(fg, name: str, head_dim: int, device: str, budget_s: float, dtype) -> dict:
    """Every config of :func:`sweep_configs` for one (variant, D), until ``budget_s`` is spent."""
    from flashgen.runtime import default_config

    t_group = time.perf_counter()
    B, H, S = SWEEP_SHAPES[head_dim]
    gen = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(B, H, S, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    mask = fg.mods.causal if name == "causal" else None
    attn = fg.compile(mask_mod=mask)
    flop = 2.0 * B * H * count_kept(mask, S, S, device) * 2 * head_dim
    default = default_config(q.device, head_dim, head_dim, dtype)
    group: dict = {"variant": name, "head_dim": head_dim, "shape": [B, H, S, head_dim],
                   "default": list(_cfg_tuple(default)), "rows": [], "not_tried": 0}
    print(f"sweep {name} D={head_dim} [B={B} H={H} S={S}] (budget {budget_s:.0f} s)", flush=True)
    base, err = attempt(lambda: (attn(q, k, v, config=default), sync(device))[0])
    if err:
        print(f"  default {_cfg_str(default)}: failed: {err}")

    def one(cfg):
        o = attn(q, k, v, config=cfg)
        sync(device)
        e = rel_err(o, base) if base is not None else None
        if e is not None and not e < REL_TOL:
            raise RuntimeError(f"wrong result: rel err {e:.3g} vs the default config")
        return bench_ms(lambda: attn(q, k, v, config=cfg)), e

    for cfg in sorted(sweep_configs(fg), key=lambda c: _sweep_order(c, default, head_dim)):
        if time.perf_counter() - t_group > budget_s:
            group["not_tried"] += 1
            continue
        row: dict = {"config": list(_cfg_tuple(cfg))}
        t0 = time.perf_counter()
        value, err = attempt(lambda cfg=cfg: one(cfg))
        row["wall_s"] = time.perf_counter() - t0
        if err:
            row["error"] = err
            print(f"  {_cfg_str(cfg)}: skipped ({err})", flush=True)
        else:
            ms, e = value
            row.update(ms=ms, tflops=tflops(flop, ms), rel_err_vs_default=e)
            print(f"  {_cfg_str(cfg)}: {ms:8.3f} ms {row['tflops']:7.1f} TF/s", flush=True)
        group["rows"].append(row)
    timed = [r for r in group["rows"] if "ms" in r]
    if timed:
        best = min(timed, key=lambda r: r["ms"])
        group["best"] = best
        dflt = next((r for r in timed if r["config"] == group["default"]), None)
        group["default_tflops"] = dflt["tflops"] if dflt else None
        print(f"  best {name} D={head_dim}: {_cfg_str(best['config'])} {best['tflops']:.1f} TF/s"
              + (f" (default {dflt['tflops']:.1f} TF/s)" if dflt else ""))
    if group["not_tried"]:
        print(f"  {group['not_tried']} configs not tried (time budget; raise --sweep-budget)")
    group["wall_s"] = time.perf_counter() - t_group
    return group


def _cfg_tuple(cfg) -> tuple:
    if isinstance(cfg, (list, tuple)):
        return tuple(cfg)
    return (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)


def _cfg_str(cfg) -> str:
    bm, bn, w, s = _cfg_tuple(cfg)
    return f"Config(block_m={bm}, block_n={bn}, num_warps={w}, num_stages={s})"


# ---------------------------------------------------------------------------------------------
# reports


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _peer_tflops(entry: dict, name: str) -> float | None:
    return entry["results"].get(name, {}).get("tflops")


def _peer_cell(entry: dict, name: str) -> str:
    r = entry["results"].get(name, {})
    if r.get("tflops") is not None:
        return f"{r['tflops']:.1f}"
    return "err" if r.get("error") else "-"


def short_table(report: dict) -> str:
    rows = [("variant", "flashgen TF/s", "flex TF/s", "ratio", "cuDNN", "FA2", "checks")]
    for e in report["variants"]:
        fgt, flx = _peer_tflops(e, "flashgen"), _peer_tflops(e, "flex")
        ratio = fgt / flx if fgt and flx else None
        rows.append((e["label"], _peer_cell(e, "flashgen"), _peer_cell(e, "flex"), _fmt(ratio, ".2f"),
                     _peer_cell(e, "cudnn"), _peer_cell(e, "fa2"), "ok" if e["checks_ok"] else "FAIL"))
    return _text_table(rows)


# analysis-time measurements: (key in entry["analysis"], Markdown header, short header)
ANALYSIS_COLUMNS = (
    ("flashgen_first_call", "flashgen first call `fg.block_mask`", "fg first"),
    ("flashgen_cached", "flashgen cached `attn.block_mask`", "fg cached"),
    ("flashgen_rebuilt", "flashgen rebuilt (`doc.add_(0)`)", "fg rebuilt"),
    ("flex_create_block_mask", "flex `create_block_mask(B, H)`", "flex (B,H)"),
    ("flex_create_block_mask_broadcast", "flex `create_block_mask(None, None)`", "flex bcast"),
    ("flex_create_block_mask_compiled", "flex compiled `create_block_mask(B, H)`", "flex compiled"),
)


def _ms_cell(a: dict, key: str, runs: bool = True) -> str:
    """Median ms of one analysis measurement; flashgen's with the run lists in parentheses."""
    r = a.get(key)
    if not isinstance(r, dict):
        return "-"
    if r.get("error"):
        return "err"

    def fmt(ms):
        return format(ms, ".3f" if ms < 10 else ".1f")

    cell = fmt(r["ms"])
    if runs and r.get("with_runs_ms") is not None:
        cell += f" ({fmt(r['with_runs_ms'])})"
    return cell


def analysis_line(a: dict) -> str:
    parts = [f"{short} {_ms_cell(a, key, runs=False)} ms" for key, _, short in ANALYSIS_COLUMNS if key in a]
    return ", ".join(parts)


def analysis_short_table(report: dict) -> str:
    entries = [e for e in report["variants"] if e.get("analysis")]
    rows = [("analysis ms/call", *(short for _, _, short in ANALYSIS_COLUMNS))]
    for e in entries:
        a = e["analysis"]
        rows.append((e["label"], *("err" if a.get("error") else _ms_cell(a, key, runs=False)
                                   for key, _, _ in ANALYSIS_COLUMNS)))
    return _text_table(rows)


def _text_table(rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def analysis_markdown(report: dict) -> list[str]:
    entries = [e for e in report["variants"] if e.get("analysis")]
    if not entries:
        return []
    out = ["", "## Analysis (block map / create_block_mask, ms per call)", "",
           "Wall time per call, synchronized, median of a few calls after a warm-up (the first call of "
           "`fg.block_mask` is not warmed: every call traces and analyses afresh). flashgen at its default "
           "forward tile size, in parentheses with the run lists the kernel reads (built on the host, copied to "
           "the GPU): what a forward call pays. cached: `attn.block_mask` again with the same doc tensor; rebuilt: "
           "after `doc.add_(0)` (a new tensor version) inside the timed region. FlexAttention at its default "
           "block size; `(B, H)` evaluates the mask for every batch and head, `(None, None)` broadcasts.", "",
           "| variant | flashgen tiles (empty / partial / full) | " + " | ".join(h for _, h, _ in ANALYSIS_COLUMNS)
           + " |", "|---|---|" + "---:|" * len(ANALYSIS_COLUMNS)]
    notes = []
    for e in entries:
        a = e["analysis"]
        if a.get("error"):
            out.append(f"| {e['label']} | error: `{a['error']}` |" + " |" * len(ANALYSIS_COLUMNS))
            continue
        t = a.get("flashgen_tiles")
        tiles = (f"{t['empty']} / {t['partial']} / {t['full']} at {a['flashgen_block_size'][0]}x"
                 f"{a['flashgen_block_size'][1]}") if t else "-"
        out.append(f"| {e['label']} | {tiles} | " + " | ".join(_ms_cell(a, key) for key, _, _ in ANALYSIS_COLUMNS)
                   + " |")
        for key, header, _ in ANALYSIS_COLUMNS:
            r = a.get(key)
            if isinstance(r, dict) and r.get("error"):
                notes.append(f"- {e['label']} / {header}: `{r['error']}`")
        comp = a.get("flex_create_block_mask_compiled")
        if isinstance(comp, dict) and comp.get("first_ms") is not None:
            notes.append(f"- {e['label']}: compiled `create_block_mask` first call (compile) "
                         f"{comp['first_ms'] / 1e3:.1f} s")
        cached = a.get("flashgen_cached")
        if isinstance(cached, dict) and cached.get("first_ms") is not None:
            notes.append(f"- {e['label']}: flashgen's first `attn.block_mask` (builds the map) "
                         f"{cached['first_ms']:.2f} ms")
        if a.get("flex_sparsity_pct") is not None:
            notes.append(f"- {e['label']}: flex block mask at {'x'.join(map(str, a.get('flex_block_size', [])))}: "
                         f"{a['flex_sparsity_pct']:.1f}% of blocks empty")
    return out + ([""] + notes if notes else [])


def markdown(report: dict) -> str:
    m = report["meta"]
    B, H, S, D = m["shape"]
    out = [f"# flashgen forward benchmark ({m['date']})", "",
           f"- GPU: {m['gpu']}; torch {m['torch']}, triton {m['triton']}, flashgen {m['flashgen']}, "
           f"CUDA {m['cuda']}, Python {m['python']}",
           f"- {m['dtype']}, B={B}, H={H}, S={S}, D={D}; forward only; "
           f"`triton.testing.do_bench(warmup={WARMUP_MS}, rep={REP_MS}, return_mode='median')`",
           "- TFLOP/s = 4·B·H·S²·D·density / time, counting only unmasked entries (density counted exactly)",
           f"- checks: relative error ‖a−b‖/‖b‖ < {REL_TOL:g} (float32 on the full shape, float64 against "
           "`fg.attention_reference` on a slice)", ""]
    if report["variants"]:
        out += ["| variant | density | flashgen ms | flashgen TF/s | flex ms | flex TF/s | flashgen/flex | "
                "cuDNN TF/s | FA2 TF/s | checks |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in report["variants"]:
            r = e["results"]
            fgt, flx = _peer_tflops(e, "flashgen"), _peer_tflops(e, "flex")
            ratio = fgt / flx if fgt and flx else None
            out.append(f"| {e['label']} | {e['density']:.4f} | {_fmt(r['flashgen'].get('ms'), '.3f')} | "
                       f"{_peer_cell(e, 'flashgen')} | {_fmt(r['flex'].get('ms'), '.3f')} | {_peer_cell(e, 'flex')} | "
                       f"{_fmt(ratio, '.2f')} | {_peer_cell(e, 'cudnn')} | {_peer_cell(e, 'fa2')} | "
                       f"{'ok' if e['checks_ok'] else 'FAIL: ' + ', '.join(e['checks_failed'])} |")
        errs = [(e["label"], name, r["error"]) for e in report["variants"] for name, r in e["results"].items()
                if r.get("error")]
        errs += [(e["label"], name, msg) for e in report["variants"] for name, msg in e.get("check_errors", {}).items()]
        if errs:
            out += ["", "Errors:", ""] + [f"- {label} / {name}: `{msg}`" for label, name, msg in errs]
        out += ["", "Checks (relative errors):", ""]
        for e in report["variants"]:
            items = ", ".join(f"{name} {value:.2e}" for name, value in e["checks"].items())
            out.append(f"- {e['label']}: {items}")
    out += analysis_markdown(report)
    h = report.get("host_overhead")
    if h:
        out += ["", "## Host overhead (B=1, H=1, S=128, D=64, bf16, causal)", ""]
        if "error" in h:
            out.append(f"- error: `{h['error']}`")
        else:
            fc = h["first_call"]

            def num(x, spec=".1f"):
                return format(x, spec) if isinstance(x, (int, float)) else f"`{x}`"

            out += [f"- cached `attn(q, k, v)`: {num(h['flashgen_cached_mean_us'])} µs/call mean over {h['calls']} "
                    "calls (one synchronize at the end); median single call "
                    f"{num(h['flashgen_cached_median_single_us'])} µs; do_bench "
                    f"{num(h['flashgen_do_bench_us'], '.2f')} µs",
                    f"- `fg.attention(q, k, v, mask_mod=causal)` (fingerprint, trace reused): "
                    f"{num(h['flashgen_functional_mean_us'])} µs/call",
                    f"- SDPA (eager, default backend) at the same shape: {num(h['sdpa_mean_us'])} µs/call; do_bench "
                    f"{num(h['sdpa_do_bench_us'], '.2f')} µs",
                    f"- first call of a new variant ({fc['variant']}): {fc['total_ms']:.0f} ms = trace+analysis "
                    f"{fc['trace_analyze_ms']:.1f} ms + codegen {fc['codegen_ms']:.1f} ms + compile+launch "
                    f"{fc['compile_and_launch_ms']:.0f} ms" + (f" (error: `{fc['error']}`)" if fc["error"] else ""),
                    f"- the same variant compiled again (trace only, kernel shared): "
                    f"{h['retrace_same_variant_ms']:.1f} ms"]
    sw = report.get("sweep")
    if sw:
        out += ["", f"## Config sweep ({sw['wall_s']:.0f} s, budget {sw['budget_s']:.0f} s)", "",
                "| variant | D | shape | best config (block_m, block_n, warps, stages) | best TF/s | default | "
                "default TF/s | tried | failed | not tried |",
                "|---|---:|---|---|---:|---|---:|---:|---:|---:|"]
        for g in sw["groups"]:
            best = g.get("best")
            n_fail = sum(1 for r in g["rows"] if "error" in r)
            out.append(f"| {g['variant']} | {g['head_dim']} | {'x'.join(map(str, g['shape']))} | "
                       f"{tuple(best['config']) if best else '-'} | {_fmt(best['tflops'] if best else None)} | "
                       f"{tuple(g['default'])} | {_fmt(g.get('default_tflops'))} | {len(g['rows'])} | {n_fail} | "
                       f"{g['not_tried']} |")
        out += ["", "All timed configs:", "", "| variant | D | config | ms | TF/s |", "|---|---:|---|---:|---:|"]
        for g in sw["groups"]:
            for r in sorted((r for r in g["rows"] if "ms" in r), key=lambda r: r["ms"]):
                out.append(f"| {g['variant']} | {g['head_dim']} | {tuple(r['config'])} | {r['ms']:.3f} | "
                           f"{r['tflops']:.1f} |")
    out += ["", f"Total wall time {report['wall_s']:.0f} s.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main


def meta(fg, device: str, args) -> dict:
    import triton

    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "timestamp": now.isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "flashgen": fg.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "shape": [args.batch, args.heads, args.seq_len, args.head_dim],
        "argv": sys.argv[1:],
    }


def compiled_flex():
    """torch.compile(flex_attention), or None where FlexAttention is missing."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    try:  # one recompile per variant (new score_mod / block mask): stay well inside dynamo's limit
        import torch._dynamo as dynamo

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    except Exception:
        pass
    return torch.compile(flex_attention)


def run(args, device: str) -> dict:
    import flashgen as fg

    t_begin = time.perf_counter()
    report: dict = {"meta": meta(fg, device, args), "variants": [], "host_overhead": None, "sweep": None}
    m = report["meta"]
    print(f"flashgen forward benchmark: {m['gpu']}, torch {m['torch']}, triton {m['triton']}, {m['date']}")
    if not args.sweep_only:
        B, H, S, D = args.batch, args.heads, args.seq_len, args.head_dim
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        flex_fn = compiled_flex()
        variants = build_variants(fg, H, device, window=args.window, seq_len=S, prefix=args.prefix,
                                  num_docs=args.docs, dilated_window=args.dilated_window)
        assert tuple(v_.key for v_ in variants) == VARIANT_KEYS
        wanted = [s.strip() for s in args.variants.split(",")] if args.variants else None
        if wanted:
            unknown = set(wanted) - {v_.key for v_ in variants}
            if unknown:
                raise SystemExit(f"unknown variants {sorted(unknown)}; known: {[v_.key for v_ in variants]}")
            variants = [v_ for v_ in variants if v_.key in wanted]
        for var in variants:
            print(f"== {var.label} ==", flush=True)
            entry = run_variant(fg, var, q, k, v, flex_fn, device, args.check_len)
            free_memory()
            report["variants"].append(entry)
            cells = ", ".join(
                f"{name} {r['ms']:.3f} ms {r['tflops']:.1f} TF/s" if "ms" in r else f"{name} {r.get('error') or '-'}"
                for name, r in entry["results"].items())
            print(f"  {cells}  ({entry['wall_s']:.0f} s)", flush=True)
            if var.analysis:
                t0 = time.perf_counter()
                value, err = attempt(lambda var=var: analysis_times(fg, var, (B, H, S, D), device, args.analysis_calls))
                entry["analysis"] = value if err is None else {"error": err}
                entry["analysis"]["wall_s"] = time.perf_counter() - t0
                print("  analysis: " + (f"failed: {err}" if err else analysis_line(value)), flush=True)
                free_memory()
        del q, k, v
        free_memory()
        print("== host overhead ==", flush=True)
        value, err = attempt(lambda: host_overhead(fg, device, args.calls))
        report["host_overhead"] = value if err is None else {"error": err}
        if err:
            print(f"  failed: {err}")
        else:
            print(f"  cached attn(q,k,v): {value['flashgen_cached_mean_us']:.1f} us/call; first call of a new "
                  f"variant {value['first_call']['total_ms']:.0f} ms")
    if args.sweep:
        value, err = attempt(lambda: run_sweep(fg, device, args.sweep_budget))
        report["sweep"] = value if err is None else {"error": err}
        if err:
            print(f"sweep failed: {err}")
    report["wall_s"] = time.perf_counter() - t_begin
    if isinstance(report.get("sweep"), dict) and "error" in report["sweep"]:
        report["sweep_error"] = report.pop("sweep")["error"]
        report["sweep"] = None
    return report


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench_forward.json", out_dir / "bench_forward.md"
    json_path.write_text(json.dumps(report, indent=2, default=str, allow_nan=True) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for bench_forward.json/.md (default {DEFAULT_OUT}/)")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep launch configs for full and causal at D=128 and D=64 (B=8, H=16, S=4096)")
    p.add_argument("--sweep-only", action="store_true", help="run only the sweep (implies --sweep)")
    p.add_argument("--sweep-budget", type=float, default=270.0,
                   help="seconds for the whole sweep, shared by its 4 groups; likely winners run first (default 270)")
    p.add_argument("--variants", default="",
                   help=f"comma-separated subset of: {', '.join(VARIANT_KEYS)} (default: all)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1024, help="sliding window size (default 1024)")
    p.add_argument("--prefix", type=int, default=1024, help="prefix length of the prefix LM mask (default 1024)")
    p.add_argument("--docs", type=int, default=16, help="documents in the causal document mask (default 16)")
    p.add_argument("--dilated-window", type=int, default=2048,
                   help="window of the dilated (stride 2) sliding window (default 2048)")
    p.add_argument("--analysis-calls", type=int, default=ANALYSIS_CALLS,
                   help=f"timed calls per analysis-time measurement, median reported (default {ANALYSIS_CALLS})")
    p.add_argument("--check-len", type=int, default=512, help="queries/keys of the float64 reference slice")
    p.add_argument("--calls", type=int, default=1000, help="calls for the host-overhead mean (default 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sweep_only:
        args.sweep = True
    if not torch.cuda.is_available():
        print("bench_forward: no CUDA GPU visible; this benchmark needs one (nothing was run)")
        return 0
    report = run(args, "cuda")
    json_path, md_path = write_report(report, Path(args.out))
    print(f"\nwrote {json_path} and {md_path} ({report['wall_s']:.0f} s)")
    if report.get("sweep"):
        print("\nsweep, best config per (variant, D):")
        for g in report["sweep"]["groups"]:
            best = g.get("best")
            print(f"  {g['variant']:<7} D={g['head_dim']:<4} "
                  + (f"{_cfg_str(best['config'])} {best['tflops']:.1f} TF/s (default {_cfg_str(g['default'])} "
                     f"{_fmt(g.get('default_tflops'))} TF/s)" if best else "no config ran"))
    elif report.get("sweep_error"):
        print(f"\nsweep failed: {report['sweep_error']}")
    if report["variants"]:
        print()
        print(short_table(report))
        if any(e.get("analysis") for e in report["variants"]):
            print()
            print(analysis_short_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
