"""softmax(q k^T / sqrt(d)) v per head with q and k in 8 bits, for the spatial transformers'
long self-attentions on GPUs with FP8 tensor cores: `flash_attention`'s kernel (online softmax,
float32 scores and sums, two query halves per program) with the score product on 8-bit operands,
which Hopper's tensor cores run at twice the fp16 rate. Two formats for q and k (`qk`):
- "int8" (the default, SageAttention's choice): symmetric int8, scale absmax / 127 per block,
  rounded to nearest (ties away from zero), the block's product accumulated exactly in int32.
  7 bits of resolution for every element of a block: a float64 emulation of the rounding gives
  1.4e-2 relative L2 for one attention at 38,880 randn tokens;
- "e4m3": FP8 with scale absmax / 448 per block; 3 mantissa bits, 4.2e-2 in the same emulation.

Two passes:
1. `_fp8_attention_prepass_kernel` reads q, k (and v) once, in the layout `flash_attention`
   receives (strided views of a fused q/k/v projection), and writes contiguous 8-bit copies (int8
   or e4m3) and float32 scales: q with one scale per BLOCK_M queries of a head (the softmax's
   log2(e)/sqrt(d) folded in), k with one per BLOCK_N keys of a head after subtracting k's mean
   over the sequence (per item, head and channel). The mean shifts every score of a query row by
   the same q . mean(k), which softmax cancels exactly; removing it leaves the (often large)
   common component out of the scale, so the 8-bit values resolve what differs between keys
   (SageAttention's smoothing).
2. `_fp8_attention_kernel`: the flash-attention loop; each block's float32 scores are de-scaled
   by q_scale * k_scale. The second product, P V, in one of two ways (`fp8_pv`):
   (a) P and V in fp16, V read from the fused projection as it is (SageAttention v1);
   (b) P and V in e4m3: P (in [0, 1] after the max-subtraction) times 448, V with one scale per
       channel (which factors out of the sum over keys), written transposed by the pre-pass
       (d, tokens), because Hopper's FP8 wgmma takes both operands K-major only.

K's mean (and in (b) V's per-channel absmax) comes from torch reductions before the pre-pass:
they span the whole sequence, which the pre-pass's programs (one per token block) do not see.

Written for Hopper-class GPUs (TMA descriptors, as `flash_attention`); the runtime uses it with
`RuntimeSettings.fp8`. Falls back (`fp8_attention_supported` false): `flash_attention` or SDPA.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..quant import absmax_scale, fp8_supported
from .common import TensorDescriptor, interpreting, tl, triton
from .flash_attention import flash_attention_supported

if triton is not None:
    from .common import to_e4m3
    from .flash_attention import _flash_scores_to_probs, _flash_store

    @triton.jit
    def _quantize_row_blocks(x, TOKENS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                             QK_INT8: tl.constexpr, ROUND_IN_FLOAT32: tl.constexpr):
        # x (TOKENS, HEAD_DIM) float32 -> (8-bit (TOKENS, HEAD_DIM), (TOKENS // BLOCK,) float32
        # scales): one scale per BLOCK rows, absmax / 448 for e4m3 (its largest value, as
        # `quant.E4M3_MAX`) or absmax / 127 for int8 (`quant.INT8_MAX`); all-zero blocks get
        # scale 1. int8: rounded to nearest, ties away from zero (+-0.5, then the conversion's
        # truncation), as `quant.quantize_int8`.
        blocks = x.reshape(TOKENS // BLOCK, BLOCK, HEAD_DIM)
        absmax = tl.max(tl.max(tl.abs(blocks), axis=2), axis=1)
        if QK_INT8:
            scale = tl.where(absmax > 0, absmax / 127.0, 1.0)
            scaled = blocks / scale[:, None, None]
            rounded = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int32)
            out = tl.minimum(tl.maximum(rounded, -127), 127).to(tl.int8)
        else:
            scale = tl.where(absmax > 0, absmax / 448.0, 1.0)
            scaled = tl.minimum(tl.maximum(blocks / scale[:, None, None], -448.0), 448.0)
            out = to_e4m3(scaled, ROUND_IN_FLOAT32)
        return out.reshape(TOKENS, HEAD_DIM), scale

    @triton.jit(do_not_specialize=["seq_q", "seq_k", "heads", "q_blocks", "k_blocks", "v8_row"])
    def _fp8_attention_prepass_kernel(q_ptr, k_ptr, v_ptr, k_mean_ptr, v_scale_ptr, q8_ptr, k8_ptr, v8_ptr,
                                      q_scale_ptr, k_scale_ptr, seq_q, seq_k, heads, q_blocks, k_blocks, v8_row,
                                      q_sb, q_st, k_sb, k_st, v_sb, v_st, qk_scale,
                                      TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                      HEAD_DIM: tl.constexpr, FP8_PV: tl.constexpr, QK_INT8: tl.constexpr,
                                      ROUND_IN_FLOAT32: tl.constexpr):
        # Program (token block, item x head): TOKENS rows of one head of q, k (and v) read from
        # the (items, tokens, heads*d) views, written as int8 or e4m3 (item*head, tokens, d) (v: e4m3 (item*head,
        # d, tokens) with rows v8_row apart) with their block scales (item*head, blocks).
        pid = tl.program_id(0)
        head_row = tl.program_id(1)  # item * heads + head
        item = (head_row // heads).to(tl.int64)
        col = (head_row % heads) * HEAD_DIM
        head_row = head_row.to(tl.int64)
        rows = pid * TOKENS + tl.arange(0, TOKENS)
        rows64 = rows.to(tl.int64)
        d = tl.arange(0, HEAD_DIM)
        if pid * TOKENS < seq_q:
            q_ok = (rows < seq_q)[:, None]
            q = tl.load(q_ptr + item * q_sb + rows64[:, None] * q_st + col + d[None, :], mask=q_ok, other=0.0)
            q8, q_scale = _quantize_row_blocks(q.to(tl.float32), TOKENS, BLOCK_M, HEAD_DIM, QK_INT8,
                                                  ROUND_IN_FLOAT32)
            tl.store(q8_ptr + (head_row * seq_q + rows64)[:, None] * HEAD_DIM + d[None, :], q8, mask=q_ok)
            block = pid * (TOKENS // BLOCK_M) + tl.arange(0, TOKENS // BLOCK_M)
            tl.store(q_scale_ptr + head_row * q_blocks + block, q_scale * qk_scale, mask=block < q_blocks)
        if pid * TOKENS < seq_k:
            k_ok = (rows < seq_k)[:, None]
            k = tl.load(k_ptr + item * k_sb + rows64[:, None] * k_st + col + d[None, :], mask=k_ok, other=0.0)
            k_mean = tl.load(k_mean_ptr + head_row * HEAD_DIM + d)
            # rows past the end stay zero (not -mean): they must not enlarge the last block's scale
            k = tl.where(k_ok, k.to(tl.float32) - k_mean[None, :], 0.0)
            k8, k_scale = _quantize_row_blocks(k, TOKENS, BLOCK_N, HEAD_DIM, QK_INT8, ROUND_IN_FLOAT32)
            tl.store(k8_ptr + (head_row * seq_k + rows64)[:, None] * HEAD_DIM + d[None, :], k8, mask=k_ok)
            block = pid * (TOKENS // BLOCK_N) + tl.arange(0, TOKENS // BLOCK_N)
            tl.store(k_scale_ptr + head_row * k_blocks + block, k_scale, mask=block < k_blocks)
            if FP8_PV:
                v = tl.load(v_ptr + item * v_sb + rows64[:, None] * v_st + col + d[None, :], mask=k_ok, other=0.0)
                v_scale = tl.load(v_scale_ptr + head_row * HEAD_DIM + d)
                v8 = to_e4m3(tl.minimum(tl.maximum(v.to(tl.float32) / v_scale[None, :], -448.0), 448.0),
                             ROUND_IN_FLOAT32)
                # transposed: element (token, channel) at (head_row * d + channel) * v8_row + token
                tl.store(v8_ptr + (head_row * HEAD_DIM + d[None, :]) * v8_row + rows64[:, None], v8, mask=k_ok)

    @triton.jit(do_not_specialize=["seq_q", "seq_k", "heads", "q_blocks", "k_blocks"])
    def _fp8_attention_kernel(q_desc, k_desc, v_desc, q_scale_ptr, k_scale_ptr, v_scale_ptr, o_ptr, seq_q, seq_k,
                              heads, q_blocks, k_blocks, o_sb, o_st, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              HEAD_DIM: tl.constexpr, STAGES: tl.constexpr, FP8_PV: tl.constexpr,
                              QK_INT8: tl.constexpr, ROUND_IN_FLOAT32: tl.constexpr):
        # Program (query block, item x head), as `_flash_attention_kernel`: q8, k8 through TMA
        # descriptors over the pre-pass's (item*head, tokens, d) int8 or e4m3 tensors (rows past a
        # sequence's end read as zeros, the last key block masked); v through one over the fused
        # projection's (items, tokens, heads*d) view (fp16), or (FP8_PV) over the pre-pass's
        # (item*head, d, tokens) e4m3 transpose.
        HALF: tl.constexpr = BLOCK_M // 2
        pid_m = tl.program_id(0)
        head_row = tl.program_id(1)  # item * heads + head
        item = head_row // heads
        col = (head_row % heads) * HEAD_DIM
        # (1, rows, d) boxes of the 3-D descriptors -> (rows, d)
        q0 = q_desc.load([head_row, pid_m * BLOCK_M, 0]).reshape(HALF, HEAD_DIM)
        q1 = q_desc.load([head_row, pid_m * BLOCK_M + HALF, 0]).reshape(HALF, HEAD_DIM)
        q_scale = tl.load(q_scale_ptr + head_row * q_blocks + pid_m)  # includes log2(e) / sqrt(d)
        m0 = tl.full([HALF], float("-inf"), tl.float32)
        m1 = tl.full([HALF], float("-inf"), tl.float32)
        l0 = tl.zeros([HALF], tl.float32)
        l1 = tl.zeros([HALF], tl.float32)
        acc0 = tl.zeros([HALF, HEAD_DIM], tl.float32)
        acc1 = tl.zeros([HALF, HEAD_DIM], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in tl.range(0, seq_k, BLOCK_N, num_stages=STAGES):
            k = k_desc.load([head_row, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            score_scale = q_scale * tl.load(k_scale_ptr + head_row * k_blocks + start // BLOCK_N)
            if QK_INT8:
                # int8 x int8 -> int32, exact (64 products of at most 127 * 127), then float32
                s0 = tl.dot(q0, k.T, out_dtype=tl.int32).to(tl.float32)
                s1 = tl.dot(q1, k.T, out_dtype=tl.int32).to(tl.float32)
            else:
                # e4m3 x e4m3 -> float32, over d (64) products only: a fresh accumulator per block,
                # so the FP8 tensor cores' reduced-precision accumulation never spans key blocks
                s0 = tl.dot(q0, k.T)
                s1 = tl.dot(q1, k.T)
            if start + BLOCK_N > seq_k:  # keys past the end: zero rows, which must get no weight
                s0 = tl.where((start + n < seq_k)[None, :], s0, float("-inf"))
                s1 = tl.where((start + n < seq_k)[None, :], s1, float("-inf"))
            p0, a0, m0, l0 = _flash_scores_to_probs(s0, m0, l0, score_scale)
            p1, a1, m1, l1 = _flash_scores_to_probs(s1, m1, l1, score_scale)
            if FP8_PV:
                # (1, d, BLOCK_N) box -> (BLOCK_N, d) with the keys contiguous: K-major for wgmma
                v = v_desc.load([head_row, 0, start]).reshape(HEAD_DIM, BLOCK_N).T
                # P * 448 in e4m3 (P <= 1: no clamp needed); each block's product in a fresh
                # float32 accumulator (the FP8 tensor cores accumulate with reduced precision,
                # Triton's max_num_imprecise_acc), added to the rescaled running sum in float32
                acc0 = acc0 * a0[:, None] + tl.dot(to_e4m3(p0 * 448.0, ROUND_IN_FLOAT32), v)
                acc1 = acc1 * a1[:, None] + tl.dot(to_e4m3(p1 * 448.0, ROUND_IN_FLOAT32), v)
            else:
                v = v_desc.load([item, start, col]).reshape(BLOCK_N, HEAD_DIM)
                acc0 = tl.dot(p0.to(v.dtype), v, acc0 * a0[:, None])
                acc1 = tl.dot(p1.to(v.dtype), v, acc1 * a1[:, None])
        if FP8_PV:  # P V = (P8 / 448) (V8 * v_scale): the channel scales and 1/448 applied once
            v_scale = tl.load(v_scale_ptr + head_row * HEAD_DIM + tl.arange(0, HEAD_DIM)) / 448.0
            acc0 = acc0 * v_scale[None, :]
            acc1 = acc1 * v_scale[None, :]
        rows = pid_m * BLOCK_M + tl.arange(0, HALF)
        item64 = item.to(tl.int64)
        _flash_store(o_ptr, acc0, l0, item64, rows, col, seq_q, o_sb, o_st, HEAD_DIM)
        _flash_store(o_ptr, acc1, l1, item64, rows + HALF, col, seq_q, o_sb, o_st, HEAD_DIM)


# Query rows per program (two halves; also q's quantisation block), keys per step (k's
# quantisation block), warps, pipeline stages of `fp8_attention`: flash_attention's tuned
# configuration, not yet swept for the FP8 kernel.
FP8_ATTENTION_CONFIG = (128, 128, 4, 3)


def fp8_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `fp8_attention` takes these: what `flash_attention_supported` asks (layout, head
    width, dtypes, a Hopper-class GPU for the TMA descriptors) on a device with FP8 tensor cores
    (`fp8_supported`), or on the CPU under Triton's interpreter."""
    if triton is None or not hasattr(torch, "float8_e4m3fn"):
        return False
    on_device = fp8_supported(q.device) or (q.device.type == "cpu" and interpreting())
    return on_device and flash_attention_supported(q, k, v, heads)


