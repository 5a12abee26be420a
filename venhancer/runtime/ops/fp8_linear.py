"""x @ W.T + b on the FP8 tensor cores: W in e4m3 with one float32 scale per output channel
(quantised once, `quant.quantize_weight`), x quantised per token by `quantize_rows` (one Triton
pass: one read of x, e4m3 values and one float32 scale per row written), the product by
`torch._scaled_mm` (cuBLASLt) with both row-wise scales and the bias in its epilogue.

The quantisation pass costs about a read of x and a write of half of it, which the faster
product must pay back, and on an H200 it did not (see FP8_LINEAR_MIN_IN_FEATURES): the runtime
uses the op only with RuntimeSettings.fp8_linear (off by default), for the shapes of
`fp8_linear_wins`. Falls back (`fp8_linear_supported` false): F.linear / the fused kernels.
"""

from __future__ import annotations

import functools

import torch

from ..quant import fp8_supported
from .common import half_or_interpreted, interpreting, tl, triton

if triton is not None:
    from .common import to_e4m3

    @triton.jit(do_not_specialize=["rows"])
    def _quantize_rows_kernel(x_ptr, x8_ptr, scale_ptr, rows, dim, x_stride, BLOCK_ROWS: tl.constexpr,
                              BLOCK_DIM: tl.constexpr, ROUND_IN_FLOAT32: tl.constexpr):
        # BLOCK_ROWS rows of x (rows, dim), row stride x_stride -> e4m3 (rows, dim) contiguous and
        # one float32 scale absmax / 448 per row (all-zero rows: scale 1).
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, BLOCK_DIM)
        r64 = r.to(tl.int64)
        ok = (r < rows)[:, None] & (c < dim)[None, :]
        x = tl.load(x_ptr + r64[:, None] * x_stride + c[None, :], mask=ok, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(absmax > 0, absmax / 448.0, 1.0)
        scaled = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
        tl.store(x8_ptr + r64[:, None] * dim + c[None, :], to_e4m3(scaled, ROUND_IN_FLOAT32), mask=ok)
        tl.store(scale_ptr + r, scale, mask=r < rows)


# Elements per program of `quantize_rows` (whole rows: a row's absmax needs all of it).
QUANTIZE_ELEMENTS = 8192
# Which Linears take the FP8 product (`fp8_linear_wins`) when RuntimeSettings.fp8_linear is set
# (off by default). With the quantisation pass counted, the probe (benchmarks/fp8_probe.py, H200)
# found no shape of the network where the FP8 product wins by more than 3%: 0.58-0.88x from
# 320- and 1280-wide inputs, 0.70-0.82x at 640 -> 640, 1.02-1.03x at 1280 -> 1280.
FP8_LINEAR_MIN_IN_FEATURES = 640
# Fewer tokens than this: the quantisation pass and the launch overheads outweigh the product.
FP8_LINEAR_MIN_ROWS = 16_384
# Quantising x moves ~1.5 bytes per input element, paid back by the product only where the output
# is at least this fraction of the input's width: not the feed-forward's 4x narrower
# down-projection (whose fp16 product is itself short).
FP8_LINEAR_MIN_OUT_RATIO = 1.0
# The GEGLU projection: its fp16 kernel gates in the matmul's epilogue (`geglu_matmul`), where the
# FP8 product needs a separate gate pass over its 8x-wide output: off until measured faster.
FP8_GEGLU = False


def fp8_linear_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fp8_linear` takes x (..., dim) and an nn.Linear weight (n_out, dim): a device with
    FP8 tensor cores (`fp8_supported`, or the CPU under Triton's interpreter), a half-precision x
    (any float dtype under the interpreter), and dim, n_out multiples of 16 (cuBLASLt's FP8
    alignment)."""
    if triton is None or not hasattr(torch, "_scaled_mm") or x.ndim < 1 or weight.ndim != 2:
        return False
    on_device = fp8_supported(x.device) or (x.device.type == "cpu" and interpreting())
    dim, n_out = x.shape[-1], weight.shape[0]
    return (on_device and half_or_interpreted(x) and weight.shape[1] == dim and dim % 16 == 0 and n_out % 16 == 0
            and x.numel() > 0)


def fp8_linear_wins(rows: int, weight: torch.Tensor, geglu: bool = False) -> bool:
    """Whether the runtime takes `fp8_linear` for `rows` tokens times weight.T (see the
    constants above); `geglu`: the product is a GEGLU projection."""
    n_out, dim = weight.shape
    return ((FP8_GEGLU or not geglu) and dim >= FP8_LINEAR_MIN_IN_FEATURES and n_out >= FP8_LINEAR_MIN_OUT_RATIO * dim
            and rows >= FP8_LINEAR_MIN_ROWS)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, dim), contiguous rows -> (e4m3 (rows, dim) contiguous, (rows, 1) float32 scales),
    as `quant.quantize_rows`."""
    rows, dim = x.shape
    x8 = torch.empty((rows, dim), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    block_dim = triton.next_power_of_2(dim)
    block_rows = max(1, QUANTIZE_ELEMENTS // block_dim)
    _quantize_rows_kernel[(triton.cdiv(rows, block_rows),)](
        x, x8, scale, rows, dim, x.stride(0), BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim,
        ROUND_IN_FLOAT32=interpreting(), num_warps=8 if block_dim >= 2048 else 4)
    return x8, scale


def _scaled_mm(x8, w8, x_scale, w_scale, bias, out_dtype, how: str) -> torch.Tensor:
    # x8 (rows, dim) row-major, w8 (n_out, dim) row-major, i.e. its transpose column-major as
    # cuBLASLt's FP8 kernels take the second operand.
    if how == "direct":
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype)
    if how == "bf16":
        bias = None if bias is None else bias.to(torch.bfloat16)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias,
                                out_dtype=torch.bfloat16).to(out_dtype)
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16).to(out_dtype)
    return out if bias is None else out.add_(bias.to(out_dtype))


@functools.cache
def _scaled_mm_way(out_dtype: torch.dtype, device: torch.device) -> str:
    """How this PyTorch runs `_scaled_mm` with row-wise scales into `out_dtype` on `device`,
    found once by trying: "direct" (out_dtype and the bias in the epilogue), "bf16" (some
    releases take row-wise scales only with a bfloat16 output: computed in bfloat16, then cast),
    or "bf16_then_bias" (nor a bias: added after the cast)."""
    x8 = torch.ones((16, 32), device=device).to(torch.float8_e4m3fn)
    w8 = torch.ones((16, 32), device=device).to(torch.float8_e4m3fn)
    scales = torch.ones((16, 1), device=device), torch.ones((1, 16), device=device)
    bias = torch.ones(16, device=device, dtype=out_dtype)
    errors = []
    for how in ("direct", "bf16", "bf16_then_bias"):
        try:
            out = _scaled_mm(x8, w8, *scales, bias, out_dtype, how)
        except (RuntimeError, NotImplementedError, ValueError) as error:  # unsupported combination
            errors.append(f"{how}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        if out.dtype == out_dtype and bool((out.float() == 33).all()):
            return how
        errors.append(f"{how}: wrong result")
    raise RuntimeError("torch._scaled_mm takes no row-wise scaled product here: " + "; ".join(errors))


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias for x (..., dim) of a half-precision dtype and W given as
    `quant.quantize_weight(W)`: e4m3 (n_out, dim) and (1, n_out) float32 scales -> (..., n_out)
    in x's dtype. x is quantised per row (`quantize_rows`). See `fp8_linear_supported`."""
    dim = x.shape[-1]
    n_out = weight_fp8.shape[0]
    rows = x.reshape(-1, dim)  # (..., dim) -> (rows, dim)
    x8, x_scale = quantize_rows(rows if rows.stride(1) == 1 else rows.contiguous())
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    out = _scaled_mm(x8, weight_fp8, x_scale, weight_scale, bias, x.dtype, _scaled_mm_way(x.dtype, x.device))
    return out.view(*x.shape[:-1], n_out)
