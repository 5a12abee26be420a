"""softmax(q k^T / sqrt(d)) v per head, FlashAttention-2 style (online softmax, float32 scores and
sums), for the spatial transformers' long self-attentions: q/k/v read through TMA descriptors
over the strided views of a fused q/k/v projection, the output written contiguous.

Tuned and measured on H100 (and run on H200) at head width 64; Hopper-class GPUs only (TMA).
Falls back (`flash_attention_supported` false, key sequences shorter than
FLASH_ATTENTION_MIN_KEYS, or the xformers backend chosen): SDPA (cuDNN's kernel on these GPUs).
"""

from __future__ import annotations

import math

import torch

from .common import TensorDescriptor, half_or_interpreted, has_tma, power_of_two_head, tl, triton

if triton is not None:

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
        # the tensor cores.
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


# Query rows per program (two halves), keys per step, warps, pipeline stages of `flash_attention`:
# the best of a sweep at the level-0 spatial shape (docs/performance.md, "Measurement notes by op family").
FLASH_ATTENTION_CONFIG = (128, 128, 4, 3)
# Shortest key sequence given to `flash_attention`: every spatial sequence of the seed clip (the
# shortest is 660 tokens) measured faster on it; the text's 77 keys stay with SDPA.
FLASH_ATTENTION_MIN_KEYS = 512


def flash_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `flash_attention` takes these: (b, n, heads*d) q and (b, m, heads*d) k, v of one
    half-precision dtype (any float dtype under the interpreter) with contiguous rows, head width
    16-128 and a power of two, and the 16-byte aligned bases and strides that TMA descriptors
    need, on a Hopper-class GPU (where it was tuned; elsewhere SDPA runs)."""
    if triton is None or TensorDescriptor is None or q.ndim != 3 or heads <= 0 or q.shape[-1] % heads:
        return False
    head_dim = q.shape[-1] // heads
    return (half_or_interpreted(q) and q.dtype == k.dtype == v.dtype and k.ndim == 3 and k.shape == v.shape
            and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and q.numel() > 0 and k.shape[1] > 0
            and power_of_two_head(head_dim, 128) and q.shape[0] * heads < 2**16
            and has_tma(q.device)
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
