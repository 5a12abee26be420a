"""The tiled matmul kernels behind the fused Linears (`geglu_matmul`, `linear_add`): a plain
one-tile-per-program kernel body and a persistent one (one program per SM walking tiles, TMA
loads, an optional flattened software pipeline) whose epilogue either gates a GEGLU projection or
adds a bias and a residual. Tile shapes are fixed per op (no autotuning runs at start-up).

Measured on H100 and H200. The persistent kernel needs a Hopper-class GPU (TMA, ~180 KB of shared
memory per block); elsewhere its ops report themselves unsupported and cuBLAS runs instead.
"""

from __future__ import annotations

import torch

from .common import HAS_FLATTEN, TensorDescriptor, dividing_block, half_or_interpreted, persistent_programs, tl, triton
from .geglu import gelu

if triton is not None:

    @triton.jit
    def _matmul_tile(x_ptr, w_ptr, rows, n_out, dim, pid_m, pid_n,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # acc[m, n] = sum_k x[m, k] * w[n, k] over a BLOCK_M x BLOCK_N tile of a row-major
        # x (rows, dim) and an nn.Linear weight w (out, dim). dim % BLOCK_K == 0.
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = (rm < rows)[:, None]
        n_ok = (rn < n_out)[None, :]
        x_tile = x_ptr + rm[:, None] * dim + rk[None, :]
        w_tile = w_ptr + rn[None, :].to(tl.int64) * dim + rk[:, None]  # (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, dim, BLOCK_K):
            acc = tl.dot(tl.load(x_tile, mask=m_ok, other=0.0), tl.load(w_tile, mask=n_ok, other=0.0), acc)
            x_tile += BLOCK_K
            w_tile += BLOCK_K
        return acc, rm, rn

    @triton.jit
    def _tile_coords(tile, rows, n_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Tiles go GROUP_M row blocks across all column blocks before moving on, so the x tiles
        # that neighbouring programs share stay in L2.
        blocks_m = tl.cdiv(rows, BLOCK_M)
        blocks_n = tl.cdiv(n_out, BLOCK_N)
        per_group = GROUP_M * blocks_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows

    @triton.jit
    def _tile_ids(rows, n_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        return _tile_coords(tl.program_id(0), rows, n_out, BLOCK_M, BLOCK_N, GROUP_M)

    @triton.jit
    def _persistent_tile(x_src, w_src, b_ptr, res_ptr, out_ptr, rows, n_out, dim, w_rows, group_rows, group_stride,
                         row_stride, tile, tile_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         W_BLOCK: tl.constexpr, GROUP_M: tl.constexpr, GEGLU: tl.constexpr, USE_TMA: tl.constexpr,
                         IDX: tl.constexpr, EXTRA: tl.constexpr):
        # One output tile of `_persistent_matmul_kernel`: products for `tile`, epilogue for
        # `tile_out` (the same tile, tracked by its own counter, as Triton's persistent matmul
        # tutorial does: nothing computed before the k loop stays live across it, which lets a
        # flattened loop overlap this tile's epilogue with the next tile's loads).
        pid_m, pid_n = _tile_coords(tile, rows, n_out, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, W_BLOCK), dtype=tl.float32)
        for k in range(0, dim, BLOCK_K):
            if USE_TMA:  # rows past the end (of each GEGLU half) read as zeros
                x = x_src.load([pid_m * BLOCK_M, k])
                if GEGLU:  # a (2, BLOCK_N, BLOCK_K) box of the (2, n_out, dim) view: value, gate rows
                    w = w_src.load([0, pid_n * BLOCK_N, k]).reshape(W_BLOCK, BLOCK_K)
                else:
                    w = w_src.load([pid_n * W_BLOCK, k])
            else:  # rows past the end read row 0; their products are never stored
                rm = pid_m.to(IDX) * BLOCK_M + tl.arange(0, BLOCK_M)
                rk = k + tl.arange(0, BLOCK_K)
                x = tl.load(x_src + tl.where(rm < rows, rm, 0)[:, None] * dim + rk[None, :])
                rw = tl.arange(0, W_BLOCK)
                if GEGLU:  # value rows, then the same gate rows
                    rn = pid_n.to(IDX) * BLOCK_N + rw % BLOCK_N
                    rw = tl.where(rn < n_out, (rw // BLOCK_N) * n_out + rn, 0)
                else:
                    rw = pid_n.to(IDX) * W_BLOCK + rw
                    rw = tl.where(rw < w_rows, rw, 0)
                w = tl.load(w_src + rw[:, None] * dim + rk[None, :])
            acc = tl.dot(x, w.T, acc)
        pid_m, pid_n = _tile_coords(tile_out, rows, n_out, BLOCK_M, BLOCK_N, GROUP_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < n_out
        rm = pid_m.to(IDX) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rm < rows)[:, None] & n_ok[None, :]
        if GEGLU:
            # (M, 2N) -> (M, N) value and gate halves of each row
            value, gate = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
            value += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            gate += tl.load(b_ptr + n_out + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            out = value * gelu(gate)
            offsets = rm[:, None] * row_stride + rn[None, :]
            if EXTRA > 0:
                if pid_n == 0:  # the EXTRA columns after the n_out outputs: 1, 0, ..., 0 (see BIAS_COLUMNS)
                    extra = tl.arange(0, EXTRA)
                    ones = tl.zeros((BLOCK_M, EXTRA), tl.float32) + tl.where(extra == 0, 1.0, 0.0)[None, :]
                    tl.store(out_ptr + rm[:, None] * row_stride + n_out + extra[None, :],
                             ones.to(out_ptr.dtype.element_ty), mask=(rm < rows)[:, None])
        else:
            offsets = ((rm // group_rows) * group_stride + (rm % group_rows) * row_stride)[:, None] + rn[None, :]
            out = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            out += tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["rows", "w_rows", "group_rows", "num_programs"])
    def _persistent_matmul_kernel(x_src, w_src, b_ptr, res_ptr, out_ptr, rows, n_out, dim, w_rows, group_rows,
                                  group_stride, row_stride, num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, W_BLOCK: tl.constexpr, GROUP_M: tl.constexpr,
                                  GEGLU: tl.constexpr, USE_TMA: tl.constexpr, FLATTEN: tl.constexpr,
                                  INT64: tl.constexpr, EXTRA: tl.constexpr):
        # x (rows, dim) @ W.T with a fused epilogue, W_BLOCK weight rows per BLOCK_N output
        # columns:
        # - GEGLU: out = (x @ Wv.T + bv) * gelu(x @ Wg.T + bg), so the 2*n_out-wide projection
        #   never goes to memory. The weight [Wv; Wg] is read as stored: each k step loads value
        #   rows [BLOCK_N*j, BLOCK_N*(j+1)) and the same gate rows as one (2*BLOCK_N, BLOCK_K)
        #   tile (with TMA, one box of a 3-D descriptor), one (BLOCK_M, 2*BLOCK_N) product; out is
        #   (rows, n_out), rows `row_stride` apart; EXTRA > 0: followed by EXTRA columns 1, 0, ...
        #   (written here rather than by two strided fills of their own).
        # - else: out = residual + x @ W.T + b (a Linear joining the residual stream, summed in
        #   float32 instead of a separate pass over both tensors); residual and out share the
        #   layout of `_row_groups`.
        # Persistent: each program walks tiles start, start + num_programs, ...; with FLATTEN in
        # one software-pipelined loop over tiles and k steps, so the next tile's loads overlap
        # this tile's epilogue. x_src / w_src are TMA descriptors with USE_TMA, else pointers.
        idx = tl.int64 if INT64 else tl.int32
        num_tiles = tl.cdiv(rows, BLOCK_M) * tl.cdiv(n_out, BLOCK_N)
        tile_out = tl.program_id(0) - num_programs
        if FLATTEN:
            for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
                tile_out += num_programs
                _persistent_tile(x_src, w_src, b_ptr, res_ptr, out_ptr, rows, n_out, dim, w_rows, group_rows,
                                 group_stride, row_stride, tile, tile_out, BLOCK_M, BLOCK_N, BLOCK_K, W_BLOCK, GROUP_M, GEGLU,
                                 USE_TMA, idx, EXTRA)
        else:
            for tile in range(tl.program_id(0), num_tiles, num_programs):
                tile_out += num_programs
                _persistent_tile(x_src, w_src, b_ptr, res_ptr, out_ptr, rows, n_out, dim, w_rows, group_rows,
                                 group_stride, row_stride, tile, tile_out, BLOCK_M, BLOCK_N, BLOCK_K, W_BLOCK, GROUP_M, GEGLU,
                                 USE_TMA, idx, EXTRA)




def matmul_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused matmul kernels take x (..., dim) and an nn.Linear weight (out, dim):
    half precision on CUDA (any float dtype under the interpreter), both contiguous, dim a
    multiple of 16."""
    return (triton is not None and half_or_interpreted(x) and x.dtype == weight.dtype and x.is_contiguous()
            and weight.is_contiguous() and x.shape[-1] == weight.shape[1] and x.shape[-1] % 16 == 0
            and x.numel() > 0)



def launch_matmul(kernel, config, rows: int, n_out: int, dim: int, *args) -> None:
    block_m, block_n, block_k, warps, stages = config
    block_k = dividing_block(dim, block_k)  # dim is a multiple of 16 (matmul_supported)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n_out, block_n),)
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                 num_warps=warps, num_stages=stages)



def persistent_matmul(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, n_out: int,
                       config: tuple[int, int, int, int, int], geglu: bool, residual: torch.Tensor | None = None,
                       group_rows: int = 1, group_stride: int = 0, row_stride: int | None = None,
                       extra_columns: int = 0) -> None:
    """Launch `_persistent_matmul_kernel` over x2 (rows, dim) and weight rows w (GEGLU: 2*n_out,
    value then gate rows; else n_out), one program per SM; out's (and the residual's) rows
    `row_stride` elements apart (default n_out)."""
    row_stride = n_out if row_stride is None else row_stride
    block_m, block_n, block_k, warps, stages = config
    rows, dim = x2.shape
    w_block = 2 * block_n if geglu else block_n
    block_k = dividing_block(dim, block_k)  # dim is a multiple of 16 (matmul_supported)
    # TMA needs 16-byte aligned bases (strides are: dim % 16 == 0); else plain loads
    use_tma = TensorDescriptor is not None and x2.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    if use_tma:
        x_src = TensorDescriptor.from_tensor(x2, [block_m, block_k])
        if geglu:  # (2, n_out, dim): value and gate rows of a column block in one box
            halves = w.view(2, n_out, dim)
            w_src = TensorDescriptor(halves, list(halves.shape), list(halves.stride()), [2, block_n, block_k])
        else:
            w_src = TensorDescriptor.from_tensor(w, [w_block, block_k])
    else:
        x_src, w_src = x2, w
    # largest element offset formed, rows past the end included
    span = (rows + block_m) * max(dim, row_stride) + w.numel() + w_block * dim
    if residual is not None:
        span = max(span, (rows // group_rows + 1) * group_stride + (group_rows + block_m) * row_stride)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n_out, block_n)
    programs = persistent_programs(x2.device, tiles)
    _persistent_matmul_kernel[(programs,)](
        x_src, w_src, bias, out if residual is None else residual, out, rows, n_out, dim, w.shape[0], group_rows,
        group_stride, row_stride, programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, W_BLOCK=w_block, GROUP_M=8,
        GEGLU=geglu, USE_TMA=use_tma, FLATTEN=HAS_FLATTEN, INT64=span >= 2**31, EXTRA=extra_columns, num_warps=warps,
        num_stages=stages)

