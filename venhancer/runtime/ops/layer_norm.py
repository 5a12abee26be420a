"""LayerNorm over the last axis of a contiguous tensor (float32 statistics, the input's dtype out).

One program normalises a few whole rows held in registers (exact two-pass mean and variance).
Used by the transformer blocks' three norms (320-1280 features over ~10^6 tokens), where it ran
~3x faster than PyTorch's kernel. Measured on H100 and H200; runs on any CUDA GPU Triton supports.
Falls back (`layer_norm_supported` false: non-contiguous or wider than 4096): nn.LayerNorm.
"""

from __future__ import annotations

import torch

from .common import tl, triton

if triton is not None:

    @triton.jit
    def _layer_norm_part(x_ptr, weight_ptr, bias_ptr, row, rows_ok, first, dim, BLOCK: tl.constexpr):
        # Columns [first, first + BLOCK) of the rows: offsets, mask, x (float32), weight, bias.
        col = first + tl.arange(0, BLOCK)
        col_ok = col < dim
        offsets = row[:, None] * dim + col[None, :]
        ok = rows_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        return offsets, ok, x, weight, bias

    @triton.jit(do_not_specialize=["rows"])
    def _layer_norm_kernel(x_ptr, weight_ptr, bias_ptr, y_ptr, rows, dim, eps,
                           BLOCK_R: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
        # BLOCK_R rows per program, each normalised over its `dim` features in float32 (exact
        # two-pass mean and variance: the row is in registers). A row is held as a HEAD-wide part
        # (the largest power of two <= dim) and a TAIL-wide rest, so 320 features take 256 + 64
        # lanes, not 512.
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_ok = row < rows
        o1, ok1, x1, w1, b1 = _layer_norm_part(x_ptr, weight_ptr, bias_ptr, row, rows_ok, 0, dim, HEAD)
        o2, ok2, x2, w2, b2 = _layer_norm_part(x_ptr, weight_ptr, bias_ptr, row, rows_ok, HEAD, dim, TAIL)
        mean = (tl.sum(x1, axis=1) + tl.sum(x2, axis=1)) / dim
        d1 = tl.where(ok1, x1 - mean[:, None], 0.0)
        d2 = tl.where(ok2, x2 - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(d1 * d1, axis=1) + tl.sum(d2 * d2, axis=1)) / dim + eps)
        tl.store(y_ptr + o1, (d1 * rstd[:, None] * w1[None, :] + b1[None, :]).to(y_ptr.dtype.element_ty), mask=ok1)
        tl.store(y_ptr + o2, (d2 * rstd[:, None] * w2[None, :] + b2[None, :]).to(y_ptr.dtype.element_ty), mask=ok2)



# Rows per program and warps of `layer_norm`, the fastest measured at 320-1280 features.
LAYER_NORM_ROWS = 4
LAYER_NORM_WARPS = 4


def layer_norm_supported(x: torch.Tensor) -> bool:
    return triton is not None and x.is_contiguous() and x.numel() > 0 and x.shape[-1] <= 4096


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis of a contiguous x, float32 statistics, x's dtype out."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    head = 1 << (dim.bit_length() - 1)
    tail = max(16, triton.next_power_of_2(dim - head))
    block_r = max(1, min(triton.next_power_of_2(rows), LAYER_NORM_ROWS))
    y = torch.empty_like(x)
    _layer_norm_kernel[(triton.cdiv(rows, block_r),)](x, weight, bias, y, rows, dim, eps, BLOCK_R=block_r,
                                                       HEAD=head, TAIL=tail, num_warps=LAYER_NORM_WARPS)
    return y

