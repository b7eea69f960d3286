"""The disk cache, loading generated kernels, and launching them.

Disk cache (``settings().cache_dir``, default ``~/.cache/flashgen``):

- ``kernels/<variant>-<key12>.py``: generated sources (Triton reads kernel source with
  ``inspect``, so they must be files), named by the sha256 of their text, which covers the IR,
  the template and flashgen's version.
- ``triton/<hash>/``: the compiled binaries of those kernels. Triton compiles and keys them (by
  the source, the launch options, the GPU architecture and Triton's version); flashgen points
  Triton's cache here while it launches its own kernels (:func:`binaries_here`), unless the user
  set ``TRITON_CACHE_DIR``, which then wins.
- ``tuning/<variant>-<family>-<hash16>.json``: autotuning results (see ``flashgen.tuning``),
  keyed by flashgen and Triton versions, GPU, source key and tuning key.
- ``templates/``: the code templates, compiled (Jinja's bytecode cache; :func:`templates_here`).

Writes are atomic (temp file + rename) under a file lock, re-checked after acquiring it, so
concurrent processes neither corrupt nor duplicate entries. An entry that does not match its key
(truncated, edited) is reported once as a warning and rebuilt, never used.
``FLASHGEN_DISABLE_CACHE=1`` sends sources to a per-process temporary directory and keeps tuning
results in memory. On a machine without a GPU, ``flashgen/__init__`` switches Triton's
interpreter on before Triton is imported, so CPU tensors run the same kernels.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import json
import operator
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import triton
import triton.language as tl

from .analysis import AxisRead, Diagonal, TileRead
from .codegen.render import LOG2E, STAGGER, KernelSource, use_template_cache
from .ir import Node, Op, toposort
from .lowrank import head_blocks
from .settings import settings


class CacheWarning(UserWarning):
    """A cache entry was corrupted (and rebuilt) or could not be written."""


_private_dir: Path | None = None


def cache_dir() -> Path:
    """Where sources and tuning results go: the settings' directory, or with
    FLASHGEN_DISABLE_CACHE=1 a temporary one removed when the process exits."""
    global _private_dir
    current = settings()
    if not current.disable_cache:
        return current.cache_dir
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="flashgen-nocache-"))
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir


_prewarm: threading.Thread | None = None
prewarm_wait_s = 0.0  # how long first launches waited for the prewarm thread (benchmarks/startup.py)


# what a first call imports that ``import flashgen`` does not: Jinja (code generation) and the
# package Triton's first launch imports to specialise arguments
_FIRST_CALL_IMPORTS = ("jinja2", "triton.experimental.gluon")


def _triton_stamp() -> str:
    """A fingerprint of the files ``triton_key`` hashes (Triton's compiler, backends and language
    sources, its cache module and its library): their names, sizes and modification times.
    Reinstalling or editing Triton changes it; stat-ing them takes milliseconds, not the
    half-second that hashing the ~0.5 GB library does."""
    root = Path(triton.__file__).parent
    files = [root / "runtime" / "cache.py", *sorted((root / "_C").glob("libtriton*"))]
    for sub in ("compiler", "backends", "language"):  # (their modules: sources and extension modules)
        files += sorted(p for p in (root / sub).rglob("*") if p.suffix in (".py", ".so", ".pyd"))
    digest = hashlib.sha256(triton.__version__.encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _remember_triton_key(key) -> None:
    """Triton's key of itself (``key``: ``triton.runtime.cache.triton_key``), which every compiled
    binary's cache key includes. A fresh process computes it on its first launch by hashing
    Triton's files. flashgen keeps it under ``<cache>/triton-key/<stamp>.txt``, named by
    :func:`_triton_stamp`: a process whose Triton files are unchanged reads it and installs it as
    ``triton_key``, so its first launch hashes nothing. Without a disk cache Triton's own function
    does the work, as it does where this raises (an unwritable cache: ``_prewarm_work``)."""
    import triton.runtime.cache as triton_cache

    if settings().disable_cache:
        key()
        return
    path = cache_dir() / "triton-key" / f"{_triton_stamp()}.txt"
    value = _read(path)
    if value is None or not value.startswith(triton.__version__):
        value = key()
        if isinstance(value, str):
            write_atomic(path, value)
    elif triton_cache.triton_key is key:
        triton_cache.triton_key = functools.cache(lambda: value)


def _prewarm_work(key) -> None:
    try:
        _remember_triton_key(key)
    except Exception:  # noqa: BLE001 -- a Triton laid out otherwise: its own hash, as without flashgen
        key()
    for name in _FIRST_CALL_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # (a Triton without it: nothing to import ahead)
            pass


def prewarm_compiler() -> None:
    """Start hashing Triton itself in a background thread (``flashgen/__init__`` calls this on a
    machine with a GPU). Triton keys every compiled binary, cached or not, by a sha256 of its
    own sources and its ~0.5 GB library, computed on a process's first launch: ~0.5 s that the
    first call of a fresh process would otherwise wait for (read from flashgen's cache instead
    when Triton's files are unchanged: :func:`_remember_triton_key`). The thread also imports what a first
    call would (``_FIRST_CALL_IMPORTS``: 0.3 s on the H200 host, whose packages have no bytecode
    caches). It overlaps all this with what a program does before that call (CUDA's start-up,
    building the model); the first launch joins it (:func:`binaries_here`) instead of doing the
    work a second time."""
    global _prewarm
    key = getattr(getattr(getattr(triton, "runtime", None), "cache", None), "triton_key", None)
    if _prewarm is not None or key is None or interpreting():
        return
    _prewarm = threading.Thread(target=_prewarm_work, args=(key,), name="flashgen-prewarm", daemon=True)
    _prewarm.start()


@contextmanager
def binaries_here() -> Iterator[None]:
    """Within this context Triton compiles into and loads from ``<cache>/triton``, so a warm cache
    serves a fresh process without compiling. A ``TRITON_CACHE_DIR`` the user set is left alone."""
    global prewarm_wait_s
    if _prewarm is not None and _prewarm.is_alive():
        started = time.perf_counter()
        _prewarm.join()  # Triton's key of itself (functools-cached once the thread is done)
        prewarm_wait_s += time.perf_counter() - started
    knobs = getattr(triton, "knobs", None)
    if knobs is None or "TRITON_CACHE_DIR" in os.environ or interpreting():
        yield
        return
    knobs.cache.dir = str(cache_dir() / "triton")  # (Triton's knob also sets the environment variable)
    try:
        yield
    finally:
        del knobs.cache.dir
        os.environ.pop("TRITON_CACHE_DIR", None)


def _lock(path: Path):
    from filelock import FileLock  # a torch dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=120)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, CacheWarning, stacklevel=3)


def identifier(name: str) -> str:
    """A readable Python identifier made from a variant name."""
    ident = re.sub(r"_+", "_", re.sub(r"\W+", "_", name)).strip("_").lower()[:48] or "attention"
    return ident if not ident[0].isdigit() else f"v_{ident}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.compiler.assume_constant_result  # (torch.compile: a constant of the process, not traced)
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (decided when triton was imported)."""
    return _interpreting()


@functools.cache
def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # pragma: no cover - Triton < 3.4


# The backward's streamed tiles through the tensor memory accelerator (TMA descriptors the kernels
# make; ``backward_tma`` says for which masks): None where the GPU has one (compute capability 9
# and later) and the layout allows it; False never; True also in the interpreter (its descriptors
# are emulated: the tests check both forms there)
TMA: bool | None = None


@functools.cache
def _tma_device(index: int) -> bool:
    return (hasattr(triton.language, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
            and torch.cuda.get_device_capability(index)[0] >= 9)


def _tma_here(device: torch.device) -> bool:
    """Whether kernels on ``device`` may make TMA descriptors: ``TMA`` True, or None (the default)
    on a GPU that has them, outside the interpreter."""
    if TMA is not None:
        return TMA
    return device.type == "cuda" and not interpreting() and _tma_device(
        device.index if device.index is not None else torch.cuda.current_device())


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may read these [B, H, S, D] tensors through TMA descriptors over each
    head's [S, D] rows: D contiguous, the data and the (positive) row stride 16-byte aligned, and
    the batch and head strides of sizes over 1. Checked per call: it is part of the plan key."""
    if not _tma_here(tensors[0].device):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or t.stride(-2) <= 0 or (t.stride(-2) * size) % 16:
            return False  # (the row stride is the descriptor's, whatever S is, and TMA takes no 0 there)
        if any(n > 1 and (stride * size) % 16 for n, stride in zip(t.shape[:-2], t.stride()[:-2])):
            return False
    return True


# global memory for the descriptors the kernels make (128 bytes each, per program)
def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tile_tma_ok(captured: list[torch.Tensor], reads: tuple) -> bool:
    """Whether the kernels may take their [q, kv] tile reads (``analysis.TileRead``: a dense bias)
    through TMA descriptors: where ``tma_ok`` would (the device, ``TMA``), kv contiguous, and the
    data, the q stride and the strides of the other indexed dimensions (of sizes over 1) 16-byte
    aligned. Checked per call (part of the plan key). H200, bf16 8x16x4096x64, bias [H, S, S]: the
    forward 1.748 ms against 2.192 with a pointer per entry (4x16x8192x128: 5.84 against 5.93)."""
    if not reads or not _tma_here(captured[reads[0].slot].device):
        return False
    for r in reads:
        t = captured[r.slot]
        size = t.element_size()
        if t.stride(r.kv_dim) != 1 or t.data_ptr() % 16 or t.stride(r.q_dim) <= 0 or (t.stride(r.q_dim) * size) % 16:
            return False
        if any(t.shape[d] > 1 and (t.stride(d) * size) % 16 for d, _ in r.others):
            return False
    return True


def ensure_allocator() -> None:
    """Kernels that make TMA descriptors need Triton's allocator for their scratch memory. Set
    flashgen's in this thread's context unless one is set already (a user's is kept). Triton keeps
    it per context, and autograd runs the backward on a thread of its own: checked per call."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        unset = isinstance(_allocator.get(), NullAllocator)
    except (ImportError, AttributeError):  # pragma: no cover - a Triton whose internals differ
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def _patch_interpreter_index() -> None:
    """Triton <= 3.6's interpreter turns scalar tensors (1-element arrays) into loop bounds with
    ``int(array)``, which NumPy >= 2.4 refuses; our kernels' ``range(start, end)`` needs it.
    Wrap the interpreter's tensor patching so ``__index__`` reads the element explicitly."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_flashgen", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._flashgen = True
    interpreter._patch_lang_tensor = patched


_modules: dict[str, ModuleType] = {}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def source_path(ks: KernelSource) -> Path:
    return cache_dir() / "kernels" / f"{ks.name}-{ks.key[:12]}.py"


def load_kernel(ks: KernelSource):
    """The ``@triton.jit`` entry point of ``ks`` (imported once per process)."""
    return getattr(load_module(ks), ks.kernel)


def load_module(ks: KernelSource) -> ModuleType:
    """The generated module of ``ks``, written to the cache directory and imported once per process."""
    module = _modules.get(ks.key)
    if module is None:
        if interpreting():
            _patch_interpreter_index()
        path = source_path(ks)
        if _read(path) != ks.source:
            with _lock(path):
                text = _read(path)  # another process may have written it meanwhile
                if text is not None and text != ks.source:
                    _warn_once(str(path), f"flashgen: cache entry {path} does not match its key "
                                          "(truncated or edited); it was rebuilt")
                if text != ks.source:
                    write_atomic(path, ks.source)
        mod_name = f"flashgen_generated_{ks.name}_{ks.key[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        _modules[ks.key] = module
    return module


# ---------------------------------------------------------------------------------------------
# the warp-specialised forward and backward for Hopper (Gluon; ``render.render_ws``)

WS_FORWARD = True  # False: the Triton forward everywhere (for A/B timing, and a way out)
WS_BACKWARD = True  # the same for the backward
WS_FORWARD_HEAD_DIMS = (64, 128)  # the forward's
# the forward's consumer warp groups of 64 query rows by v's head dim (else 2). At 64, FlashAttention-3's
# three taking turns in persistent programs, there for plain logits over a band or a block map of a mask
# that reads no tensor (``Attention._ws_groups``). 8x16x4096x64, TF/s against the Triton kernel's and
# flex's: no mask 492 / 431 / 403, causal 421 / 384 / 343, a sliding window 1024 339 / 307 / 276, prefix
# LM 1024 423 / 384 / 352, a dilated window 182 / 123 / 97; with a score_mod the Triton kernel was faster
# and takes those calls, and masks that read tensors (documents) keep it too (benchmarks/ab_ws_forward.py,
# ab_item_order.py; PERFLOG, twenty-sixth to twenty-eighth sessions)
WS_FORWARD_GROUPS = {64: 3}
# their persistent programs take rounds of work items from chunks of heads whose keys and values take about
# this many bytes, each chunk's last query blocks first (``_item`` in the template): a round's keys and
# values then come from L2. 8x16x4096x64 (1 MiB of them per head), TF/s with chunks of 8 / 16 / 32 / 64
# MiB / every head, the Triton kernel and flex: causal 423.0 / 420.6 / 408.5 / 372.2 / 374.1, 384.0, 342.7;
# a sliding window 1024 322.7 / 339.0 / 339.1 / 327.9 / 306.2, 307.4, 276.3; prefix LM 1024 416.3 / 423.4
# / 408.0 / 375.1 / 382.1, 383.5, 351.6 (H200, benchmarks/ab_item_order.py, PERFLOG)
WS_CHUNK_BYTES = 16 << 20
# the columns q and k may have past v's head dim (a low-rank bias's factors, padded with zeros)
WS_EXTRA_QK = 16
WS_STAGES = 3  # K/V buffers: 3 measured 614 TF/s against 605 for 2 (H200, 4x16x8192x128, PERFLOG)
# the backward's Q/dO buffers, and dQ tiles in flight per consumer group (shared memory allows 3 and
# 1, or 2 and 2); chosen by benchmarks/ab_ws_backward.py (PERFLOG)
WS_BACKWARD_STAGES = 2
WS_DQ_BUFFERS = 2
# v's head dims at which block maps with fewer than SPARSE_OCCUPANCY of their tiles non-empty (rows of
# a few query blocks: a document mask's) take the Gluon kernels, the forward where WS_FORWARD_HEAD_DIMS
# has it: 16 documents at 4x16x8192x128 1.750 ms fwd+bwd against 1.946 for the Triton kernels; at 64
# the Gluon backward measured 1.3-1.5x slower (H200, benchmarks/ab_sparse_backward.py, PERFLOG)
WS_SPARSE_HEAD_DIMS = (128,)
# the least work (4·B·H·S²·D) it takes: ~0.2 ms of forward. Its launch goes through Gluon's launcher
# (130-250 µs of host time per call on the H200 host, against 35-67 µs for the Triton kernel's kept
# launches; benchmarks/ws_host.py), which smaller calls would wait on
WS_MIN_FLOPS = 1e11


@functools.cache
def _gluon_hopper() -> bool:
    """Whether this Triton has Gluon's Hopper API (Triton 3.5 on)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _sm90(index: int | None) -> bool:
    """Whether CUDA device ``index`` (None: the current one) is a Hopper GPU (sm_90): asked once per device."""
    return torch.cuda.get_device_capability(index) == (9, 0)


def ws_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool = False) -> bool:
    """Whether a call can take the warp-specialised forward (or backward): a Hopper GPU (sm_90), bf16
    or fp16, head dims of 128 or 64 (the forward at 64 for plain logits over a band or a map of a mask
    that reads no tensor, the caller's rule: ``Attention._ws_groups``), as many keys as queries and a
    multiple of 128 of each, contiguous 16-byte aligned inputs, at least ``WS_MIN_FLOPS`` of work. Every
    other call takes the Triton kernel."""
    on = WS_BACKWARD if backward else WS_FORWARD
    if not on or interpreting() or q.device.type != "cuda" or not _gluon_hopper():
        return False
    Sq, D = q.shape[-2:]
    Skv, Dv = v.shape[-2:]
    return (_sm90(q.device.index) and q.dtype in (torch.bfloat16, torch.float16)
            and D - Dv in (0, WS_EXTRA_QK) and Dv in ((64, 128) if backward else WS_FORWARD_HEAD_DIMS)
            and Sq == Skv and Sq % 128 == 0 and 4 * q.shape[:2].numel() * Sq * Sq * Dv >= WS_MIN_FLOPS
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v)))  # (TMA's alignment)


