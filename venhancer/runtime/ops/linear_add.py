"""residual + x @ W.T + b in one matmul whose epilogue adds the bias and the residual: the Linears
that join the residual stream (attention output projections, the transformers' proj_out), the
sum formed in float32 instead of a separate pass over both tensors. The residual may be a strided
range of pixels of every frame, read and written in place.

Two kernels: one tile per program for inputs up to LINEAR_ADD_MAX_DIM wide (any CUDA GPU Triton
supports; measured on H100), and on Hopper-class GPUs the persistent kernel of `matmul.py` for
the shapes where it beats cuBLAS (`persistent_linear_add_wins`; measured on H100 and H200).
Falls back (`linear_add_supported` false, or wider inputs off Hopper): cuBLAS and an add.
"""

from __future__ import annotations

import torch

from .common import has_tma, tl, triton
from .matmul import launch_matmul, matmul_supported, persistent_matmul

if triton is not None:
    from .matmul import _matmul_tile, _tile_ids

    @triton.jit(do_not_specialize=["rows", "group_rows"])
    def _linear_add_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, rows, n_out, dim, group_rows, group_stride,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
        # out = residual + x @ W.T + b: a Linear whose output joins the residual stream, the sum
        # formed in float32 in the epilogue instead of a separate pass over both tensors. The
        # residual and the output share one layout: groups of `group_rows` rows of n_out
        # contiguous elements, consecutive groups `group_stride` elements apart.
        pid_m, pid_n = _tile_ids(rows, n_out, BLOCK_M, BLOCK_N, GROUP_M)
        acc, rm, rn = _matmul_tile(x_ptr, w_ptr, rows, n_out, dim, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
        n_ok = rn < n_out
        ok = (rm < rows)[:, None] & n_ok[None, :]
        offsets = ((rm // group_rows) * group_stride + (rm % group_rows) * n_out)[:, None] + rn[None, :]
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=ok)




# Tile shapes (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the one-tile-per-program kernel,
# fixed rather than autotuned so that a process pays no tuning runs at start-up; the narrow tile
# for inputs up to 320 wide (docs/performance.md, "Measurement notes by op family").
LINEAR_ADD_CONFIG_UP_TO_320 = (128, 64, 64, 4, 4)
LINEAR_ADD_CONFIG = (128, 256, 64, 8, 3)
# Widest input of the one-tile-per-program kernel: from 640 on cuBLAS + an add was faster.
LINEAR_ADD_MAX_DIM = 512
# The persistent kernel beat cuBLAS + an add from this many rows on (with fewer cuBLAS won), and
# not for the feed-forward's down-projection (input 4x the output).
PERSISTENT_LINEAR_ADD_MIN_ROWS = 100_000


def _persistent_linear_add_config(n_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the sweep's winners."""
    return (128, 256, 64, 8, 3) if n_out % 256 == 0 else (256, 128, 64, 8, 3)


def persistent_linear_add_wins(x: torch.Tensor, weight: torch.Tensor, enabled: bool = True) -> bool:
    """Whether `linear_add` runs x @ weight.T on the persistent kernel, which then beats cuBLAS +
    an add (see above); the interpreter stands for a Hopper-class GPU. `enabled`: the runtime
    setting that can turn the persistent kernel off (`RuntimeSettings.persistent_linear_add`)."""
    n_out, dim = weight.shape
    return (enabled and has_tma(x.device) and dim <= 2 * n_out
            and (x.numel() // dim >= PERSISTENT_LINEAR_ADD_MIN_ROWS or x.device.type != "cuda"))


def _row_groups(t: torch.Tensor) -> tuple[int, int] | None:
    """(rows per group, elements between groups) of a tensor whose last dim is contiguous and whose
    rows are densely packed within each group: a contiguous tensor (one group), or a (G, R, n)
    view with strides (any, n, 1), such as a range of pixels across frames."""
    if t.is_contiguous():
        return max(t.numel() // max(t.shape[-1], 1), 1), 0
    if t.ndim == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t.shape[1], t.stride(0)
    return None


def linear_add_supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    return (matmul_supported(x, weight) and residual.dtype == x.dtype and residual.shape[-1] == weight.shape[0]
            and residual.numel() == rows * weight.shape[0] and _row_groups(residual) is not None
            and (out is None or (out.shape == residual.shape and out.stride() == residual.stride() and out.dtype == x.dtype)))


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
               out: torch.Tensor | None = None, persistent: bool = True) -> torch.Tensor:
    """residual + x @ weight.T + bias in one kernel (float32 epilogue); x (..., dim), weight
    (n, dim); residual (and `out`, written in place if given) in one of the layouts of
    `_row_groups`, holding x's rows in order. `persistent`: may take the persistent kernel. See
    `linear_add_supported`."""
    dim = x.shape[-1]
    n_out = weight.shape[0]
    rows = x.numel() // dim
    group_rows, group_stride = _row_groups(residual)
    if out is None:
        if not residual.is_contiguous():
            raise ValueError("linear_add needs `out` for a strided residual")
        out = torch.empty_like(residual)
    if persistent_linear_add_wins(x, weight, persistent):
        config = _persistent_linear_add_config(n_out)
        persistent_matmul(x.view(rows, dim), weight, bias, out, n_out, config, geglu=False, residual=residual,
                           group_rows=group_rows, group_stride=group_stride)
        return out
    config = LINEAR_ADD_CONFIG_UP_TO_320 if dim <= 320 else LINEAR_ADD_CONFIG
    launch_matmul(_linear_add_kernel, config, rows, n_out, dim, x, weight, bias, residual, out, rows, n_out, dim,
                   group_rows, group_stride)
    return out


