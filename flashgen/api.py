"""The public entry points: :func:`compile`, :class:`Attention` and :func:`attention`."""

from __future__ import annotations

import itertools
import math
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import ir, runtime
from .analysis import Analysis, analyze, entrywise_reads, reads_in_range, shared_by, tile_reads
from .autodiff import float_reads
from .blocks import BlockMask, reads
from .codegen.render import (
    KernelSource,
    lowering_notes,
    render_backward,
    render_block_map,
    render_forward,
    render_ws,
)
from .factors import LowRankBias, factor_bias
from .lowrank import lowering_cost
from .maps import LiveRuns
from .parallel import capturing, compile_concurrently
from .runtime import (
    SPARSE_OCCUPANCY,
    WS_EXTRA_QK,
    WS_FORWARD_GROUPS,
    Config,
    Launch,
    backward_tma,
    binaries_here,
    captured_args,
    default_backward_configs,
    default_config,
    diagonal_index,
    ensure_allocator,
    fold_staggered,
    gradient_buffer,
    identifier,
    index_type,
    interpreting,
    launch,
    like_layout,
    load_kernel,
    load_module,
    load_tuning,
    padded,
    qk_blocks,
    run_config,
    staggered,
    store_tuning,
    sum_leading,
    templates_here,
    tile_tma_ok,
    tma_ok,
    ws_axis_args,
    ws_backward,
    ws_fits,
    ws_forward,
    ws_tile_args,
)
from .settings import settings
from .spec import Mod
from .trace import Program, trace_attention
from .tuning import candidates, first_fitting, tune, tuning_key

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
FACTOR_ROUNDING_TOL = 1 / 128  # logits: a bias lowered to factors may move none by more (1% of a weight)

# one rendered kernel per program key, shared by every Attention with an equivalent program
_sources: dict[object, KernelSource | None] = {}


def _as_bias_fn(bias) -> Callable | None:
    """A dense bias tensor broadcastable to [B, H, Sq, Skv] becomes a mod that reads it
    (size-1 and missing leading dimensions are read at index 0, as broadcasting would)."""
    if not isinstance(bias, torch.Tensor):
        return bias
    if not 2 <= bias.dim() <= 4 or not bias.is_floating_point():
        raise ValueError(f"a bias tensor must be floating point with 2 to 4 dims broadcastable to [B, H, Sq, Skv] "
                         f"(e.g. [H, Sq, Skv]), got {bias.dtype} of shape {tuple(bias.shape)}")
    bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))  # leading dims of 1, as broadcasting reads them
    ones = [size == 1 for size in bias.shape]

    def dense_bias(b, h, q_idx, kv_idx):
        index = [0 if one else i for one, i in zip(ones, (b, h, q_idx, kv_idx))]
        return bias[index[0], index[1], index[2], index[3]]

    return dense_bias


