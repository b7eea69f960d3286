"""Shared test helpers: interpreter detection and comparison against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import flashgen as fg
from flashgen.runtime import interpreting

# CPU tests run kernels in Triton's interpreter; on a GPU machine they need TRITON_INTERPRET=1.
requires_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU kernels need Triton's interpreter")

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    return (out - ref).norm().item() / (denom.item() if denom > 0 else 1.0)


def check_against_reference(q, k, v, score_mod=None, mask_mod=None, bias=None, *, enable_gqa=False, scale=None,
                            attn=None):
    """Run flashgen and the fp64 reference; assert outputs and lse agree within the dtype's tolerance."""
    fn = attn if attn is not None else fg.compile(score_mod, mask_mod, bias)
    out, lse = fn(q, k, v, enable_gqa=enable_gqa, scale=scale, return_lse=True)
    ref, ref_lse = fg.attention_reference(q, k, v, score_mod, mask_mod, bias, enable_gqa=enable_gqa, scale=scale,
                                          return_lse=True)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = TOLERANCES[q.dtype]
    assert rel_err(out, ref) < tol, f"relative error {rel_err(out, ref):.2e} >= {tol}"
    masked = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), masked), "fully masked rows must give lse = -inf (and only those)"
    assert (out[masked] == 0).all(), "fully masked rows must give out = 0"
    if (~masked).any():
        lse_err = (lse.double()[~masked] - ref_lse[~masked]).abs().max().item()
        assert lse_err < 50 * tol, f"lse error {lse_err:.2e}"
    return out


# every FLASHGEN_* variable (flashgen.settings reads exactly these)
FLASHGEN_VARS = ("FLASHGEN_CACHE_DIR", "FLASHGEN_DISABLE_CACHE", "FLASHGEN_AUTOTUNE", "FLASHGEN_TUNE_MS",
                 "FLASHGEN_PROGRESS", "FLASHGEN_COMPILE_JOBS")
