"""Compiling a call's kernels side by side, in forked processes.

Triton compiles one kernel at a time and holds the GIL for much of it, so threads gain little. A
forward+backward call of a new variant needs three kernels (forward, dQ, dK/dV), ~1 s each
on a GPU host. :func:`compile_concurrently` runs the call once with its launches captured instead
of run, works out the binaries they need exactly as Triton's launcher would (argument
specialisation, options, target), and compiles each one missing from Triton's disk cache in a
child process of its own, at most ``FLASHGEN_COMPILE_JOBS`` at a time (``fork``: the child
inherits the loaded kernels and Triton's key of itself, and never touches the GPU). The children
write into Triton's cache; the call then runs normally and loads them from there. Anything
unexpected (a Triton release whose internals differ, a child that fails or hangs) leaves the work
to the ordinary serial compile, so the result never depends on this module: only the time to the
first result does.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .settings import settings

CHILD_TIMEOUT_S = 300.0  # a child still compiling after this is killed (its kernel compiles serially)


_capturing = threading.local()


def capturing() -> bool:
    """Whether this thread's launches are being recorded (:func:`captured`), not run."""
    return getattr(_capturing, "on", False)


@contextmanager
def captured(into: list) -> Iterator[None]:
    """Within this context, Triton kernel launches made by this thread are recorded as
    ``(kernel, args, kwargs)`` instead of run (other threads' launches run as usual)."""
    from triton.runtime.jit import JITFunction

    real, me = JITFunction.run, threading.get_ident()

    def run(kernel, *args, grid, warmup, **kwargs):
        if threading.get_ident() != me:
            return real(kernel, *args, grid=grid, warmup=warmup, **kwargs)
        into.append((kernel, args, kwargs))
        return None

    JITFunction.run, _capturing.on = run, True
    try:
        yield
    finally:
        JITFunction.run, _capturing.on = real, False


def launch_source(kernel, args: tuple, kwargs: dict, target) -> tuple:
    """``(src, options)``: what ``triton.compile`` is asked for a launch of ``kernel`` with these
    arguments on ``target``, worked out as Triton's launcher does (argument specialisation,
    options); ``triton.compile(src, target=target, options=options.__dict__)`` builds it."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kw = dict(kwargs)  # what JITFunction.run adds before binding
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
    if getattr(kernel, "is_gluon", lambda: False)():  # a Gluon kernel (``runtime.ws_forward``)
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    return ASTSource(kernel, signature, constexprs, attrs), options


def _job(kernel, args: tuple, kwargs: dict, target) -> tuple | None:
    """``(src, options, cache hash)`` of a launch (:func:`launch_source`), or None if its binary
    is already in Triton's disk cache."""
    from triton.compiler import make_backend
    from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key, get_cache_manager

    src, options = launch_source(kernel, args, kwargs, target)
    backend = make_backend(target)
    parsed = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    key = get_cache_key(src, backend, parsed, env_vars=get_cache_invalidating_env_vars())
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    name = f"{src.name[:150]}.json"
    if (get_cache_manager(digest).get_group(name) or {}).get(name) is not None:
        return None
    return src, options, digest


def _fork_compile(src, options, target) -> int:
    """Start a child that compiles one kernel into Triton's disk cache; its pid."""
    from triton import compile as triton_compile

    with warnings.catch_warnings():  # Python 3.12 warns on fork in a threaded process; the child runs no Python threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: compile, then leave without running the parent's exit handlers
        code = 1
        try:
            triton_compile(src, target=target, options=options.__dict__)
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait(pids: list[int], timeout_s: float, start: Callable[[], int | None] = lambda: None) -> int:
    """Wait for the children, starting another (``start()``: a pid, or None when there is none
    left) as each one ends; kill those still running after ``timeout_s``. How many succeeded."""
    deadline, done, pending = time.monotonic() + timeout_s, 0, set(pids)
    while pending:
        for pid in list(pending):
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                pending.discard(pid)
                done += os.waitstatus_to_exitcode(status) == 0
                if (more := start()) is not None:
                    pending.add(more)
        if pending and time.monotonic() > deadline:
            for pid in pending:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    return done


def _compiles_anyway() -> bool:
    """Whether the caller would compile even with a binary in the cache (Triton's
    ``TRITON_ALWAYS_COMPILE``, IR overrides or dumps): the children's work would be wasted."""
    try:
        from triton import knobs

        return bool(knobs.compilation.always_compile or knobs.compilation.override or knobs.compilation.dump_ir)
    except (ImportError, AttributeError):
        return False


def compile_concurrently(work: Callable[[], Any], target=None) -> int:
    """Run ``work`` with its kernel launches captured (nothing runs on the GPU; its return value
    is discarded) and compile the binaries they need, two or more at once, in child processes.
    ``target`` is Triton's ``GPUTarget`` (default: the current device's). Returns how many
    kernels the children compiled: 0 when fewer than two needed compiling (one compiles as fast
    in this process), on a platform without ``fork``, with ``FLASHGEN_COMPILE_JOBS`` below 2 (at
    most that many children run at once), or where Triton's internals differ from the 3.x ones
    this relies on."""
    limit = settings().compile_jobs
    if not hasattr(os, "fork") or limit < 2 or _compiles_anyway():
        return 0
    launches: list = []
    try:
        with captured(launches):
            work()
    except Exception:  # noqa: BLE001 -- the real run raises it again, where the caller expects it
        return 0
    try:
        if target is None:
            from triton.runtime import driver

            target = driver.active.get_current_target()
        jobs = {}
        for kernel, args, kwargs in launches:
            job = _job(kernel, args, kwargs, target)
            if job is not None:
                jobs[job[2]] = job  # one child per distinct binary
    except Exception:  # noqa: BLE001 -- a Triton whose internals differ: compile serially, as before
        return 0
    if len(jobs) < 2:
        return 0
    queue = list(jobs.values())

    def start() -> int | None:
        return _fork_compile(*queue.pop(0)[:2], target) if queue else None

    return _wait([start() for _ in range(min(limit, len(queue)))], CHILD_TIMEOUT_S, start)
