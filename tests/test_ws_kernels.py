"""The warp-specialised Hopper forward and backward (Gluon, ``render.render_ws``) without a GPU:
which programs they cover, which calls take them, and their generated modules compiled for sm_90
with Triton's own compiler (Gluon does not run in the interpreter; ``test_gpu.py`` runs them on a
Hopper GPU against float64)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashgen as fg
from flashgen import runtime

ROOT = Path(__file__).resolve().parent.parent
gluon_hopper = pytest.mark.skipif(not runtime._gluon_hopper(), reason="this Triton has no Gluon Hopper API")


@pytest.mark.parametrize("mods, band", [
    (dict(), "-inf <= kv_idx - q_idx <= +inf"),
    (dict(mask_mod=fg.mods.causal), "-inf <= kv_idx - q_idx <= 0"),
    (dict(mask_mod=fg.mods.sliding_window(1024)), "-1023 <= kv_idx - q_idx <= 0"),
    (dict(mask_mod=fg.mask_mod(lambda b, h, q, kv: (kv - q <= 5) & (q - kv <= 7))), "-7 <= kv_idx - q_idx <= 5"),
])
def test_plain_logits_with_a_band_through_the_diagonal_have_warp_specialised_kernels(mods, band):
    for which in ("fwd_ws", "bwd_ws"):
        source = fg.compile(**mods).source(which)
        assert f"#   band   = {band}" in source and "gl.warp_specialize" in source


@pytest.mark.parametrize("mods, mask", [
    (dict(mask_mod=fg.mods.prefix_lm(100)), " = kv_idx < 100"),  # a union: no band
    (dict(mask_mod=fg.mods.document(torch.zeros(64, dtype=torch.long))), "_read(cap0 + (kv_idx)"),  # reads a tensor
    (dict(mask_mod=fg.mods.causal & fg.mask_mod(lambda b, h, q, kv: (q % 2) == (kv % 2))), "_floormod("),
    (dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.prefix_lm(100)), " = kv_idx < 100"),
])
def test_masks_beyond_a_band_have_warp_specialised_kernels_over_a_block_map(mods, mask):
    """Masks with a block map: the Gluon kernels visit the hull of their rows of the map's hulls and
    evaluate the mask (the Triton kernels' code under ``gl``) on tiles outside its full span."""
    for which in ("fwd_ws", "bwd_ws"):
        source = fg.compile(**mods).source(which)
        assert "#   tiles  = a block map's hulls" in source and "def _hull_row(row):" in source
        assert mask in source and "tl." not in source and "gl.warp_specialize" in source
    assert "at least 10% of its tiles are non-empty" in fg.compile(**mods).explain()


@pytest.mark.parametrize("mods, band", [
    (dict(mask_mod=fg.mods.document(torch.arange(64) // 8) & fg.mods.causal), ("(kv_idx - q_idx <= 0)",)),
    (dict(mask_mod=fg.mods.sliding_window(100) & fg.mods.document(torch.arange(64) // 8)),
     ("(kv_idx - q_idx >= -99) & (kv_idx - q_idx <= 0)",)),
    (dict(mask_mod=fg.mods.prefix_lm(100)), ()),  # (a union: no band clauses)
])
def test_a_block_maps_band_clauses_are_evaluated_only_on_tiles_across_the_bands_edges(mods, band):
    """A map's mask that is a band and more (documents within a causal or sliding window): the
    Gluon kernels evaluate the rest per entry on partial tiles, and the band's clauses only where
    the tile crosses its edges; a mask without band clauses is evaluated whole."""
    attn = fg.compile(**mods)
    for which in ("fwd_ws", "bwd_ws"):
        source = attn.source(which)
        s = "s" if which == "fwd_ws" else "st"
        assert all(f"{s} = gl.where({clauses}, {s}, float(\"-inf\"))" in source for clauses in band)
        assert ("the mask's band clauses" in source) == bool(band)


@pytest.mark.parametrize("n, checked", [(256, False), (200, True)])
def test_a_launch_drops_the_gluon_kernels_bounds_masks_where_the_reads_are_proved_in_range(n, checked):
    """Document ids that cover the sequence are read without bounds masks (CHECK_READS False in the
    module a launch takes: the masks' indices had spilled the backward consumers' registers); ids
    shorter than it keep them; ``source()`` shows the checked form."""
    attn = fg.compile(mask_mod=fg.mods.document(torch.arange(n) // 64) & fg.mods.causal)
    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    def code(source: str) -> list[str]:  # (the header names the variant that rendered the program first)
        return [line for line in source.splitlines() if not line.startswith("#")]

    for backward in (False, True):
        source = attn._ws_launch_source(backward, 0, q, q, 256).source
        shown = attn.source("bwd_ws" if backward else "fwd_ws")
        assert f"CHECK_READS = gl.constexpr({checked})" in source and "CHECK_READS = gl.constexpr(True)" in shown
        unchecked = source.replace("CHECK_READS = gl.constexpr(False)", "CHECK_READS = gl.constexpr(True)")
        assert code(unchecked) == code(shown)


def test_a_dense_bias_has_warp_specialised_kernels_that_load_its_tiles_by_tma():
    """A read in [q, kv] tiles: the Gluon forward's producer loads it with K (two stages), the
    backward's with Q_i; the consumers add it from shared memory (the backward's transposed)."""
    attn = fg.compile(bias=torch.randn(4, 64, 64), mask_mod=fg.mods.causal)
    source = attn.source("fwd_ws")
    assert "t0 = tile0.to(gl.float32)" in source and "tl." not in source
    assert "tma.async_copy_global_to_shared(t_desc, [t_row, kv_start + j * BLOCK_N]" in source
    # K and the tile leave their stage once both groups have their logits (kt_empty), before the
    # P V products free V's: the producer's next K load does not wait for those
    producer = source[source.index("def _load"):source.index("def _logits")]
    assert producer.index("mbarrier.wait(kt_empty.index(s)") < producer.index("k_bars.index(s), k_smem.index(s)")
    assert producer.index("k_smem.index(s))") < producer.index("mbarrier.wait(empty_bars.index(s)")
    loop = source[source.index("for j in range(j0 + 1, j1)"):]
    assert loop.index("s = _logits(") < loop.index("mbarrier.arrive(kt_empty.index(sj)") < loop.index(
        "acc = warpgroup_mma_wait(0, deps=[o_tok])")
    assert "kt_empty" not in fg.compile(mask_mod=fg.mods.causal).source("fwd_ws")  # (plain kernels: one release)
    backward = attn.source("bwd_ws")
    assert "t0 = tile0.to(gl.float32)" in backward and "tl." not in backward
    assert "tma.async_copy_global_to_shared(t_desc, [t_row, kv_lo], q_bars.index(s), t_smem.index(s))" in backward
    assert "t_smem.index(s).slice(WG * HALF, HALF, dim=1).permute((1, 0)).load(st_layout)" in backward


@pytest.mark.parametrize("shape, index, lead", [
    ((3, 40, 48), "h", (0, 40, 0)),  # [H, Sq, Skv]: shared by the batch
    ((2, 3, 40, 48), "bh", (120, 40, 0)),
    ((2, 3, 40, 48), "b1", (120, 0, 40)),  # a constant index: head 1
])
def test_ws_tile_args_place_each_batch_entry_and_head_on_rows_of_keys(shape, index, lead):
    """``runtime.ws_tile_args``: the descriptor reads the tensor as rows of keys; row
    lead_b * b + lead_h * h + lead + q holds entry [b, h, q, :] of the read."""
    from flashgen.analysis import TileRead

    t = torch.randn(*shape, dtype=torch.bfloat16)
    others = tuple((d, {"b": "b", "h": "h", "1": 1}[x]) for d, x in enumerate(index))
    desc, *got = runtime.ws_tile_args(TileRead(0, t.dim() - 2, t.dim() - 1, others), t)
    assert tuple(got) == lead
    rows = t.as_strided(desc.shape, desc.strides)  # what the descriptor reads
    assert list(desc.shape) == [t.numel() // shape[-1], shape[-1]] and list(desc.block_shape) == [128, 128]
    for b, h, q in ((0, 0, 0), (1, 2, 39), (1, 0, 7), (0, 2, 17)):
        at = {"b": b, "h": h, "1": 1}
        entry = t[tuple(at[x] for x in index)][q]
        assert torch.equal(rows[lead[0] * b + lead[1] * h + lead[2] + q], entry)


@pytest.mark.parametrize("ids, staged", [
    ((torch.arange(2 * 512).view(2, 512) // 200).int(), True),  # [B, S] int32
    ((torch.arange(512) // 100).short(), True),  # [S], shared by the batch
    (torch.arange(2 * 512).view(2, 512) // 200, False),  # int64: three stages of it do not fit
    ((torch.arange(2 * 1024).view(2, 1024) // 200).int()[:, ::2], False),  # not contiguous
])
def test_the_gluon_kernels_stage_a_masks_reads_along_an_axis(ids, staged):
    """Where a launch proves the reads in range, the Gluon kernels' mask takes its reads along the
    keys (the forward) or the queries (the backward) from shared memory, staged by TMA with K or Q_i:
    for tensors of four bytes or fewer per entry, contiguous; never with bounds masks."""
    attn = fg.compile(mask_mod=fg.mods.document(ids) & fg.mods.causal)
    for backward, axis, copy in ((False, "kv_idx", "tma.async_copy_global_to_shared(sides[0][0]"),
                                 (True, "q_idx", "tma.async_copy_global_to_shared(sides[0][0]")):
        ks = attn._ws_source(backward, 0, check_reads=False)
        assert [r.axis for r in ks.axis_reads] == ([axis] if staged else [])
        assert ("side0 = sides[0].load(" in ks.source) == staged and (copy in ks.source) == staged
        assert not attn._ws_source(backward, 0, check_reads=True).axis_reads


@pytest.mark.parametrize("index, lead", [("b", (512, 0, 0)), ("hb", (512, 1024, 0)), ("1b", (512, 0, 1024))])
@pytest.mark.parametrize("axis, block", [("kv_idx", 128), ("q_idx", 64)])
def test_ws_axis_args_place_each_batch_entry_and_head_on_the_axis(index, lead, axis, block):
    """``runtime.ws_axis_args``: entry lead_b * b + lead_h * h + lead + i of the 1-D descriptor is the
    read's [..., i] for batch entry b and head h."""
    from flashgen.analysis import AxisRead

    t = torch.arange(3 * 2 * 512, dtype=torch.int32).view(-1, 512)[:2] if len(index) == 1 else \
        torch.arange(3 * 2 * 512, dtype=torch.int32).view(3, 2, 512)
    others = tuple((d, {"b": "b", "h": "h", "1": 1}[x]) for d, x in enumerate(index))
    desc, *got = runtime.ws_axis_args(AxisRead(0, axis, t.dim() - 1, others), t, block)
    assert tuple(got) == lead and list(desc.block_shape) == [block] and list(desc.shape) == [t.numel()]
    flat = t.view(-1)
    for b, h, i in ((0, 0, 0), (1, 2, 511), (1, 0, 77), (0, 1, 300)):
        at = {"b": b, "h": h, "1": 1}
        assert flat[lead[0] * b + lead[1] * h + lead[2] + i] == t[tuple(at[x] for x in index)][i]


def test_analysis_axis_read_of():
    from flashgen import ir
    from flashgen.analysis import AxisRead, axis_read_of

    b, h, q, kv = (ir.index(n) for n in ("b", "h", "q_idx", "kv_idx"))
    assert axis_read_of(ir.load(0, ir.DType.INT, [b, kv])) == AxisRead(0, "kv_idx", 1, ((0, "b"),))
    assert axis_read_of(ir.load(1, ir.DType.FLOAT, [kv])) == AxisRead(1, "kv_idx", 0, ())
    assert axis_read_of(ir.load(0, ir.DType.INT, [ir.const(2), h, kv])) == AxisRead(0, "kv_idx", 2, ((0, 2), (1, "h")))
    assert axis_read_of(ir.load(0, ir.DType.INT, [b, q])) == AxisRead(0, "q_idx", 1, ((0, "b"),))
    assert axis_read_of(ir.load(0, ir.DType.FLOAT, [q, kv])) is None  # a tile
    assert axis_read_of(ir.load(0, ir.DType.INT, [kv, kv])) is None
    assert axis_read_of(ir.load(0, ir.DType.INT, [ir.binary(ir.Op.FLOORDIV, kv, ir.const(2))])) is None
    assert axis_read_of(ir.load(0, ir.DType.BOOL, [kv])) is None


def test_ws_tile_args_refuse_what_tma_cannot_read():
    from flashgen.analysis import TileRead

    read = TileRead(0, 1, 2, ((0, "h"),))
    assert runtime.ws_tile_args(read, torch.randn(3, 40, 48)) is None  # float32: tiles too large
    assert runtime.ws_tile_args(read, torch.randn(3, 48, 40, dtype=torch.bfloat16).transpose(1, 2)) is None
    assert runtime.ws_tile_args(read, torch.randn(3, 40, 52, dtype=torch.bfloat16)[..., :44]) is None  # 104 B rows
    assert runtime.ws_tile_args(read, torch.randn(3, 40, 48, dtype=torch.bfloat16).expand(3, 40, 48)) is not None
    assert runtime.ws_tile_args(read, torch.randn(1, 40, 48, dtype=torch.bfloat16).expand(3, 40, 48)) is not None


@pytest.mark.parametrize("mods", [
    dict(score_mod=fg.mods.relative_bias(torch.randn(4, 127))),  # a read per entry (along diagonals)
    dict(mask_mod=fg.mask_mod(lambda b, h, q, kv: kv >= q + 3)),  # the diagonal outside the band
])
def test_other_programs_keep_the_triton_kernels(mods):
    for which in ("fwd_ws", "bwd_ws"):
        with pytest.raises(ValueError, match="no warp-specialised kernels"):
            fg.compile(**mods).source(which)


@pytest.mark.parametrize("mods, logits", [
    (dict(score_mod=fg.mods.alibi(fg.mods.alibi_slopes(4)), mask_mod=fg.mods.causal), "_read(cap0 + (h)"),
    (dict(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal), "_tanh("),
    (dict(score_mod=fg.mods.softcap(20.0)), "_tanh("),
])
def test_score_mods_read_per_head_at_most_have_warp_specialised_kernels(mods, logits):
    """Logits that are elementwise code of the score and the indices, reading captured tensors once per
    (batch, head) at most: the Gluon kernels evaluate them per tile (the Triton kernels' code under
    ``gl``), the backward their derivative in the score too."""
    attn = fg.compile(**mods)
    for which in ("fwd_ws", "bwd_ws"):
        source = attn.source(which)
        assert logits in source and "tl." not in source and "def _tanh(x, FAST_MATH: gl.constexpr)" in source
        assert "FAST_MATH = gl.constexpr(True)" in source  # (bf16/fp16 only: fast_math=None means the approximation)
        assert "FAST_MATH = gl.constexpr(False)" in fg.compile(**mods, fast_math=False).source(which)
    assert "dscore = " in attn.source("bwd_ws") and "* dscore" in attn.source("bwd_ws")
    assert "source('fwd_ws') and source('bwd_ws')" in attn.explain()


def test_the_gluon_forward_leaves_a_logits_row_terms_to_its_lse():
    """ALiBi's slope * (kv_idx - q_idx) splits about the query block's origin: the column term is
    computed per tile, the row term once per row and added to the stored lse (the backward, whose
    origin moves with each query block, keeps both in its tiles)."""
    attn = fg.compile(score_mod=fg.mods.alibi(fg.mods.alibi_slopes(4)), mask_mod=fg.mods.causal)
    forward, backward = attn.source("fwd_ws"), attn.source("bwd_ws")
    tile = forward[forward.index("def _logits"):forward.index("def _row_term")]
    assert "kv_idx - tile_origin" in tile and "q_idx - tile_origin" not in tile
    assert "lse += _row_term(q_pos, mods)" in forward
    assert "_row_term" not in backward and "q_idx - tile_origin" in backward
    assert "_row_term" not in fg.compile(score_mod=fg.mods.softcap(30.0), mask_mod=fg.mods.causal).source("fwd_ws")


def test_explain_names_the_warp_specialised_forward_and_its_last_use():
    attn = fg.compile(mask_mod=fg.mods.causal)
    assert "the warp-specialised Gluon kernels, source('fwd_ws') and source('bwd_ws')" in attn.explain()
    attn.last_tiles = {"forward": "warp-specialised (Gluon)"}  # what a call that took it records
    assert "forward warp-specialised (Gluon)" in attn.explain()
    assert "warp-specialised" not in fg.compile(score_mod=fg.mods.relative_bias(torch.randn(4, 127))).explain()


def test_the_warp_specialised_kernels_are_not_taken_off_hopper():
    q, k, v = (torch.randn(1, 2, 256, 128, dtype=torch.bfloat16) for _ in range(3))
    assert not runtime.ws_fits(q, k, v) and not runtime.ws_fits(q, k, v, backward=True)  # (CPU, interpreter)


WS_COMPILE_CASES = ["none,bfloat16,4,128", "causal,float16,2,128", "sliding300,bfloat16,4,128",
                    "causal,bfloat16,2,64", "none,float16,2,64"]  # (at 64 the backward's other dQ form, and the
# forward of plain logits over a band in three consumer groups)


def compiled(modules: dict, case: str) -> dict:
    """A case's compile result; skipped where the launch leaves the forward to the Triton kernel
    (``Attention._ws_groups``: at D = 64, a score_mod, a mask that reads tensors or extra q and k
    columns)."""
    result = modules[case]
    if result["groups"] is None:
        pytest.skip("the launch takes the Triton forward here (Attention._ws_groups)")
    return result
WS_MOD_CASES = ["alibi_causal,bfloat16,2,128", "softcap_causal,float16,4,128", "prefix_lm,bfloat16,4,128",
                "prefix_lm,bfloat16,4,64",
                "document_causal,bfloat16,2,128", "document_causal,bfloat16,2,64", "softcap_document,float16,4,128",
                "dense_bias_causal,bfloat16,2,128", "dense_bias_causal,float16,4,64"]


WS_EXTRA_CASES = ["low_rank_causal,bfloat16,4,144:128", "low_rank_causal,float16,2,80:64"]  # (q, k 16 columns wider)


@pytest.fixture(scope="module")
def compiled_ws_modules(tmp_path_factory) -> dict:
    """Each case's module compiled for sm_90 in one child process (``tests/ws_compile.py``: Gluon
    does not compile where Triton was imported for its interpreter) with a fresh Triton cache."""
    cases = [f"{c},fwd" for c in WS_COMPILE_CASES + WS_MOD_CASES + WS_EXTRA_CASES]
    cases += [f"{c},bwd" for c in WS_COMPILE_CASES + WS_MOD_CASES + WS_EXTRA_CASES]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton")),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "ws_compile.py"), *cases], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return {r["case"]: r for r in map(json.loads, run.stdout.splitlines())}


@gluon_hopper
@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("case", WS_MOD_CASES)
def test_the_gluon_kernels_with_mods_compile_for_sm90(case, which, compiled_ws_modules):
    """Score_mods, masks over a block map and dense biases (``tests/ws_compile.py`` names them)."""
    result = compiled(compiled_ws_modules, f"{case},{which}")
    assert result["shared"] <= 232448 and result["setmaxnreg"] and result["tma_reduce"] == (which == "bwd")


@gluon_hopper
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", WS_COMPILE_CASES)
def test_the_generated_gluon_module_compiles_for_sm90(case, backward, compiled_ws_modules):
    result = compiled(compiled_ws_modules, f"{case},{'bwd' if backward else 'fwd'}")
    assert result["group_size"] == 4 // int(case.split(",")[2])
    assert result["groups"] == (3 if case.endswith(",64") and not backward else 2)  # (the forward's consumer groups)
    assert result["shared"] <= 232448  # an H100/H200's shared memory per block
    assert result["setmaxnreg"]  # the partitions' register split
    assert result["tma_reduce"] == backward  # the backward's dQ through TMA reductions


@gluon_hopper
def test_the_gluon_kernels_that_stage_a_documents_ids_compile_for_sm90(tmp_path):
    """The modules a launch that proved its reads in range takes (``WS_CHECK_READS=0``), with int32
    ids staged with K (the forward) or Q_i (the backward, head dims 128 and 64): within the shared
    memory, one read staged."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), WS_CHECK_READS="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cases = ["document32_causal,bfloat16,4,128,fwd", "document32_causal,bfloat16,4,128,bwd",
             "document32_causal,bfloat16,2,64,bwd"]
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "ws_compile.py"), *cases], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    for line in run.stdout.splitlines():
        result = json.loads(line)
        assert result["staged"] == 1 and result["shared"] <= 232448 and result["setmaxnreg"], result


@gluon_hopper
@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("case", WS_EXTRA_CASES)
def test_the_gluon_kernels_with_extra_qk_columns_compile_for_sm90(case, which, compiled_ws_modules):
    """q and k 16 columns wider than v (a low-rank bias's factors): within the shared memory (the
    forward with two K/V stages, the backward with one dQ buffer at head dim 128)."""
    result = compiled(compiled_ws_modules, f"{case},{which}")
    assert result["shared"] <= 232448 and result["setmaxnreg"] and result["tma_reduce"] == (which == "bwd")


def test_extra_qk_columns_take_a_second_product_in_the_gluon_kernels():
    """A low-rank bias's factors as 16 more columns of q and k: the forward's S tiles and the
    backward's Sᵀ tiles add a K = 16 product over them (their own descriptors and buffers); the
    backward only where the factors are frozen (it computes no gradients for those columns)."""
    attn = fg.compile(mask_mod=fg.mods.causal)
    source = attn._ws_source(extra=16).source
    assert source.count("s_tok = warpgroup_mma(qx, kx_smem.index(") == 2  # (the first tile's, the loop's)
    assert "tma.async_copy_global_to_shared(kx_desc, [kv, 0], k_bars.index(s), kx_smem.index(s))" in source
    # two K/V stages with the columns' buffers: K's stage is released once the logits are taken, apart
    # from V's (as a dense bias's; 455 -> 495 TF/s, PERFLOG twentieth session)
    assert "mbarrier.arrive(kt_empty.index(sj), count=1)" in source and "kt_empty" not in attn._ws_source().source
    assert "qx_desc" not in attn._ws_source().source
    assert attn._ws_source(backward=True, extra=16) is None and attn._ws_source(extra=8) is None
    factors = [torch.randn(1, 2, 64, 5) for _ in range(2)]
    frozen = fg.compile(bias=fg.LowRankBias(*factors), mask_mod=fg.mods.causal)
    backward = frozen._ws_source(backward=True, extra=16).source
    assert "st_tok = warpgroup_mma(kx, qx_smem.index(s).permute((1, 0)), st_tok, is_async=True)" in backward
    learnable = fg.compile(bias=fg.LowRankBias(factors[0].requires_grad_(), factors[1]), mask_mod=fg.mods.causal)
    assert learnable._ws_source(backward=True, extra=16) is None


@pytest.mark.parametrize("learnable", [False, True])
def test_a_low_rank_bias_call_takes_the_gluon_kernels_with_its_factors_as_columns(learnable, monkeypatch):
    """``fg.LowRankBias`` of rank 5: q' = [q, φ_q / scale, 0…] and k' = [k, φ_k, 0…], 16 columns past
    v's head dim, reach the Gluon forward (with the call's scale) and, with frozen factors, the Gluon
    backward, whose gradients for those columns are zeros; learnable factors take the Triton
    backward. Without gradients, the forward takes q and k as they are and the factors apart.
    Results match the float64 reference with the bias φ_q φ_kᵀ."""
    from flashgen import api

    calls = []

    def fake_forward(module, q, k, v, out, lse, scale, mods=None, plain=True, runs=(), tile=(), factors=()):
        calls.append(("fwd", q.shape[-1], k.shape[-1], v.shape[-1], scale, plain) + tuple(f.shape for f in factors))
        if factors:  # (the factors apart: the kernel's extra columns)
            q, k = torch.cat([q, factors[0]], dim=-1), torch.cat([k, factors[1]], dim=-1)
        o, l_ = fg.attention_reference(q.double(), k.double(), v.double(), mask_mod=fg.mods.causal, scale=scale,
                                       return_lse=True)
        out.copy_(o)
        lse.copy_(l_)

    def fake_backward(module, q, k, v, out, lse, dout, dlse, scale, mods=None, plain=True, runs=(), tile=()):
        calls.append(("bwd", q.shape[-1], k.shape[-1], v.shape[-1], scale, plain))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            fg.attention_reference(*leaves, mask_mod=fg.mods.causal, scale=scale).backward(dout.double())
        dq, dk, dv = (t.grad.to(q.dtype) for t in leaves)
        dq[..., v.shape[-1]:] = 0  # (what the kernel gives the factors' columns)
        dk[..., v.shape[-1]:] = 0
        return dq, dk, dv

    monkeypatch.setattr(api, "ws_forward", fake_forward)
    monkeypatch.setattr(api, "ws_backward", fake_backward)
    monkeypatch.setattr(api, "ws_fits", lambda q, k, v, backward=False: True)
    q, k, v = (torch.randn(1, 2, 128, 128, requires_grad=True) for _ in range(3))
    fq, fk = torch.randn(1, 2, 128, 5, requires_grad=learnable), torch.randn(1, 2, 128, 5)
    attn = fg.compile(bias=fg.LowRankBias(fq, fk), mask_mod=fg.mods.causal)
    out = attn(q, k, v, scale=0.1)
    out.sum().backward()
    assert calls == [("fwd", 144, 144, 128, 0.1, True)] + ([] if learnable else [("bwd", 144, 144, 128, 0.1, True)])
    assert ("dQ" in attn.last_tiles) == learnable
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = fg.attention_reference(*leaves, bias=(fq @ fk.transpose(-1, -2)).double(), mask_mod=fg.mods.causal,
                                  scale=0.1)
    want.sum().backward()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    for got, w in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), w.grad, rtol=1e-3, atol=1e-4)
    assert (fq.grad is not None) == learnable
    with torch.no_grad():  # no gradients: q and k as they are, the factors apart (no copy of q and k)
        calls.clear()
        alone = attn(q, k, v, scale=0.1)
    assert calls == [("fwd", 128, 128, 128, 0.1, True, (1, 2, 128, 16), (1, 2, 128, 16))]
    torch.testing.assert_close(alone.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dlse", [False, True])
def test_row_dots_is_the_backward_delta(dlse):
    a, b = torch.randn(2, 3, 40, 64, dtype=torch.bfloat16), torch.randn(2, 3, 40, 64, dtype=torch.bfloat16)
    sub = torch.randn(2, 3, 40) if dlse else None
    if dlse:  # (a fully masked row's dlse may be +-inf or NaN: it counts as 0, as in the Triton backward)
        sub[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    want = (a.double() * b.double()).sum(-1) - (sub.double().nan_to_num(0.0, 0.0, 0.0) if dlse else 0)
    got = runtime.row_dots(a, b, sub)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 40)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rounds_as_torch_does(dtype):
    """Exactly torch's rounding (to nearest even) in fp16; in bf16 within one unit in the last place:
    Triton's interpreter truncates there (the GPU rounds to nearest even: test_gpu.py checks it)."""
    src = torch.randn(3, 5000) * torch.logspace(-8, 4, 5000)  # (more than one block; ragged)
    src[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    got = runtime.cast(src, dtype)
    want = src.to(dtype)
    assert got.dtype == dtype and got.shape == src.shape
    assert torch.equal(got.isnan(), want.isnan())
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    ulp = 0.0 if dtype == torch.float16 else 2.0 ** -7
    assert ((got[finite].double() - want[finite].double()).abs() <= ulp * want[finite].double().abs()).all()


def test_which_calls_take_the_warp_specialised_backward(monkeypatch):
    """The dispatch in ``Attention._backward``, with the launch replaced by the float64 reference: a
    call the fit rule accepts takes it (dlse passed on when the loss reads lse), deterministic mode
    and ``tune()`` take the Triton kernels."""
    from flashgen import api

    calls = []

    def fake_backward(module, q, k, v, out, lse, dout, dlse, scale, mods=None, plain=True, runs=(), tile=()):
        calls.append((module.attn_bwd_ws.fn.__name__, dlse is not None, scale))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():  # (autograd runs backwards without)
            o, l_ = fg.attention_reference(*leaves, mask_mod=fg.mods.causal, scale=scale, return_lse=True)
            dl = dlse.double() if dlse is not None else torch.zeros_like(l_)
            torch.autograd.backward((o, l_), (dout.double(), dl))
        return tuple(t.grad.to(q.dtype) for t in leaves)

    monkeypatch.setattr(api, "ws_backward", fake_backward)
    monkeypatch.setattr(api, "ws_fits", lambda q, k, v, backward=False: backward)
    q, k, v = (torch.randn(1, 2, 64, 128, requires_grad=True) for _ in range(3))
    attn = fg.compile(mask_mod=fg.mods.causal)
    out, lse = attn(q, k, v, scale=0.2, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    assert calls == [("attn_bwd_ws", True, 0.2)]
    assert attn.last_tiles["dQ, dK/dV"] == "warp-specialised (Gluon), one pass"
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    det = fg.compile(mask_mod=fg.mods.causal, deterministic=True)
    out, lse = det(q, k, v, scale=0.2, return_lse=True)
    (out.square().sum() + lse.sum()).backward()  # the Triton kernels: the same gradients
    assert len(calls) == 1
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=2e-4, atol=2e-4)


def test_which_calls_take_the_warp_specialised_forward(monkeypatch):
    """The dispatch in ``Attention._forward``, with the launch replaced by the float64 reference (Gluon
    does not run here): a call the fit rule accepts takes it, with an lse buffer even when none is
    asked for, and with autotune on; an explicit config, ``tune()`` and programs outside it take the
    Triton kernel."""
    from flashgen import api

    calls = []

    def fake_launch(module, q, k, v, out, lse, scale, mods=None, plain=True, runs=(), tile=(), factors=()):
        calls.append((module.attn_fwd_ws.fn.__name__, tuple(q.shape), lse.shape, scale))
        o, l_ = fg.attention_reference(q, k, v, mask_mod=fg.mods.causal, scale=scale, return_lse=True)
        out.copy_(o)
        lse.copy_(l_)

    monkeypatch.setattr(api, "ws_forward", fake_launch)
    monkeypatch.setattr(api, "ws_fits", lambda q, k, v, backward=False: q.shape[-1] == 128 and not backward)
    q, k, v = (torch.randn(1, 2, 64, 128) for _ in range(3))
    attn = fg.compile(mask_mod=fg.mods.causal)
    out = attn(q, k, v, scale=0.2)
    assert calls == [("attn_fwd_ws", (1, 2, 64, 128), (1, 2, 64), 0.2)]
    assert attn.last_tiles == {"forward": "warp-specialised (Gluon)"}
    torch.testing.assert_close(out, fg.attention_reference(q, k, v, mask_mod=fg.mods.causal, scale=0.2).float())
    fg.compile(mask_mod=fg.mods.causal, autotune=True)(q, k, v)
    assert len(calls) == 2  # autotune tunes the Triton kernel's tiles, for the calls the fit rule refuses
    attn(q, k, v, config=runtime.Config(32, 32, 4, 1))
    assert len(calls) == 2 and attn.last_tiles["forward"] == runtime.Config(32, 32, 4, 1)
    monkeypatch.setattr(attn, "_retune", True)  # what tune() sets while it measures the Triton kernel
    attn(q, k, v)
    assert len(calls) == 2 and isinstance(attn.last_tiles["forward"], runtime.Config)
    monkeypatch.setattr(attn, "_retune", False)
    other = fg.compile(score_mod=fg.mods.relative_bias(torch.randn(2, 127)))  # (a read per entry)
    other(q, k, v)
    attn(*(t[..., :64].contiguous() for t in (q, k, v)))  # refused by the (patched) fit rule
    assert len(calls) == 2 and isinstance(other.last_tiles["forward"], runtime.Config)


def test_a_score_mod_forward_takes_the_captured_tensors(monkeypatch):
    """The Gluon forward of a score_mod gets the captured tensors' arguments (``runtime.captured_args``);
    plain logits get none. (The backward here is the Triton one: the fit rule is patched to refuse it.)"""
    from flashgen import api

    calls = []
    slopes = fg.mods.alibi_slopes(2)
    mods = dict(score_mod=fg.mods.alibi(slopes), mask_mod=fg.mods.causal)

    def fake_launch(module, q, k, v, out, lse, scale, captured=None, plain=True, runs=(), tile=(), factors=()):
        calls.append(captured)
        o, l_ = fg.attention_reference(q, k, v, **mods, scale=scale, return_lse=True)
        out.copy_(o)
        lse.copy_(l_)

    monkeypatch.setattr(api, "ws_forward", fake_launch)
    monkeypatch.setattr(api, "ws_fits", lambda q, k, v, backward=False: not backward)
    q, k, v = (torch.randn(1, 2, 64, 128, requires_grad=True) for _ in range(3))
    attn = fg.compile(**mods)
    attn(q, k, v).sum().backward()
    assert len(calls) == 1 and calls[0][0] is slopes and calls[0][1:] == [2, 1]  # (pointer, size, stride)
    assert "dQ, dK/dV" not in attn.last_tiles and "dQ" in attn.last_tiles  # the Triton backward
    fg.compile(mask_mod=fg.mods.causal)(q, k, v)
    assert calls[1] is None


def test_a_block_map_call_passes_its_hulls_to_the_gluon_kernels(monkeypatch):
    """The forward gets the map's hulls by queries at 64 x 64 tiles (whatever its consumer groups),
    the backward those by keys (with the mask's captured tensors and plain=True); a map that varies
    by head leaves a grouped call's backward to the Triton kernels."""
    from flashgen import api

    calls = []
    NONE = 1 << 30  # (the least column of a row with none)

    def reference(q, k, v, scale, mask, gqa):
        return fg.attention_reference(q, k, v, mask_mod=mask, scale=scale, return_lse=True, enable_gqa=gqa)

    def fake_forward(module, q, k, v, out, lse, scale, mods=None, plain=True, runs=(), tile=(), factors=()):
        calls.append(("fwd", mods, plain, runs[0].tolist(), runs[1:]))
        o, l_ = reference(q, k, v, scale, mask, q.shape[1] != k.shape[1])
        out.copy_(o)
        lse.copy_(l_)

    def fake_backward(module, q, k, v, out, lse, dout, dlse, scale, mods=None, plain=True, runs=(), tile=()):
        calls.append(("bwd", mods, plain, runs[0].tolist(), runs[1:]))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            torch.autograd.backward(reference(*leaves, scale, mask, False)[0], dout.double())
        return tuple(t.grad.to(q.dtype) for t in leaves)

    monkeypatch.setattr(api, "ws_forward", fake_forward)
    monkeypatch.setattr(api, "ws_backward", fake_backward)
    monkeypatch.setattr(api, "ws_fits", lambda q, k, v, backward=False: True)
    mask = fg.mods.prefix_lm(40)
    q, k, v = (torch.randn(1, 1, 256, 128, requires_grad=True) for _ in range(3))  # (at 64: plain only)
    attn = fg.compile(mask_mod=mask)
    attn(q, k, v).sum().backward()
    # rows of 64 queries: 0 sees key block 0 partly; 1 sees 0 whole and 1 partly (the diagonal); 2
    # sees 0 and 1 whole, 2 partly; 3 sees 0-2 whole (each row: first and last tile, first and last
    # full one, how many full, 3 unused)
    by_queries = [[0, 0, NONE, -1, 0], [0, 1, 0, 0, 1], [0, 2, 0, 1, 2], [0, 3, 0, 2, 3]]
    assert calls[0] == ("fwd", [], True, [[[row + [0, 0, 0] for row in by_queries]]], (0, 0, 8, 1))
    # rows of 64 keys: key block 0 is seen by query blocks 0-3 (partly by 0), 1 by 1-3 (partly by 1) ...
    by_keys = [[0, 3, 1, 3, 3], [1, 3, 2, 3, 2], [2, 3, 3, 3, 1], [3, 3, NONE, -1, 0]]
    assert calls[1] == ("bwd", [], True, [[[row + [0, 0, 0] for row in by_keys]]], (0, 0, 8, 1))
    assert attn.last_tiles["dQ, dK/dV"] == "warp-specialised (Gluon), one pass"
    calls.clear()
    mask = fg.mask_mod(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 10 * h)
    attn = fg.compile(mask_mod=mask)
    q = torch.randn(1, 2, 256, 128, requires_grad=True)
    attn(q, k, v, enable_gqa=True).sum().backward()
    assert [c[0] for c in calls] == ["fwd"] and calls[0][4][1] > 0  # (the map's head stride)
    assert "dQ" in attn.last_tiles  # the Triton backward
    calls.clear()
    q, k, v = (torch.randn(1, 1, 256, 64, requires_grad=True) for _ in range(3))
    attn = fg.compile(mask_mod=fg.mods.prefix_lm(40))
    attn(q, k, v).sum().backward()
    # at 64 the forward's three groups take rows of 64: the same hulls
    assert calls[0] == ("fwd", [], True, [[[row + [0, 0, 0] for row in by_queries]]], (0, 0, 8, 1))
    assert calls[1][0] == "bwd" and calls[1][3:] == ([[[row + [0, 0, 0] for row in by_keys]]], (0, 0, 8, 1))
    calls.clear()
    mask = fg.mods.document(torch.arange(2048) // 128)  # 16 documents: 6 % of the 128 x 128 tiles non-empty
    q, k, v = (torch.randn(1, 1, 2048, 64, requires_grad=True) for _ in range(3))
    attn = fg.compile(mask_mod=mask)
    attn(q, k, v).sum().backward()
    assert calls == [] and "dQ" in attn.last_tiles  # at head dim 64 the Triton kernels, both ways
    monkeypatch.setattr(runtime, "WS_SPARSE_HEAD_DIMS", (64,))
    monkeypatch.setattr(api, "WS_FORWARD_GROUPS", {})  # (else at 64 the Gluon forward takes no block map)
    attn(q, k, v).sum().backward()
    assert [c[0] for c in calls] == ["fwd", "bwd"] and "dQ" not in attn.last_tiles
    calls.clear()
    q, k, v = (torch.randn(1, 1, 2048, 128, requires_grad=True) for _ in range(3))
    attn(q, k, v).sum().backward()  # (128 not in the head dims now)
    assert calls == [] and "dQ" in attn.last_tiles
    monkeypatch.setattr(runtime, "WS_SPARSE_HEAD_DIMS", (128,))  # (the default)
    attn(q, k, v).sum().backward()
    assert [c[0] for c in calls] == ["fwd", "bwd"] and "dQ" not in attn.last_tiles


@pytest.mark.parametrize("dtype, taken", [(torch.bfloat16, True), (torch.float32, False)])
def test_a_dense_bias_call_passes_its_tiles_to_the_gluon_kernels(dtype, taken, monkeypatch):
    """A bf16 bias [H, S, S]: the Gluon forward gets its descriptor (blocks of 128 x 128) and row
    placement, the Gluon backward its own (64 x 128), unless the bias needs a gradient (the Triton
    kernels then); a float32 one (tiles too large for the shared memory left) takes the Triton kernels."""
    from flashgen import api

    bias = torch.randn(2, 128, 128, dtype=dtype)
    calls = []

    def fake_forward(module, q, k, v, out, lse, scale, mods=None, plain=True, runs=(), tile=(), factors=()):
        calls.append(("fwd", plain, tile[0].block_shape, tile[1:], tile[0].base.data_ptr() == bias.data_ptr()))
        o, l_ = fg.attention_reference(q, k, v, bias=bias, scale=scale, return_lse=True)
        out.copy_(o)
        lse.copy_(l_)

    def fake_backward(module, q, k, v, out, lse, dout, dlse, scale, mods=None, plain=True, runs=(), tile=()):
        calls.append(("bwd", plain, tile[0].block_shape, tile[1:], tile[0].base.data_ptr() == bias.data_ptr()))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            o = fg.attention_reference(*leaves, bias=bias.double(), scale=scale)
            o.backward(dout.double())
        return tuple(t.grad.to(q.dtype) for t in leaves)

    monkeypatch.setattr(api, "ws_forward", fake_forward)
    monkeypatch.setattr(api, "ws_backward", fake_backward)
    monkeypatch.setattr(api, "ws_fits", lambda q, k, v, backward=False: True)
    q, k, v = (torch.randn(1, 2, 128, 128, requires_grad=True) for _ in range(3))  # (at 64: plain only)
    attn = fg.compile(bias=bias)
    attn(q, k, v).sum().backward()
    assert calls == ([("fwd", False, [128, 128], (0, 128, 0), True), ("bwd", False, [64, 128], (0, 128, 0), True)]
                     if taken else [])
    assert ("dQ" in attn.last_tiles) != taken  # (else the Gluon backward's entry)
    if taken:
        want = [t.detach().double().requires_grad_() for t in (q, k, v)]
        fg.attention_reference(*want, bias=bias.double()).sum().backward()
        for got, w in zip((q, k, v), want):
            torch.testing.assert_close(got.grad.double(), w.grad, rtol=1e-4, atol=1e-5)
        calls.clear()
        learnable = bias.clone().requires_grad_()
        fg.compile(bias=learnable)(q, k, v).sum().backward()
        assert [c[0] for c in calls] == ["fwd"] and learnable.grad is not None  # (dbias: the Triton kernels)


def test_kept_launches_are_keyed_by_what_triton_specialises(monkeypatch):
    """``runtime.kept_launch``: one Launch per kernel, grid, constexprs and argument kinds (tensor
    dtypes, integer values, descriptor blocks, shapes and strides); floats and tensor contents do not
    make a new one."""
    class Kernel:  # records its launches, as a Triton kernel whose launches are captured
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))

    monkeypatch.setattr(runtime, "_KEPT", type(runtime._KEPT)())
    kernel = Kernel()
    a, b = torch.randn(4), torch.randn(4)
    runtime.kept_launch(kernel, (2,), (a, 3, 0.5), dict(X=1))
    runtime.kept_launch(kernel, (2,), (b, 3, 0.25), dict(X=1))
    assert len(runtime._KEPT) == 1 and [c[1][0] for c in kernel.calls] == [a, b]
    runtime.kept_launch(kernel, (2,), (a, 4, 0.5), dict(X=1))  # another integer
    runtime.kept_launch(kernel, (2,), (a.half(), 3, 0.5), dict(X=1))  # another dtype
    runtime.kept_launch(kernel, (3,), (a, 3, 0.5), dict(X=1))  # another grid
    runtime.kept_launch(kernel, (2,), (a, 3, 0.5), dict(X=2))  # another constexpr
    assert len(runtime._KEPT) == 5 and kernel.calls[-1] == ((2,), (a, 3, 0.5), dict(X=2))