_KEPT: OrderedDict = OrderedDict()  # kept_launch's Launches, by kernel, grid, constexprs and argument kinds


def kept_launch(kernel, grid: tuple, args: tuple, constexprs: dict) -> None:
    """Launch ``kernel`` (Triton or Gluon) through a kept :class:`Launch`: Triton's launcher the first
    time for each (kernel, grid, constexprs, argument kinds), the compiled kernel directly after
    that, skipping Triton's binding and specialisation (~50 µs of host time per launch). Argument
    kinds: tensors by dtype and device (``Launch`` checks their alignment per call), integers by
    value (Triton specialises them), TMA descriptors by block, dtype, shape and strides."""
    key = (kernel, grid, tuple(constexprs.items()), tuple(_kind(a) for a in args))
    launch = _KEPT.get(key)
    if launch is None:
        launch = _KEPT[key] = Launch(None, kernel, grid, (), constexprs)
        if len(_KEPT) > 256:  # (many shapes)
            _KEPT.popitem(last=False)
    launch(*args)


def _kind(a) -> tuple:
    if isinstance(a, torch.Tensor):
        return "t", a.dtype, a.device
    if isinstance(a, (bool, int)):
        return "i", type(a), a
    if isinstance(a, float):
        return ("f",)
    if hasattr(a, "block_shape"):  # a TMA descriptor
        return "d", tuple(a.block_shape), a.base.dtype, tuple(a.shape), tuple(a.strides)
    return "o", a


