"""Triton kernels for the memory-bound steps of the optimized path: GroupNorm(+SiLU) over
channels-last activations, LayerNorm, the GEGLU gate, bias + residual adds; narrow Linears with
their epilogue fused (the GEGLU projection with its gate, Linear + residual); the temporal
attention over frame-major tokens; and, on Hopper-class GPUs, the spatial self-attention as a
flash-attention kernel (faster than cuDNN's at these sequence lengths and head width 64).

Why hand-written: on an H100 these steps took a third of the network's time as eager kernels
(strided GroupNorm passes in float32, separate gelu and multiply over the 8x-wide feed-forward
intermediate), and `torch.compile` needed ~110 s of compilation per process for the GroupNorm
graphs alone. These kernels read and write each activation once or twice and need no graph
capture; their compilation (20 compilations, ~7 s for the seed clip's two window shapes on a
cold cache, measured on an H100) is cached on disk by Triton.

Every function here has an eager equivalent in `layers.py` / `attention.py`; callers use these
only on CUDA tensors of a supported layout (`group_norm_supported`, ...), and tests run the kernels
under Triton's CPU interpreter (`TRITON_INTERPRET=1`) against the eager code.
"""

from __future__ import annotations

import inspect
import math
import os

import torch

from .config import GROUP_NORM_GROUPS

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: callers fall back to eager kernels
    triton = None
try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
# tl.range(..., flatten=True) (Triton >= 3.3): one software-pipelined loop over tiles and k steps.
_HAS_FLATTEN = triton is not None and "flatten" in inspect.signature(tl.range).parameters

GROUPS = GROUP_NORM_GROUPS
_MAX_PARTIALS = 1024  # GroupNorm statistics programs per item and column block


# Triton's interpreter runs the kernels on CPU tensors (slowly): the tests use it.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor's device."""
    return triton is not None and (x.is_cuda or (_INTERPRET and x.device.type == "cpu"))


def _half_or_interpreted(x: torch.Tensor) -> bool:
    """Whether x has a dtype the tensor-core kernels take: half precision, or under the
    interpreter (CPU tests) any float dtype."""
    return x.dtype in (torch.float16, torch.bfloat16) or (_INTERPRET and x.device.type == "cpu")


def _power_of_two_head(head_dim: int, widest: int) -> bool:
    """A head width the attention kernels' tiles take: a power of two from 16 to `widest`."""
    return 16 <= head_dim <= widest and head_dim & (head_dim - 1) == 0