class Attention:
    """A compiled attention variant. Call it like :func:`flashgen.attention` without the mods.

    ``attn(q, k, v)``: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Skv, D]``, v ``[B, Hkv, Skv, Dv]`` ->
    out ``[B, Hq, Sq, Dv]`` (and lse ``[B, Hq, Sq]`` float32 with ``return_lse=True``).
    """

    def __init__(self, score_mod: Callable | None = None, mask_mod: Callable | None = None,
                 bias: Callable | torch.Tensor | None = None, *, deterministic: bool = False,
                 autotune: bool | None = None, bias_lowering: str = "loop", fast_math: bool | None = None):
        if bias_lowering not in ("auto", "loop", "factors"):
            raise ValueError(f"bias_lowering={bias_lowering!r}: choose 'auto', 'loop' or 'factors'")
        if fast_math is not None and not isinstance(fast_math, bool):
            raise ValueError(f"fast_math={fast_math!r}: choose None (approximate tanh for bf16/fp16), True or False")
        self.bias_lowering = bias_lowering
        self.deterministic = deterministic
        self.fast_math = fast_math
        self.autotune = settings().autotune if autotune is None else autotune
        self.last_tuning: dict[str, list[dict]] = {}  # family -> trials of the last tuning run
        self._retune = False
        self._columns: tuple | None = None  # _kept_columns's (key, columns)
        self._tuned_configs: dict[tuple, Config] = {}  # tuning key -> configuration, for this process
        # a LowRankBias is not traced: its factors become extra head dims of q and k at call time
        self.low_rank_bias = bias if isinstance(bias, LowRankBias) else None
        # a dense bias tensor's shape, with leading 1s to 4 dims (checked against every call's shape)
        self.dense_bias_shape = (1,) * (4 - bias.dim()) + bias.shape if isinstance(bias, torch.Tensor) else None
        self.program: Program
        self.program, self.captured = trace_attention(score_mod, mask_mod,
                                                      None if self.low_rank_bias else _as_bias_fn(bias))
        self.analysis: Analysis = analyze(self.program.logits, self.program.mask)
        if self.low_rank_bias is not None and score_mod is not None and not self.analysis.bias.additive:
            raise ValueError("a LowRankBias with a score_mod that is not of the form score + f(b, h, q_idx, kv_idx) "
                             "is not supported: the factors enter the score itself (q' = [q, phi_q / scale]), so the "
                             "score_mod would see score + bias. Pass the bias as a tensor or a traced bias instead")
        self.name = identifier(self.program.name)
        self._mods = (score_mod, mask_mod, None if isinstance(bias, (LowRankBias, torch.Tensor)) else bias)
        # factor lowering per shape: the Attention that runs it, or why the factors were refused
        self._factored: OrderedDict[tuple, Attention | str] = OrderedDict()
        self.last_lowering: str | None = None  # the cost model's decision at the last call
        self._lowering_memo: dict[tuple[int, str], tuple[str, str]] = {}
        if bias_lowering == "factors" and (self.low_rank_bias is not None or isinstance(bias, torch.Tensor)
                                           or not self.analysis.bias.rank):
            raise ValueError("bias_lowering='factors' needs a traced additive bias of finite rank (attn.analysis."
                             f"bias: {self.analysis.bias.report()}); tensors and LowRankBias already have a path")
        self._block_maps: OrderedDict[tuple, BlockMask] = OrderedDict()
        self._mask_reads = [self.captured[i] for i in reads(self.program.mask)]  # what a block map depends on
        self._logit_reads = frozenset(r.arg for r in float_reads(self.program.logits))  # (a mask's get no gradient)
        self._entrywise = entrywise_reads(self.program.logits)  # (each backward call chooses among them)
        self._last_block_map: BlockMask | None = None
        self.last_tiles: dict[str, Config] = {}  # kernel -> the configuration the last call launched
        self._constants: dict[tuple, dict] = {}  # launch constexprs per call layout (_launch_constants)
        # a signature's launches, with the runs they refill or the versions of the tensors the mask
        # reads that they were planned for (_keep_plan)
        self._plans: dict[tuple, tuple[Launch | tuple[Launch, Launch], tuple | None, tuple]] = {}
        self._last_stored: dict[tuple[int, ...], tuple[int, ...]] = {}  # grad slots -> the last backward's stored ones
        self._live: OrderedDict[tuple, LiveRuns] = OrderedDict()  # per shape and device: runs refilled in place
        self._ws_dense: dict[tuple, bool] = {}  # per shape and device: a block map the Gluon kernels take
        self._staggered: dict = {}  # diagonal read -> (what its copies were built from, the copies, their index)
        self._op_id = next(_op_ids)  # how torch.compile's graphs name it (the flashgen::attention operators)
        _by_op_id[self._op_id] = self

    # -- introspection -----------------------------------------------------------------------
    def _kernel_source(self) -> KernelSource:
        ks = _sources.get(self.program.key)
        if ks is None:
            templates_here()
            ks = render_forward(self.name, self.program.key, self.program.logits, self.program.mask, self.analysis,
                                tuple(c.ndim for c in self.program.captures))
            _sources[self.program.key] = ks
        return ks

    def _ws_source(self, backward: bool = False, extra: int = 0, check_reads: bool = True,
                   groups: int = 2) -> KernelSource | None:
        """The warp-specialised Hopper forward or backward (Gluon), or None where the program is outside
        it; ``extra``: how many columns q and k have past v's head dim (``runtime.WS_EXTRA_QK`` or 0:
        a low-rank bias's factors; in the backward only frozen ones, whose gradients it leaves out);
        ``check_reads``: the module constant CHECK_READS (False: a launch proved its reads in range);
        ``groups``: the forward's consumer warp groups (``render_ws``)."""
        if extra and (extra != WS_EXTRA_QK or backward and not self._frozen_factors()):
            return None
        axis_slots = self._axis_slots()
        key = ("ws", backward, self.program.key, self.fast_math is not False, extra, check_reads,
               axis_slots, groups)  # (in the source)
        if key not in _sources:
            templates_here()
            _sources[key] = render_ws(self.name, self.program.key, self.analysis, backward, self.program.logits,
                                      tuple(c.ndim for c in self.program.captures), self.fast_math is not False,
                                      self.program.mask, extra_qk=bool(extra), check_reads=check_reads,
                                      axis_slots=axis_slots, groups=groups)
        return _sources[key]

    def _axis_slots(self) -> frozenset[int]:
        """Captured tensors the Gluon kernels may stage with K (or Q_i) where their mask reads them along
        the keys (or the queries in the backward; ``render_ws``'s ``axis_slots``): contiguous, 16-byte
        aligned, four bytes or fewer per entry (three stages of 128 fit in the shared memory K and V
        leave in the forward), not booleans."""
        return frozenset(slot for slot, t in enumerate(self.captured)
                         if torch.is_tensor(t) and t.dim() and t.is_contiguous() and t.data_ptr() % 16 == 0
                         and t.element_size() <= 4 and t.dtype != torch.bool and not t.is_complex())

    def _ws_launch_source(self, backward: bool, extra: int, q, v, Skv: int) -> KernelSource | None:
        """``_ws_source`` for a launch: no bounds masks where its shape proves the reads in range (their
        indices had spilled a document mask's backward consumers into local memory), the forward's
        consumer groups by head dim (``runtime.WS_FORWARD_GROUPS``); None where the Triton kernel
        takes the call."""
        constants = self._launch_constants(q.dtype, q.shape[-1], v.shape[-1], (*q.shape[:3], Skv))
        groups = self._ws_groups(backward, extra, v.shape[-1])
        return None if groups is None else self._ws_source(backward, extra, constants["CHECK_READS"], groups)

    def _ws_groups(self, backward: bool, extra: int, Dv: int) -> int | None:
        """The Gluon kernel's consumer groups at v's head dim ``Dv``, or None where the Triton kernel takes
        the call: the backward's two; the forward's by head dim (``runtime.WS_FORWARD_GROUPS``), where
        three (persistent programs) take plain logits, no extra q and k columns, over a band or a block
        map the host knows (a mask that reads no tensor; at D = 64 measured faster than the Triton kernel
        there, and slower with a score_mod; PERFLOG, twenty-sixth to twenty-eighth sessions)."""
        groups = 2 if backward else WS_FORWARD_GROUPS.get(Dv, 2)
        if groups != 2 and (extra or not self.analysis.plain_logits
                            or self.analysis.block_runs and self._mask_reads):
            return None
        return groups

    def _frozen_factors(self) -> bool:
        """Whether q and k's columns past v's head dim are a LowRankBias's factors that need no gradient."""
        lr = self.low_rank_bias
        return lr is not None and not (lr.phi_q.requires_grad or lr.phi_k.requires_grad)

    def source(self, which: str = "fwd") -> str:
        """The generated Triton source: ``"fwd"`` (forward kernel) or ``"bwd"`` (the dK/dV and dQ
        kernels, with gradients for every floating-point captured tensor that requires grad, in the
        form the last backward took: which gradients the dQ pass stores depends on B and H, see
        ``_stored_slots``; before any backward, every one it can); ``"fwd_ws"``: the Gluon forward
        that Hopper GPUs run where it fits (``runtime.ws_fits``); ``"bwd_ws"``: the Gluon backward, the
        same where no captured tensor needs a gradient."""
        if which == "fwd":
            return self._kernel_source().source
        if which in ("fwd_ws", "bwd_ws"):
            ws = self._ws_source(backward=which == "bwd_ws")
            if ws is None:
                raise ValueError(f"{self.name}: no warp-specialised kernels (they cover no mask, a band of "
                                 "constant offsets that holds the diagonal, such as causal, or a mask with a block "
                                 "map, with plain logits or score_mods that read captured tensors per (batch, head) "
                                 "at most)")
            return ws.source
        if which == "bwd":
            slots = tuple(i for i, t in enumerate(self.captured) if t.is_floating_point() and t.requires_grad)
            return self._backward_source(slots, self._last_stored.get(slots)).source
        raise ValueError(f"source({which!r}): choose 'fwd', 'fwd_ws', 'bwd' or 'bwd_ws'")

    def explain(self) -> str:
        """A readable report: the traced IR, the captured tensors and every analysis result."""
        lines = [f"flashgen.Attention '{self.program.name}'  (program key {self.program.key[:16]})",
                 "IR (score = scale * q.k; entries where mask is False are removed):",
                 ir.format_program({"logits": self.program.logits, "mask": self.program.mask})]
        if self.captured:
            lines.append("captured tensors (kernel inputs; new values never recompile):")
            for slot, t in enumerate(self.captured):
                lines.append(f"  captured{slot}: {str(t.dtype).removeprefix('torch.')} {list(t.shape)} on {t.device}")
        lines.append("analysis:")
        lines.append(self.analysis.report())
        if self.analysis.bias.rank and self.low_rank_bias is None:
            decided = f"; last call: {self.last_lowering}" if self.last_lowering else ""
            lines.append(f"  bias lowering:  {self.bias_lowering}{decided}")
        if self.low_rank_bias is not None:
            lr = self.low_rank_bias
            err = f", factorisation error {lr.error:.2e}" if lr.error is not None else ""
            lines.append(f"  low-rank bias:  fg.LowRankBias of rank {lr.rank}{err}: runs as plain attention with "
                         f"head dim D + {lr.rank} (q' = [q, phi_q / scale], k' = [k, phi_k]; the factors "
                         f"padded with zeros to a multiple of 16); the factors, "
                         f"rounded to bf16 beside q and k, move a logit by at most "
                         f"{lr.rounding_bound(torch.bfloat16):.3g} (fp16 {lr.rounding_bound(torch.float16):.3g})"
                         + ("; on Hopper GPUs at D = 128 and rank 16 or less, the forward is the warp-specialised "
                            "Gluon kernel with a second product over the factors' columns" if lr.rank <= WS_EXTRA_QK
                            else ""))
        notes = lowering_notes(self.program.logits, self.program.mask)
        ws = self._ws_source()  # (a low-rank bias runs another program: _ws_source is for this one)
        if ws is not None:
            notes = [*notes, "forward and backward on Hopper GPUs (bf16 or fp16, head dim 128, the backward 64 "
                             "too, lengths a multiple of 128, contiguous inputs"
                             + (", a bf16 or fp16 bias read in range with whole rows of keys" if ws.tile_reads
                                else "") + "): the warp-specialised Gluon kernels, source('fwd_ws') and "
                             "source('bwd_ws') (the backward where no captured tensor needs a gradient"
                             + ("; a block map only where at least 10% of its tiles are non-empty, and for a "
                                "grouped call's backward only if it is the same in every head"
                                if self.analysis.block_runs else "") + ")"]
        if notes and self.low_rank_bias is None:
            lines.append("kernels:")
            lines += [f"  {note}" for note in notes]
        if self.last_tiles:
            lines.append("tiles of the last call (block_m, block_n, warps, stages): " + ", ".join(
                f"{name} {c if isinstance(c, str) else (c.block_m, c.block_n, c.num_warps, c.num_stages)}"
                for name, c in self.last_tiles.items()))
        if self._plans:
            kept = [x for plan, _, _ in self._plans.values() for x in (plan if isinstance(plan, tuple) else (plan,))]
            direct = sum(1 for x in kept if x._direct)
            lines.append(f"launches kept for {len(self._plans)} call signature(s): {direct} of {len(kept)} call the "
                         f"compiled kernel directly (runtime.DIRECT_LAUNCH_TRITON), the others Triton's launcher")
            tma = sum(1 for x in kept if x.kwargs.get("TMA"))
            if tma:
                lines.append(f"  {tma} of them load their streamed tiles through TMA descriptors (backward_tma)")
            if tiles := sum(1 for x in kept if x.kwargs.get("TILE_TMA")):
                lines.append(f"  {tiles} of them read [q, kv] tiles of a captured tensor through TMA descriptors "
                             "(tile_tma_ok)")
            if split := sum(1 for x in kept if x.kwargs.get("SPLIT_BAND")):
                lines.append(f"  {split} forward(s) test the band's clauses only on tiles across its edges, the rest "
                             "on every partial tile (_split_band: most partial tiles lie inside the band)")
            live = sum(1 for _, refills, _ in self._plans.values() if refills is not None)
            if live:
                lines.append(f"  {live} of them refill their block maps' runs on the device when the tensors the mask "
                             "reads change (maps.LiveRuns): the tiles and launches of the first call stay")
        if self._last_block_map is not None and self.analysis.has_mask:
            bm = self.block_mask(*self._last_block_map.shape, self._last_block_map.block_size,
                                 self._last_block_map.device)  # (of the values the mask reads now)
            lines.append("block map of the last call:")
            lines.append("  " + str(bm).replace("\n", "\n  "))
        if any(n.op in (ir.Op.TANH, ir.Op.SIGMOID) for n in ir.toposort([self.program.logits, self.program.mask])):
            lines.append("tanh, sigmoid: " + {None: "the GPU's approximate tanh for bf16/fp16 inputs, exact for fp32 "
                                              "(fast_math=None)", True: "the GPU's approximate tanh (fast_math=True)",
                                              False: "exact formulas (fast_math=False)"}[self.fast_math])
        read = self._logit_reads
        learnable = [i for i, t in enumerate(self.captured) if i in read and t.requires_grad]
        entrywise = self._entrywise
        adds = ("int64 fixed-point atomics, deterministic, two dK/dV passes" if self.deterministic
                else "fp32 atomic adds")
        storable = self._stored_slots(tuple(learnable), 1, 1)  # (the rule's size test then depends on B and H)
        shared = [i for i in storable if shared_by(entrywise[i])]
        added = ", ".join(f"captured{i}" for i in learnable if i not in storable)
        stored = ", ".join(f"captured{i}" for i in storable if not shared_by(entrywise[i]))
        ws = not self.deterministic and self._ws_source(backward=True) is not None
        lines.append(("gradients: k, v (deterministic), q (float32 TMA reductions on Hopper GPUs, in no fixed order; "
                      "deterministic=True avoids them)" if ws else "gradients: q, k, v (deterministic)")
                     + (f"; {stored} (stored by the dQ pass, once per entry: deterministic)" if stored else "")
                     + "".join(f"; captured{i} (stored by the dQ pass per {' and '.join(shared_by(entrywise[i]))} in "
                               "its dtype and summed in float32 after, deterministic, where that buffer is at most "
                               f"twice a float32 copy; else {adds})" for i in shared)
                     + (f"; {added} ({adds})" if added else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"flashgen.Attention({self.program.name!r}, key={self.program.key[:12]})"

    def _repr_markdown_(self) -> str:
        """Jupyter's view: :meth:`explain` (IR, analysis, kernels, the block map of the last call)."""
        return (f"**flashgen.Attention** `{self.program.name}`\n\n```\n{self.explain()}\n```\n\n"
                "`attn.source('fwd')` / `attn.source('bwd')` show the generated kernels.")

    # -- block sparsity -------------------------------------------------------------------------
    def block_mask(self, B: int, H: int, Sq: int, Skv: int, block_size: tuple[int, int] = (128, 128),
                   device: torch.device | str | None = None) -> BlockMask:
        """The block map of this variant's mask at one shape, cached: rebuilt only for a new shape,
        tile size or device, or when a captured tensor the mask reads changes (its data pointer or
        version counter)."""
        key = (B, H, Sq, Skv, tuple(block_size), str(device),
               tuple((t.data_ptr(), t._version) for t in self._mask_reads))
        bm = self._block_maps.get(key)
        if bm is None:
            bm = BlockMask(self.program.mask, self.captured, (B, H, Sq, Skv), tuple(block_size),
                           closed_form=not self.analysis.block_runs, device=device)
            self._block_maps[key] = bm
            if len(self._block_maps) > _BLOCK_MAPS_MAX:
                self._block_maps.popitem(last=False)
        else:
            self._block_maps.move_to_end(key)
        self._last_block_map = bm
        return bm

    def _launch_constants(self, dtype: torch.dtype, D: int, Dv: int, shape: tuple) -> dict:
        """The constexprs every kernel of a call shares, for a signature's first launch (memoised
        per shapes and layouts: a block map's new version launches anew, with the same ones)."""
        key = (dtype, D, Dv, shape, tuple((t.shape, t.stride()) for t in self.captured))
        constants = self._constants.get(key)
        if constants is None:
            if len(self._constants) >= 256:  # (many sequence lengths)
                self._constants.clear()
            constants = self._constants[key] = dict(
                HEAD_D=D, HEAD_DV=Dv, **qk_blocks(D), BLOCK_DV=padded(Dv),  # (staggered copies: their whole
                # storage, since the kernels' offsets reach before a copies view's first entry)
                IDX_T=index_type(self.captured + [w.new_empty(0).set_(w.untyped_storage())
                                                   for _, w, _ in self._staggered.values()]),
                CHECK_READS=self._check_reads(shape), FAST_MATH=self._fast_math(dtype), **_precision(dtype))
        return constants

    def _tile_tma(self, ks: KernelSource, dtype: torch.dtype, D: int, Dv: int, shape: tuple) -> dict:
        """The TILE_TMA constexpr of a launch of ``ks`` (none where it reads no [q, kv] tiles): its tile
        reads through TMA descriptors where ``runtime.tile_tma_ok`` allows and every read is proved in
        range (a descriptor is placed at the read's b and h)."""
        if not ks.tile_reads:
            return {}
        tma = (not self._launch_constants(dtype, D, Dv, shape)["CHECK_READS"]
               and tile_tma_ok(self.captured, ks.tile_reads))
        if tma:
            ensure_allocator()  # (device-side descriptors; in this thread: autograd runs the backward on its own)
        return {"TILE_TMA": tma}

    def _fast_math(self, dtype: torch.dtype) -> bool:
        """FAST_MATH for a launch: the approximate tanh for bf16/fp16 unless told; never in the
        interpreter, which cannot run the GPU's instruction."""
        return not interpreting() and (dtype != torch.float32 if self.fast_math is None else self.fast_math)

    def _check_reads(self, shape: tuple[int, int, int, int]) -> bool:
        """CHECK_READS for a launch: False when every captured-tensor read is proved in range for
        this shape (the kernels then read without bounds masks). Memoised with the other launch
        constants (``_launch_constants``)."""
        return not reads_in_range([self.program.logits, self.program.mask],
                                  [tuple(t.shape) for t in self.captured], *shape)

    def _sparsity(self, shape: tuple[int, int, int, int], D: int, Dv: int, dtype: torch.dtype, device) -> str:
        """How the default tiles see the mask (``runtime.default_config``): "window" for a band
        bounded on both sides with nothing else; "sparse" for a block map, at the dense forward
        tiles, with fewer than ``SPARSE_OCCUPANCY`` of its tiles non-empty, or with more partial
        tiles than full ones (a dilated window: the mask is evaluated nearly everywhere); else
        "dense"."""
        a, device = self.analysis, torch.device(device)
        if a.has_mask and not a.block_runs and a.band.lo is not None and a.band.hi is not None:
            return "window"
        if a.block_runs:
            cfg = first_fitting("fwd", default_config(device, D, Dv, dtype), device, D, Dv, dtype)
            bm = self.block_mask(*shape, (cfg.block_m, cfg.block_n), device)
            counts = bm.counts()
            if bm.sparser_than(SPARSE_OCCUPANCY) or counts["partial"] > counts["full"]:
                return "sparse"
        return "dense"

    def forward_config(self, shape: tuple[int, int, int, int], D: int, Dv: int, dtype: torch.dtype,
                       device) -> Config:
        """The forward's tiles for ``shape`` = (B, H, Sq, Skv) without tuning or ``config=``: the
        measured default for the GPU and head dims, smaller for windows and sparse block maps."""
        device = torch.device(device)
        default = default_config(device, D, Dv, dtype, self._sparsity(shape, D, Dv, dtype, device),
                                 bool(self._kernel_source().diagonals))
        return first_fitting("fwd", default, device, D, Dv, dtype)

    def _ws_map_fits(self, shape: tuple[int, int, int, int], device, Dv: int) -> bool:
        """Whether the Gluon kernels take this call's block map: no map, v's head dim in
        ``runtime.WS_SPARSE_HEAD_DIMS``, or a map with at least ``SPARSE_OCCUPANCY`` of its 128 x 128
        tiles non-empty, decided once per shape from the first call's map (a rule of speed only).
        Sparser maps (16 documents in 8192 keys: 4 % of the tiles) leave rows of a few tiles, where at
        D = 64 the Gluon backward measured 1.3-1.5x slower than the Triton kernels (H200, PERFLOG)."""
        if not self.analysis.block_runs or Dv in runtime.WS_SPARSE_HEAD_DIMS:
            return True
        key = (shape, str(device))
        if key not in self._ws_dense:
            self._ws_dense[key] = not self.block_mask(*shape, (128, 128), device).sparser_than(SPARSE_OCCUPANCY)
        return self._ws_dense[key]

    def _ws_args(self, ws: KernelSource | None, q, k, v, backward: bool) -> tuple | None:
        """``runtime.ws_forward``'s (or ``ws_backward``'s) arguments past the scale for this call of the
        Gluon module ``ws`` (captured tensors' for mods it evaluates, plain logits or not, the block
        map's hulls, a dense bias's TMA arguments), or None where the Triton kernels take the call:
        ``ws_fits`` says no, a map under 10% full at a head dim outside
        ``runtime.WS_SPARSE_HEAD_DIMS``, a bias TMA cannot read or not proved in range, or in
        a grouped backward a map that varies by head (the kernel visits one set of query blocks)."""
        B, Hq, S, D = q.shape
        shape, maps = (B, Hq, S, S), self.analysis.block_runs
        if ws is None or not ws_fits(q, k, v, backward=backward) or not self._ws_map_fits(shape, q.device, v.shape[-1]):
            return None
        tile = ()
        if ws.tile_reads:
            read = ws.tile_reads[0]
            if self._launch_constants(q.dtype, D, v.shape[-1], shape)["CHECK_READS"]:
                return None
            tile = ws_tile_args(read, self.captured[read.slot], (64, 128) if backward else (128, 128))
            if tile is None:
                return None
        runs = self._hulls_args(shape, q.device, transpose=backward) if maps else ()
        for read in ws.axis_reads:  # (staged with K, or Q_i: their descriptors after the hulls)
            runs = runs + ws_axis_args(read, self.captured[read.slot], 64 if backward else 128)
        if backward and runs and runs[2] != 0 and Hq != k.shape[1]:
            return None
        mods = captured_args(self.captured) if maps or not self.analysis.plain_logits else None
        return mods, self.analysis.plain_logits, runs, tile

    def _runs_args(self, shape: tuple[int, int, int, int], cfg: Config, device, *, transpose: bool = False,
                   ragged_last: bool = False) -> tuple:
        """Kernel arguments for the block map's runs: tensor, then strides (0 along b, h when the
        mask ignores them). For a mask that reads tensors, a buffer that later calls refill on the
        GPU when those tensors change (``maps.LiveRuns``), unless the map is too large for it."""
        block = (cfg.block_m, cfg.block_n)
        live = self._live_runs(shape, device) if self._mask_reads else None
        if live is not None and live.fits(block):
            runs = live.runs(block, transpose=transpose, ragged_last=ragged_last)
        else:
            runs = self.block_mask(*shape, block, device).runs(transpose=transpose, ragged_last=ragged_last)
        return _with_strides(runs)

    def _hulls_args(self, shape: tuple[int, int, int, int], device, *, transpose: bool) -> tuple:
        """The Gluon kernels' arguments for the block map: its hulls at 64 x 64 tiles (``blocks.hulls``),
        by query blocks (or by KV blocks, ``transpose``), then their strides (0 along b, h where the
        mask ignores them). For a mask that reads tensors, refilled on the GPU when those change
        (``maps.LiveRuns.hulls``), unless the map is too large for it."""
        live = self._live_runs(shape, device) if self._mask_reads else None
        if live is not None and live.fits((64, 64)):
            hulls = live.hulls(transpose=transpose)
        else:
            hulls = self.block_mask(*shape, (64, 64), device).hulls(transpose=transpose)
        return _with_strides(hulls)

    def _live_runs(self, shape: tuple[int, int, int, int], device) -> LiveRuns:
        key = (shape, str(device), tuple(t.shape for t in self.captured))  # (its CHECK_READS proof holds for these)
        live = self._live.get(key)
        if live is None:
            ks = _sources.get(("map", self.program.key))
            if ks is None:
                templates_here()
                ks = _sources["map", self.program.key] = render_block_map(
                    self.name, self.program.key, self.program.mask, tuple(c.ndim for c in self.program.captures))
            live = self._live[key] = LiveRuns(ks, self.program.mask, self.captured, shape, torch.device(device),
                                              self._check_reads(shape))
            if len(self._live) > _BLOCK_MAPS_MAX:  # (kept plans keep theirs)
                self._live.popitem(last=False)
        return live

    # -- running ------------------------------------------------------------------------------
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                 enable_gqa: bool = False, return_lse: bool = False, config: Config | None = None):
        scale = _check_inputs(q, k, v, scale, enable_gqa, self.captured)
        if scale <= 0:  # (the same scores with sm_scale > 0, which the forward kernel's row max assumes)
            q, scale = (-q, -scale) if scale < 0 else (q * 0, 1.0)
        if self.dense_bias_shape is not None:
            call = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            if any(n not in (1, want) for n, want in zip(self.dense_bias_shape, call)):
                raise ValueError(f"the bias tensor of shape {list(self.dense_bias_shape)} does not broadcast to "
                                 f"[B, H, Sq, Skv] = {list(call)}")
        if self.bias_lowering != "loop" and torch.compiler.is_compiling():
            raise NotImplementedError(f"bias_lowering={self.bias_lowering!r} under torch.compile: the factors are "
                                      "built per shape outside the graph; use the default 'loop' inside compiled code")
        if self._lowers_to_factors(q.shape[-1], q.dtype):
            inner = self._factored_attention(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, q.dtype)
            if inner is not None:
                return inner(q, k, v, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, config=config)
        lr = self.low_rank_bias
        if lr is not None:
            if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
                    t.requires_grad for t in (q, k, v, lr.phi_q, lr.phi_k))):
                # no gradients: the factors go to the kernels beside q and k (the Gluon forward
                # reads them in place; the Triton one as q's and k's last columns)
                k, v = _factor_keys(lr, q, k, v)
                out, lse = self._forward(q, k, v, scale, return_lse, config, factors=self._kept_columns(q, k, scale))
                return (out, lse) if return_lse else out
            q, k, v = _with_factors(lr, q, k, v, scale)
        if torch.compiler.is_compiling():  # one opaque operator in the graph (Dynamo would trace the launches)
            out, lse = _compiled_call(self, q, k, v, scale)
            return (out, lse) if return_lse else out
        learnable = [t for t in self.captured if t.requires_grad]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or learnable):
            out, lse = _AttentionFunction.apply(self, scale, config, q, k, v, *self.captured)
        else:
            out, lse = self._forward(q, k, v, scale, return_lse, config)
        return (out, lse) if return_lse else out

    def _kept_columns(self, q, k, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-rank bias's columns of q and k (``_factor_columns``), kept for later calls with
        the same factors (data and version), shapes, dtype and scale."""
        lr = self.low_rank_bias
        key = (q.shape, k.shape, q.dtype, q.device, scale,
               *((f.data_ptr(), f._version, f.shape, f.stride()) for f in (lr.phi_q, lr.phi_k)))
        if self._columns is None or self._columns[0] != key:
            self._columns = (key, _factor_columns(lr, q, k, scale))
        return self._columns[1]

    def _lowers_to_factors(self, head_dim: int, dtype: torch.dtype) -> bool:
        """Whether this call runs the traced bias as factors (FlashBias), by ``bias_lowering`` and
        the cost model; gradients to captured tensors the bias reads keep it in the loop."""
        if self.bias_lowering == "loop" or self.low_rank_bias is not None or self.analysis.plain_logits:
            return False
        structure = self.analysis.bias
        if not structure.rank:
            return False
        learnable = torch.is_grad_enabled() and any(t.requires_grad for t in self.captured)
        if self.bias_lowering == "factors":
            if learnable:
                raise ValueError("bias_lowering='factors' cannot pass gradients to the captured tensors the bias "
                                 "reads (the factors are computed numerically); use 'loop' or detach them")
            self.last_lowering = "factors (forced)"
            return True
        key = (head_dim, {torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, "bf16"))
        if key not in self._lowering_memo:
            self._lowering_memo[key] = lowering_cost(self.program.logits, structure.rank, *key, MAX_HEAD_DIM)
        choice, why = self._lowering_memo[key]
        self.last_lowering = why if not learnable else "loop: captured tensors the bias reads require grad"
        return choice == "factors" and not learnable

    def _factored_attention(self, B: int, H: int, Sq: int, Skv: int, device, dtype: torch.dtype) -> Attention | None:
        """An Attention for the mask with the bias as factors at this shape (cached per shape, dtype
        and captured-tensor versions), or None where the cost model chose factors whose rounding to
        ``dtype`` would move a logit by more than FACTOR_ROUNDING_TOL (a forced choice warns instead)."""
        key = (B, H, Sq, Skv, str(device), dtype, tuple((t.data_ptr(), t._version) for t in self.captured))
        inner = self._factored.get(key)
        if inner is None:
            score_mod, mask_mod, bias = self._mods
            zero = torch.zeros((), dtype=torch.float64, device=device)

            def additive(b, h, q_idx, kv_idx):
                total = score_mod(zero, b, h, q_idx, kv_idx) if score_mod is not None else 0.0
                return total + (bias(b, h, q_idx, kv_idx) if bias is not None else 0.0)

            factors = factor_bias(additive, self.analysis.bias.rank, B, H, Sq, Skv, device)
            moved = factors.rounding_bound(dtype)
            why = (f"the factors in {str(dtype).removeprefix('torch.')} would move logits by up to {moved:.3g} "
                   f"(the bias's terms cancel), more than {FACTOR_ROUNDING_TOL:.3g}")
            if moved > FACTOR_ROUNDING_TOL and self.bias_lowering == "auto":
                inner = f"loop: {why}"  # refused: the reason, for last_lowering and explain()
            else:
                if moved > FACTOR_ROUNDING_TOL:
                    warnings.warn(f"flashgen: bias_lowering='factors': {why}", stacklevel=4)
                inner = Attention(mask_mod=mask_mod, bias=factors, deterministic=self.deterministic,
                                  autotune=self.autotune, fast_math=self.fast_math)
            self._factored[key] = inner
            if len(self._factored) > 4:
                self._factored.popitem(last=False)
        if isinstance(inner, str):
            self.last_lowering = inner
            return None
        return inner

    def _first_launch(self, key: tuple, launch_now: Callable[[], object], ahead: Callable[[], object] | None):
        """A call signature's first launch (``launch_now``), with Triton's cache in flashgen's
        (``binaries_here``) so that a fresh process finds the binaries; the launches ``ahead``
        makes (a backward's two kernels; a forward that autograd saves for a backward: its own
        and the backward's) compile side by side first. The launches are kept for the
        signature's later calls, which skip all of this (``_keep_plan``)."""
        if capturing():  # recorded to compile ahead, within a first launch: nothing runs, nothing to keep
            return launch_now()
        with binaries_here():
            if ahead is not None and not (self.autotune or interpreting()):
                compile_concurrently(ahead)
            plan = launch_now()
        self._keep_plan(key, plan)
        return plan

    def _forward(self, q, k, v, scale: float, want_lse: bool, config: Config | None,
                 grad_slots: tuple[int, ...] | None = None, factors: tuple = ()):
        """``grad_slots``: the captured tensors a backward will pass gradients to, when one will
        follow (its kernels then compile with the forward's on a first call); ``factors``: a
        LowRankBias's columns of q and k, given apart (``_factor_columns``)."""
        B, Hq, Sq, D = q.shape
        _, Hkv, Skv, Dv = v.shape
        out = torch.empty((B, Hq, Sq, Dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if want_lse else None
        if out.numel() == 0:
            return out, lse
        if Skv == 0:  # nothing to attend to: every row is fully masked
            out.zero_()
            if lse is not None:
                lse.fill_(float("-inf"))
            return out, lse
        # (tuning measures the Triton kernel's tiles; with autotune on, calls it fits still take it)
        extra = factors[0].shape[-1] if factors else D - Dv
        ws = (self._ws_launch_source(False, extra, q, v, Skv) if config is None and not self._retune and not capturing()
              else None)
        ws_args = self._ws_args(ws, q, k, v, backward=False)
        if ws_args is not None:  # Hopper: the warp-specialised kernel
            scratch = lse if lse is not None else torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
            ws_forward(load_module(ws), q, k, v, out, scratch, scale, *ws_args, factors=factors)
            self.last_tiles = {"forward": "warp-specialised (Gluon)"}
            return out, lse
        if factors:  # the Triton kernel: plain attention on the wider q' and k'
            q, k = _with_columns(q, k, factors)
            D = q.shape[-1]
        shape = (B, Hq, Sq, Skv)
        ks = self._kernel_source()
        capture_args = self._capture_args(Sq, Skv, ks)
        args = (q, k, v, out, lse if lse is not None else out,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *capture_args, scale, Hq, Sq, Skv, Hq // Hkv)
        tiles = self._tile_tma(ks, q.dtype, D, Dv, shape)
        key = ("fwd", q.dtype, q.device, want_lse, config, tiles.get("TILE_TMA"),
               self._layout_key(capture_args, q, k, v))
        plan = self._kept(key)
        if plan is not None:
            plan(*args)
        else:
            def forward_and_backward():  # (``out`` stands in for the gradient of its shape)
                out, lse = self._forward(q, k, v, scale, True, config)
                self._backward(q, k, v, out, lse, out, None, scale, grad_slots)
            plan = self._first_launch(
                key, lambda: self._forward_launch(shape, D, Dv, q, args, want_lse, config, tiles),
                forward_and_backward if grad_slots is not None else None)
        self.last_tiles = {"forward": plan.config}
        return out, lse

    def _forward_launch(self, shape, D: int, Dv: int, q, args: tuple, want_lse: bool,
                        config: Config | None, tiles: dict) -> Launch:
        """A forward signature's first launch: tiles tuned, given or chosen by the mask."""
        B, Hq, Sq, Skv = shape
        ks = self._kernel_source()
        kernel = load_kernel(ks)
        kwargs = dict(self._launch_constants(q.dtype, D, Dv, shape), STORE_LSE=want_lse, **tiles,
                      extra=(lambda c: self._runs_args(shape, c, q.device, ragged_last=Skv % c.block_n != 0))
                      if self.analysis.block_runs else None,
                      constexprs=(lambda c: {"SPLIT_BAND": self._split_band(shape, c, q.device)})
                      if self.analysis.band_split else None)

        def grid(c):
            return (_cdiv(Sq, c.block_m), B * Hq)

        if config is None and self.autotune:
            config = self._tuned("fwd", ks.key, shape, D, Dv, q, lambda c: run_config(kernel, c, grid, *args, **kwargs))
        cfg = config or self.forward_config(shape, D, Dv, q.dtype, q.device)
        return launch(kernel, (ks.key, cfg, D, Dv, q.dtype), cfg, grid, *args, **kwargs)

    def _split_band(self, shape: tuple[int, int, int, int], cfg: Config, device) -> bool:
        """Whether a forward launch of a band and a rest (``Analysis.band_split``) tests the band's
        clauses only on tiles across its edges: where fewer than half of the map's partial tiles
        cross them (a dilated window's lie inside the band: 1.13x -> 1.26x flex at D = 64), not
        where more do (documents along the diagonal at (64, 32) tiles: 1.57x -> 1.43x; PERFLOG,
        twenty-second session), nor for masks that read tensors, whose maps are not on the host."""
        if self._mask_reads:
            return False
        _, _, Sq, _ = shape
        bm, bn, band = cfg.block_m, cfg.block_n, self.analysis.band
        runs = self.block_mask(*shape, (bm, bn), device).runs()[..., 0, :].cpu().long()  # partial runs
        live = torch.arange((runs.shape[-1] - 1) // 2) < runs[..., :1]
        start, end = runs[..., 1::2], runs[..., 2::2]
        q_first = torch.arange(runs.shape[-2])[:, None] * bm
        q_last = (q_first + bm).clamp(max=Sq) - 1
        crossing = torch.zeros_like(start)
        if band.lo is not None:  # tiles j with j * bn - q_last < lo
            crossing += (torch.minimum(end, -(-(band.lo + q_last) // bn)) - start).clamp(min=0)
        if band.hi is not None:  # tiles j with (j + 1) * bn - 1 - q_first > hi
            crossing += (end - torch.maximum(start, (band.hi + q_first + 1) // bn)).clamp(min=0)
        partial = (end - start)[live].sum()
        return bool(2 * torch.minimum(crossing, end - start)[live].sum() < partial)

    def _layout_key(self, capture_args: list, *tensors: torch.Tensor) -> tuple:
        """What a call's kept launches depend on besides its flags and the block map's runs
        (``_kept``): the shapes and strides of its tensors and of the captured ones (the kernels'
        integer arguments and constexprs), and whether tuning is on."""
        return (*((t.shape, t.stride()) for t in tensors), tuple(a for a in capture_args if type(a) is int),
                self.autotune)

    def _capture_args(self, Sq: int, Skv: int, ks: KernelSource) -> list:
        """The captured tensors' kernel arguments, then the staggered copies of ``ks``'s diagonal
        reads (``runtime.staggered``), rebuilt when a tensor they read changes (data, version or
        layout) or the lengths do."""
        args = captured_args(self.captured)
        if ks.diagonals:  # (what the copies are built from, once per call, not per diagonal read)
            built = (Sq, Skv, *((t.data_ptr(), t._version, t.shape, t.stride(), t.device) for t in self.captured))
        for d in ks.diagonals:
            kept = self._staggered.get(d)
            if kept is None or kept[0] != built:
                index = diagonal_index(d, self.captured, Sq, Skv)
                kept = self._staggered[d] = (built, staggered(d, self.captured, index), index)
            args += [kept[1], *kept[1].stride()[:-1]]
        return args

    def _read_versions(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self._mask_reads)

    def _keep_plan(self, key: tuple, plan) -> None:
        """Keep a signature's launches, with the ``LiveRuns`` whose buffers hold all their runs
        (refilled when the tensors the mask reads change), or else for the versions of those
        tensors only."""
        if plan is None or self._retune:  # (deterministic mode; tuning)
            return
        if len(self._plans) >= 256:  # (many sequence lengths)
            self._plans.clear()
        runs = [x.extra[0] for x in (plan if isinstance(plan, tuple) else (plan,)) if x.extra]  # (then strides)
        live = next(((m, keys) for m in self._live.values() if (keys := m.keys_of(runs)) is not None), None)
        self._plans[key] = (plan, live, self._read_versions())

    def _kept(self, key: tuple):
        """The launches kept for ``key``, with their runs brought up to date; None if there are none
        or if they were planned for other values of the tensors the mask reads."""
        kept = self._plans.get(key)
        if kept is None:
            return None
        plan, live, versions = kept
        if live is not None:
            live[0].refresh(live[1])
        elif versions != self._read_versions():
            return None
        return plan

    def _tuned(self, family: str, kernel_key: str, shape: tuple[int, int, int, int], D: int, Dv: int,
               q: torch.Tensor, run) -> Config:
        """The tuned configuration of one kernel family for this call's key: stored, or tuned now."""
        B, Hq, Sq, Skv = shape
        sparsity = "none" if not self.analysis.has_mask else ("map" if self.analysis.block_runs else "band")
        key = tuning_key(family, kernel_key, B * Hq, Sq, Skv, D, Dv, q.dtype, sparsity)
        memo = (tuple(key.values()), q.device)
        if not self._retune and memo in self._tuned_configs:
            return self._tuned_configs[memo]
        record = None if self._retune else load_tuning(self.name, family, key)
        if record is not None:
            self._tuned_configs[memo] = Config(**record["best"])
            return self._tuned_configs[memo]
        current = settings()
        configs = candidates(family, q.device, D, Dv, q.dtype)
        if not configs:  # every configuration of the space is over budget (fp32, wide heads): the default
            dkdv, dq = default_backward_configs(q.device, D, Dv, q.dtype)
            configs = [{"fwd": default_config(q.device, D, Dv, q.dtype), "dkdv": dkdv, "dq": dq}[family]]
        best, trials = tune(f"{self.name} {family}", configs, run, q.device, tune_ms=current.tune_ms,
                            progress=current.progress)
        store_tuning(self.name, family, key, best, trials)
        self.last_tuning[family] = trials
        self._tuned_configs[memo] = best
        return best

    def tune(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backward: bool = False,
             enable_gqa: bool = False) -> dict[str, list[dict]]:
        """Tune the forward (and with ``backward=True`` the two backward kernels) for these inputs'
        key now, even if results are stored; returns the trials per kernel family."""
        self.last_tuning = {}
        autotune, self.autotune, self._retune = self.autotune, True, True
        learnable = [t for t in self.captured if t.requires_grad]
        saved = [None if t.grad is None else t.grad.clone() for t in learnable]
        self._plans.clear()  # the launches kept hold the configurations this replaces
        try:
            if backward:
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = self(*leaves, enable_gqa=enable_gqa)
                out.backward(torch.randn_like(out))
            else:
                with torch.no_grad():
                    self(q, k, v, enable_gqa=enable_gqa)
        finally:
            self.autotune, self._retune = autotune, False
            for t, g in zip(learnable, saved):  # the tuning step's gradients are not the user's
                t.grad = g
        return self.last_tuning

    def _backward_source(self, grad_slots: tuple[int, ...], stored: tuple[int, ...] | None = None) -> KernelSource:
        """The backward module for ``grad_slots``, with the gradients of ``stored`` stored by the dQ
        pass (default: every entry-wise read's, ``analysis.entrywise_reads``)."""
        if stored is None:
            stored = tuple(slot for slot in self._entrywise if slot in grad_slots)
        key = (self.program.key, grad_slots, stored)
        ks = _sources.get(key)
        if ks is None:
            templates_here()
            ks = render_backward(self.name, self.program.key, self.program.logits, self.program.mask,
                                 self.analysis, tuple(c.ndim for c in self.program.captures), grad_slots, stored)
            _sources[key] = ks
        return ks

    def _stored_slots(self, grad_slots: tuple[int, ...], B: int, Hq: int) -> tuple[int, ...]:
        """The entry-wise reads (``analysis.entrywise_reads``) whose gradients the dQ pass stores: all whose
        index names b and h; those it leaves out (``analysis.shared_by``) only without a mask, where their
        buffer, with those as leading dimensions, is at most twice the float32 one of atomic adds. (H200,
        bf16 4x16x8192x128, a bias [H, S, S], fwd+bwd: 26.75 ms stored and summed, 33.31 added; causal 17.16
        and 17.09: the stored buffer is then zeroed and summed whole, the adds skip the masked half.)"""
        extent = {"b": B, "h": Hq}
        return tuple(slot for slot, index in self._entrywise.items() if slot in grad_slots
                     and (not shared_by(index) or not self.analysis.has_mask
                          and math.prod(extent[n] for n in shared_by(index)) * self.captured[slot].element_size() <= 8))

    def _backward(self, q, k, v, out, lse, dout, dlse, scale: float, grad_slots: tuple[int, ...]):
        """Gradients for q, k, v and the captured tensors in ``grad_slots`` (in their dtypes)."""
        B, Hq, Sq, D = q.shape
        _, Hkv, Skv, Dv = v.shape
        if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                    {slot: torch.zeros_like(self.captured[slot]) for slot in grad_slots})
        dlse = dlse.float().contiguous() if dlse is not None else None
        lse = lse.contiguous()
        ws = (self._ws_launch_source(True, D - Dv, q, v, Skv)
              if not grad_slots and not self.deterministic and not self._retune and not capturing() else None)
        ws_args = self._ws_args(ws, q, k, v, backward=True)
        if ws_args is not None:  # Hopper: the warp-specialised kernel
            dq, dk, dv = ws_backward(load_module(ws), q, k, v, out.contiguous(), lse, dout.contiguous(), dlse, scale,
                                     *ws_args)
            self.last_tiles.update({"dQ, dK/dV": "warp-specialised (Gluon), one pass"})
            return dq, dk, dv, {}
        stored_slots = self._last_stored[grad_slots] = self._stored_slots(grad_slots, B, Hq)
        ks = self._backward_source(grad_slots, stored_slots)
        # float32 buffers the dK/dV pass adds into, and the gradients the dQ pass stores (each entry
        # once, in the tensor's dtype, with the b and h its index leaves out as leading dimensions):
        # uninitialised where every entry is stored (no mask, and the tensor's extents those of its
        # index: b, h, q_idx, kv_idx, and 1 where a constant indexes it)
        extent = {"b": B, "h": Hq, "q_idx": Sq, "kv_idx": Skv}
        stored = dict(ks.stored_grads)
        grads = {}
        for slot in grad_slots:
            t = self.captured[slot]
            if slot not in stored:
                grads[slot] = torch.zeros(t.shape, dtype=torch.float32, device=q.device)
                continue
            shape = (*(extent[n] for n in shared_by(stored[slot])), *t.shape)
            covered = not self.analysis.has_mask and t.shape == tuple(extent.get(i, 1) for i in stored[slot])
            grads[slot] = (torch.empty if covered else torch.zeros)(shape, dtype=t.dtype, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # every element is stored
        # delta = rowsum(dO * O) - dlse, the softmax's correction term per row: the dQ pass, which
        # runs first, computes it for its rows and stores it for the dK/dV pass
        delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        shape = (B, Hq, Sq, Skv)
        capture_args = self._capture_args(Sq, Skv, ks)
        # GMAX and GSCALE of the dK/dV kernel (deterministic mode's max |contribution| and scale)
        added = tuple(_added(grads, ks))  # (before the staggered copies' buffers join ``grads``)
        fixed = torch.zeros(2, dtype=torch.float32, device=q.device) if added else None
        # the gradients of diagonal reads, laid out as their staggered copies (folded in below)
        grads.update({("diag", k): gradient_buffer(self._staggered[ks.diagonals[k]][1]) for k in ks.staggered_grads})

        def dkdv_args(gbufs: dict) -> tuple:
            grad_args = [x for slot in added for x in [gbufs[slot], *gbufs[slot].stride()]]
            grad_args += [x for k in ks.staggered_grads for x in (gbufs["diag", k], *gbufs["diag", k].stride())]
            if added:
                grad_args += [fixed[0:], fixed[1:]]
            return (q, k, v, dout, dk, dv, lse, delta,
                    *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
                    *capture_args, *grad_args, scale, Hq, Hkv, Sq, Skv, Hq // Hkv)

        dq_args = (q, k, v, dout, dq, lse, delta, out, dlse if dlse is not None else delta,
                   *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *out.stride(),
                   *capture_args, *[x for slot in stored for x in (grads[slot], *grads[slot].stride())],
                   scale, Hq, Sq, Skv, Hq // Hkv)
        tma = tma_ok(q, k, v, dout)  # (the layout allows it; ``backward_tma`` decides by the variant)
        if tma:
            ensure_allocator()  # (in this thread: autograd runs the backward on its own)
        tiles = self._tile_tma(ks, q.dtype, D, Dv, shape)
        key = ("bwd", q.dtype, q.device, dlse is not None, grad_slots, tma, runtime.TMA,  # (backward_tma reads it)
               tiles.get("TILE_TMA"), self._layout_key(capture_args, q, k, v, out, dout))
        plan = self._kept(key)
        if plan is None:
            self._first_launch(key, lambda: self._backward_launch(shape, Hkv, D, Dv, q, dq_args, dkdv_args,
                                                                  grads, fixed, dlse is not None, ks, tma, tiles),
                               lambda: self._backward(q, k, v, out, lse, dout, dlse, scale, grad_slots))
        else:  # the dQ pass first: it stores delta
            plan[0](*dq_args)
            plan[1](*dkdv_args(grads))
            self.last_tiles.update({"dQ": plan[0].config, "dK/dV": plan[1].config})
        grads = self._folded(grads, ks)
        for slot, index in stored.items():  # (over the leading b and h: float32 sums, in a fixed order)
            if lead := len(shared_by(index)):
                grads[slot] = sum_leading(grads[slot], lead)
        return dq, dk, dv, {slot: g.to(self.captured[slot].dtype) for slot, g in grads.items()}

    def _folded(self, grads: dict, ks: KernelSource) -> dict:
        """``grads`` with the staggered copies' gradients added into their tables' (``runtime.fold_staggered``)."""
        for k in ks.staggered_grads:
            d, g = ks.diagonals[k], grads.pop(("diag", k), None)
            if g is not None:  # (None: already folded, in deterministic mode)
                fold_staggered(d, g, self._staggered[d][2], grads[d.slot])
        return grads

    def _backward_launch(self, shape, Hkv: int, D: int, Dv: int, q, dq_args: tuple, dkdv_args,
                         grads: dict, fixed, has_dlse: bool, ks: KernelSource, tma: bool,
                         tiles: dict) -> tuple | None:
        """A backward signature's first launches, dQ pass then dK/dV pass: tiles tuned or chosen by
        the mask. Returns them to keep, or None in deterministic mode (nothing to keep)."""
        B, Hq, Sq, Skv = shape
        sparsity = self._sparsity(shape, D, Dv, q.dtype, q.device)
        tma = tma and backward_tma(sparsity, D, Dv, bool(self._logit_reads))
        common = dict(self._launch_constants(q.dtype, D, Dv, shape), TMA=tma, **tiles)
        # the stored gradients' buffers are dense (a stride-0 view's gradient is not): offsets into them may
        # pass 2**31 - 1 where the captured tensor's do not
        wide = index_type([grads[slot] for slot, _ in ks.stored_grads])
        if wide.primitive_bitwidth > common["IDX_T"].primitive_bitwidth:
            common["IDX_T"] = wide
        module = load_module(ks)
        defaults = default_backward_configs(q.device, D, Dv, q.dtype, sparsity, bool(tile_reads([self.program.logits])),
                                            bool(ks.diagonals))
        dkdv_cfg, dq_cfg = (first_fitting(family, c, q.device, D, Dv, q.dtype)
                            for family, c in zip(("dkdv", "dq"), defaults))
        masked = self.analysis.has_mask
        dkdv_kernel, dq_kernel = module.attn_bwd_dkdv, module.attn_bwd_dq

        def even_n(c):  # Skv is a multiple of BLOCK_N (of the tiles launched: a fallback's, maybe)
            return {"EVEN_N": Skv % c.block_n == 0}

        def even_mn(c):  # (and Sq a multiple of BLOCK_M: the dK/dV pass's query tiles need no clamping)
            return {**even_n(c), "EVEN_M": Sq % c.block_m == 0}

        dkdv_kw = dict(common, constexprs=even_mn,
                       extra=(lambda c: self._runs_args(shape, c, q.device, transpose=True)) if masked else None)
        dq_kw = dict(common, HAS_DLSE=has_dlse, constexprs=even_n,
                     extra=(lambda c: self._runs_args(shape, c, q.device)) if masked else None)

        def dkdv_grid(c):
            return (_cdiv(Skv, c.block_n), B * Hkv)

        def dq_grid(c):
            return (_cdiv(Sq, c.block_m), B * Hq)

        if self.autotune:
            dq_cfg = self._tuned("dq", ks.key, shape, D, Dv, q,
                                 lambda c: run_config(dq_kernel, c, dq_grid, *dq_args, **dq_kw))
        dq_launch = launch(dq_kernel, (ks.key, "dq", dq_cfg, D, Dv, q.dtype), dq_cfg, dq_grid, *dq_args, **dq_kw)
        self.last_tiles["dQ"] = dq_launch.config
        if self.autotune:
            scratch = {slot: like_layout(g, g.dtype) for slot, g in _added(grads, ks).items()}  # (tuning adds here)
            dkdv_cfg = self._tuned("dkdv", ks.key, shape, D, Dv, q, lambda c: run_config(
                dkdv_kernel, c, dkdv_grid, *dkdv_args(scratch), GRAD_PASS=0, **dkdv_kw))
        if self.deterministic and fixed is not None:  # (gradients the dQ pass stores are deterministic)
            self._deterministic_dkdv(dkdv_kernel, ks, dkdv_cfg, dkdv_grid, dkdv_args, dkdv_kw, grads, fixed,
                                     shape, D, Dv, q.dtype)
            return None  # (two dK/dV passes and a scale between them, every call)
        dkdv_launch = launch(dkdv_kernel, (ks.key, "dkdv", dkdv_cfg, D, Dv, q.dtype), dkdv_cfg,
                             dkdv_grid, *dkdv_args(grads), GRAD_PASS=0, **dkdv_kw)
        self.last_tiles["dK/dV"] = dkdv_launch.config
        return dq_launch, dkdv_launch

    def _deterministic_dkdv(self, kernel, ks: KernelSource, cfg, grid, args, kw, grads, fixed, shape, D, Dv, dtype):
        """Captured-tensor gradients that are bitwise reproducible: a first dK/dV pass finds the
        largest contribution m (atomic max: order-free), then the second adds every contribution
        as an int64 fixed-point number at scale 2^F, F = floor(62 - log2(m · N)) for N terms, so
        that no sum can overflow and integer addition makes the order irrelevant. Costs a second
        dK/dV pass; the resolution is m · N / 2^62 per term. The gradients replace ``grads``' entries
        (those the dQ pass stored stay as they are)."""
        B, Hq, Sq, Skv = shape
        cfg = self.last_tiles["dK/dV"] = launch(kernel, (ks.key, "dkdv", cfg, D, Dv, dtype), cfg, grid,
                                                *args(grads), GRAD_PASS=1, **kw).config
        added = _added(grads, ks)
        terms = B * Hq * Sq * Skv * max(1, sum(1 for r in float_reads(self.program.logits)
                                               if r.arg in added))
        largest = fixed[0].clamp_min(torch.finfo(torch.float32).tiny)
        exponent = torch.floor(62.0 - torch.log2(largest) - math.log2(terms)).clamp(-120.0, 120.0)
        fixed[1] = torch.exp2(exponent)  # on the device: no synchronisation
        integers = {slot: like_layout(g, torch.int64) for slot, g in added.items()}
        run_config(kernel, cfg, grid, *args(integers), GRAD_PASS=2, **kw)
        integers = self._folded(integers, ks)  # (exact: integer sums)
        for slot in added:
            grads.pop(slot)
        grads.update({slot: (i.double() / fixed[1].double()).float() for slot, i in integers.items()})


def _added(grads: dict, ks: KernelSource) -> dict:
    """The buffers of ``grads`` that ``ks``'s dK/dV pass adds into: all but those its dQ pass stores."""
    stored = {slot for slot, _ in ks.stored_grads}
    return {slot: g for slot, g in grads.items() if slot not in stored}


class _AttentionFunction(torch.autograd.Function):
    """Autograd for one Attention: the forward saves (out, lse); the backward runs the generated
    dK/dV and dQ kernels, which also accumulate gradients into learnable captured tensors."""

    @staticmethod
    def forward(ctx, attn: Attention, scale: float, config, q, k, v, *captured):
        out, lse = attn._forward(q, k, v, scale, True, config, _grad_slots(attn, ctx.needs_input_grad[6:]))
        ctx.attn, ctx.scale = attn, scale
        ctx.set_materialize_grads(False)  # an lse nobody used has no gradient (not a tensor of zeros to read)
        # saving the captured tensors makes autograd refuse a backward after they were modified in place
        ctx.save_for_backward(q, k, v, out, lse, *captured)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        attn: Attention = ctx.attn
        q, k, v, out, lse = ctx.saved_tensors[:5]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, grads = attn._backward(q, k, v, out, lse, dout, dlse, ctx.scale,
                                           _grad_slots(attn, ctx.needs_input_grad[6:]))
        captured_grads = [grads.get(i) for i in range(len(attn.captured))]
        return (None, None, None, dq, dk, dv, *captured_grads)


# torch.compile: a compiled graph reaches an Attention through two custom operators that Dynamo
# does not trace into, ``flashgen::attention`` (out and lse) and ``flashgen::attention_backward``,
# by the Attention's ``_op_id`` (an int the graph holds as a constant; the registry holds no reference)
_op_ids = itertools.count()
_by_op_id: weakref.WeakValueDictionary[int, Attention] = weakref.WeakValueDictionary()


def _registered(op_id: int, captured: list[torch.Tensor]) -> Attention:
    attn = _by_op_id.get(op_id)
    if attn is None:
        raise RuntimeError("flashgen: a compiled graph calls an Attention that no longer exists; keep the object "
                           "that fg.compile returned alive as long as the compiled function runs")
    if any(a.data_ptr() != b.data_ptr() or a.shape != b.shape for a, b in zip(captured, attn.captured)):
        raise RuntimeError("flashgen: the compiled graph passed other tensors than the ones the mods captured; "
                           "kernels read the captured tensors themselves (update them in place, not by rebinding)")
    return attn


@torch.library.custom_op("flashgen::attention", mutates_args=(),
                         schema="(int op_id, Tensor q, Tensor k, Tensor v, Tensor[] captured, float scale) "
                                "-> (Tensor, Tensor)")
def _attention_op(op_id, q, k, v, captured, scale):
    return _registered(op_id, captured)._forward(q, k, v, scale, True, None)


@_attention_op.register_fake
def _(op_id, q, k, v, captured, scale):
    B, Hq, Sq, _ = q.shape
    return q.new_empty((B, Hq, Sq, v.shape[-1])), q.new_empty((B, Hq, Sq), dtype=torch.float32)


@torch.library.custom_op("flashgen::attention_backward", mutates_args=(),
                         schema="(int op_id, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, "
                                "Tensor? dlse, Tensor[] captured, float scale, int[] grad_slots) "
                                "-> (Tensor, Tensor, Tensor, Tensor[])")
def _attention_backward_op(op_id, q, k, v, out, lse, dout, dlse, captured, scale, grad_slots):
    dq, dk, dv, grads = _registered(op_id, captured)._backward(q, k, v, out, lse, dout, dlse, scale,
                                                               tuple(grad_slots))
    return dq, dk, dv, [grads[slot] for slot in grad_slots]


@_attention_backward_op.register_fake
def _(op_id, q, k, v, out, lse, dout, dlse, captured, scale, grad_slots):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            [torch.empty_like(captured[slot]) for slot in grad_slots])


def _op_setup(ctx, inputs, output):
    op_id, q, k, v, captured, scale = inputs
    ctx.op_id, ctx.scale = op_id, scale
    ctx.set_materialize_grads(False)  # an lse nobody used has no gradient (not a tensor of zeros to read)
    ctx.grad_slots = list(_grad_slots(_by_op_id[op_id], [t.requires_grad for t in captured]))
    ctx.save_for_backward(q, k, v, *output, *captured)


def _op_backward(ctx, dout, dlse):
    q, k, v, out, lse, *captured = ctx.saved_tensors
    dq, dk, dv, grads = _attention_backward_op(
        ctx.op_id, q, k, v, out, lse, dout if dout is not None else torch.zeros_like(out), dlse, captured,
        ctx.scale, ctx.grad_slots)
    by_slot = dict(zip(ctx.grad_slots, grads))
    return None, dq, dk, dv, [by_slot.get(i) for i in range(len(captured))], None


torch.library.register_autograd("flashgen::attention", _op_backward, setup_context=_op_setup)


def _compiled_call(attn: Attention, q, k, v, scale: float):
    """``attn(q, k, v)`` inside torch.compile (a LowRankBias's factors already joined to q and k):
    the ``flashgen::attention`` operator."""
    return torch.ops.flashgen.attention(attn._op_id, q, k, v, list(attn.captured), scale)


def _grad_slots(attn: Attention, wanted) -> tuple[int, ...]:
    """The captured tensors that get gradients: floating point, read in the logits (a mask's
    reads get none) and ``wanted`` by autograd (a flag per captured tensor)."""
    return tuple(i for i, (t, w) in enumerate(zip(attn.captured, wanted))
                 if w and t.is_floating_point() and i in attn._logit_reads)


def _with_factors(lr: LowRankBias, q, k, v, scale: float):
    """FlashBias: ``q' = [q, phi_q / scale]``, ``k' = [k, phi_k]`` (attention with the same scale
    on these equals attention on q, k with the bias phi_q phi_kᵀ added), and v; see
    :func:`_factor_columns`."""
    k, v = _factor_keys(lr, q, k, v)
    return *_with_columns(q, k, _factor_columns(lr, q, k, scale)), v


def _with_strides(block_map: torch.Tensor) -> tuple:
    """A block map's kernel arguments (runs or hulls): the tensor, then its strides (0 along b, h where
    the mask ignores them: a dimension of 1)."""
    return (block_map, *(block_map.stride(i) if block_map.shape[i] > 1 else 0 for i in (0, 1)),
            block_map.stride(2), block_map.stride(3))


def _with_columns(q, k, columns: tuple[torch.Tensor, torch.Tensor]):
    """q and k with a low-rank bias's columns (``_factor_columns``) appended."""
    return torch.cat([q, columns[0]], dim=-1), torch.cat([k, columns[1]], dim=-1)


def _factor_keys(lr: LowRankBias, q, k, v):
    """k and v for a LowRankBias's call (its factors checked against q and k): per-query-head key
    factors under grouped-query attention repeat k and v to the query heads."""
    B, Hq, Sq, _ = q.shape
    _, Hkv, Skv, _ = k.shape
    fq, fk = lr.phi_q, lr.phi_k
    problems = []
    for name, t, length, heads in (("phi_q", fq, Sq, Hq), ("phi_k", fk, Skv, Hq)):
        if t.shape[2] != length:
            problems.append(f"{name} has length {t.shape[2]}, expected {length}")
        if t.shape[0] not in (1, B) or t.shape[1] not in (1, heads) + ((Hkv,) if name == "phi_k" else ()):
            problems.append(f"{name} of shape {list(t.shape)} does not broadcast to batch {B}, heads {heads}")
        if t.device != q.device:
            problems.append(f"{name} is on {t.device} but q on {q.device}")
    if q.shape[-1] + fq.shape[-1] > MAX_HEAD_DIM:
        problems.append(f"head dim {q.shape[-1]} plus rank {fq.shape[-1]} exceeds {MAX_HEAD_DIM}, the widest head "
                        "the kernels take; use a lower rank (fg.low_rank(..., max_rank=...)) or a dense bias")
    if problems:
        raise ValueError("LowRankBias: " + "; ".join(problems))
    if fk.shape[1] not in (1, Hkv):  # per query head: give every query head its own keys
        k, v = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    return k, v


def _factor_columns(lr: LowRankBias, q, k, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns a LowRankBias adds to q and k (k from ``_factor_keys``): ``phi_q / scale`` and
    ``phi_k`` in q's dtype, broadcast to q's and k's batch and heads (contiguous) and padded with
    zero columns to a multiple of 16 (the tensor cores' K step) where the head stays within
    MAX_HEAD_DIM. Column r of the two is multiplied by 2^e_r and 2^-e_r (the bias unchanged, and
    exactly so: powers of two), e_r balancing their largest entries, so that dividing by the scale
    cannot overflow float16 where the bias's terms do not."""
    B, Hq, Sq, _ = q.shape
    _, Hkv, Skv, _ = k.shape
    with torch.no_grad():  # (column maxima: 0 for empty factors)
        aq, ak = (torch.zeros(f.shape[-1], device=f.device) if f.numel() == 0 else
                  f.detach().abs().float().flatten(0, -2).amax(0) for f in (lr.phi_q, lr.phi_k))
        aq = aq / scale
        e = torch.where((aq > 0) & (ak > 0), torch.round(0.5 * torch.log2(ak / aq)), 0.0)
        c = torch.exp2(e)
    r = lr.phi_q.shape[-1]
    n = -r % 16 if q.shape[-1] + r + -r % 16 <= MAX_HEAD_DIM else 0
    fq = torch.nn.functional.pad((lr.phi_q.float() * (c / scale)).to(q.dtype).expand(B, Hq, Sq, r), (0, n))
    fk = torch.nn.functional.pad((lr.phi_k.float() / c).to(k.dtype).expand(B, Hkv, Skv, r), (0, n))
    return fq.contiguous(), fk.contiguous()


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (Triton 3.6's ``triton.cdiv`` is a constexpr function: ~5 µs a call)."""
    return -(-a // b)


def _precision(dtype: torch.dtype) -> dict:
    # fp32: three tf32 tensor-core products per dot (the split-precision trick), accurate to about
    # fp32's rounding; "ieee" would run the dots on CUDA cores and take minutes to compile at D = 256
    return dict(INPUT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
                DOT_F32=dtype == torch.bfloat16 and interpreting())


def _check_inputs(q, k, v, scale, enable_gqa, captured) -> float:
    """Validate the inputs, listing every problem at once; returns the softmax scale."""
    names = ("q", "k", "v")
    tensors = (q, k, v)
    problems = []
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if problems:
        raise TypeError("; ".join(problems))
    for name, t in zip(names, tensors):
        if t.dim() != 4:
            problems.append(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            problems.append(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if problems:
        raise ValueError("invalid attention inputs:\n  " + "\n  ".join(problems))
    if not (q.dtype == k.dtype == v.dtype):
        problems.append(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        problems.append(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cuda", "cpu"):
        problems.append(f"device {q.device} is not supported: use CUDA tensors, or CPU tensors (Triton's interpreter)")
    elif q.device.type == "cpu" and not interpreting():
        problems.append("CPU tensors run in Triton's interpreter, which is only on when no GPU is visible or "
                        "TRITON_INTERPRET=1 was set before importing flashgen; move q, k, v to CUDA")
    (B, Hq, _, D), (Bk, Hk, Skv, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    if not B == Bk == Bv:
        problems.append(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Dk != D:
        problems.append(f"head dims differ: q has D={D}, k has D={Dk} (they must match; v may differ)")
    if Skv != Sv:
        problems.append(f"k and v lengths differ: k has {Skv}, v has {Sv}")
    if Hk != Hv:
        problems.append(f"k and v head counts differ: k has {Hk}, v has {Hv}")
    for name, d in (("q/k", D), ("v", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            problems.append(f"{name} head dim {d} is not supported (1..{MAX_HEAD_DIM})")
    if Hk and Hq != Hk:
        if not enable_gqa:
            problems.append(f"q has {Hq} heads but k/v have {Hk}; pass enable_gqa=True for grouped-query attention")
        elif Hq % Hk:
            problems.append(f"grouped-query attention needs Hq % Hkv == 0, got Hq={Hq}, Hkv={Hk}")
    elif Hk == 0 and Hq:
        problems.append("k and v have 0 heads")
    for slot, t in enumerate(captured):
        if t.device != q.device:
            problems.append(f"captured tensor {slot} (shape {list(t.shape)}) is on {t.device} but q is on "
                            f"{q.device}; move it to {q.device} before building the mod")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        problems.append(f"scale must be a finite number, got {scale!r}")
    if problems:
        raise ValueError("invalid attention inputs:\n  " + "\n  ".join(problems))
    return float(scale)


def compile(score_mod: Callable | None = None, mask_mod: Callable | None = None,
            bias: Callable | torch.Tensor | None = None, *, deterministic: bool = False,
            autotune: bool | None = None, bias_lowering: str = "loop", fast_math: bool | None = None) -> Attention:
    """Trace and analyse the mods once; the returned :class:`Attention` is reusable.

    ``deterministic=True`` promises bitwise-identical gradients run to run: learnable captured
    tensors then accumulate in int64 fixed point instead of fp32 atomics, at the cost of a second
    dK/dV pass, and Hopper GPUs keep the Triton backward (the warp-specialised one adds dq up in
    float32 through TMA reductions, in no fixed order). Without it, dk and dv are still deterministic
    everywhere, and dq wherever the Triton backward runs.
    ``autotune=True`` tunes each kernel's launch configuration on first use for a new key (shape
    bucket, dtype, head dims) and stores the result on disk for later processes; the default
    (None) follows ``FLASHGEN_AUTOTUNE`` and otherwise uses a default configuration per GPU and
    head dim.
    ``bias_lowering`` places a traced additive bias of finite rank (``attn.analysis.bias_rank``):
    ``"loop"`` (default) evaluates it per score in the KV loop; ``"factors"`` computes exact
    factors φ_q, φ_k per shape (an interpolative decomposition from O((Sq + Skv)·rank) evaluations)
    and runs it as ``fg.LowRankBias`` (FlashBias); ``"auto"`` lets a cost model choose per head dim
    (experimental: its constants come from the H200's datasheet ratios, not from measurements).
    ``fast_math`` chooses how kernels compute ``tanh`` and ``sigmoid`` (soft-capping, gates): the
    GPU's ``tanh.approx.f32`` instruction (relative error about 2^-11, below bf16's and fp16's
    resolution; one special-function operation instead of an exp and a division) or exact
    formulas. None (default): approximate for bf16/fp16 inputs, exact for fp32. Triton's
    interpreter (no GPU) always runs the exact formulas."""
    return Attention(score_mod, mask_mod, bias, deterministic=deterministic, autotune=autotune,
                     bias_lowering=bias_lowering, fast_math=fast_math)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable | None = None,
              mask_mod: Callable | None = None, bias: Callable | torch.Tensor | None = None, *,
              scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
              deterministic: bool = False, fast_math: bool | None = None):
    """softmax(score_mod(scale * q kᵀ) + bias, masked by mask_mod) · v, as one fused kernel.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Skv, D]``, v ``[B, Hkv, Skv, Dv]`` -> ``[B, Hq, Sq, Dv]`` in
    q's dtype; with ``return_lse=True`` also the row log-sum-exp ``[B, Hq, Sq]`` (float32, natural
    log, ``-inf`` for fully masked rows, whose output is 0). Mods are traced on the first call and
    again only when something they read changes; kernels are generated and compiled once per
    equivalent program. ``deterministic`` and ``fast_math`` as in :func:`compile`.
    """
    key = _fingerprint((score_mod, mask_mod, bias, deterministic, fast_math))
    attn = _recent.get(key) if key is not None else None
    if attn is None:
        attn = Attention(score_mod, mask_mod, bias, deterministic=deterministic, fast_math=fast_math)
        if key is not None:
            _recent[key] = attn
            if len(_recent) > _RECENT_MAX:
                _recent.popitem(last=False)
    else:
        _recent.move_to_end(key)
    return attn(q, k, v, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse)


# fg.attention traces its mods on the first call only: later calls with the same functions, whose
# closures, defaults and globals hold the same values (tensors: the same objects, shapes and dtypes),
# reuse the traced Attention. Anything the fingerprint cannot see through is traced every time.
_recent: OrderedDict[tuple, Attention] = OrderedDict()
_RECENT_MAX = 128
_BLOCK_MAPS_MAX = 16  # block maps kept per Attention (shapes x tile sizes x captured-tensor versions)
_UNSEEN = object()
_STABLE_MODULES = {"torch", "math", "flashgen", "operator", "builtins"}


def _fingerprint(obj, depth: int = 0):
    """A hashable summary of everything a trace of ``obj`` can depend on, or None if unknown."""
    if depth > 8:
        return None
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype)):
        return (type(obj).__name__, obj)
    if isinstance(obj, torch.Tensor):
        return ("tensor", id(obj), obj.dtype, tuple(obj.shape), tuple(obj.stride()), str(obj.device))
    if isinstance(obj, LowRankBias):
        return ("lowrank", _fingerprint(obj.phi_q), _fingerprint(obj.phi_k))
    if isinstance(obj, types.ModuleType):
        # torch.where, math.pi: fixed. A user module's attributes can change between calls (cfg.W),
        # so a mod that reads one is traced every time.
        return ("module", obj.__name__) if obj.__name__.split(".")[0] in _STABLE_MODULES else None
    if isinstance(obj, types.BuiltinFunctionType):
        return ("builtin", id(obj))
    if isinstance(obj, Mod):
        inner = _fingerprint(obj.fn, depth + 1)
        return None if inner is None else ("mod", type(obj).__name__, inner)
    if isinstance(obj, (tuple, list)):
        parts = tuple(_fingerprint(x, depth + 1) for x in obj)
        return None if any(p is None for p in parts) else parts
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        if any(isinstance(c, types.CodeType) for c in code.co_consts):
            return None  # nested functions/comprehensions read names we do not follow: trace every call
        parts = [("code", id(code))]
        for cell in obj.__closure__ or ():
            try:
                parts.append(_fingerprint(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                parts.append(("empty",))
        parts.extend(_fingerprint(d, depth + 1) for d in obj.__defaults__ or ())
        for name in code.co_names:
            value = obj.__globals__.get(name, _UNSEEN)
            if value is not _UNSEEN:
                inner = _fingerprint(value, depth + 1)
                if inner is None:
                    return None
                parts.append((name, inner))
        return None if any(p is None for p in parts) else (obj, tuple(parts))
    return None


def block_mask(mask_mod: Callable, B: int, H: int, Sq: int, Skv: int, *, block_size: tuple[int, int] = (128, 128),
               device: torch.device | str | None = None, exact: bool | None = None) -> BlockMask:
    """Which ``block_size`` tiles of ``mask_mod`` over ``[B, H, Sq, Skv]`` are empty, full or
    partial, derived from the mask's IR by interval analysis (no per-element evaluation).

    ``exact=True`` also evaluates the mask element by element on the tiles that intervals leave
    undecided (streaming, on ``device``); the default does so only for masks that read captured
    tensors and leave most tiles undecided (unsorted ids). For inspection: attention calls build
    (and cache) the maps they need themselves."""
    for name, value in (("B", B), ("H", H), ("Sq", Sq), ("Skv", Skv)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"block_mask: {name} must be a positive int, got {value!r}")
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(x, int) and x >= 1 for x in block_size)):
        raise ValueError(f"block_mask: block_size must be two positive ints (query, kv), got {block_size!r}")
    attn = Attention(mask_mod=mask_mod)
    return BlockMask(attn.program.mask, attn.captured, (B, H, Sq, Skv), tuple(block_size),
                     closed_form=not attn.analysis.block_runs, device=device, exact=exact)