def _gluon_descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor for Gluon kernels over ``t`` (contiguous, or the last columns of a
    contiguous tensor) viewed as rows of its last dimension (1-D for a 1-D block), in tiles of
    ``block`` with that block's default shared layout (unswizzled for 1-D)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    view = t.view(-1) if len(block) == 1 else t.view(-1, t.shape[-1])
    return TensorDescriptor.from_tensor(view, block, _gluon_layout(tuple(block), t.dtype))


@functools.cache
def _gluon_layout(block: tuple[int, ...], dtype: torch.dtype):
    """The shared layout of a TMA block (computed once: ~6 µs of host time per descriptor otherwise)."""
    from triton.experimental.gluon import language as gl

    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32, torch.int32: gl.int32,
             torch.int16: gl.int16, torch.int8: gl.int8, torch.uint8: gl.uint8}[dtype]
    if len(block) == 1:
        return gl.NVMMASharedLayout(0, dtype.primitive_bitwidth, rank=1)
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def _leads(t: torch.Tensor, others: tuple[tuple[int, str | int], ...], unit: int = 1) -> tuple[int, int, int]:
    """(lead_b, lead_h, lead): where a read of ``t`` whose dimensions ``others`` are indexed by b, h or
    constants starts for (b, h), as lead_b * b + lead_h * h + lead, in units of ``unit`` entries
    (each of those dimensions' strides a multiple of it)."""
    lead = {"b": 0, "h": 0, "": 0}
    for d, x in others:
        lead[x if isinstance(x, str) else ""] += t.stride(d) // unit * (1 if isinstance(x, str) else x)
    return lead["b"], lead["h"], lead[""]


