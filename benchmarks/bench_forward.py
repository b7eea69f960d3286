"""Forward-pass benchmark: flashgen next to torch.compile(flex_attention) and SDPA (cuDNN, FA2).

One process, one command on a CUDA machine (from the repository root)::

    PYTHONPATH=. python3 benchmarks/bench_forward.py --out docs/benchmarks/
    PYTHONPATH=. python3 benchmarks/bench_forward.py --sweep          # also sweep launch configs

bf16, B=4, H=16, S=8192, D=128 by default. Variants: full, causal, sliding window 1024,
alibi + causal, softcap 30 + causal. flashgen runs the library mods (``fg.mods``); FlexAttention
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
(trace + codegen + Triton compile + launch) of a new variant. ``--sweep`` times every launch
config of a grid for full and causal at D=128 and at D=64 (B=8, H=16, S=4096).

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


# ---------------------------------------------------------------------------------------------
# small helpers (module level so that they can be replaced in a dry run)


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


def closed_form_kept(kind: str, s: int, window: int | None = None) -> int:
    """Unmasked entries of an S x S mask, in closed form (a cross-check of :func:`count_kept`)."""
    if kind == "full":
        return s * s
    if kind == "causal":
        return s * (s + 1) // 2  # density (S + 1) / (2 S)
    if kind == "sliding":
        w = min(window, s)
        return w * (w + 1) // 2 + (s - w) * w  # row i keeps min(i + 1, W) keys
    raise ValueError(kind)


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
    window: int | None = None
    extra: dict = field(default_factory=dict)


def build_variants(fg, heads: int, device: str, window: int = 1024) -> list[Variant]:
    """The benchmark's variants. The flex mods keep Python floats out of their closures (the softcap
    constant is a literal): dynamo may turn a captured float into a dynamic scalar, a different kernel."""
    slopes = fg.mods.alibi_slopes(heads, device=device)

    def flex_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def flex_sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    def flex_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def flex_softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

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
    kept = count_kept(var.fg_kwargs.get("mask_mod"), S, S, device)
    closed = closed_form_kept(var.mask_kind, S, var.window)
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
        import torch._dynamo

        attempt(torch._dynamo.reset)
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


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
        import torch._dynamo

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
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
        variants = build_variants(fg, H, device, window=args.window)
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
                   help="comma-separated subset of: full, causal, sliding, alibi_causal, softcap_causal")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=1024, help="sliding window size (default 1024)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
