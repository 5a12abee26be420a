"""Self-attention along the frames of frame-major tokens: for the temporal transformers, each
pixel's `frames` tokens attend to each other, read by stride from the (fused q/k/v) projections
and written straight into the frame-major output, with no transposed copies.

A whole sequence (at most FRAME_ATTENTION_MAX_FRAMES) fits one tile, so the softmax is exact in
one pass. Measured on H100 and H200; runs on any CUDA GPU Triton supports. Falls back
(`frame_attention_supported` false): SDPA on strided per-pixel views (`attention_over_frames`).
"""

from __future__ import annotations

import math

import torch

from .common import half_or_interpreted, power_of_two_head, tl, triton

if triton is not None:

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


# Longest sequence the frame-attention kernel takes: one tile holds a whole sequence's scores.
FRAME_ATTENTION_MAX_FRAMES = 64
# (positions per program, warps) by the padded sequence length, the fastest measured at the
# network's temporal shapes.
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
    return (half_or_interpreted(q) and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.shape[1] % frames == 0 and frames <= FRAME_ATTENTION_MAX_FRAMES and q.numel() > 0
            and power_of_two_head(head_dim, 256)
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