class Fp8AttentionInputs(NamedTuple):
    """What the pre-pass hands the attention kernel: q8 (b*heads, n, d) and k8 (b*heads, m, d),
    int8 or e4m3 (`qk`), with float32 block scales (b*heads, blocks), q's including
    log2(e)/sqrt(d); with fp8_pv, e4m3 v8 (b*heads, d, m padded to 16) and its float32 channel
    scales (b, heads*d), else v itself."""

    q8: torch.Tensor
    k8: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor | None
    fp8_pv: bool
    qk: str


QK_FORMATS = ("int8", "e4m3")


def quantize_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              fp8_pv: bool = False, qk: str = "int8") -> Fp8AttentionInputs:
    """The pre-pass of `fp8_attention` (module docstring, step 1), on its arguments."""
    if qk not in QK_FORMATS:
        raise ValueError(f"qk must be one of {QK_FORMATS}, got {qk!r}")
    batch, seq_q, inner = q.shape
    seq_k = k.shape[1]
    head_dim = inner // heads
    head_rows = batch * heads
    block_m, block_n = FP8_ATTENTION_CONFIG[:2]
    device, fp8 = q.device, torch.float8_e4m3fn
    qk_dtype = torch.int8 if qk == "int8" else fp8
    q_blocks, k_blocks = triton.cdiv(seq_q, block_m), triton.cdiv(seq_k, block_n)
    q8 = torch.empty((head_rows, seq_q, head_dim), device=device, dtype=qk_dtype)
    k8 = torch.empty((head_rows, seq_k, head_dim), device=device, dtype=qk_dtype)
    q_scale = torch.empty((head_rows, q_blocks), device=device, dtype=torch.float32)
    k_scale = torch.empty((head_rows, k_blocks), device=device, dtype=torch.float32)
    k_mean = k.mean(dim=1, dtype=torch.float32)  # (b, heads*d), read as (b*heads, d)
    if fp8_pv:
        # One scale per channel of each head; v8's rows padded to 16 bytes for its descriptor
        v_scale = absmax_scale(torch.linalg.vector_norm(v, float("inf"), dim=1))  # (b, heads*d)
        v8_row = triton.cdiv(seq_k, 16) * 16
        v8 = torch.empty((head_rows, head_dim, v8_row), device=device, dtype=fp8)
    else:
        v_scale, v8, v8_row = None, None, 0
    tokens = max(block_m, block_n)
    qk_scale = 1.4426950408889634 / math.sqrt(head_dim)  # log2(e) / sqrt(d)
    _fp8_attention_prepass_kernel[(triton.cdiv(max(seq_q, seq_k), tokens), head_rows)](
        q, k, v, k_mean, k_mean if v_scale is None else v_scale, q8, k8, k8 if v8 is None else v8, q_scale, k_scale,
        seq_q, seq_k, heads, q_blocks, k_blocks, v8_row, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), qk_scale, TOKENS=tokens, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        FP8_PV=fp8_pv, QK_INT8=qk == "int8", ROUND_IN_FLOAT32=interpreting(), num_warps=4)
    return Fp8AttentionInputs(q8, k8, v if v8 is None else v8, q_scale, k_scale, v_scale, fp8_pv, qk)


