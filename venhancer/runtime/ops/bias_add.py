"""a + b + bias[channel] (optionally a + scale * (b + bias)) in one pass over channels-innermost
tensors: the residual sums into which the optimized network folds convolution biases.

Float32 sum, the first operand's dtype and layout out. Memory-bound; measured on H100 and H200,
runs on any CUDA GPU Triton supports. Falls back (`add_supported` false: differing layouts or
dtypes, channels-first tensors): the eager sum.
"""

from __future__ import annotations

import torch

from .common import rows_channels, tl, triton

if triton is not None:

    @triton.jit
    def _row_block(rows, width, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # This program's BLOCK_R rows of a row-major (rows, width) matrix: offsets, mask, columns.
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_C)
        ok = (row < rows)[:, None] & (col < width)[None, :]
        return row[:, None] * width + col[None, :], ok, col


    @triton.jit(do_not_specialize=["rows"])
    def _add_bias_kernel(a_ptr, b_ptr, bias_ptr, scale_ptr, y_ptr, rows, channels, HAS_SCALE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        offsets, ok, col = _row_block(rows, channels, BLOCK_R, BLOCK_C)
        col_ok = col < channels
        a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_SCALE:
            y = a + tl.load(scale_ptr).to(tl.float32) * (b + bias[None, :])
        else:
            y = a + b + bias[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)



def add_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (triton is not None and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.numel() > 0 and rows_channels(a) is not None)


def add_with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """a + b + bias[channel] in one pass, for a and b of one channels-innermost layout
    (`add_supported`); float32 sum, a's dtype and layout out. With `scale` (a one-element
    tensor on a's device): a + scale * (b + bias)."""
    items, rows, channels = rows_channels(a)
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 8192 // block_c)
    y = torch.empty_like(a)
    total_rows = items * rows
    has_scale = scale is not None
    _add_bias_kernel[(triton.cdiv(total_rows, block_r),)](a, b, bias, scale if has_scale else bias, y, total_rows,
                                                         channels, HAS_SCALE=has_scale, BLOCK_R=block_r, BLOCK_C=block_c)
    return y

