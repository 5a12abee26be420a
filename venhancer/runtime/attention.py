"""Attention as the optimized network runs it: SDPA with a kernel order tuned per sequence length,
attention over frame-major tokens, the Linear + residual sums, and the VAE's wide-head attention.

The backend choice itself (SDPA or xformers, logged once per device) stays in
`venhancer.models.attention`; these functions use it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import venhancer.models.attention as attention_choice
from venhancer.models.attention import _attend, _backend_for

from . import ops
from .layers import DerivedWeight
from .quant import quantize_weight

# Sequences up to this long (the temporal ones, <= 40 frames) run fastest on the memory-efficient
# kernel, longer ones (spatial) on cuDNN's.
_SHORT_SEQUENCE = 128
_SHORT_ORDER = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
_LONG_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def tuned_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention with the kernel order picked by sequence length on CUDA
    (PyTorch's own choice elsewhere)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(_SHORT_ORDER if q.shape[-2] <= _SHORT_SEQUENCE else _LONG_ORDER, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def attention_over_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int,
                          sdpa=None) -> torch.Tensor:
    """Self-attention along the frame axis of frame-major tokens: q, k, v (b, frames*P, heads*d),
    token index = frame * P + position; each position attends over its `frames` tokens.

    The same computation as `attention` on the (b P, frames, heads*d) transpose, without
    materialising it: the kernels read each position's frames by stride. `sdpa`: as `attention`'s.
    """
    batch, tokens, inner = q.shape
    positions = tokens // frames
    d = inner // heads
    backend = _backend_for(q.device)
    step = max(1, attention_choice.MAX_ATTENTION_BATCH_HEADS // heads)
    out = torch.empty_like(q)
    for item in range(batch):
        # (frames*P, heads*d) -> (frames, P, heads, d) views
        qi, ki, vi, oi = (t[item].view(frames, positions, heads, d) for t in (q, k, v, out))
        for start in range(0, positions, step):
            cols = slice(start, min(start + step, positions))
            # (frames, p, heads, d) -> (p, frames, heads, d): sequences of frames, by stride
            o = _attend(qi[:, cols].transpose(0, 1), ki[:, cols].transpose(0, 1), vi[:, cols].transpose(0, 1), backend, sdpa)
            oi[:, cols].copy_(o.transpose(0, 1))
    return out


def takes_flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `ops.flash_attention` runs this attention instead of SDPA: with the SDPA backend
    (an explicit xformers choice is kept), for key sequences of at least
    `ops.FLASH_ATTENTION_MIN_KEYS` (the text's 77 keys stay with SDPA), in a layout the
    kernel takes."""
    return (ops.runs_on(q) and k.shape[1] >= ops.FLASH_ATTENTION_MIN_KEYS
            and _backend_for(q.device) == "sdpa" and ops.flash_attention_supported(q, k, v, heads))


