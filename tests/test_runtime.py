"""Runtime pieces that need no kernel: config fallback, atomic writes, identifiers."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from flashgen import runtime
from flashgen.runtime import Config, launch, smaller_configs


def test_smaller_configs_reduce_stages_then_tiles():
    out = smaller_configs(Config(64, 128, 8, 3))
    assert out[:2] == [Config(64, 128, 8, 2), Config(64, 128, 8, 1)]
    assert out[2] == Config(64, 64, 4, 2) and out[-1] == Config(16, 16, 4, 2)


class FakeKernel:
    """Refuses configurations whose tile is larger than ``limit`` elements, as a GPU without enough
    shared memory would; records what was launched."""

    def __init__(self, limit):
        self.limit, self.launched = limit, []

    def __getitem__(self, grid):
        def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **kwargs):
            if BLOCK_M * BLOCK_N * num_stages > self.limit:
                raise OutOfResources(BLOCK_M * BLOCK_N * num_stages, self.limit, "shared memory")
            self.launched.append((grid, BLOCK_M, BLOCK_N, num_stages))
        return run


def test_launch_falls_back_and_remembers():
    kernel = FakeKernel(limit=64 * 128 * 2)
    used = launch(kernel, ("k", 1), Config(64, 128, 8, 3), lambda c: (c.block_m,), 1, 2).config
    assert used == Config(64, 128, 8, 2) and kernel.launched == [((64,), 64, 128, 2)]
    # the next launch with the same key starts from the configuration that worked
    assert launch(kernel, ("k", 1), Config(64, 128, 8, 3), lambda c: (c.block_m,)).config == used
    assert len(kernel.launched) == 2


def test_launch_gives_up_with_the_error():
    with pytest.raises(OutOfResources):
        launch(FakeKernel(limit=1), ("k", 2), Config(32, 32, 4, 2), lambda c: (1,))


def test_write_atomic_and_identifier(tmp_path):
    path = tmp_path / "a" / "b.py"
    runtime.write_atomic(path, "x = 1\n")
    assert path.read_text() == "x = 1\n" and not list(path.parent.glob("*.tmp"))
    assert runtime.identifier("alibi_(causal & sliding_window(64))") == "alibi_causal_sliding_window_64"
    assert runtime.identifier("123") == "v_123"


def test_defaults_that_cannot_fit_are_shrunk_before_compiling():
    from flashgen.runtime import Config, default_backward_configs, default_config
    from flashgen.tuning import first_fitting, shared_memory_bytes, shared_memory_limit

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # the GPU tables, the H200's limit (cpu's)
    limit = shared_memory_limit(cpu)
    for d, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32), (256, torch.bfloat16)):
        for family, cfg in zip(("fwd", "dkdv", "dq"), (default_config(cuda, d, d, dtype),
                                                       *default_backward_configs(cuda, d, d, dtype))):
            assert first_fitting(family, cfg, cpu, d, d, dtype) == cfg, (family, d, dtype)  # measured defaults stay
    wide = default_backward_configs(cuda, 256, 256, torch.float32)[0]
    assert shared_memory_bytes("dkdv", wide, 256, 256, 4) > limit  # the fp32 D=256 default cannot fit ...
    fitted = first_fitting("dkdv", wide, cpu, 256, 256, torch.float32)
    assert fitted != wide and shared_memory_bytes("dkdv", fitted, 256, 256, 4) <= limit  # ... so it is shrunk
    assert first_fitting("dkdv", Config(512, 512, 8, 4), cpu, 256, 256, torch.float32).block_m <= 32


def test_sparse_block_maps_take_the_small_backward_tiles():
    import flashgen as fg
    from flashgen.runtime import Config, default_backward_configs

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    dense = default_backward_configs(cuda, 128, 128, bf16)
    assert default_backward_configs(cuda, 128, 128, bf16, "sparse") == (Config(32, 64, 4, 3), Config(64, 32, 4, 4))
    assert default_backward_configs(cuda, 256, 256, bf16, "sparse")[0].block_n == 64  # wide: as before
    assert dense == (Config(64, 128, 8, 3), Config(128, 64, 8, 3))
    shape = (1, 1, 512, 512)  # tiles of 32 here: 8 documents of 64 tokens leave 24 of 256 tiles non-empty
    doc = torch.arange(512) // 64
    assert fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)._sparsity(shape, 16, 16, bf16, "cpu") == "sparse"
    assert fg.compile(mask_mod=fg.mods.document(doc // 2) & fg.mods.causal)._sparsity(shape, 16, 16, bf16,
                                                                                     "cpu") == "dense"  # 40 of 256


def test_windows_and_sparse_maps_take_short_query_blocks():
    """The forward's default tiles follow the mask: a band bounded on both sides (a sliding
    window) and a sparse block map take shorter query blocks than dense or causal masks."""
    import flashgen as fg
    from flashgen.runtime import Config, default_backward_configs, default_config

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    shape = (4, 16, 8192, 8192)
    dense = default_config(cuda, 128, 128, bf16)
    window = fg.compile(mask_mod=fg.mods.sliding_window(1024))
    assert window._sparsity(shape, 128, 128, bf16, "cpu") == "window"
    assert default_config(cuda, 128, 128, bf16, "window") == Config(64, 64, 4, 3) != dense
    assert fg.compile(mask_mod=fg.mods.causal)._sparsity(shape, 128, 128, bf16, "cpu") == "dense"  # one edge only
    assert fg.compile()._sparsity(shape, 128, 128, bf16, "cpu") == "dense"
    assert default_config(cuda, 128, 128, torch.float32, "window") == default_config(cuda, 128, 128, torch.float32)
    assert default_config(cuda, 256, 256, bf16, "window") == default_config(cuda, 256, 256, bf16)  # wide: as before
    assert default_config(cuda, 64, 64, bf16, "sparse") == Config(64, 32, 4, 3)
    # staggered table copies: short KV tiles at D <= 64 only
    table = fg.compile(score_mod=fg.mods.relative_bias(torch.randn(2, 63)))
    assert table._kernel_source().diagonals and not fg.compile()._kernel_source().diagonals
    assert default_config(cuda, 64, 64, bf16, "dense", True) == Config(64, 32, 4, 3)
    assert default_config(cuda, 128, 128, bf16, "dense", True) == dense
    assert default_backward_configs(cuda, 64, 64, bf16, "dense", False, True) == (Config(64, 64, 4, 3),
                                                                                  Config(64, 32, 4, 3))
    assert default_backward_configs(cuda, 128, 128, bf16, "dense", False, True) == default_backward_configs(
        cuda, 128, 128, bf16)
    # the backward: short tiles for windows at D <= 64 only
    assert default_backward_configs(cuda, 64, 64, bf16, sparsity="window") == (Config(64, 64, 4, 3),) * 2
    assert default_backward_configs(cuda, 128, 128, bf16, sparsity="window") == default_backward_configs(cuda, 128, 128,
                                                                                                        bf16)
    small = (1, 1, 512, 512)  # block maps are measured on this machine's device
    doc = torch.arange(512) // 64
    assert fg.compile(mask_mod=fg.mods.document(doc) & fg.mods.causal)._sparsity(small, 16, 16, bf16, "cpu") == "sparse"
    assert fg.compile(mask_mod=fg.mods.causal)._sparsity(small, 16, 16, bf16, "cpu") == "dense"
    # a window with more to it than the band (here a document mask) is a block map, not a window;
    # with more partial tiles than full ones (34 and 26 of 256 here) it takes the sparse tiles
    windowed_docs = fg.compile(mask_mod=fg.mods.sliding_window(100) & fg.mods.document(torch.arange(512) // 256))
    assert windowed_docs._sparsity(small, 16, 16, bf16, "cpu") == "sparse"
    # as does a dilated window, every tile of whose band is partial (70 partial, 0 full)
    dilated = fg.compile(mask_mod=lambda b, h, q_idx, kv_idx: ((kv_idx - q_idx) % 2 == 0) & (kv_idx <= q_idx)
                         & (q_idx - kv_idx < 128))
    assert dilated._sparsity(small, 16, 16, bf16, "cpu") == "sparse"
    assert fg.compile(mask_mod=fg.mods.prefix_lm(64))._sparsity(small, 16, 16, bf16, "cpu") == "dense"  # 14 and 123


def test_kept_launches_call_the_compiled_kernel_with_what_triton_would_bind(monkeypatch):
    """``Launch``'s direct path (GPU only, so faked here): after a first launch through Triton's
    launcher it calls the compiled kernel with a three-dimensional grid and every parameter's
    value in the kernel's order (the call's arguments, ``extra``, the constexprs, defaults);
    a call whose tensors are aligned differently goes through Triton's launcher again."""
    import inspect
    import types

    import triton

    from flashgen import parallel

    class Param:
        def __init__(self, name, default=inspect.Parameter.empty):
            self.name, self.default, self.has_default = name, default, default is not inspect.Parameter.empty

    direct, through_triton = [], []

    class Compiled:
        def __getitem__(self, grid):
            assert len(grid) == 3
            return lambda *values: direct.append((grid, values))

    class Jit:
        params = [Param(n) for n in ("X", "n", "RUNS", "BLOCK_M", "BLOCK_N")] + [Param("FLAG", True)]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                through_triton.append((grid, args, kwargs))
                return Compiled()
            return run

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    monkeypatch.setattr(runtime, "DIRECT_LAUNCH_TRITON", (".".join(triton.__version__.split(".")[:2]),))
    monkeypatch.setattr(torch, "cuda", types.SimpleNamespace(current_device=lambda: 0))
    x = torch.zeros(64)
    plan = runtime.Launch.of(Jit(), Config(16, 32, 4, 2), lambda c: (c.block_m,), lambda c: ("runs",), None, {})
    plan(x, 7)
    plan(x[4:], 7)  # 16 bytes further: the same alignment
    [(grid, values)] = direct
    assert len(through_triton) == 1 and grid == (16, 1, 1) and values[1:] == (7, "runs", 16, 32, True)
    assert values[0].data_ptr() == x[4:].data_ptr()
    plan(x[1:], 7)  # 4 bytes further: Triton specialises it otherwise
    assert len(through_triton) == 2 and len(direct) == 1
    with parallel.captured([]):  # recorded launches are never run directly
        plan(x, 7)
    assert len(through_triton) == 3 and len(direct) == 1
