"""The package's layers depend in one direction: spec -> ir <- analysis <- codegen <- runtime <- cli.

Every module belongs to exactly one layer, and may import flashgen modules of its own layer or of the
layers listed as its dependencies. A new module must be placed here, which keeps the picture honest.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flashgen"

LAYERS = {
    "ir": {"ir", "rewrite", "autodiff", "_version"},
    "spec": {"spec", "trace", "mods", "reference", "factors"},
    "analysis": {"analysis", "blocks", "lowrank"},
    "codegen": {"codegen", "codegen.render"},
    "runtime": {"runtime", "api", "settings", "tuning", "parallel", "maps"},
    "cli": {"cli", "__main__", "__init__"},
}
DEPENDS = {
    "ir": set(),
    "spec": {"ir"},
    "analysis": {"ir"},
    "codegen": {"analysis", "ir"},
    "runtime": {"codegen", "analysis", "spec", "ir"},
    "cli": set(LAYERS),
}
# Lines of code (non-blank, non-comment) the package may hold: small enough to read in an afternoon.
# 3500 until the block maps (#4), the tuner and CLI (#6) and low-rank biases (#5) arrived (~3700);
# 4000 until two head blocks, fast math, launch-time bounds proofs and the binary cache (~4015);
# 4100 until the lowering rules, loop-invariant backward code and the compiler prewarm (~4160);
# 4200 until the factor-rounding guard and sparse backward tiles (~4230);
# 4300 until first calls compiled their kernels side by side (flashgen.parallel, ~4440), row
# terms left the per-entry logits for the log-sum-exp, and explain() showed the lowering (~4570);
# 4600 until the mask chose the default tiles (windows, sparse maps) and a band's two edges shared
# one KV loop (~4610); 4620 until a call signature's launches were kept for its later calls
# (``Launch``, ``Attention._first_launch``: the launch path's host time, ~4650); 4660 until
# Triton's key of itself was kept in the cache (``runtime._remember_triton_key``, ~4690); 4700
# until kept launches called the compiled kernels directly (``Launch._direct_launch``, ~4730); 4740
# until explain() reported the kept launches (~4745); 4870 until block maps were refilled on the GPU
# for ids that change every step (``maps.LiveRuns`` and its kernels; ~4860 after dropping the host
# maps' coarse seeding it replaced); 5050 until block_states bounded tiles by intervals before
# evaluating the entries of those left open, for many rows at once (``render._IntervalEmitter``,
# ``maps.LiveRuns._states_launch``; ~5044); 5100 until the streamed tiles came through TMA
# descriptors where the GPU and the layout allow (``runtime.tma_ok``, its allocator; ~5085); 5140 until
# relative-position tables came from staggered copies (``analysis.diagonal_of``, ``render._staggered``,
# ``runtime.staggered``; ~5250); 5260 until their index could be any integer function of q - kv
# (``runtime._on_diagonals``) and the library gained T5's buckets (``mods.t5_bias``; ~5340); 5350
# until the gradients of looked-up tables accumulated on their staggered copies
# (``runtime.fold_staggered``; ~5390); 5400 until that buffer took its own layout
# (``runtime.gradient_buffer``) and staggered tables their own forward tiles at D64 (~5406), and the
# generated kernels named their copies (``render._diagonal_listing``; ~5413), and their backward took
# its own tiles at D64 (``runtime.default_backward_configs(..., diagonal_reads)``; ~5418); 5420 until
# torch.compile's graphs reached an Attention through two custom operators instead of tracing the
# launch code (``api._attention_op``, ``api._attention_backward_op`` and their autograd; ~5484); 5490
# until gradients of tensors read once per score entry were stored by the dQ pass
# (``analysis.entrywise_reads``, the dQ pass's stores and the runtime's split of the buffers; ~5547); 5550
# until a dense bias's [q, kv] tiles came through TMA descriptors (``analysis.TileRead``,
# ``render._tile_descriptors``, ``runtime.tile_tma_ok`` and the TILE_TMA launches; ~5636), and
# ``explain()`` counted those launches and stored gradients took int64 offsets where needed (~5642);
# 5645 until a bias the batch shares had its gradient stored per batch entry and summed after
# (``analysis.shared_by``, the leading dimensions of the dQ pass's stores, ``runtime.sum_leading``
# and the size rule ``Attention._stored_slots``; ~5703); 5710 until the forward took the row max of
# logits that cost a multiply per entry to scale (plain q·kᵀ, a bias read) unscaled and scaled it
# per row, with a non-positive sm_scale folded into q (``exp2_scale``; ~5715); 5720 until block-map
# refills were replayed as CUDA graphs (``maps.LiveRuns._record``; ~5760) and Hopper GPUs took the
# warp-specialised Gluon forward (``render.render_forward_ws``, ``runtime.ws_forward`` and its fit
# rule with its size threshold, ``Attention._ws_source``, its names in ``explain()`` and
# ``flashgen show --ws``, and ``parallel.launch_source`` for Gluon kernels; ~5842); 5845 until they
# took the one-pass Gluon backward too (``render.render_ws`` for both, ``runtime.ws_backward`` and
# ``runtime.row_dots`` for delta, the dispatch in ``Attention._backward``, ``source("bwd_ws")``; ~5908);
# 5910 until the Gluon kernels evaluated score_mods that read per (batch, head) at most, the
# backward their derivative in the score too (``render._ws_logits``, the emitter's lines under
# ``gl``, the captured tensors' launch arguments; ~5951).
# 5955 until the Gluon kernels visited the tiles of block maps (``api._ws_map_fits``, the runs'
# arguments, ``render_ws``'s mask lines) and the forward read a dense bias by TMA
# (``runtime.ws_tile_args``, the emitter's loaded tiles; ~6042), and their dispatch in one rule
# for both directions (``Attention._ws_args``; ~6053), and source("bwd_ws")'s error for a dense
# bias (~6058), and the Gluon kernels' kept launches (``runtime.kept_launch``; ~6085).
# 6090 until the Gluon backward read a dense bias too (``ws_backward``'s tile, ``ws_tile_args``'s
# block, ``runtime._sm90``) and ``fg.low_rank`` took a randomized SVD for long slices
# (``factors._sketched_svd``, one rank rule for both; ~6104); 6110 until the Gluon kernels took
# q and k wider than v by 16 columns, a low-rank bias's factors (``runtime.WS_EXTRA_QK``, the extra
# descriptors in ``ws_forward`` and ``ws_backward``, ``Attention._frozen_factors``; ~6131). 6135
# until calls without gradients gave the Gluon forward a low-rank bias's columns apart from q and k,
# kept across calls and balanced by powers of two against float16's range (``_factor_keys``,
# ``_factor_columns``, ``Attention._kept_columns``; ~6174). 6195 until the Gluon backward's dQ sums
# were cast by a vectorised kernel (``runtime.cast``) and sparse block maps' backward could take the
# Gluon kernel, off by measurement, for A/B (``runtime.WS_SPARSE_BACKWARD``; ~6193). 6200 until the
# Gluon kernels a launch takes dropped their bounds masks where its reads are proved in range
# (``Attention._ws_launch_source``: the masks' indices spilled a document mask's backward; ~6200).
# 6205 until the Gluon kernels evaluated a block map's band clauses only on tiles across the band's
# edges (``render_ws``'s ``mask_band``: documents' forward 1.21x -> 1.26x flex; ~6204). 6225 until
# block-map refills bounded the mask once at 64 x 64 tiles for all of a step's maps and proved open
# tiles partial by sampled entries before evaluating every entry (``LiveRuns.base``, ``block_runs``'
# fold, the witnesses: the 8k document refill's GPU time 72 -> 9 us; ~6220), and a recorded
# refill's maps were listed side by side (``LiveRuns._launch``'s branches; ~6226). 6265 until the
# Triton forward tested a band's clauses only on tiles across its edges where the host map's
# partial tiles mostly lie inside the band (``Analysis.band_split``, ``Attention._split_band``,
# render_forward's rest lines, SPLIT_BAND: a dilated window's D = 64 forward 1.13x -> 1.25x flex; ~6262),
# and the refill's kernels took programmatic dependent launch on Hopper (``maps.PDL``; 13.0 -> 12.1 us; ~6268).
# 6270 until the Gluon forward staged the mask's reads along the keys in shared memory with K
# (``analysis.AxisRead``, ``render_ws``'s axis_slots, ``runtime.ws_axis_args``, ``Attention._axis_slots``:
# the documents' forward 1.26x -> 1.31x flex, forward+backward 1.23x -> 1.25x; ~6325), and the
# backward its reads along the queries with Q_i (~6335). 6340 until the Gluon forward ran plain attention
# at D = 64 in three consumer groups of 192-row query blocks (``render_ws``'s groups, ``WS_GROUP_REGS``,
# ``runtime.WS_FORWARD_GROUPS``, ``_keep_turns``: 429 -> 480 TF/s, 1.07x -> 1.21x flex, 1.08x cuDNN; ~6357).
# 6360 until that forward ran persistent programs, about one per SM, over (query block, head) items,
# and took causal and sliding windows at D = 64 (``runtime.sm_count``, ``Attention._ws_groups``, which
# the compile tests now ask instead of repeating its rule: causal 1.14x -> 1.18x flex, sliding 1.13x ->
# 1.22x; ~6370). 6380 until the Gluon kernels read a block map's hulls, filled by the bounding's
# atomics, instead of runs (``blocks.hulls``, ``LiveRuns.hulls``, ``_ws_runs.py.jinja``: the 8k
# document refill 12.1 -> 9.3 us, two kernels instead of three; ~6467).
SIZE_BUDGET = 6480


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def layer_of(name: str) -> str:
    for layer, members in LAYERS.items():
        if name in members:
            return layer
    raise AssertionError(f"flashgen.{name} is in no layer: add it to LAYERS in tests/test_layering.py")


def flashgen_imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    if name == "__init__":
        package = []
    else:
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    found.update(".".join(base + [alias.name]) for alias in node.names)
                else:
                    found.add(target)
            elif node.module and node.module.startswith("flashgen"):
                found.add(node.module.removeprefix("flashgen").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flashgen."):
                    found.add(alias.name.removeprefix("flashgen."))
    return {f.strip(".") or "__init__" for f in found}


def test_layers_depend_in_one_direction():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        layer = layer_of(name)
        for target in flashgen_imports(path, name):
            target_layer = layer_of(target if target in {m for ms in LAYERS.values() for m in ms}
                                    else target.rsplit(".", 1)[0])
            if target_layer != layer and target_layer not in DEPENDS[layer]:
                problems.append(f"flashgen.{name} ({layer}) imports flashgen.{target} ({target_layer})")
    assert not problems, "\n".join(problems)


def test_ir_spec_and_analysis_do_not_import_triton():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if layer_of(name) not in ("ir", "spec", "analysis"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] == "triton" for m in modules), f"flashgen.{name} imports triton"


def test_size_budget():
    lines = 0
    for path in PACKAGE.rglob("*.py"):
        lines += sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))
    assert lines <= SIZE_BUDGET, f"flashgen/ has {lines} lines of code, over the budget of {SIZE_BUDGET}"