if triton is not None:
    # Sizes that only bound loops or masks (rows, tile and partial counts, group sizes, frame and
    # position counts) are left unspecialised: Triton would otherwise compile a kernel again for
    # each such value's class (1, a multiple of 16, other). For the seed clip on an H100 that cut
    # a fresh machine's compilations from 69 (21.9 s) to 40 (12.8 s), at the same speed (A/B
    # within 0.1%). Widths and strides stay specialised: their divisibility gives vector loads.

    @triton.jit
    def _column_pilot(x_ptr, n, rows, channels, col, BLOCK_R: tl.constexpr):
        # Mean of channels `col` over item n's first BLOCK_R rows: the shift that keeps the
        # float32 sums of squares below well conditioned (it is close to each channel's mean).
        row = tl.arange(0, BLOCK_R)
        ok = (row < rows)[:, None] & (col < channels)[None, :]
        x = tl.load(x_ptr + n * rows * channels + row[:, None] * channels + col[None, :], mask=ok, other=0.0)
        return tl.sum(x.to(tl.float32), axis=0) / tl.minimum(rows, BLOCK_R)

    @triton.jit(do_not_specialize=["rows", "tiles_per_program"])
    def _gn_partial_kernel(x_ptr, part_ptr, pilot_ptr, rows, channels, tiles_per_program,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        # Program (p, column block, n): `tiles_per_program` tiles of BLOCK_R rows (pixels) x the
        # BLOCK_C channels of its column block of item n, accumulating per channel the sum and the
        # sum of squares of (x - pilot) elementwise in registers; one reduction at the end.
        # Writes (2, channels) partials; program 0 of each column block also writes the pilot.
        program = tl.program_id(0)
        n = tl.program_id(2).to(tl.int64)
        col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = col < channels
        pilot = _column_pilot(x_ptr, n, rows, channels, col, BLOCK_R)
        if program == 0:
            tl.store(pilot_ptr + n * channels + col, pilot, mask=col_ok)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        # Loads software-pipelined: at level 0 of a 31-frame window 0.356 -> 0.292 ms (H100).
        for i in tl.range(tiles_per_program, num_stages=STAGES):
            row = (program * tiles_per_program + i) * BLOCK_R + tl.arange(0, BLOCK_R)
            ok = (row < rows)[:, None] & col_ok[None, :]
            offsets = n * rows * channels + row.to(tl.int64)[:, None] * channels + col[None, :]
            x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, x - pilot[None, :], 0.0)
            acc += d
            acc_sq += d * d
        out = part_ptr + (n * tl.num_programs(0) + program) * (2 * channels) + col
        tl.store(out, tl.sum(acc, axis=0), mask=col_ok)
        tl.store(out + channels, tl.sum(acc_sq, axis=0), mask=col_ok)

    @triton.jit(do_not_specialize=["rows", "channels", "group_size", "num_partials"])
    def _gn_group_kernel(add_ptr, part_ptr, pilot_ptr, weight_ptr, bias_ptr, table_ptr, rows, channels, group_size,
                         num_partials, eps, HAS_ADD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
        # Program (g, n): group g of item n. Sums its channels' partials (all taken about the
        # same pilot) into each channel's mean and sum of squared deviations, combines those into
        # the group's mean and 1/std (Chan's formula; every channel holds `rows` elements), then
        # writes each channel's scale and shift for the apply pass: y = x * scale + shift, with
        # the affine weight and bias and the optional per-channel add (which shifts the means
        # only) folded in. The tiles do not depend on the channel count: one compilation serves
        # every layer (the earlier per-channel-count kernels compiled 14 variants in ~8 s on an
        # H100, this one 2 in 0.5 s).
        n = tl.program_id(1).to(tl.int64)
        j = tl.arange(0, BLOCK_G)
        col = tl.program_id(0) * group_size + j
        ok = j < group_size
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        total_sq = tl.zeros((BLOCK_G,), dtype=tl.float32)
        for start in range(0, num_partials, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            p_ok = (p < num_partials)[:, None] & ok[None, :]
            base = part_ptr + (n * num_partials + p[:, None]) * (2 * channels) + col[None, :]
            total += tl.sum(tl.load(base, mask=p_ok, other=0.0), axis=0)
            total_sq += tl.sum(tl.load(base + channels, mask=p_ok, other=0.0), axis=0)
        offset = total / rows
        mean_c = tl.load(pilot_ptr + n * channels + col, mask=ok, other=0.0) + offset
        if HAS_ADD:
            add = tl.load(add_ptr + n * channels + col, mask=ok, other=0.0).to(tl.float32)
            mean_c += add
        m2_c = tl.maximum(total_sq - total * offset, 0.0)
        mean = tl.sum(tl.where(ok, mean_c, 0.0), axis=0) / group_size
        delta = mean_c - mean
        count = rows.to(tl.float32)
        m2 = tl.sum(tl.where(ok, m2_c + count * delta * delta, 0.0), axis=0)
        rstd = 1.0 / tl.sqrt(m2 / (count * group_size) + eps)
        centre = tl.zeros((BLOCK_G,), dtype=tl.float32) + mean
        if HAS_ADD:
            centre -= add  # x + add - mean
        scale = rstd * tl.load(weight_ptr + col, mask=ok, other=0.0).to(tl.float32)
        shift = tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32) - centre * scale
        tl.store(table_ptr + n * (2 * channels) + col, scale, mask=ok)
        tl.store(table_ptr + n * (2 * channels) + channels + col, shift, mask=ok)

    @triton.jit
    def _gn_apply_kernel(x_ptr, table_ptr, y_ptr, total, item_size, channels, segment, segment_stride,
                         SILU: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr, SEGMENTED: tl.constexpr):
        # y = x * scale[n, c] + shift[n, c] (then SiLU) over the flat channels-innermost memory of
        # y: whole BLOCKs of elements whatever the channel count (no padding of the channels to a
        # power of two). `total` and `item_size` are multiples of the channel count, itself of the
        # 32 groups: their divisibility keeps the masked loads vectorised. SEGMENTED: x is read
        # as runs of `segment` elements `segment_stride` apart (a range of pixels of every frame).
        block = tl.program_id(0)
        if INT64:
            block = block.to(tl.int64)
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < total
        entry = table_ptr + (offsets // item_size) * (2 * channels) + offsets % channels
        scale = tl.load(entry, mask=ok, other=0.0)
        shift = tl.load(entry + channels, mask=ok, other=0.0)
        source = offsets
        if SEGMENTED:
            source = (offsets // segment) * segment_stride + offsets % segment
        y = tl.load(x_ptr + source, mask=ok, other=0.0).to(tl.float32) * scale + shift
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _row_block(rows, width, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # This program's BLOCK_R rows of a row-major (rows, width) matrix: offsets, mask, columns.
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_C)
        ok = (row < rows)[:, None] & (col < width)[None, :]
        return row[:, None] * width + col[None, :], ok, col

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
        # lanes, not 512 (H100, 262144 x 320: 0.155 -> 0.141 ms; the copy 0.12).
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

    @triton.jit
    def _gelu(x):
        # Exact (erf) GELU, x * (1 + erf(x / sqrt(2))) / 2, with erf(z) = z P(z^2) / Q(z^2), P and
        # Q of degree 5: a rational fit to erf on |z| <= 3.92 (weighted least squares), where
        # erf(3.92) = 1 - 4.5e-8 makes the clamp exact to float32 resolution. |error| < 5e-7 in
        # float32, far below the half-precision rounding of the output; one division instead of
        # libdevice's erff (two polynomials, an exp2, selects), which had made the GEGLU epilogue
        # the bottleneck of 320-wide projections (H100: 1.13 -> 0.97 ms for 262144 tokens).
        z = tl.minimum(tl.maximum(x * 0.7071067811865476, -3.92), 3.92)
        s = z * z
        p = (((((2.0906332e-06 * s + 0.00028652276) * s + 0.0037298403) * s + 0.052642614) * s + 0.18924864) * s
             + 1.1283791)
        q = (((((3.8598242e-05 * s + 0.0011584988) * s + 0.014894091) * s + 0.113673955) * s + 0.5010495) * s
             + 1.0)
        return 0.5 * x * (1.0 + z * p / q)

    @triton.jit
    def _geglu_kernel(proj_ptr, out_ptr, hidden, out_stride, BLOCK: tl.constexpr):
        # proj: (tokens, 2*hidden) = [value | gate]; out: (tokens, hidden) = value * gelu(gate),
        # rows out_stride apart.
        token = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < hidden
        row = proj_ptr + token * (2 * hidden)
        value = tl.load(row + col, mask=ok, other=0.0).to(tl.float32)
        gate = tl.load(row + hidden + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * out_stride + col, (value * _gelu(gate)).to(out_ptr.dtype.element_ty), mask=ok)


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
            out = value * _gelu(gate)
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

    @triton.jit(do_not_specialize=["frames", "positions", "heads"])
    def _frame_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, frames, positions, heads, qk_scale,
                                q_sb, q_st, k_sb, k_st, v_sb, v_st, o_sb, o_st,
                                BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, HEAD_DIM: tl.constexpr):
        # Program (position block, item): every head's softmax attention over the `frames` tokens
        # of BLOCK_P positions (token index frame * positions + position), read by stride from
        # the frame-major projections and written to the frame-major output. A whole sequence
        # fits one tile, so the softmax is exact in one pass (float32 scores and sums; the
        # probabilities rounded to the inputs' type for the second product, as the fused SDPA
        # kernels do).
        item = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        f = tl.arange(0, BLOCK_F)
        d = tl.arange(0, HEAD_DIM)
        rows_ok = ((p < positions)[:, None] & (f < frames)[None, :])[:, :, None]  # (P, F, 1)
        token = (f.to(tl.int64) * positions)[None, :] + p[:, None]  # (P, F)
        q_rows = q_ptr + item * q_sb + token[:, :, None] * q_st + d[None, None, :]
        k_rows = k_ptr + item * k_sb + token[:, :, None] * k_st + d[None, None, :]
        v_rows = v_ptr + item * v_sb + token[:, :, None] * v_st + d[None, None, :]
        o_rows = o_ptr + item * o_sb + token[:, :, None] * o_st + d[None, None, :]
        key_ok = (f < frames)[None, None, :]
        for h in range(heads):
            offset = h * HEAD_DIM
            q = tl.load(q_rows + offset, mask=rows_ok, other=0.0)
            k = tl.load(k_rows + offset, mask=rows_ok, other=0.0)
            v = tl.load(v_rows + offset, mask=rows_ok, other=0.0)
            # scores in log2 units: exp2 of (s - max) * log2(e) is the softmax's exp
            s = tl.dot(q, tl.permute(k, (0, 2, 1))) * qk_scale  # (P, F, F)
            s = tl.where(key_ok, s, float("-inf"))
            w = tl.exp2(s - tl.max(s, axis=2)[:, :, None])
            o = tl.dot(w.to(v.dtype), v) / tl.sum(w, axis=2)[:, :, None]
            tl.store(o_rows + offset, o.to(o_ptr.dtype.element_ty), mask=rows_ok)

    @triton.jit
    def _flash_scores_to_probs(s, m_i, l_i, qk_scale):
        # Online softmax of one key block: running max (log2 units), probabilities, rescale factor
        # for what was summed before, updated row sums.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _flash_store(o_ptr, acc, l_i, item, rows, col, seq_q, o_sb, o_st, HEAD_DIM: tl.constexpr):
        d = tl.arange(0, HEAD_DIM)
        offsets = item * o_sb + rows[:, None].to(tl.int64) * o_st + col + d[None, :]
        tl.store(o_ptr + offsets, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=(rows < seq_q)[:, None])

    @triton.jit(do_not_specialize=["seq_q", "seq_k", "heads"])
    def _flash_attention_kernel(q_desc, k_desc, v_desc, o_ptr, seq_q, seq_k, heads, qk_scale, o_sb, o_st,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                                STAGES: tl.constexpr):
        # Program (query block, item x head): softmax(q k^T / sqrt(d)) v for BLOCK_M queries,
        # streaming BLOCK_N keys at a time (FlashAttention-2's online softmax; float32 scores and
        # sums, the probabilities rounded to the inputs' type for the second product, as SDPA's
        # fused kernels do). q/k/v come through TMA descriptors over (items, tokens, heads*d)
        # views, so the strided views of a fused q/k/v projection are read as they are; rows past
        # a sequence's end read as zeros and the last key block is masked.
        # The queries are two independent halves, each with its own statistics: while one half's
        # softmax runs on the FMA and special-function units, the other's products can run on
        # the tensor cores (on an H100 at the level-0 shape, 8 frames: 455 TFLOP/s against 446
        # for one 128-row tile with 8 warps and 64-key steps, and 419 for cuDNN).
        HALF: tl.constexpr = BLOCK_M // 2
        pid_m = tl.program_id(0)
        item = tl.program_id(1) // heads
        col = (tl.program_id(1) % heads) * HEAD_DIM
        # (1, rows, d) boxes of the 3-D descriptors -> (rows, d)
        q0 = q_desc.load([item, pid_m * BLOCK_M, col]).reshape(HALF, HEAD_DIM)
        q1 = q_desc.load([item, pid_m * BLOCK_M + HALF, col]).reshape(HALF, HEAD_DIM)
        m0 = tl.full([HALF], float("-inf"), tl.float32)
        m1 = tl.full([HALF], float("-inf"), tl.float32)
        l0 = tl.zeros([HALF], tl.float32)
        l1 = tl.zeros([HALF], tl.float32)
        acc0 = tl.zeros([HALF, HEAD_DIM], tl.float32)
        acc1 = tl.zeros([HALF, HEAD_DIM], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in tl.range(0, seq_k, BLOCK_N, num_stages=STAGES):
            k = k_desc.load([item, start, col]).reshape(BLOCK_N, HEAD_DIM)
            v = v_desc.load([item, start, col]).reshape(BLOCK_N, HEAD_DIM)
            s0 = tl.dot(q0, k.T)
            s1 = tl.dot(q1, k.T)
            if start + BLOCK_N > seq_k:  # keys past the end: zero rows, which must get no weight
                s0 = tl.where((start + n < seq_k)[None, :], s0, float("-inf"))
                s1 = tl.where((start + n < seq_k)[None, :], s1, float("-inf"))
            p0, a0, m0, l0 = _flash_scores_to_probs(s0, m0, l0, qk_scale)
            acc0 = tl.dot(p0.to(v.dtype), v, acc0 * a0[:, None])
            p1, a1, m1, l1 = _flash_scores_to_probs(s1, m1, l1, qk_scale)
            acc1 = tl.dot(p1.to(v.dtype), v, acc1 * a1[:, None])
        rows = pid_m * BLOCK_M + tl.arange(0, HALF)
        item64 = item.to(tl.int64)
        _flash_store(o_ptr, acc0, l0, item64, rows, col, seq_q, o_sb, o_st, HEAD_DIM)
        _flash_store(o_ptr, acc1, l1, item64, rows + HALF, col, seq_q, o_sb, o_st, HEAD_DIM)


def _rows_channels(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(items, rows, channels) when x (n, c, *spatial) stores channels innermost with the spatial
    positions of each item densely packed in memory order (channels-last 4-D, channels-last-3d,
    or the 5-D views of channels-last frames the temporal layers make); else None."""
    if x.ndim < 3 or not x.movedim(1, -1).is_contiguous():
        return None
    n, c = x.shape[0], x.shape[1]
    return n, x.numel() // max(n * c, 1), c


def group_norm_supported(x: torch.Tensor, groups: int) -> bool:
    return (
        triton is not None
        and groups == GROUPS
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.shape[1] % groups == 0
        and x.shape[1] // groups <= GN_MAX_GROUP_SIZE
        and x.numel() > 0
        and _rows_channels(x) is not None
    )


# Tile widths of the GroupNorm passes: the statistics read column blocks of at most
# GN_STATS_MAX_BLOCK_C channels that divide the channel count (320 channels as 5 x 64, not one
# block padded to 512), the apply pass walks the flat memory GN_APPLY_BLOCK elements at a time
# (the channels padded to a power of two wasted 3/8 of the lanes at 320 and 640). Picked from 36
# combinations on an H100 (channels-last fp16, with SiLU and the add): at level 0 of a 31-frame
# window 0.93 ms instead of 1.15 (the copy of that tensor: 0.53 ms), 0.6% of the evaluation.
GN_STATS_MAX_BLOCK_C = 64
GN_STATS_TILE = 4096  # elements per statistics tile
GN_STATS_STAGES = 3
GN_APPLY_BLOCK = 4096
GN_APPLY_WARPS = 8
GN_MAX_GROUP_SIZE = 128  # channels per group (4096 channels)


def _dividing_block(size: int, block: int) -> int:
    """The widest power of two up to `block` (itself a power of two) that divides `size`."""
    while size % block:
        block //= 2
    return block


def group_norm_table(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm's statistics (32 groups, float32) on a channels-innermost x (see
    `group_norm_supported`), with `add` (n, c), if given, added to x first, as per-channel
    factors: (items, 2, channels) float32 scale and shift, GroupNorm(x) = x * scale + shift."""
    items, rows, channels = _rows_channels(x)
    # Statistics: tiles of GN_STATS_TILE elements (two float32 accumulators of that size per
    # program, spread over 8 warps), ~2K programs in all to fill the GPU, each walking several
    # tiles of its column block.
    stats_c = _dividing_block(channels, GN_STATS_MAX_BLOCK_C)  # channels: a multiple of the 32 groups
    col_blocks = triton.cdiv(channels, stats_c)
    stat_rows = max(1, min(triton.next_power_of_2(rows), GN_STATS_TILE // stats_c))
    num_tiles = triton.cdiv(rows, stat_rows)
    programs = max(1, min(num_tiles, _MAX_PARTIALS, triton.cdiv(2048, items * col_blocks)))
    tiles_per_program = triton.cdiv(num_tiles, programs)
    programs = triton.cdiv(num_tiles, tiles_per_program)
    has_add = add is not None
    if has_add:
        add = add.reshape(items, channels).contiguous()
    partials = torch.empty((items, programs, 2, channels), device=x.device, dtype=torch.float32)
    pilots = torch.empty((items, channels), device=x.device, dtype=torch.float32)
    _gn_partial_kernel[(programs, col_blocks, items)](x, partials, pilots, rows, channels, tiles_per_program,
                                                      BLOCK_R=stat_rows, BLOCK_C=stats_c, STAGES=GN_STATS_STAGES,
                                                      num_warps=8)
    table = torch.empty((items, 2, channels), device=x.device, dtype=torch.float32)
    _gn_group_kernel[(GROUPS, items)](add if has_add else pilots, partials, pilots, weight, bias, table, rows,
                                      channels, channels // GROUPS, programs, eps, HAS_ADD=has_add,
                                      BLOCK_G=GN_MAX_GROUP_SIZE, BLOCK_P=32)
    return table


def _gn_apply(x: torch.Tensor, table: torch.Tensor, y: torch.Tensor, item_size: int, silu: bool,
              segment: int = 0, segment_stride: int = 0) -> None:
    total = y.numel()
    _gn_apply_kernel[(triton.cdiv(total, GN_APPLY_BLOCK),)](
        x, table, y, total, item_size, table.shape[-1], segment, segment_stride, SILU=silu, BLOCK=GN_APPLY_BLOCK,
        INT64=max(total, segment_stride * (total // max(segment, 1))) + GN_APPLY_BLOCK >= 2**31,
        SEGMENTED=segment > 0, num_warps=GN_APPLY_WARPS)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, silu: bool,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm with 32 groups (float32 statistics), optionally SiLU, on a channels-innermost x
    (see `group_norm_supported`); `add` (n, c), if given, is added to x first (per item and
    channel, as the ResBlock adds its time embedding). Returns x's dtype and memory layout."""
    items, rows, channels = _rows_channels(x)
    table = group_norm_table(x, weight, bias, eps, add)
    y = torch.empty_like(x)
    _gn_apply(x, table, y, rows * channels, silu)
    return y


def group_norm_rows(x: torch.Tensor, table: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """x * scale + shift (then SiLU) with one item's `group_norm_table` entry (2, channels), for a
    (segments, rows, channels) view of that item whose rows are contiguous and densely packed
    within each segment (some of the pixels of each frame): a contiguous
    (segments * rows, channels) result, the gathered tokens already normalised."""
    segments, rows, channels = x.shape
    if table.shape != (2, channels) or x.stride(2) != 1 or x.stride(1) != channels:
        raise ValueError(f"group_norm_rows needs densely packed rows of {channels} channels and a (2, {channels}) "
                         f"table, got strides {x.stride()} and a table of shape {tuple(table.shape)}")
    y = torch.empty((segments * rows, channels), device=x.device, dtype=x.dtype)
    _gn_apply(x, table.contiguous(), y, y.numel(), silu, segment=rows * channels, segment_stride=x.stride(0))
    return y


# Columns appended by `geglu(..., bias_column=True)` and `geglu_matmul(..., bias_column=True)`: a
# one, then zeros, so rows stay 16-byte aligned (cuBLAS, TMA) and the kernels' row stride keeps
# its divisibility by 16.
BIAS_COLUMNS = 16


def _geglu_output(like: torch.Tensor, hidden: int, bias_column: bool, fill: bool = True) -> torch.Tensor:
    """(..., hidden) for like (..., any), or with `bias_column` (..., hidden + BIAS_COLUMNS) whose
    extra columns are 1, 0, ..., 0 (`fill`; else left for the kernel to write)."""
    out = like.new_empty((*like.shape[:-1], hidden + BIAS_COLUMNS if bias_column else hidden))
    if bias_column and fill:
        out[..., hidden + 1 :].zero_()
        out[..., hidden].fill_(1)
    return out


def with_bias_column(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """An nn.Linear's (out, dim) weight and bias as one (out, dim + BIAS_COLUMNS) matrix [W | b | 0]:
    `h @ result.T` for h from a `bias_column=True` GEGLU is h's Linear, bias included."""
    out, dim = weight.shape
    joined = weight.new_zeros(out, dim + BIAS_COLUMNS)
    joined[:, :dim] = weight.detach()
    joined[:, dim] = bias.detach()
    return joined


def geglu(proj: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
    """value * gelu(gate) (exact erf GELU, float32 math; erf by `_gelu`'s rational fit) for proj
    (..., 2*hidden) = [value | gate]; `bias_column` as in `geglu_matmul`."""
    hidden = proj.shape[-1] // 2
    proj = proj.contiguous()
    out = _geglu_output(proj, hidden, bias_column)
    tokens = math.prod(proj.shape[:-1])
    if tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(hidden))
    _geglu_kernel[(tokens, triton.cdiv(hidden, block))](proj, out, hidden, out.shape[-1], BLOCK=block)
    return out


# Rows per program and warps of `layer_norm` (H100, 320-1280 features: 4 rows on 4 warps ran
# 4-11% faster than 8 rows on 8 warps or more rows).
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


def add_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (triton is not None and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.numel() > 0 and _rows_channels(a) is not None)


def add_with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """a + b + bias[channel] in one pass, for a and b of one channels-innermost layout
    (`add_supported`); float32 sum, a's dtype and layout out. With `scale` (a one-element
    tensor on a's device): a + scale * (b + bias)."""
    items, rows, channels = _rows_channels(a)
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, 8192 // block_c)
    y = torch.empty_like(a)
    total_rows = items * rows
    has_scale = scale is not None
    _add_bias_kernel[(triton.cdiv(total_rows, block_r),)](a, b, bias, scale if has_scale else bias, y, total_rows,
                                                         channels, HAS_SCALE=has_scale, BLOCK_R=block_r, BLOCK_C=block_c)
    return y


# Tile shapes (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the matmul kernels, fixed rather than
# autotuned so that a process pays no tuning runs at start-up. Measured on an H100 at the
# network's shapes (~300K tokens): for inputs 320 wide the small tile ran the fused Linear +
# residual 1.56x faster than cuBLAS + an add, for 512 the wide one 1.22x (from 640 on cuBLAS
# wins).
LINEAR_ADD_CONFIG_UP_TO_320 = (128, 64, 64, 4, 4)
LINEAR_ADD_CONFIG = (128, 256, 64, 8, 3)
# The persistent GEGLU kernel (BLOCK_N counts output columns: each tile is 2*BLOCK_N products
# wide), picked from a sweep of 4 designs x ~6 tile shapes on an H200. `benchmarks/bench.py
# matmul` on an H100 (262144 tokens, fp16), against cuBLAS + the gate kernel: 320-wide inputs
# 1.50 vs 1.94 ms, 512-wide 2.47 vs 2.99, 640-wide 3.60 vs 4.20. With `_gelu`'s cheaper erf
# (H100, 2026-11-26f; still the best of 8 tile shapes): 320-wide 1.07 vs 1.63 ms, 640-wide 3.36
# vs 4.10, and 1280-wide inputs now win too: 78120 tokens 3.45 vs 3.73 ms, 100800 4.50 vs 4.93,
# 20460 0.94 vs 0.96. The weight is read as stored through a 3-D descriptor, as fast as the
# interleaved copy it used to keep (0.12 GB for the widths up to 640; 0.59 GB with 1280); two
# N-wide products per k step instead of one 2N-wide ran 1.2-1.3x slower.
GEGLU_MATMUL_CONFIG = (128, 128, 64, 8, 3)
# The persistent kernel for Linear + residual, on Hopper-class GPUs, for the shapes where it beat
# both the kernel above and cuBLAS + an add (a sweep of 9 tile shapes over the 37 (rows, in, out)
# shapes of the seed clip's forward, H100): at least PERSISTENT_LINEAR_ADD_MIN_ROWS rows (with
# fewer, ~20K-80K, cuBLAS was up to 1.6x faster) and not the feed-forward's down-projection
# (dim = 4 x out: cuBLAS 1-6% faster). E.g. 305040 x 640 -> 640: 0.69 ms vs 0.80 (cuBLAS + add);
# 156736 x 320 -> 320 into a strided residual: 0.29 ms vs 0.73 (kernel above).
PERSISTENT_LINEAR_ADD = True
PERSISTENT_LINEAR_ADD_MIN_ROWS = 100_000


def _persistent_linear_add_config(n_out: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the sweep's winners."""
    return (128, 256, 64, 8, 3) if n_out % 256 == 0 else (256, 128, 64, 8, 3)


def persistent_linear_add_wins(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_add` runs x @ weight.T on the persistent kernel, which then beats cuBLAS +
    an add (see above); the interpreter stands for a Hopper-class GPU."""
    n_out, dim = weight.shape
    return (PERSISTENT_LINEAR_ADD and _has_tma(x.device) and dim <= 2 * n_out
            and (x.numel() // dim >= PERSISTENT_LINEAR_ADD_MIN_ROWS or x.device.type != "cuda"))


# Widest inputs for which the fused kernels are used.
LINEAR_ADD_MAX_DIM = 512
GEGLU_MATMUL_MAX_DIM = 1280


def matmul_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused matmul kernels take x (..., dim) and an nn.Linear weight (out, dim):
    half precision on CUDA (any float dtype under the interpreter), both contiguous, dim a
    multiple of 16."""
    return (triton is not None and _half_or_interpreted(x) and x.dtype == weight.dtype and x.is_contiguous()
            and weight.is_contiguous() and x.shape[-1] == weight.shape[1] and x.shape[-1] % 16 == 0
            and x.numel() > 0)


def _launch_matmul(kernel, config, rows: int, n_out: int, dim: int, *args) -> None:
    block_m, block_n, block_k, warps, stages = config
    block_k = _dividing_block(dim, block_k)  # dim is a multiple of 16 (matmul_supported)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n_out, block_n),)
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                 num_warps=warps, num_stages=stages)


_SM_COUNTS: dict[int, int] = {}


def _has_tma(device: torch.device) -> bool:
    """Hopper or later (compute capability 9.0+): tensor-memory-accelerator loads and the
    ~180 KB of shared memory per block that GEGLU_MATMUL_CONFIG's 3-stage pipeline uses (Ampere
    and Ada cards have at most 164 / 99 KB). The interpreter emulates both."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


def geglu_matmul_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `geglu_matmul` takes x and weight: `matmul_supported`, at most
    GEGLU_MATMUL_MAX_DIM wide, on a Hopper-class GPU (where it was tuned and measured; elsewhere
    cuBLAS and the gate kernel run it)."""
    return x.shape[-1] <= GEGLU_MATMUL_MAX_DIM and matmul_supported(x, weight) and _has_tma(x.device)


def _programs(device: torch.device, tiles: int) -> int:
    """One persistent program per SM (fewer if there are fewer tiles)."""
    if device.type != "cuda":
        return max(1, min(tiles, 4))  # the interpreter: a few programs, each walking several tiles
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(tiles, _SM_COUNTS[index]))


def _persistent_matmul(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, n_out: int,
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
    block_k = _dividing_block(dim, block_k)  # dim is a multiple of 16 (matmul_supported)
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
    programs = _programs(x2.device, tiles)
    _persistent_matmul_kernel[(programs,)](
        x_src, w_src, bias, out if residual is None else residual, out, rows, n_out, dim, w.shape[0], group_rows,
        group_stride, row_stride, programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, W_BLOCK=w_block, GROUP_M=8,
        GEGLU=geglu, USE_TMA=use_tma, FLATTEN=_HAS_FLATTEN, INT64=span >= 2**31, EXTRA=extra_columns, num_warps=warps,
        num_stages=stages)


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
    _persistent_matmul(x.view(rows, dim), weight, bias, out, hidden, GEGLU_MATMUL_CONFIG, geglu=True,
                       row_stride=out.shape[-1], extra_columns=BIAS_COLUMNS if bias_column else 0)
    return out


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
               out: torch.Tensor | None = None) -> torch.Tensor:
    """residual + x @ weight.T + bias in one kernel (float32 epilogue); x (..., dim), weight
    (n, dim); residual (and `out`, written in place if given) in one of the layouts of
    `_row_groups`, holding x's rows in order. See `linear_add_supported`."""
    dim = x.shape[-1]
    n_out = weight.shape[0]
    rows = x.numel() // dim
    group_rows, group_stride = _row_groups(residual)
    if out is None:
        if not residual.is_contiguous():
            raise ValueError("linear_add needs `out` for a strided residual")
        out = torch.empty_like(residual)
    if persistent_linear_add_wins(x, weight):
        config = _persistent_linear_add_config(n_out)
        _persistent_matmul(x.view(rows, dim), weight, bias, out, n_out, config, geglu=False, residual=residual,
                           group_rows=group_rows, group_stride=group_stride)
        return out
    config = LINEAR_ADD_CONFIG_UP_TO_320 if dim <= 320 else LINEAR_ADD_CONFIG
    _launch_matmul(_linear_add_kernel, config, rows, n_out, dim, x, weight, bias, residual, out, rows, n_out, dim,
                   group_rows, group_stride)
    return out


# Longest sequence the frame-attention kernel takes: one tile holds a whole sequence's scores.
FRAME_ATTENTION_MAX_FRAMES = 64
# (positions per program, warps) by the padded sequence length. Measured on an H100 (fp16,
# head width 64, 38880 / 9720 / 2460 positions with 5 / 10 / 20 heads): at 31 frames one position
# and 4 warps ran 2.8-3.0x faster than SDPA's memory-efficient kernel on the strided views plus
# the copy of its output (2.6 TB/s at level 0); at 40 frames (padded to 64) 2 warps did best (1.85x).
FRAME_ATTENTION_CONFIGS = {16: (1, 4), 32: (1, 4), 64: (1, 2)}


def _token_strides(t: torch.Tensor) -> tuple[int, int] | None:
    """(item stride, token stride) of a (b, tokens, width) tensor whose last dim is contiguous."""
    return (t.stride(0), t.stride(1)) if t.ndim == 3 and t.stride(2) == 1 else None


def frame_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> bool:
    """Whether `frame_attention` takes these (see there): same shape and a half-precision dtype
    (any float dtype under the interpreter), head width 16-256 and a power of two, sequences of
    at most FRAME_ATTENTION_MAX_FRAMES, every row's features contiguous."""
    if triton is None or q.ndim != 3 or heads <= 0 or q.shape[-1] % heads or frames <= 0:
        return False
    head_dim = q.shape[-1] // heads
    return (_half_or_interpreted(q) and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.shape[1] % frames == 0 and frames <= FRAME_ATTENTION_MAX_FRAMES and q.numel() > 0
            and _power_of_two_head(head_dim, 256)
            and all(_token_strides(t) is not None for t in (q, k, v)))


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """Self-attention along the frames of frame-major tokens in one kernel: q, k, v (b,
    frames*P, heads*d) with token index frame * P + position, any row stride (views of a fused
    q/k/v projection); each position attends over its `frames` tokens, scale 1/sqrt(d).
    Returns a contiguous (b, frames*P, heads*d) tensor, written in place of the strided reads and
    the output transpose of the SDPA route. See `frame_attention_supported`."""
    batch, tokens, inner = q.shape
    head_dim = inner // heads
    positions = tokens // frames
    out = torch.empty((batch, tokens, inner), device=q.device, dtype=q.dtype)
    block_f = max(16, triton.next_power_of_2(frames))
    block_p, warps = FRAME_ATTENTION_CONFIGS[block_f]
    qk_scale = 1.4426950408889634 / math.sqrt(head_dim)  # log2(e) / sqrt(d)
    _frame_attention_kernel[(triton.cdiv(positions, block_p), batch)](
        q, k, v, out, frames, positions, heads, qk_scale, *_token_strides(q), *_token_strides(k),
        *_token_strides(v), *_token_strides(out), BLOCK_P=block_p, BLOCK_F=block_f, HEAD_DIM=head_dim,
        num_warps=warps)
    return out


# Query rows per program (two halves), keys per step, warps, pipeline stages of `flash_attention`;
# chosen on an H100 at the level-0 spatial shape (31 frames x 5 heads x 38880 tokens, d 64) among
# 64/128/256-row tiles, 32/64/128-key steps, 4/8 warps, 2-5 stages, one tile or two halves.
# In the model (fp16, fused q/k/v views) it ran 1.19x (level 0) to 1.12x (660 tokens) faster
# than cuDNN's kernel through SDPA, ~470 against ~395 TFLOP/s at level 0.
FLASH_ATTENTION_CONFIG = (128, 128, 4, 3)
# Shortest key sequence given to `flash_attention`: the seed clip's shortest spatial sequence is
# 660 tokens (measured faster there too); the text's 77 keys stay with SDPA.
FLASH_ATTENTION_MIN_KEYS = 512


def flash_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `flash_attention` takes these: (b, n, heads*d) q and (b, m, heads*d) k, v of one
    half-precision dtype (any float dtype under the interpreter) with contiguous rows, head width
    16-128 and a power of two, and the 16-byte aligned bases and strides that TMA descriptors
    need, on a Hopper-class GPU (where it was tuned; elsewhere SDPA runs)."""
    if triton is None or TensorDescriptor is None or q.ndim != 3 or heads <= 0 or q.shape[-1] % heads:
        return False
    head_dim = q.shape[-1] // heads
    return (_half_or_interpreted(q) and q.dtype == k.dtype == v.dtype and k.ndim == 3 and k.shape == v.shape
            and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and q.numel() > 0 and k.shape[1] > 0
            and _power_of_two_head(head_dim, 128) and q.shape[0] * heads < 2**16
            and _has_tma(q.device)
            and all(t.stride(2) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
                    and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (q, k, v)))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head in one Triton kernel: q (b, n, heads*d), k and v
    (b, m, heads*d), any row strides (views of a fused q/k/v projection) -> a contiguous
    (b, n, heads*d) tensor. See `flash_attention_supported`."""
    batch, seq_q, inner = q.shape
    seq_k = k.shape[1]
    head_dim = inner // heads
    block_m, block_n, warps, stages = FLASH_ATTENTION_CONFIG
    out = torch.empty((batch, seq_q, inner), device=q.device, dtype=q.dtype)
    descriptors = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, head_dim])
                   for t, rows in ((q, block_m // 2), (k, block_n), (v, block_n))]
    qk_scale = 1.4426950408889634 / math.sqrt(head_dim)  # log2(e) / sqrt(d)
    _flash_attention_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        *descriptors, out, seq_q, seq_k, heads, qk_scale, out.stride(0), out.stride(1), BLOCK_M=block_m,
        BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages, num_warps=warps, num_stages=stages)
    return out
