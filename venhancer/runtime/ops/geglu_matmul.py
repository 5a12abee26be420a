"""GEGLU(x) = value * gelu(gate) with [value | gate] = x @ W.T + b, as one persistent matmul whose
epilogue applies the gate: the 2*hidden-wide projection never goes to memory.

For the transformers' feed-forward up-projections up to GEGLU_MATMUL_MAX_DIM wide. Tuned and
measured on H200 and H100; Hopper-class GPUs only (TMA, shared memory). Falls back
(`geglu_matmul_supported` false): cuBLAS for the projection and the gate kernel of `geglu.py`.
"""

from __future__ import annotations

import torch

from .common import has_tma
from .geglu import BIAS_COLUMNS, _geglu_output
from .matmul import matmul_supported, persistent_matmul

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_N counts output columns, so each tile is
# 2*BLOCK_N products wide. The best of a sweep of designs and tile shapes
# (docs/performance.md, "Measurement notes by op family").
GEGLU_MATMUL_CONFIG = (128, 128, 64, 8, 3)
# Widest input the fused projection takes (wider ones measured faster on cuBLAS).
GEGLU_MATMUL_MAX_DIM = 1280


def geglu_matmul_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `geglu_matmul` takes x and weight: `matmul_supported`, at most
    GEGLU_MATMUL_MAX_DIM wide, on a Hopper-class GPU (where it was tuned and measured; elsewhere
    cuBLAS and the gate kernel run it)."""
    return x.shape[-1] <= GEGLU_MATMUL_MAX_DIM and matmul_supported(x, weight) and has_tma(x.device)


def geglu_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
    """GEGLU(x) = value * gelu(gate) with [value | gate] = x @ weight.T + bias, in one kernel
    (float32 accumulation and epilogue, one rounding to x's dtype); x (..., dim), weight
    (2*hidden, dim) -> (..., hidden). `bias_column`: (..., hidden + BIAS_COLUMNS) instead, the
    extra columns 1, 0, ..., 0, so that a product with `with_bias_column(w, b)` adds the bias.
    See `geglu_matmul_supported`."""
    dim = x.shape[-1]
    hidden = weight.shape[0] // 2
    rows = x.numel() // dim
    out = _geglu_output(x, hidden, bias_column, fill=False)
    persistent_matmul(x.view(rows, dim), weight, bias, out, hidden, GEGLU_MATMUL_CONFIG, geglu=True,
                       row_stride=out.shape[-1], extra_columns=BIAS_COLUMNS if bias_column else 0)
    return out
