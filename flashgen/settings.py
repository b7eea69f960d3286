"""Every ``FLASHGEN_*`` environment variable, in one typed place (``flashgen config`` prints them).

Values are read from the environment at each call of :func:`settings`, so a notebook can change
``os.environ`` between calls; nothing else in flashgen reads ``FLASHGEN_*`` variables.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path


def _flag(name: str, raw: str | None) -> bool:
    value = (raw or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={raw!r}: use 1/0 (or true/false, yes/no, on/off)")


def _number(name: str, raw: str | None, default: float, lo: float) -> float:
    raw = (raw or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if not math.isfinite(value) or value < lo:
        raise ValueError(f"{name}={raw!r}: must be at least {lo}")
    return value


def _count(name: str, raw: str | None, default: int) -> int:
    value = float(_number(name, raw, default, 0))
    if not value.is_integer():
        raise ValueError(f"{name}={raw!r}: expected a whole number")
    return int(value)


@dataclass(frozen=True)
class Settings:
    """flashgen's configuration from the environment."""

    cache_dir: Path  # FLASHGEN_CACHE_DIR: generated sources and tuning results (default ~/.cache/flashgen)
    disable_cache: bool  # FLASHGEN_DISABLE_CACHE=1: nothing persists (sources go to a per-process temp dir)
    autotune: bool  # FLASHGEN_AUTOTUNE=1: every compiled variant tunes on first use, as with autotune=True
    tune_ms: float  # FLASHGEN_TUNE_MS: measuring time per configuration while tuning (default 50 ms)
    progress: bool  # FLASHGEN_PROGRESS=0 hides the tuning progress bar (default: shown on a terminal)
    compile_jobs: int  # FLASHGEN_COMPILE_JOBS: kernels a first call compiles at once, each in a child (default: CPUs)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value, meaning) rows."""
        meaning = {
            "cache_dir": ("FLASHGEN_CACHE_DIR", "generated sources and tuning results"),
            "disable_cache": ("FLASHGEN_DISABLE_CACHE", "1: nothing is written to the cache directory"),
            "autotune": ("FLASHGEN_AUTOTUNE", "1: every variant tunes on first use"),
            "tune_ms": ("FLASHGEN_TUNE_MS", "measuring time per configuration while tuning"),
            "progress": ("FLASHGEN_PROGRESS", "tuning progress bar"),
            "compile_jobs": ("FLASHGEN_COMPILE_JOBS", "kernels a first call compiles at once (0, 1: one by one)"),
        }
        rows = []
        for f in fields(self):
            var, text = meaning[f.name]
            value = getattr(self, f.name)
            shown = ("1" if value else "0") if isinstance(value, bool) else str(value)
            rows.append((var, shown, text))
        return rows


VARIABLES = ("FLASHGEN_CACHE_DIR", "FLASHGEN_DISABLE_CACHE", "FLASHGEN_AUTOTUNE", "FLASHGEN_TUNE_MS",
             "FLASHGEN_PROGRESS", "FLASHGEN_COMPILE_JOBS")


def settings() -> Settings:
    """The current settings (a bad value raises ValueError naming the variable). Parsed once per
    distinct environment: a call on the launch path costs a few dictionary reads."""
    import sys

    env = os.environ
    return _parse(tuple(env.get(v) for v in VARIABLES), env.get("HOME"), sys.stderr.isatty())


@functools.lru_cache(maxsize=16)
def _parse(values: tuple[str | None, ...], home: str | None, tty: bool) -> Settings:
    cache, disable, autotune, tune_ms, progress, jobs = values
    return Settings(
        cache_dir=Path(cache or Path.home() / ".cache" / "flashgen").expanduser(),
        disable_cache=_flag("FLASHGEN_DISABLE_CACHE", disable),
        autotune=_flag("FLASHGEN_AUTOTUNE", autotune),
        tune_ms=_number("FLASHGEN_TUNE_MS", tune_ms, 50.0, 1.0),
        progress=_flag("FLASHGEN_PROGRESS", progress) if (progress or "").strip() else tty,
        compile_jobs=_count("FLASHGEN_COMPILE_JOBS", jobs, os.cpu_count() or 1),
    )
