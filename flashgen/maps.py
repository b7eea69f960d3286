"""Block maps built on the GPU, for masks that read tensors whose values change between calls.

A packed training batch brings new document ids every step. The host analysis (``blocks``)
would copy them to the host, which waits for the GPU's queue, and then classify tiles in Python:
milliseconds per step. :class:`LiveRuns` instead keeps each map's runs in a buffer of fixed
shape that the kept launches point at, and refills it with generated kernels
(``block_map.py.jinja``: bounds, states, runs) when the tensors' versions change: nothing is read
on the host, and the tiles and launches chosen on the first call stay.
"""

from __future__ import annotations

import math

import torch
import triton

from .blocks import EMPTY_HULL, mask_dims, reads
from .codegen.render import KernelSource
from .ir import Node
from .parallel import capturing
from .runtime import Launch, captured_args, index_type, load_module

_MAX_BYTES = 1 << 28  # of one map's runs buffer (as large as flex's block mask); larger maps: the host analysis
_CHUNK = 16  # the most column blocks one ``block_states`` program bounds at once
_PROGRAMS = 8192  # the ``block_states`` programs to aim for: fewer rows per program below that
_STRIP = 4096  # entries per step when ``block_states`` evaluates a row's chunk entry by entry
GRAPHS = True  # refills seen before replayed as one CUDA graph (False: launched one by one; for A/B timing)
PDL = True  # on Hopper, the refill's kernels by programmatic dependent launch (False: for A/B timing)


