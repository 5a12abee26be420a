"""FP8 (e4m3) quantisation helpers in plain torch: absmax scales per row, per block of rows and per
output channel, quantise and dequantise, and `fp8_supported`, whether a device runs the FP8 path
of the optimized network (`RuntimeSettings.fp8`).

e4m3 (`torch.float8_e4m3fn`) has 3 mantissa bits and no infinities: its largest finite value is
448, the smallest normal one 2**-6 and the smallest subnormal 2**-9. A tensor is stored as
`x / scale` rounded to e4m3 with scale = absmax / 448 over the group of elements that shares it,
so every group uses the format's whole range; rounding to nearest then errs by at most 2**-4 of
an element (half a unit in the last place) in the normal range and by 2**-10 * scale below it.
The attention's q and k may instead be int8 (`ops.fp8_attention`'s default): `x / scale` with
scale = absmax / 127, rounded to the nearest integer (ties away from zero) and clamped to +-127,
which errs by at most half a step, scale / 2, for every element of the group (7 bits over the
group's range, against e4m3's 3 mantissa bits).
The Triton kernels (`ops.fp8_attention`, `ops.fp8_linear`) compute the same scales and roundings;
the tests check them against these functions.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
# Largest relative error of one rounded element in e4m3's normal range (half a unit in the last
# place of 3 mantissa bits), and the largest absolute error, in units of the scale, below it.
E4M3_HALF_ULP = 2.0**-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10
INT8_MAX = 127.0


def fp8_supported(device: torch.device | str) -> bool:
    """Whether `device` runs the FP8 path: a CUDA GPU with FP8 tensor cores (compute capability
    8.9 or later: Ada, Hopper and newer) and a PyTorch with e4m3 tensors and `torch._scaled_mm`."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if not (hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")):
        return False
    # not cached: torch caches the device properties itself, and the tests patch this query
    return torch.cuda.get_device_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


def absmax_scale(absmax: torch.Tensor, maximum: float = E4M3_MAX) -> torch.Tensor:
    """float32 scales absmax / maximum (448: e4m3, 127: int8); groups of zeros get scale 1 (they
    quantise to zeros), so that no division by zero or NaN can occur."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / maximum, torch.ones_like(absmax))


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """One scale per row (the last axis): (..., n) -> (..., 1) float32."""
    return absmax_scale(x.abs().amax(dim=-1, keepdim=True))


def block_scales(x: torch.Tensor, block: int, maximum: float = E4M3_MAX) -> torch.Tensor:
    """One scale per `block` consecutive rows (axis -2) of each (rows, d) matrix, the last block
    possibly shorter: (..., n, d) -> (..., ceil(n / block)) float32 (`maximum`: as
    `absmax_scale`)."""
    n, d = x.shape[-2:]
    blocks = -(-n // block)
    padded = torch.zeros((*x.shape[:-2], blocks * block, d), dtype=x.dtype, device=x.device)
    padded[..., :n, :] = x.abs()
    # (..., blocks * block, d) -> (..., blocks, block * d)
    return absmax_scale(padded.reshape(*x.shape[:-2], blocks, block * d).amax(dim=-1), maximum)


def expand_blocks(scales: torch.Tensor, block: int, rows: int) -> torch.Tensor:
    """Block scales (..., blocks) repeated for each row: (..., rows, 1), to broadcast over x."""
    return scales.repeat_interleave(block, dim=-1)[..., :rows, None]


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (scale broadcast against x) rounded to the nearest e4m3 value, clamped to +-448
    first (some PyTorch releases turn out-of-range values into NaN instead of saturating)."""
    scaled = x.float() / scale
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (scale broadcast against x) rounded to the nearest integer, ties away from zero
    (the kernels' +-0.5 and truncation), clamped to +-127, as int8."""
    scaled = x.float() / scale
    return torch.trunc(scaled + 0.5 * torch.sign(scaled)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values that `quantize` (or `quantize_int8`) stored: x_fp8 * scale, in `dtype`."""
    return (x_fp8.float() * scale).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n) -> (e4m3 values, (..., 1) float32 scales), one scale per row."""
    scale = row_scales(x)
    return quantize(x, scale), scale


def quantize_blocks(x: torch.Tensor, block: int, fmt: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n, d) -> (e4m3 or (fmt "int8") int8 values, (..., ceil(n / block)) float32
    scales), one scale per `block` rows."""
    if fmt not in ("e4m3", "int8"):
        raise ValueError(f"fmt must be 'e4m3' or 'int8', got {fmt!r}")
    int8 = fmt == "int8"
    scales = block_scales(x, block, INT8_MAX if int8 else E4M3_MAX)
    expanded = expand_blocks(scales, block, x.shape[-2])
    return (quantize_int8(x, expanded) if int8 else quantize(x, expanded)), scales


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear weight (out, in) -> (contiguous e4m3 (out, in), (1, out) float32 scales), one
    scale per output channel: the layout `torch._scaled_mm` takes for its second operand
    (transposed) and its row-wise scale_b."""
    fp8, scale = quantize_rows(weight)
    return fp8.contiguous(), scale.reshape(1, -1).contiguous()
