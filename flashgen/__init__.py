"""flashgen: an attention compiler. Write attention variants as small Python functions
(FlexAttention's ``score_mod`` / ``mask_mod`` contract, plus additive ``bias``); flashgen traces
them into an IR, analyses it, and generates fused Triton kernels.

    import flashgen as fg
    out = fg.attention(q, k, v, mask_mod=fg.mods.causal)
"""

import os as _os
import sys as _sys

if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        # No GPU: run kernels in Triton's interpreter. It must be chosen before triton is imported,
        # because triton.language's own @jit helpers are built at import time.
        _os.environ["TRITON_INTERPRET"] = "1"

from . import mods  # noqa: E402
from ._version import __version__  # noqa: E402
from .api import Attention, attention, block_mask, compile  # noqa: E402
from .blocks import BlockMask  # noqa: E402
from .factors import LowRankBias, low_rank  # noqa: E402
from .reference import attention_reference  # noqa: E402
from .runtime import Config, prewarm_compiler  # noqa: E402
from .spec import bias, mask_mod, score_mod  # noqa: E402
from .trace import TraceError  # noqa: E402

prewarm_compiler()  # Triton's self-hash for the first launch, in the background (GPU machines only)

__all__ = ["Attention", "BlockMask", "Config", "LowRankBias", "TraceError", "__version__", "attention",
           "attention_reference", "bias", "block_mask", "compile", "low_rank", "mask_mod", "mods", "score_mod"]
