"""Autotuning of launch configurations (tile sizes, warps, pipeline stages).

Each kernel family (``fwd``, ``dkdv``, ``dq``) has a declarative :class:`Space`; :func:`candidates`
prunes it with a filter that drops configurations over the GPU's shared memory or a register
budget for the head dims and dtype, then :func:`tune` times the rest on the call's own tensors
(``triton.testing.do_bench``: CUDA events, median) and keeps the fastest. Results are stored by
``runtime.store_tuning`` under a key of (family, dtype, head dims, power-of-two buckets of the
lengths and of batch x heads, sparsity signature), next to the versions and the GPU, and reused by
later processes without re-tuning.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from .lowrank import head_blocks
from .runtime import Config, padded, smaller_configs


@dataclass(frozen=True)
class Space:
    """The configurations of one kernel family: every combination of these values."""

    block_m: tuple[int, ...]
    block_n: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]

    def configs(self) -> list[Config]:
        return [Config(*c) for c in itertools.product(self.block_m, self.block_n, self.num_warps, self.num_stages)]


SPACES = {
    "fwd": Space(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4)),
    "dkdv": Space(block_m=(32, 64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    "dq": Space(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3)),
}

_REGISTERS_PER_THREAD = 160  # fp32 tile values per thread that a configuration may keep live


def shared_memory_bytes(family: str, cfg: Config, block_d: int, block_dv: int, itemsize: int) -> int:
    """A lower estimate of the shared memory a configuration needs: the tiles that stay resident
    plus ``num_stages`` copies of the streamed ones."""
    m, n, s = cfg.block_m, cfg.block_n, cfg.num_stages
    if family == "fwd":  # q resident; k and v streamed
        return itemsize * (m * block_d + s * n * (block_d + block_dv))
    if family == "dkdv":  # k and v resident; q and dO streamed
        return itemsize * (n * (block_d + block_dv) + s * m * (block_d + block_dv))
    return itemsize * (m * (block_d + block_dv) + s * n * (block_d + block_dv))  # dq: q, dO resident


def register_values(family: str, cfg: Config, block_d: int, block_dv: int) -> float:
    """fp32 values per thread held by the accumulators and one score tile."""
    m, n = cfg.block_m, cfg.block_n
    live = {"fwd": m * block_dv, "dkdv": n * (block_d + block_dv), "dq": m * block_d}[family] + m * n
    return live / (32 * cfg.num_warps)


def _tile_dims(head_dim: int, head_dim_v: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """The widths the kernels' tiles give the head dims (q/k head blocks, padded v) and the
    element size."""
    return sum(head_blocks(head_dim)), padded(head_dim_v), torch.empty((), dtype=dtype).element_size()


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return 232448  # an H100/H200's, so that tuning in the interpreter prunes like on the GPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


@functools.cache  # on every call's path: computed once per (family, config, device, head dims, dtype)
@functools.lru_cache(maxsize=256)  # (the launch path asks on every call)
def first_fitting(family: str, cfg: Config, device: torch.device, head_dim: int, head_dim_v: int,
                  dtype: torch.dtype) -> Config:
    """``cfg``, or the first of :func:`~flashgen.runtime.smaller_configs` whose shared-memory
    estimate (a lower bound) fits the device: configurations that cannot fit are never compiled
    (each failed compile of a wide fp32 kernel costs tens of seconds)."""
    block_d, block_dv, itemsize = _tile_dims(head_dim, head_dim_v, dtype)
    limit = shared_memory_limit(device)
    options = [cfg] + smaller_configs(cfg)
    for c in options:
        if shared_memory_bytes(family, c, block_d, block_dv, itemsize) <= limit:
            return c
    return options[-1]


def candidates(family: str, device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
               space: Space | None = None) -> list[Config]:
    """The family's space without configurations that cannot fit."""
    block_d, block_dv, itemsize = _tile_dims(head_dim, head_dim_v, dtype)
    limit = shared_memory_limit(device)
    return [c for c in (space or SPACES[family]).configs()
            if shared_memory_bytes(family, c, block_d, block_dv, itemsize) <= limit
            and register_values(family, c, block_d, block_dv) <= _REGISTERS_PER_THREAD]


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def tuning_key(family: str, kernel_key: str, batch_heads: int, sq: int, skv: int, head_dim: int,
               head_dim_v: int, dtype: torch.dtype, sparsity: str) -> dict:
    """What a tuning result is valid for (lengths and batch x heads in power-of-two buckets)."""
    return {"family": family, "kernel": kernel_key, "dtype": str(dtype).removeprefix("torch."),
            "head_dim": head_dim, "head_dim_v": head_dim_v, "q_len": _bucket(sq), "kv_len": _bucket(skv),
            "batch_heads": _bucket(batch_heads), "sparsity": sparsity}


def measure(fn: Callable[[], None], device: torch.device, tune_ms: float) -> float:
    """Milliseconds per call: median of CUDA-event timings on a GPU, of wall times otherwise."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=max(5, int(tune_ms / 4)), rep=int(tune_ms),
                                             return_mode="median"))
    fn()  # compile / warm up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def tune(label: str, configs: list[Config], run: Callable[[Config], None], device: torch.device, *,
         tune_ms: float, progress: bool) -> tuple[Config, list[dict]]:
    """Time ``run(cfg)`` for every configuration; returns the fastest and every trial (failed ones
    with their error)."""
    from triton.runtime.errors import OutOfResources

    trials: list[dict] = []
    best: tuple[float, Config] | None = None
    for i, cfg in enumerate(configs):
        try:
            ms = measure(lambda cfg=cfg: run(cfg), device, tune_ms)
            trials.append({**cfg.__dict__, "ms": round(ms, 5)})
            if best is None or ms < best[0]:
                best = (ms, cfg)
        except (OutOfResources, triton.CompilationError, RuntimeError) as exc:
            trials.append({**cfg.__dict__, "ms": None, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        if progress:
            done = i + 1
            bar = "#" * (20 * done // len(configs))
            shown = f"{best[0]:.3f} ms" if best else "-"
            sys.stderr.write(f"\rflashgen: tuning {label} [{bar:<20}] {done}/{len(configs)}  best {shown}")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    if best is None:
        raise RuntimeError(f"flashgen: no configuration of {label} ran; errors: "
                           + "; ".join(t.get("error", "") for t in trials[:3]))
    return best[1], trials