class LiveRuns:
    """The runs of one mask at one shape and device, refilled in place on the GPU.

    :meth:`runs` gives the buffer of one map (tile size, transposed for the dK/dV pass or not,
    ragged last block or not): int32 ``[batches, heads, rows, 2, 1 + 2R]`` as ``blocks.runs``
    describes, with R = ceil(columns / 2), the most runs of one kind a row can have, so that no
    value of the tensors can outgrow it. :meth:`refresh` refills the buffers when the tensors'
    versions change: ``block_states`` bounds the mask over each tile by interval arithmetic (the
    tensors' values by their min/max over the tile's index range; reads by ``q_idx`` or
    ``kv_idx`` alone bounded once per block by ``block_summaries``); where the bounds leave a tile
    open, a visible and a hidden entry among 16 sampled prove it partial, and only where they do
    not is the mask evaluated on every entry, as the attention kernels do on partial tiles, so the
    map is exact (with ``exact=False`` open tiles stay partial: the bounds alone, conservative);
    ``block_runs`` lists each row's runs. The states are kept at 64 x 64 tiles (:meth:`base`): the
    maps of larger tiles combine them, so a step's forward and backward maps bound the mask once.

    :meth:`hulls` gives the states' hulls, for kernels that visit each row's tiles from its first
    non-empty one to its last and skip the mask on one span of full ones (the Gluon kernels, which
    combine the rows and columns of 64 x 64 tiles into theirs): ``block_states`` adds its tiles to
    them by atomics, so a refill of hulls alone is two launches (``block_summaries``, which empties
    them, then ``block_states``)."""

    def __init__(self, source: KernelSource, mask: Node, captured: list[torch.Tensor],
                 shape: tuple[int, int, int, int], device: torch.device, check_reads: bool, *, exact: bool = True):
        self.shape, self.device, self.captured, self.mask = shape, device, captured, mask
        self.source = source
        self.dims = mask_dims(mask, shape[0], shape[1])
        self._module = load_module(source)
        self._read = [captured[i] for i in reads(mask)]
        # Hopper's programmatic dependent launch: each refill kernel launches while the one before it
        # runs, and waits for its results only where it reads them
        pdl = device.type == "cuda" and PDL and torch.cuda.get_device_capability(device)[0] >= 9
        self._pdl = dict(PDL=pdl, **({"launch_pdl": True} if pdl else {}))
        self._constants = dict(IDX_T=index_type(captured), CHECK_READS=check_reads, FAST_MATH=False,
                               EXACT=exact, num_warps=4, **self._pdl)  # (the states' launches)
        self._slots = self._module.SLOTS.value  # reads bounded once per block (``block_summaries``)
        self._states: dict[tuple[int, int], list] = {}  # base tile size -> [states, launch, summaries, launch]
        # (tile size, transpose, ragged_last) -> runs, their launch, its arguments, the base tile size;
        # (64 x 64, transpose, "hull") -> hulls, None, None, 64 x 64
        self._runs: dict[tuple, tuple] = {}
        self._fresh: set = set()  # base tile sizes bounded and keys filled for ``_versions``
        # refills seen once (None), then recorded, for the captured tensors' "addresses" in the graphs
        self._graphs: dict = {}
        # the versions of the tensors the mask reads, and the captured tensors' integer arguments the
        # states' launches specialise on, when last filled
        self._versions = self._layout = None

    @staticmethod
    def base(block: tuple[int, int]) -> tuple[int, int]:
        """The tiles whose states a map at ``block`` tiles is made from: one bounding of the mask at
        64 x 64 serves every tile size of multiples of 64 (the forward's and the backward's maps)."""
        return math.gcd(block[0], 64), math.gcd(block[1], 64)

    def fits(self, block: tuple[int, int]) -> bool:
        """Whether the map at ``block`` tiles is small enough to keep here (~8 bytes per tile of runs,
        and one per tile of states at its base tiles)."""
        base = self.base(block)
        tiles = [math.prod(self.dims) * -(-self.shape[2] // bm) * -(-self.shape[3] // bn) for bm, bn in (block, base)]
        return tiles[0] * 8 + tiles[1] <= _MAX_BYTES

    def runs(self, block: tuple[int, int], *, transpose: bool = False, ragged_last: bool = False) -> torch.Tensor:
        """The runs buffer of one map, filled for the current values of the tensors the mask reads."""
        block = tuple(block)
        key = (block, transpose, ragged_last)
        if key not in self._runs:
            base = self.base(block)
            grid = (-(-self.shape[2] // base[0]), -(-self.shape[3] // base[1]))  # (of the states)
            self._states_buffers(base)
            states = self._states[base][0]
            fold = (block[0] // base[0], block[1] // base[1])
            rows, cols = (-(-n // b) for n, b in zip(self.shape[2:], block))
            if transpose:
                (rows, cols), grid, fold = (cols, rows), grid[::-1], fold[::-1]
            runs = torch.empty(*self.dims, rows, 2, 1 + 2 * -(-cols // 2), dtype=torch.int32, device=self.device)
            sb, sh, sr, sc = states.stride()
            launch = Launch(None, self._module.block_runs, (rows, *self.dims), (),
                            dict(CHUNK=256, FR=fold[0], FC=fold[1], num_warps=4, **self._pdl))
            self._runs[key] = (runs, launch, (states, sb, sh, *((sc, sr) if transpose else (sr, sc)), runs,
                                              *runs.stride()[:4], cols, int(ragged_last), *grid), base)
        self.refresh((key,))
        return self._runs[key][0]

    def hulls(self, *, transpose: bool = False) -> torch.Tensor:
        """The hulls of the rows of 64 x 64 tiles (query blocks, or KV blocks if ``transpose``),
        filled for the current values of the tensors the mask reads: int32 ``[batches, heads, rows,
        8]`` as ``blocks.hulls`` lays them out."""
        base = (64, 64)
        key = (base, transpose, "hull")
        if key not in self._runs:
            self._states_buffers(base)
            rows = -(-self.shape[3 if transpose else 2] // 64)
            self._empty_hull = torch.tensor(EMPTY_HULL, dtype=torch.int32, device=self.device)  # (copied on the GPU)
            hull = self._empty_hull.repeat(*self.dims, rows, 1)
            self._runs[key] = (hull, None, None, base)
            # (the bounds' launches add to every hull of their tiles: made again, and run again)
            entry = self._states[base]
            entry[1] = entry[3] = None
            self._graphs = {}
            self._fresh.discard(base)
        self.refresh((key,))
        return self._runs[key][0]

    def _states_buffers(self, base: tuple[int, int]) -> None:
        if base not in self._states:
            grid = (-(-self.shape[2] // base[0]), -(-self.shape[3] // base[1]))
            self._states[base] = [torch.empty(*self.dims, *grid, dtype=torch.int8, device=self.device), None,
                                  torch.empty(math.prod(self.dims), self._slots, 2, max(grid), dtype=torch.float64,
                                              device=self.device), None]

    def _hulls(self, base: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The hulls of ``base`` tiles by query blocks and by KV blocks (None where not asked for)."""
        return tuple(self._runs[k][0] if k in self._runs else None for k in ((base, t, "hull") for t in (False, True)))

    def _hull_flags(self, base: tuple[int, int]) -> dict:
        """The bounds' constexprs saying which hulls of ``base`` tiles they fill (HULL_Q, HULL_K)."""
        return {f"HULL_{x}": h is not None for x, h in zip("QK", self._hulls(base))}

    def _hull_args(self, base: tuple[int, int], states: torch.Tensor, summaries: bool) -> tuple:
        """``block_summaries``' (or else ``block_states``') arguments for the hulls of ``base`` tiles:
        each one's pointer and size (or strides along b and h; ``states`` stands in for one not asked for)."""
        out = ()
        for hull in self._hulls(base):
            at = hull if hull is not None else states
            out += (at, at.numel()) if summaries else (at, *(at.stride(i) if at.shape[i] > 1 else 0 for i in (0, 1)))
        return out

    def _states_launch(self, block: tuple[int, int], rows: int, cols: int) -> Launch:
        """``block_states``'s launch for one tile size: ROWS x CHUNK tiles per program."""
        bm, bn = block
        bnp = triton.next_power_of_2(bn)
        chunk = max(2, min(_CHUNK, 512 // bnp))  # column blocks per program: ~512 keys
        chunks, maps = -(-cols // chunk), self.dims[0] * self.dims[1]
        per = max(2, min(64, 1 << (rows * chunks * maps // _PROGRAMS).bit_length() >> 1))  # rows per program
        constants = dict(self._constants, **self._hull_flags(block), BM=bm, BN=bn, BNP=bnp, ROWS=per, CHUNK=chunk,
                         SUB_M=max(2, min(triton.next_power_of_2(bm), _STRIP // (chunk * bnp))),
                         RANGE_M=triton.next_power_of_2(bm), RANGE_N=bnp)  # (a tile's index range fits)
        return Launch(None, self._module.block_states, (-(-rows // per), chunks, maps), (), constants)

    def _summaries_launch(self, block: tuple[int, int]) -> Launch:
        """``block_summaries``'s launch for one tile size: the bounds of R blocks per program, R from 1
        (a latency-bound launch of a few dozen programs) to 16 (thousands of blocks)."""
        blocks = self._states[block][2].shape[-1]
        r = max(1, min(16, triton.next_power_of_2(blocks * math.prod(self.dims)) // 1024))
        constants = dict(BM=block[0], BN=block[1], R=r, num_warps=4, RANGE_M=triton.next_power_of_2(block[0]),
                         **self._hull_flags(block),
                         RANGE_N=triton.next_power_of_2(block[1]), PDL=self._pdl["PDL"])  # (its range fits)
        grid = (-(-blocks // r), math.prod(self.dims))
        return Launch(None, self._module.block_summaries, grid, (), constants)

    def keys_of(self, runs: list[torch.Tensor]) -> tuple | None:
        """The keys of these buffers, or None if one of them is not this object's."""
        keys = tuple(next((k for k, (buf, *_) in self._runs.items() if buf is r), None) for r in runs)
        return keys if runs and None not in keys else None

    def refresh(self, keys: tuple) -> None:
        """Refill the buffers of ``keys`` if the tensors the mask reads changed since they were filled.

        From the second refill of the same keys on (ids that change every step), the refill's
        launches (the bounds once, then one per map) are replayed as one CUDA graph: one call on the
        host instead of three to five launches, and no gaps between the small kernels on the GPU."""
        versions = tuple((t.data_ptr(), t._version) for t in self._read)
        if versions != self._versions:
            self._versions = versions
            self._fresh.clear()
        stale = [k for k in keys if k not in self._fresh]
        if not stale:
            return
        captures = captured_args(self.captured)
        layout = tuple(a for a in captures if type(a) is int)
        if layout != self._layout:  # the states' launches specialise on the captured tensors' layouts
            for entry in self._states.values():
                entry[1] = entry[3] = None
            self._layout = layout
        recorded = capturing()  # (launches recorded to compile ahead, not run: nothing is filled)
        if GRAPHS and not recorded and self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            # a graph holds its launches' arguments: the buffers here, and the captured tensors' addresses
            addresses = tuple(t.data_ptr() for t in self.captured if torch.is_tensor(t))
            if addresses != self._graphs.get("addresses"):
                self._graphs = {"addresses": addresses}
            bounds = tuple(sorted({self._runs[k][3] for k in stale} - self._fresh))  # tile sizes to bound
            graph_key = (tuple(stale), bounds, layout)
            graph = self._graphs.get(graph_key)
            if graph is None and graph_key in self._graphs:  # the second refill of these keys: record it
                graph = self._graphs[graph_key] = self._record(stale, captures)
            if graph is not None:
                graph.replay()
                self._filled(stale)
                return
            self._graphs.setdefault(graph_key, None)
        self._launch(stale, captures)
        if not recorded:
            self._filled(stale)

    def _filled(self, stale: list) -> None:
        """Mark ``stale`` filled, with their tile sizes' bounds and the hulls of those (filled by the bounds)."""
        for key in stale:
            base = self._runs[key][3]
            hulls = ((base, t, "hull") for t, hull in zip((False, True), self._hulls(base)) if hull is not None)
            self._fresh.update((key, base, *hulls))

    def _launch(self, stale: list, captures: tuple, branches: list | None = None) -> None:
        """The launches that refill ``stale``'s buffers: per tile size, the bounds (``block_summaries``
        where the mask reads a tensor along one side, then ``block_states``); then per key,
        ``block_runs``, each key after the first on its stream of ``branches`` if given (side by side
        in a recorded graph: the maps do not depend on each other)."""
        _, _, sq, skv = self.shape
        for base in dict.fromkeys(self._runs[key][3] for key in stale):
            entry = self._states[base]
            if entry[1] is None:
                entry[1] = self._states_launch(base, *entry[0].shape[2:])
            if base not in self._fresh:
                sums = (entry[2], entry[2].shape[-1]) if self._slots else ()
                if self._slots:  # the reads along one side, bounded per block first (and the hulls emptied)
                    entry[3] = entry[3] or self._summaries_launch(base)
                    entry[3](*sums, *captures, sq, skv, self.dims[1], *self._hull_args(base, entry[0], True))
                for hull in self._hulls(base) if not self._slots else ():
                    if hull is not None:  # (no block_summaries to empty them)
                        hull.copy_(self._empty_hull.expand_as(hull))
                entry[1](entry[0], *entry[0].stride()[:3], *sums, *captures, sq, skv, self.dims[1],
                         *self._hull_args(base, entry[0], False))
        stale = [key for key in stale if key[-1] != "hull"]  # (runs; the bounds fill the hulls)
        here = torch.cuda.current_stream(self.device) if branches else None
        for i, key in enumerate(stale):
            _, launch, args, _ = self._runs[key]
            if not i or not branches:
                launch(*args)
                continue
            branch = branches[i - 1]
            branch.wait_stream(here)
            with torch.cuda.stream(branch):
                launch(*args)
        for branch in branches or ():
            here.wait_stream(branch)

    def _record(self, stale: list, captures: tuple) -> torch.cuda.CUDAGraph:
        """``_launch(stale)`` recorded as a CUDA graph on a side stream (nothing runs until it is replayed)."""
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.device)
        branches = [torch.cuda.Stream(self.device) for _ in [key for key in stale if key[-1] != "hull"][1:]]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._launch(stale, captures, branches)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph
