"""GroupNorm with 32 groups (float32 statistics), optionally SiLU, on channels-innermost activations.

Computes GroupNorm(x + add) (then SiLU) as two kernels: per-channel partial sums about a pilot
mean (so float32 sums of squares stay well conditioned), folded with the affine weights into a
per-item scale/shift table, and one flat pass y = x * scale + shift over the memory. The table
alone (`group_norm_table`) lets a caller normalise parts of a tensor as it gathers them
(`group_norm_rows`). Measured on H100 and H200; runs on any CUDA GPU Triton supports. Falls back
(`group_norm_supported` false): GroupNorm32's eager float32 path (channels-first layouts, other
group counts, CPU without the interpreter).
"""

from __future__ import annotations

import torch

from venhancer.models.config import GROUP_NORM_GROUPS

from .common import dividing_block, rows_channels, tl, triton

GROUPS = GROUP_NORM_GROUPS
_MAX_PARTIALS = 1024  # statistics programs per item and column block


if triton is not None:
    # Sizes that only bound loops or masks (rows, tile and partial counts, group sizes) are left
    # unspecialised (do_not_specialize): Triton would otherwise compile a kernel again for each
    # such value's class (1, a multiple of 16, other). Widths and strides stay specialised: their
    # divisibility gives vector loads.

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
        # Loads software-pipelined (docs/performance.md, "Measurement notes by op family", GroupNorm).
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
        # every layer.
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



def group_norm_supported(x: torch.Tensor, groups: int) -> bool:
    return (
        triton is not None
        and groups == GROUPS
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.shape[1] % groups == 0
        and x.shape[1] // groups <= GN_MAX_GROUP_SIZE
        and x.numel() > 0
        and rows_channels(x) is not None
    )


# Tile widths of the GroupNorm passes: the statistics read column blocks of at most
# GN_STATS_MAX_BLOCK_C channels that divide the channel count (320 channels as 5 x 64, not one
# block padded to 512), the apply pass walks the flat memory GN_APPLY_BLOCK elements at a time
# (channels padded to a power of two would waste 3/8 of the lanes at 320 and 640). Picked by a
# sweep on an H100 (docs/performance.md, "Measurement notes by op family").
GN_STATS_MAX_BLOCK_C = 64
GN_STATS_TILE = 4096  # elements per statistics tile
GN_STATS_STAGES = 3
GN_APPLY_BLOCK = 4096
GN_APPLY_WARPS = 8
GN_MAX_GROUP_SIZE = 128  # channels per group (4096 channels)


def group_norm_table(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm's statistics (32 groups, float32) on a channels-innermost x (see
    `group_norm_supported`), with `add` (n, c), if given, added to x first, as per-channel
    factors: (items, 2, channels) float32 scale and shift, GroupNorm(x) = x * scale + shift."""
    items, rows, channels = rows_channels(x)
    # Statistics: tiles of GN_STATS_TILE elements (two float32 accumulators of that size per
    # program, spread over 8 warps), ~2K programs in all to fill the GPU, each walking several
    # tiles of its column block.
    stats_c = dividing_block(channels, GN_STATS_MAX_BLOCK_C)  # channels: a multiple of the 32 groups
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
    items, rows, channels = rows_channels(x)
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