def attend_quantized(inputs: Fp8AttentionInputs, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The attention kernel of `fp8_attention` (module docstring, step 2) on the pre-pass's
    output -> a contiguous (b, n, heads*d) tensor of `dtype`."""
    q8, k8, v, q_scale, k_scale, v_scale, fp8_pv, qk = inputs
    head_rows, seq_q, head_dim = q8.shape
    seq_k = k8.shape[1]
    block_m, block_n, warps, stages = FP8_ATTENTION_CONFIG
    q_desc = TensorDescriptor(q8, list(q8.shape), list(q8.stride()), [1, block_m // 2, head_dim])
    k_desc = TensorDescriptor(k8, list(k8.shape), list(k8.stride()), [1, block_n, head_dim])
    if fp8_pv:  # logical shape (b*heads, d, m): the padding past m reads as zeros, never as data
        v_desc = TensorDescriptor(v, [head_rows, head_dim, seq_k], list(v.stride()), [1, head_dim, block_n])
    else:
        v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, block_n, head_dim])
    out = torch.empty((batch, seq_q, heads * head_dim), device=q8.device, dtype=dtype)
    _fp8_attention_kernel[(q_scale.shape[1], head_rows)](
        q_desc, k_desc, v_desc, q_scale, k_scale, q_scale if v_scale is None else v_scale, out, seq_q, seq_k,
        heads, q_scale.shape[1], k_scale.shape[1], out.stride(0), out.stride(1), BLOCK_M=block_m,
        BLOCK_N=block_n, HEAD_DIM=head_dim, STAGES=stages, FP8_PV=fp8_pv, QK_INT8=qk == "int8",
        ROUND_IN_FLOAT32=interpreting(),
        num_warps=warps, num_stages=stages)
    return out


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, fp8_pv: bool = False,
                  qk: str = "int8") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head with the score product in 8 bits (`qk`: "int8" or
    "e4m3", see the module docstring): q (b, n, heads*d), k and v (b, m, heads*d), any row strides
    (views of a fused q/k/v projection) -> a contiguous (b, n, heads*d) tensor of q's dtype, as
    `flash_attention`. `fp8_pv`: P V in e4m3 as well (variant (b) of the module docstring), else
    in q's dtype. See `fp8_attention_supported`."""
    return attend_quantized(quantize_attention_inputs(q, k, v, heads, fp8_pv, qk), q.shape[0], heads, q.dtype)