def takes_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `ops.fp8_attention` runs this attention (with `RuntimeSettings.fp8`): the
    conditions of `takes_flash_kernel`, on a GPU with FP8 tensor cores."""
    return (ops.runs_on(q) and k.shape[1] >= ops.FLASH_ATTENTION_MIN_KEYS
            and _backend_for(q.device) == "sdpa" and ops.fp8_attention_supported(q, k, v, heads))


def fp8_weights(*names: str) -> dict[str, DerivedWeight]:
    """One lazily made e4m3 copy (`quant.quantize_weight`: per-output-channel scales) per named
    Linear weight of a layer, held outside its state dict and remade whenever that weight changes."""
    return {name: DerivedWeight(quantize_weight) for name in names}


def fp8_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp8_weight: DerivedWeight | None,
                geglu: bool = False) -> torch.Tensor | None:
    """x @ weight.T + bias on the FP8 tensor cores (`ops.fp8_linear`, weight quantised through
    `fp8_weight`) where that takes the tensors and wins at this shape (`ops.fp8_linear_wins`;
    `geglu`: a GEGLU projection); None otherwise, or when fp8_weight is None (FP8 off)."""
    if fp8_weight is None or not (ops.fp8_linear_supported(x, weight)
                                  and ops.fp8_linear_wins(x.numel() // x.shape[-1], weight, geglu)):
        return None
    weight_fp8, scale = fp8_weight(weight)
    return ops.fp8_linear(x, weight_fp8, scale, bias)


def linear_plus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, fused: bool,
                out: torch.Tensor | None = None, persistent: bool = True,
                fp8_weight: DerivedWeight | None = None) -> torch.Tensor:
    """residual + x @ weight.T + bias, x's rows matching residual's in order; written into `out`
    (residual's shape and strides) when given, instead of a temporary and a copy.

    `fused`: one Triton pass (the sum in the matmul's epilogue) where that beat cuBLAS and a
    separate add: inputs up to `ops.LINEAR_ADD_MAX_DIM` wide, and on Hopper-class GPUs (with
    `persistent`) the shapes of `ops.persistent_linear_add_wins`. `fp8_weight` (FP8 on): the
    product on the FP8 tensor cores where `fp8_product` takes it, then the add."""
    y = fp8_product(x, weight, bias, fp8_weight)
    if (y is None and fused and ops.runs_on(x)
            and (x.shape[-1] <= ops.LINEAR_ADD_MAX_DIM or ops.persistent_linear_add_wins(x, weight, persistent))
            and ops.linear_add_supported(x, weight, residual, out)):
        return ops.linear_add(x, weight, bias, residual, out=out, persistent=persistent)
    if y is None:
        y = F.linear(x, weight, bias)
    y = y.view(residual.shape)
    return residual + y if out is None else torch.add(residual, y, out=out)


# Head widths above this have no flash or cuDNN SDPA kernel on CUDA, only the memory-efficient one.
SDPA_FAST_HEAD_DIM = 256
# Float32 scores held at once by `wide_head_attention` (per chunk of query rows).
WIDE_HEAD_SCORE_BYTES = 512 * 2**20
PROBABILITY_SCALE = 2.0**15


@functools.cache
def half_products_in_float32() -> bool:
    """Whether this PyTorch's matrix products take half-precision inputs to float32 outputs
    (`out_dtype`, newer releases), which `wide_head_attention` needs to be fast on CUDA."""
    return all("dtype" in op.overloads() for op in (torch.ops.aten.baddbmm, torch.ops.aten.mm))


def wide_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        score_bytes: int = WIDE_HEAD_SCORE_BYTES) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(d), on (B, N, d) queries and (B, M, d) keys and values ->
    (B, N, d), as two cuBLAS products around a float32 softmax, a chunk of query rows at a time
    (its float32 scores at most `score_bytes`).

    For the temporal VAE's single 512-wide head over a whole frame (38,880 tokens at the seed
    clip's size), where SDPA has only its memory-efficient kernel (~130 TFLOP/s on an H100) and
    that attention took half of the encoder's time. The precision is the fused kernels': scores
    and softmax in float32, the probabilities rounded to v's dtype (scaled into its normal range)
    for the second product, which accumulates in float32.
    """
    batch, n, d = q.shape
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2] or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    m = k.shape[1]
    scale = d ** -0.5
    rows = max(1, min(n, score_bytes // (4 * m)))
    # On CUDA the products take float32 outputs from half-precision inputs; elsewhere (and for
    # float64, or without `half_products_in_float32`) they run in the wider of float32 and the
    # input type.
    mixed = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and half_products_in_float32()
    work = torch.float32 if mixed else torch.promote_types(q.dtype, torch.float32)
    out = torch.empty((batch, n, v.shape[2]), dtype=v.dtype, device=v.device)
    for item in range(batch):
        keys_t = k[item].t()[None]  # (1, d, M)
        values = v[item]
        if not mixed:
            keys_t, values = keys_t.to(work), values.to(work)
        probs = torch.empty((rows, m), dtype=v.dtype, device=v.device) if mixed else None
        for start in range(0, n, rows):
            queries = q[item, start:start + rows][None]  # (1, r, d)
            target = out[item, start:start + rows]
            if not mixed:
                scores = torch.baddbmm(queries.new_empty((), dtype=work), queries.to(work), keys_t,
                                       beta=0, alpha=scale)
                target.copy_(torch.softmax(scores[0], dim=-1) @ values)
                continue
            scores = torch.baddbmm(queries.new_empty((), dtype=work), queries, keys_t, beta=0, alpha=scale,
                                   out_dtype=work)
            # Probabilities near 1/M (2.6e-5 at 38,880 keys) lie below half precision's normal
            # range: they are rounded as PROBABILITY_SCALE times themselves (a power of two, so
            # exact, and at most 2**15 < 65504), and the float32 product is scaled back.
            chunk_probs = probs[: queries.shape[1]]
            torch.mul(torch.softmax(scores[0], dim=-1), PROBABILITY_SCALE, out=chunk_probs)
            torch.mul(torch.mm(chunk_probs, values, out_dtype=torch.float32), 1 / PROBABILITY_SCALE, out=target)
    return out
