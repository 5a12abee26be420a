"""Triton kernels for the memory-bound steps of the optimized network, one op family per module:

- `group_norm`: GroupNorm(+SiLU, + a per-channel add) over channels-innermost activations;
- `layer_norm`: LayerNorm over the last axis;
- `bias_add`: a + b + bias (the residual sums that absorb convolution biases);
- `geglu`: the GEGLU gate over a projection (and the GELU the fused epilogues share);
- `matmul`: the tiled and persistent matmul kernels behind the next two;
- `geglu_matmul`: the GEGLU projection with its gate in the epilogue (Hopper-class GPUs);
- `linear_add`: a Linear with bias and residual added in the epilogue;
- `frame_attention`: temporal self-attention over frame-major tokens;
- `flash_attention`: the spatial self-attention (Hopper-class GPUs);
- `fp8_attention`: the same with the score product (and optionally P V) in FP8 e4m3;
- `fp8_linear`: a Linear on the FP8 tensor cores (`torch._scaled_mm`), its input quantised per row.

The two FP8 ops run only with `RuntimeSettings.fp8` (opt-in), on GPUs with FP8 tensor cores.

Every op has an eager equivalent in `venhancer.models`; the runtime calls an op only where
`runs_on` and the op's entry in `SUPPORTED` accept the tensors. The tests run the kernels under
Triton's CPU interpreter (TRITON_INTERPRET=1) against float64 references.

Callers (and tests that count or replace calls) go through this package's names, e.g.
`ops.group_norm(...)`.
"""

from __future__ import annotations

from .bias_add import add_supported, add_with_bias
from .common import HAS_FLATTEN, TensorDescriptor, has_tma, interpreting, rows_channels, runs_on, triton
from .flash_attention import (
    FLASH_ATTENTION_CONFIG,
    FLASH_ATTENTION_MIN_KEYS,
    flash_attention,
    flash_attention_supported,
)
from .fp8_attention import FP8_ATTENTION_CONFIG, fp8_attention, fp8_attention_supported
from .fp8_linear import (
    FP8_LINEAR_MIN_IN_FEATURES,
    FP8_LINEAR_MIN_ROWS,
    fp8_linear,
    fp8_linear_supported,
    fp8_linear_wins,
    quantize_rows,
)
from .frame_attention import (
    FRAME_ATTENTION_CONFIGS,
    FRAME_ATTENTION_MAX_FRAMES,
    frame_attention,
    frame_attention_supported,
)
from .geglu import BIAS_COLUMNS, geglu, with_bias_column
from .geglu_matmul import GEGLU_MATMUL_CONFIG, GEGLU_MATMUL_MAX_DIM, geglu_matmul, geglu_matmul_supported
from .group_norm import GROUPS, group_norm, group_norm_rows, group_norm_supported, group_norm_table
from .layer_norm import layer_norm, layer_norm_supported
from .linear_add import LINEAR_ADD_MAX_DIM, linear_add, linear_add_supported, persistent_linear_add_wins
from .matmul import matmul_supported

# The op families and the check that says whether an op takes its arguments (each check's
# docstring lists its conditions). The GEGLU gate runs wherever Triton runs, on the
# contiguous projection it makes itself.
SUPPORTED = {
    "group_norm": group_norm_supported,
    "layer_norm": layer_norm_supported,
    "bias_add": add_supported,
    "geglu": lambda proj: triton is not None,
    "geglu_matmul": geglu_matmul_supported,
    "linear_add": linear_add_supported,
    "frame_attention": frame_attention_supported,
    "flash_attention": flash_attention_supported,
    "fp8_attention": fp8_attention_supported,
    "fp8_linear": fp8_linear_supported,
}

__all__ = [
    "BIAS_COLUMNS", "FLASH_ATTENTION_CONFIG", "FLASH_ATTENTION_MIN_KEYS", "FP8_ATTENTION_CONFIG",
    "FP8_LINEAR_MIN_IN_FEATURES", "FP8_LINEAR_MIN_ROWS", "FRAME_ATTENTION_CONFIGS",
    "FRAME_ATTENTION_MAX_FRAMES", "GEGLU_MATMUL_CONFIG", "GEGLU_MATMUL_MAX_DIM", "GROUPS", "HAS_FLATTEN",
    "LINEAR_ADD_MAX_DIM", "SUPPORTED", "TensorDescriptor", "add_supported", "add_with_bias", "flash_attention",
    "flash_attention_supported", "fp8_attention", "fp8_attention_supported", "fp8_linear",
    "fp8_linear_supported", "fp8_linear_wins", "frame_attention", "frame_attention_supported", "geglu", "geglu_matmul",
    "geglu_matmul_supported", "group_norm", "group_norm_rows", "group_norm_supported", "group_norm_table",
    "has_tma", "interpreting", "layer_norm", "layer_norm_supported", "linear_add", "linear_add_supported",
    "matmul_supported", "persistent_linear_add_wins", "quantize_rows", "rows_channels", "runs_on", "triton", "with_bias_column",
]