def ws_tile_args(read: TileRead, t: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple | None:
    """The Gluon kernels' arguments for a tensor read in [q, kv] tiles (a dense bias; its reads
    proved in range): a TMA descriptor of ``t`` as rows of keys (blocks of ``block``: 128 x 128 for
    the forward, 64 x 128 for the backward) and the row of (b, h, q = 0) there as ``lead_b * b +
    lead_h * h + lead``; or None where TMA cannot read it so: a dtype other than bf16 or fp16, keys
    not contiguous, rows not 16-byte aligned, or strides of other dimensions that are not whole rows."""
    row = t.stride(read.q_dim)
    if (t.dtype not in (torch.bfloat16, torch.float16) or t.stride(read.kv_dim) != 1 or row <= 0
            or row * t.element_size() % 16 or t.data_ptr() % 16
            or any(t.stride(d) % row for d, _ in read.others)):
        return None
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows = 1 + sum((t.shape[d] - 1) * t.stride(d) // row for d in range(t.dim()) if d != read.kv_dim)
    desc = TensorDescriptor(t, [rows, t.shape[read.kv_dim]], [row, 1], list(block), _gluon_layout(block, t.dtype))
    return desc, *_leads(t, read.others, row)


def ws_axis_args(read: AxisRead, t: torch.Tensor, block: int) -> tuple:
    """The Gluon kernels' arguments for a tensor their mask reads along the keys or the queries
    (``analysis.AxisRead``, that axis the tensor's innermost dimension; ``Attention._axis_slots`` said
    it can be staged): a 1-D TMA descriptor of ``t``'s entries (blocks of ``block``: the forward's
    128 keys, the backward's 64 queries) and the entry of (b, h, position 0) as ``lead_b * b +
    lead_h * h + lead``."""
    return _gluon_descriptor(t.view(-1), [block]), *_leads(t, read.others)


def ws_forward(module: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, scale: float, mods: list | None = None, plain: bool = True,
               runs: tuple = (), tile: tuple = (), factors: tuple = ()) -> None:
    """Launch ``module.attn_fwd_ws`` (``ws_fits`` said yes): out and lse (contiguous [B, Hq, S, D]
    and [B, Hq, S]) written in place. ``mods``: None where the module evaluates no mod, else the
    captured tensors' arguments (``captured_args``); ``plain``: the logits are plain (``scale`` > 0
    then); ``runs``: the block map's hulls by queries and their strides (``blocks.hulls``), for a
    module that visits its tiles; ``tile``: ``ws_tile_args``'s, for a module that reads a tensor in
    [q, kv] tiles (two stages then: its
    tiles take the shared memory of the third). For a module rendered with ``extra_qk`` (two
    stages too: three of K or of V measured no faster), q and k have ``WS_EXTRA_QK`` columns past
    v's head dim, or those columns come apart as ``factors`` ([B, Hq, S, WS_EXTRA_QK] and
    [B, Hkv, S, WS_EXTRA_QK]: no copy of q and k with them)."""
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    scales = (scale * LOG2E if plain else LOG2E,) + ((scale, *mods) if mods is not None else ()) + runs + tile
    factors = (q[..., Dv:], k[..., Dv:]) if D != Dv else factors
    extra = tuple(_gluon_descriptor(t, [rows, t.shape[-1]]) for t, rows in zip(factors, (64, 128)))
    blocks = -(-S // (64 * module.GROUPS.value))
    persistent = module.PERSISTENT.value  # (about one program per SM over (query block, head) items)
    grid = (min(blocks * B * Hq, sm_count(q.device)),) if persistent else (blocks, B * Hq)
    chunk = min(max(1, WS_CHUNK_BYTES // (S * (D + Dv) * k.element_size())) * (Hq // Hkv), B * Hq)  # (query heads)
    kept_launch(module.attn_fwd_ws, grid,
                (_gluon_descriptor(q, [64, Dv]), _gluon_descriptor(k, [128, Dv]), _gluon_descriptor(v, [128, Dv]), out,
                 lse, Hq, S, *((B * Hq, chunk) if persistent else ()), *scales, *extra),
                dict(GROUP_SIZE=Hq // Hkv, STAGES=2 if tile or extra else WS_STAGES, num_warps=4))


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (an H100's or H200's 132 for a device that is not a GPU:
    launches captured to compile offline, ``parallel.captured``)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@triton.jit
def _row_dots(a, b, sub, out, rows, D: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = r < rows
    offs = r.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    x = tl.load(a + offs, mask=keep[:, None], other=0.0).to(tl.float32)
    y = tl.load(b + offs, mask=keep[:, None], other=0.0).to(tl.float32)
    dot = tl.sum(x * y, 1)
    if SUB:  # (+-inf and NaN, a fully masked row's dlse, count as 0, as in the Triton backward)
        d = tl.load(sub + r, mask=keep, other=0.0)
        dot -= tl.where((d == d) & (tl.abs(d) != float("inf")), d, 0.0)
    tl.store(out + r, dot, mask=keep)


def row_dots(a: torch.Tensor, b: torch.Tensor, sub: torch.Tensor | None = None) -> torch.Tensor:
    """rowsum(a · b) - sub in float32 for contiguous [..., D] ``a`` and ``b`` (D a power of two) and
    ``sub`` of their leading shape, its non-finite entries taken as 0: the backward's
    delta = rowsum(dO · O) - dlse."""
    rows, D = a.numel() // a.shape[-1], a.shape[-1]
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    if rows:
        kept_launch(_row_dots, (triton.cdiv(rows, 32),), (a, b, sub if sub is not None else out, out, rows),
                    dict(D=D, BLOCK=32, SUB=sub is not None))
    return out


@triton.jit
def _cast(src, dst, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = i < n
    tl.store(dst + i, tl.load(src + i, mask=keep).to(dst.dtype.element_ty, fp_downcast_rounding="rtne"), mask=keep)


def cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor's entries in ``dtype``: one vectorised pass (PyTorch's mixed-dtype
    elementwise kernels run unvectorised, ~3 TB/s from float32 to bf16 on the H200)."""
    dst = torch.empty(src.shape, dtype=dtype, device=src.device)
    if src.numel():
        kept_launch(_cast, (triton.cdiv(src.numel(), 4096),), (src, dst, src.numel()), dict(BLOCK=4096))
    return dst


def ws_backward(module: ModuleType, q, k, v, out, lse, dout, dlse, scale: float, mods: list | None = None,
                plain: bool = True, runs: tuple = (), tile: tuple = ()) -> tuple:
    """dq, dk, dv from ``module.attn_bwd_ws`` (``ws_fits(..., backward=True)`` said yes for q, k, v;
    out, lse, dout and dlse (or None) contiguous): one pass, dQ's tiles scaled and added up in a
    float32 buffer, then cast.
    ``mods``, ``plain``: as for ``ws_forward``; ``runs``: the map's hulls by keys;
    ``tile``: ``ws_tile_args``'s at blocks of 64 x 128, for a module that reads a tensor in [q, kv]
    tiles. q and k may have ``WS_EXTRA_QK`` columns past v's head dim (a module rendered with
    ``extra_qk``): their gradients come back as zeros (frozen factors of a low-rank bias)."""
    B, Hq, S, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    delta = row_dots(dout, out, dlse)
    # (zeroing it in delta's pass measured slower: 130 µs against 65 + 58 at 4x16x8192x128, PERFLOG)
    dq_sum = torch.zeros((B, Hq, S, Dv), dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(v), torch.empty_like(v)
    extra = tuple(_gluon_descriptor(t[..., Dv:], [64, D - Dv]) for t in (q, k)) if D != Dv else ()
    kept_launch(module.attn_bwd_ws, (S // 128, B * Hkv),
                (*(_gluon_descriptor(t, [64, Dv]) for t in (q, k, v, dout)), _gluon_descriptor(dq_sum, [64, 64]), dk,
                 dv, _gluon_descriptor(lse, [64]), _gluon_descriptor(delta, [64]), Hq, S,
                 scale * LOG2E if plain else LOG2E, scale, *(mods or ()), *runs, *tile, *extra),
                dict(GROUP_SIZE=Hq // Hkv, STAGES=WS_BACKWARD_STAGES, num_warps=4,  # (tiles' rings: a dQ buffer's room)
                     DQ_BUFFERS=1 if (tile or extra) and Dv == 128 else WS_DQ_BUFFERS))
    if not extra:
        return cast(dq_sum, q.dtype), dk, dv
    dq_full, dk_full = torch.zeros_like(q), torch.zeros_like(k)  # (the extra columns' gradients: zeros)
    dq_full[..., :Dv] = dq_sum
    dk_full[..., :Dv] = dk
    return dq_full, dk_full, dv


# ---------------------------------------------------------------------------------------------
# launch configurations


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters of one kernel (forward, dK/dV pass or dQ pass)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


SPARSE_OCCUPANCY = 0.1  # block maps with fewer non-empty tiles than this take the sparse tiles


def default_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                   sparsity: str = "dense", diagonal_reads: bool = False) -> Config:
    """A good forward configuration without tuning (measured on an H200; see benchmarks/PERFLOG.md).
    ``sparsity``: "window" for a diagonal band bounded on both sides (a sliding window), "sparse"
    for a block map with fewer than ``SPARSE_OCCUPANCY`` of its tiles non-empty or with more
    partial tiles than full ones (``Attention._sparsity``), else "dense". ``diagonal_reads``: the
    kernel reads staggered copies of a table (``analysis.diagonal_of``)."""
    if device.type != "cuda":
        return Config(32, 32, 4, 1)  # the interpreter: big enough to keep the program count small
    width = max(head_dim, head_dim_v)
    if dtype == torch.float32:
        return Config(64, 32, 4, 2) if width <= 128 else Config(32, 32, 4, 1)
    # H200 tuning 2026-11-29 (bf16): short query blocks waste less on partial tiles at a window's two
    # edges or at documents' boundaries. Sliding window 1024: 0.666 ms against 0.770 for the dense
    # default at 4x16x8192x128, 0.372 against 0.517 at 8x16x4096x64 (windows 256 and 4096 alike);
    # causal document mask of 16 documents: 0.276 against 0.374 ms, and 0.129 against 0.206.
    # Dilated window 2048, stride 2 (every tile in its band partial): 1.454 against 1.662 ms, and
    # 0.890 against 1.122 (H200, 2026-11-29, benchmarks/ab_tiles.py).
    if sparsity == "window" and width <= 128:
        return Config(64, 64, 4, 3)
    if sparsity == "sparse" and width <= 128:
        return Config(64, 32, 4, 3)
    if diagonal_reads and width <= 64:
        # H200, 2026-11-29, bf16 8x16x4096x64, relative table [H, 2S-1] fp32 (benchmarks/ab_tiles.py):
        # 2.19 ms against 3.00 for (128, 64, 8, 3), whose three stages of 32 KB table tiles leave
        # one program per SM; at D = 128 (128, 64, 8, 3) stays the fastest (6.18 ms, others 6.45-7.44)
        return Config(64, 32, 4, 3)
    if width <= 64:
        return Config(128, 64, 8, 3)  # H200 sweep 2026-11-28: full 416 vs 387 TF/s for (128, 64, 4, 3)
    if width <= 128:
        return Config(128, 64, 8, 3)
    return Config(64, 32, 4, 2)


def default_backward_configs(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                             sparsity: str = "dense", tile_reads: bool = False,
                             diagonal_reads: bool = False) -> tuple[Config, Config]:
    """(dK/dV pass, dQ pass) configurations: a tall KV block streaming short query blocks, and the
    reverse. ``sparsity`` as in :func:`default_config`; ``tile_reads``: ``analysis.tile_reads``;
    ``diagonal_reads``: the kernels read staggered copies of a table (``analysis.diagonal_of``)."""
    if device.type != "cuda":
        return Config(32, 32, 4, 1), Config(32, 32, 4, 1)
    width = max(head_dim, head_dim_v)
    if dtype == torch.float32 or width > 128:
        return Config(32, 64, 4, 2), Config(64, 32, 4, 2)
    if sparsity == "window" and width <= 64:
        # H200 sweep 2026-11-29 (bf16, 8x16x4096x64, sliding window 1024): 1.807 ms fwd+bwd against
        # 2.127 for the dense pair below; at D = 128 the dense pair stays (3.290 against 3.234 ms)
        return Config(64, 64, 4, 3), Config(64, 64, 4, 3)
    if sparsity == "sparse":
        # H200 sweep 2026-11-29 (bf16, B=4, H=16, S=8192, D=128, causal document mask of 16 documents,
        # 4% of the tiles): 2.288 ms fwd+bwd against 2.580 ms for the dense pair below. Dilated window
        # 2048, stride 2, 8x16x4096x64: (64, 64, 4, 3) + (64, 32, 4, 4) 3.581 ms against 4.023
        return Config(32, 64, 4, 3), Config(64, 32, 4, 4)
    if diagonal_reads and width <= 64 and sparsity == "dense":
        # H200, 2026-11-29, bf16 8x16x4096x64, relative table [H, 2S-1] fp32, fwd+bwd interleaved over 3
        # rounds (benchmarks/ab_backward_tiles.py), against 9.04 ms for the pair below: dK/dV (64, 64, 4, 3)
        # 0.953x, dQ (64, 32, 4, 3) 0.914x (as the forward: its 32 KB fp32 table tiles)
        return Config(64, 64, 4, 3), Config(64, 32, 4, 3)
    if tile_reads and width == 128 and sparsity == "dense":
        # H200, 2026-11-29, bf16 4x16x8192x128, dense bias [H, S, S], fwd+bwd interleaved over 4 rounds
        # (benchmarks/ab_backward_tiles.py): 23.56 ms against 24.30 for the pair below (every round
        # 2.4-3.8% faster); full attention and causal within their rounds' range, ALiBi 2.5% slower
        return Config(64, 64, 4, 2), Config(128, 64, 8, 3)
    # H200 sweep 2026-11-28 (bf16, B=4, H=16, S=8192, D=128, fwd+bwd): full 398 TF/s, causal 337,
    # against 210 / 196 for (32, 128, 4, 3) + (128, 32, 4, 3); see benchmarks/PERFLOG.md
    return Config(64, 128, 8, 3), Config(128, 64, 8, 3)


# H200, bf16, 4x16x8192x128, backward ms with TMA against pointer loads, same runs (2026-11-29,
# benchmarks/PERFLOG.md; identical kernels scattered by up to 4% there): full attention 13.40 /
# 14.20 (a prototype measured the same gain), a dense bias 20.5 / 18.7; within the scatter: causal
# 7.43 / 7.59 (and 2.63 / 2.73 at 8x16x4096x64), prefix LM 7.51 / 7.62, ALiBi 7.60 / 7.32, a
# sliding window 2.32 / 2.27, a document mask 1.47 / 1.44. The forward was not faster with TMA
# (full 4.75 / 4.64 ms) and keeps its pointer loads. Heads over 128 (a second head block after
# 128, or v wider than 128) crash Triton 3.6's ptxas.
def backward_tma(sparsity: str, head_dim: int, head_dim_v: int, reads_in_logits: bool) -> bool:
    """Whether the backward passes take their streamed tiles through TMA descriptors where the
    layout allows (``tma_ok``): dense masks whose logits read no captured tensor (a bias, a table,
    ALiBi's slopes), heads up to 128. ``TMA = True`` takes it for any mask and logits."""
    if head_dim > 128 or head_dim_v > 128:
        return False
    return TMA is True or (sparsity == "dense" and not reads_in_logits)


def smaller_configs(cfg: Config) -> list[Config]:
    """Configurations to try, in order, when ``cfg`` needs more shared memory than the GPU has:
    fewer pipeline stages first, then halved tiles (never below 16)."""
    out = [Config(cfg.block_m, cfg.block_n, cfg.num_warps, stages) for stages in range(cfg.num_stages - 1, 0, -1)]
    block_m, block_n = cfg.block_m, cfg.block_n
    while max(block_m, block_n) > 16:
        if block_n >= block_m:
            block_n //= 2
        else:
            block_m //= 2
        out.append(Config(block_m, block_n, min(cfg.num_warps, 4), min(cfg.num_stages, 2)))
    return out


_working_configs: dict[tuple, Config] = {}


def launch(kernel, key: tuple, cfg: Config, grid, *args, extra=None, constexprs=None, **kwargs) -> Launch:
    """Launch ``kernel`` with ``cfg`` (``grid(cfg)`` gives the grid; ``extra(cfg)``, if given, more
    positional arguments that depend on the tile sizes, and ``constexprs(cfg)`` more keywords);
    if it does not fit the GPU's shared memory, retry with :func:`smaller_configs` and remember
    what worked for ``key``. Returns the :class:`Launch` that ran, to repeat for later calls of
    the same signature."""
    from triton.runtime.errors import OutOfResources

    cfg = _working_configs.get(key, cfg)
    tries = (cfg, *smaller_configs(cfg))
    for i, candidate in enumerate(tries):
        done = Launch.of(kernel, candidate, grid, extra, constexprs, kwargs)
        try:
            done(*args)
        except OutOfResources:
            if i == len(tries) - 1:
                raise
            continue
        _working_configs[key] = candidate
        return done


def run_config(kernel, cfg: Config, grid, *args, extra=None, constexprs=None, **kwargs) -> None:
    """Launch ``kernel`` with exactly ``cfg`` (see :func:`launch` for ``grid``, ``extra`` and
    ``constexprs``)."""
    Launch.of(kernel, cfg, grid, extra, constexprs, kwargs)(*args)


# Triton releases whose compiled kernels flashgen launches directly (``Launch``): checked on the
# GPU with those releases (tests/test_gpu.py); others go through Triton's launcher every time
DIRECT_LAUNCH_TRITON = ("3.6",)


class Launch:
    """One kernel launch with everything decided but the call's own arguments: the kernel, its
    grid, the arguments that follow the call's (``extra``: the block map's runs) and the keywords
    (constexprs, tiles, warps, stages). A call signature's plan keeps these, so that later calls
    of that signature only build their argument tuple and launch.

    After its first launch, a Launch calls the compiled kernel directly (``CompiledKernel[grid]``)
    where Triton allows (``DIRECT_LAUNCH_TRITON``), skipping Triton's per-launch argument binding
    and specialisation (~40 µs of host time per launch on the H200 host). That is exact only for
    arguments that Triton would specialise the same way: the plan's key fixes every integer
    argument and dtype, and each call's tensors must keep the first call's 16-byte alignment;
    a call that differs goes through Triton's launcher."""

    __slots__ = ("config", "kernel", "grid", "extra", "kwargs", "_direct")

    def __init__(self, config: Config, kernel, grid: tuple, extra: tuple, kwargs: dict):
        self.config, self.kernel, self.grid, self.extra, self.kwargs = config, kernel, grid, extra, kwargs
        self._direct: Callable | None | bool = None  # None: not tried yet; False: not possible

    @classmethod
    def of(cls, kernel, cfg: Config, grid, extra, constexprs, kwargs: dict) -> Launch:
        return cls(cfg, kernel, grid(cfg), extra(cfg) if extra is not None else (),
                   dict(kwargs, **(constexprs(cfg) if constexprs is not None else {}), BLOCK_M=cfg.block_m,
                        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages))

    def __call__(self, *args) -> None:
        direct = self._direct
        if direct and direct(args):
            return
        compiled = self.kernel[self.grid](*args, *self.extra, **self.kwargs)
        if direct is None and compiled is not None:  # (None: recorded to compile ahead, not run)
            self._direct = self._direct_launch(compiled, args) or False

    def _direct_launch(self, compiled, args: tuple) -> Callable | None:
        """``go(args) -> bool``: launch ``compiled`` with the arguments Triton's launcher would bind
        (the call's, ``extra``, then the constexprs in the kernel's order), or return False for a
        call whose tensors are aligned differently, on another device, or recorded (``captured``)."""
        from .parallel import capturing

        if (compiled is None or capturing() or interpreting()
                or ".".join(triton.__version__.split(".")[:2]) not in DIRECT_LAUNCH_TRITON):
            return None
        try:
            params = self.kernel.params[len(args) + len(self.extra):]
            tail = tuple(self.kwargs[p.name] if p.name in self.kwargs else p.default for p in params)
            if any(p.name not in self.kwargs and not p.has_default for p in params):
                return None
            run = compiled[(*self.grid, 1, 1)[:3]]  # (the compiled kernel's launcher reads three grid dims)
        except (AttributeError, TypeError):  # a Triton whose internals differ: its launcher, every time
            return None
        tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        aligned = tuple(args[i].data_ptr() % 16 == 0 for i in tensors)
        device, extra = torch.cuda.current_device(), self.extra

        def go(call: tuple) -> bool:
            if (tuple(call[i].data_ptr() % 16 == 0 for i in tensors) != aligned
                    or torch.cuda.current_device() != device or capturing()):
                return False
            run(*call, *extra, *tail)
            return True

        return go


def captured_args(tensors: list[torch.Tensor]) -> list:
    """The captured tensors' kernel arguments: each one's pointer, sizes and strides."""
    return [x for t in tensors for x in (t, *t.shape, *t.stride())]


_HOST_OPS = {  # analysis.DIAGONAL_OPS on int64 / bool tensors, with the IR's semantics (floor division)
    Op.NEG: operator.neg, Op.NOT: operator.invert, Op.ABS: torch.abs, Op.SIGN: torch.sign, Op.ADD: operator.add,
    Op.SUB: operator.sub, Op.MUL: operator.mul, Op.FLOORDIV: operator.floordiv, Op.MOD: operator.mod,
    Op.MIN: torch.minimum, Op.MAX: torch.maximum, Op.AND: operator.and_, Op.OR: operator.or_, Op.XOR: operator.xor,
    Op.SHL: operator.lshift, Op.SHR: operator.rshift, Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt,
    Op.GE: operator.ge, Op.EQ: operator.eq, Op.NE: operator.ne, Op.WHERE: torch.where,
}


def _on_diagonals(root: Node, diff: torch.Tensor, captured: list[torch.Tensor]) -> torch.Tensor:
    """The integer expression ``root`` (of ``q_idx - kv_idx`` alone: ``analysis.diagonal_of``) at
    ``q_idx - kv_idx = diff``; reads out of range give 0, as in the kernels."""
    memo: dict[int, torch.Tensor] = {}
    for n in toposort([root]):
        s = [memo[id(c)] for c in n.src]
        if n.op is Op.CONST:
            memo[id(n)] = torch.tensor(n.arg, device=diff.device)
        elif n.op is Op.INDEX:
            memo[id(n)] = diff if n.arg == "q_idx" else torch.zeros_like(diff)
        elif n.op is Op.LOAD:
            t = captured[n.arg]
            s = torch.broadcast_tensors(*s, diff)[:-1]
            inside = functools.reduce(operator.and_, [(i >= 0) & (i < size) for i, size in zip(s, t.shape)])
            got = t[tuple(i.clamp(0, max(size - 1, 0)) for i, size in zip(s, t.shape))].to(torch.int64)
            memo[id(n)] = torch.where(inside, got, 0)
        elif n.op is Op.CAST:
            memo[id(n)] = s[0] != 0 if n.arg == "bool" else s[0].to(torch.int64)
        else:
            memo[id(n)] = _HOST_OPS[n.op](*s)
    return memo[id(root)]


def diagonal_index(d: Diagonal, captured: list[torch.Tensor], Sq: int, Skv: int) -> torch.Tensor:
    """The table index of each entry of the staggered copies of ``d`` (:func:`staggered`) for ``Sq``
    queries and ``Skv`` keys: int64 ``[2, STAGGER, 2E]``, ``d.index`` at ``q_idx - kv_idx = r - x``
    for o = 0 and ``x - r`` for o = 1 (x from -E to E; E = max(Sq, Skv) rounded up to 16)."""
    reach = -(-max(Sq, Skv) // 16) * 16
    x = torch.arange(-reach, reach, device=captured[d.slot].device)
    r = torch.arange(STAGGER, device=x.device)[:, None]
    return _on_diagonals(d.index, torch.stack([r - x, x - r]), captured)


def staggered(d: Diagonal, captured: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """The staggered copies of the diagonal read ``d`` that the kernels take as ``diag{k}``
    (``codegen.render._staggered``): ``w[o, ..., r, x]``, with ``...`` the other dims of the table
    ``t = captured[d.slot]``, holds t's entry at ``index[o, r, x]`` (:func:`diagonal_index`) along
    ``d.dim``, 0 where that is outside t (as a read out of range gives). The view starts at x = 0,
    so that a row's first read is a multiple of STAGGER entries from its pointer. In the forward
    and dQ loops the kernels read ``w[0, ..., q % 8, kv - q // 8 * 8]``, in the dK/dV loop
    ``w[1, ..., kv % 8, q - kv // 8 * 8]``: contiguous along the tile's fast axis. 32·E entries per
    entry of t's other dims: 16 times a table [..., 2L - 1] of sequences as long as L."""
    t = captured[d.slot]
    length = t.shape[d.dim]
    with torch.no_grad():
        values = t.detach().movedim(d.dim, -1)[..., index.clamp(0, max(length - 1, 0))]
        values = torch.where((index >= 0) & (index < length), values, torch.zeros((), dtype=t.dtype, device=t.device))
        return values.movedim(-3, 0).contiguous()[..., index.shape[-1] // 2:]


def like_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros with ``t``'s shape, strides and offset into a storage as large as ``t``'s (a staggered
    copies' view reaches before its first entry)."""
    whole = torch.zeros(t.untyped_storage().nbytes() // t.element_size(), dtype=dtype, device=t.device)
    return whole.as_strided(t.shape, t.stride(), t.storage_offset())


def gradient_buffer(copies: torch.Tensor) -> torch.Tensor:
    """Zeros (float32) indexed as the staggered copies ``copies`` (:func:`staggered`'s view) but laid
    out with their row index fastest: the dK/dV pass's adds from neighbouring keys (rows r, r + 1)
    then land side by side instead of a whole row of copies apart."""
    *lead, rows, reach = copies.shape  # (the view's width is the columns before it: E)
    whole = torch.zeros(*lead, 2 * reach, rows, dtype=torch.float32, device=copies.device).transpose(-1, -2)
    return whole[..., reach:]


def fold_staggered(d: Diagonal, grad: torch.Tensor, index: torch.Tensor, into: torch.Tensor) -> None:
    """Add the gradient ``grad`` of ``d``'s staggered copies (:func:`gradient_buffer`; the dK/dV pass
    writes the rows along q_idx, o = 1) into ``into``, the table's gradient: each entry to the table
    index it copied."""
    reach = index.shape[-1] // 2
    whole = grad.as_strided((*grad.shape[:-1], 2 * reach), grad.stride(),
                            grad.storage_offset() - reach * grad.stride(-1))
    src, idx = whole[1].flatten(-2), index[1].flatten()
    inside = (idx >= 0) & (idx < into.shape[d.dim])
    into.movedim(d.dim, -1).index_add_(-1, idx[inside], src[..., inside].to(into.dtype))


@triton.jit
def _sum_leading(parts, out, n, count, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    total = tl.zeros([BLOCK], tl.float32)
    part = parts + offs
    for _ in range(count):  # (in order: the same sums on every call)
        total += tl.load(part, mask=keep, other=0.0).to(tl.float32)
        part += n  # (64-bit pointers: no offset of count * n to overflow)
    tl.store(out + offs, total.to(out.dtype.element_ty), mask=keep)


def sum_leading(parts: torch.Tensor, lead: int) -> torch.Tensor:
    """The contiguous ``parts`` summed over its first ``lead`` dimensions, in float32 and in a fixed
    order, returned in its dtype: the per-batch-entry gradients that the dQ pass stores (``api``).
    One read of ``parts`` (H200, [4, 16, 8192, 8192] bf16: 2.6 ms, 4.1 TB/s; torch's ``sum(0)`` took
    18.4 ms, 0.58 TB/s)."""
    out = torch.empty(parts.shape[lead:], dtype=parts.dtype, device=parts.device)
    if interpreting():
        _patch_interpreter_index()
    if out.numel():
        _sum_leading[(triton.cdiv(out.numel(), 4096),)](parts, out, out.numel(), parts.numel() // out.numel(),
                                                        BLOCK=4096)
    return out


def index_type(tensors: list[torch.Tensor]):
    """IDX_T for kernels that read ``tensors``: int64 where an offset into one may pass 2**31 - 1."""
    large = any(sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) > 2**31 - 1 for t in tensors)
    return triton.language.int64 if large else triton.language.int32


def padded(d: int) -> int:
    """The width of a head dim in the kernels' tiles: a power of two for v (``BLOCK_DV``), the sum
    of the q·kᵀ head blocks for q and k (``head_blocks``)."""
    return max(16, 1 << (d - 1).bit_length())


def qk_blocks(d: int) -> dict[str, int]:
    """The kernels' BLOCK_D and BLOCK_D2 constexprs for a q/k head dim (``lowrank.head_blocks``)."""
    first, second = head_blocks(d)
    return {"BLOCK_D": first, "BLOCK_D2": second}


# ---------------------------------------------------------------------------------------------
# tuning results on disk


def _environment_key() -> dict:
    """What, besides the kernel, changes a tuning result: versions and the GPU."""
    from ._version import __version__

    gpu = "cpu"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} sm_{major}{minor}"
    return {"flashgen": __version__, "triton": triton.__version__, "gpu": gpu}


def tuning_path(name: str, family: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps({**key, **_environment_key()}, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "tuning" / f"{name}-{family}-{digest[:16]}.json"


_tuned_in_memory: dict[str, dict] = {}


def load_tuning(name: str, family: str, key: dict) -> dict | None:
    """A stored tuning record for ``key``, or None (a corrupted one is reported and removed)."""
    path = tuning_path(name, family, key)
    if str(path) in _tuned_in_memory:
        return _tuned_in_memory[str(path)]
    if settings().disable_cache:
        return None
    text = _read(path)
    if text is None:
        return None
    try:
        record = json.loads(text)
        expected = {**key, **_environment_key()}
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.get("key") != json.loads(json.dumps(expected)) or "best" not in record:
            raise ValueError("key mismatch")
        Config(**record["best"])
    except (ValueError, TypeError, KeyError) as exc:
        _warn_once(str(path), f"flashgen: tuning result {path} is corrupted ({exc}); it will be tuned again")
        path.unlink(missing_ok=True)
        return None
    _tuned_in_memory[str(path)] = record
    return record


def store_tuning(name: str, family: str, key: dict, best: Config, trials: list[dict]) -> Path:
    path = tuning_path(name, family, key)
    record = {"key": {**key, **_environment_key()}, "best": best.__dict__, "trials": trials,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record = json.loads(json.dumps(record))
    _tuned_in_memory[str(path)] = record
    if not settings().disable_cache:
        with _lock(path):
            write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# inspecting and clearing the cache (``flashgen cache``)


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "kernel" (a generated source), "binary" (one compiled kernel, a directory) or "tuning"
    path: Path
    size: int
    mtime: float
    label: str = ""  # what a binary is: the kernel's name, from Triton's metadata


def _binary_entry(path: Path) -> CacheEntry:
    files = [f for f in path.iterdir() if f.is_file()]
    names = sorted({f.stem for f in files if f.suffix == ".json" and not f.name.startswith("__grp__")})
    mtime = max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
    return CacheEntry("binary", path, sum(f.stat().st_size for f in files), mtime, ",".join(names))


def templates_here() -> None:
    """Compiled code templates go to ``<cache>/templates`` (see ``render.use_template_cache``)."""
    path = cache_dir() / "templates"
    path.mkdir(parents=True, exist_ok=True)
    use_template_cache(str(path))


def cache_entries() -> list[CacheEntry]:
    root = cache_dir()
    out = []
    for kind, sub, pattern in (("kernel", "kernels", "*.py"), ("tuning", "tuning", "*.json"),
                               ("template", "templates", "*.cache")):
        for path in sorted((root / sub).glob(pattern)):
            st = path.stat()
            out.append(CacheEntry(kind, path, st.st_size, st.st_mtime, path.name))
    out += [_binary_entry(path) for path in sorted((root / "triton").glob("*")) if path.is_dir()]
    return out


def clear_cache() -> int:
    """Remove every cache entry (and its lock file); returns the number of entries removed."""
    entries = cache_entries()
    for e in entries:
        if e.kind == "binary":
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            e.path.unlink(missing_ok=True)
            Path(str(e.path) + ".lock").unlink(missing_ok=True)
    _tuned_in_memory.clear()
    return len(entries)
