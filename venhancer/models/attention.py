"""Attention for the video UNet: the kernel choice, attention/feed-forward layers, and the
spatial (per-frame) and temporal (per-pixel) transformers.

This is the one place that decides how attention is computed: PyTorch's
`scaled_dot_product_attention` (default) or xformers' `memory_efficient_attention` when it is
installed and asked for (`set_attention_backend`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from venhancer.runtime import ops
from .layers import GroupNorm32

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Kernel choice
# ---------------------------------------------------------------------------------------------

# Most sequences (batch x heads) handed to one attention kernel call. The fused CUDA kernels put
# the batch (and for xformers' folded layout batch*heads) on a grid axis limited to 65535 blocks:
# at batch >= 65536 they fail with "invalid configuration argument" (pytorch/pytorch#146704,
# facebookresearch/xformers#845). Temporal attention has one sequence per pixel: a 2-item batch
# at 90x160 latents is 28,800 sequences x 8 heads = 230,400. Capping batch*heads at 2**15 keeps
# every grid axis under the limit whichever layout the kernel uses, and each call still holds
# enough work to fill the GPU, so the slicing costs nothing measurable.
MAX_ATTENTION_BATCH_HEADS = 2**15

_BACKENDS = ("sdpa", "xformers", "auto")
_requested_backend = "sdpa"
_xformers_ops = None  # the imported `xformers.ops` module, once loaded
_logged_choices: set[tuple[str, str]] = set()
# SDPA kernel order per sequence length on CUDA (None: PyTorch's own choice). Measured on an
# H100 at the real sizes: long spatial sequences run fastest on cuDNN (~420 TFLOP/s against
# ~330 for flash), the short temporal ones (<= 40 frames) on the memory-efficient kernel (2x
# faster than flash there). Set by `venhancer.models.optimize`.
_tuned_sdpa = False
_SHORT_SEQUENCE = 128


def _load_xformers():
    global _xformers_ops
    if _xformers_ops is None:
        try:
            _xformers_ops = importlib.import_module("xformers.ops")
        except Exception:  # ImportError, or a broken build raising something else on import
            return None
    return _xformers_ops


def xformers_available() -> bool:
    return _load_xformers() is not None


def set_attention_backend(name: str) -> str:
    """Choose the attention kernel: "sdpa", "xformers" or "auto" (xformers if importable).

    Returns the backend that will be used on CUDA tensors. xformers has no CPU kernels, so CPU
    tensors always use SDPA. Raises ValueError for an unknown name or when "xformers" is asked
    for and cannot be imported.
    """
    global _requested_backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(_BACKENDS)}")
    if name == "xformers" and not xformers_available():
        raise ValueError("attention backend 'xformers' requested but the xformers package cannot be imported")
    _requested_backend = name
    _logged_choices.clear()
    return "xformers" if name == "xformers" or (name == "auto" and xformers_available()) else "sdpa"


def set_tuned_sdpa(enabled: bool) -> None:
    """Pick the SDPA kernel per sequence length on CUDA (see `_tuned_sdpa`)."""
    global _tuned_sdpa
    _tuned_sdpa = bool(enabled)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not (_tuned_sdpa and q.is_cuda):
        return F.scaled_dot_product_attention(q, k, v)
    if q.shape[-2] <= _SHORT_SEQUENCE:
        order = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    else:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def get_attention_backend() -> str:
    """The backend name as requested ("sdpa", "xformers" or "auto")."""
    return _requested_backend


def _backend_for(device: torch.device) -> str:
    wants_xformers = _requested_backend == "xformers" or (_requested_backend == "auto" and xformers_available())
    chosen = "xformers" if wants_xformers and device.type == "cuda" else "sdpa"
    key = (chosen, device.type)
    if key not in _logged_choices:
        _logged_choices.add(key)
        note = " (xformers has no kernels for this device)" if wants_xformers and chosen == "sdpa" else ""
        logger.info("attention on %s: %s%s", device.type, chosen, note)
    return chosen


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax attention on (B, N, heads, d) views (any strides, d contiguous) -> a (B, N, heads, d)
    tensor or view."""
    if backend == "xformers":
        # xformers takes (batch, seq, heads, d) directly, no transposes needed
        return _xformers_ops.memory_efficient_attention(q, k, v)
    # (B, N, heads, d) -> (B, heads, N, d) strided views; SDPA accepts them as they are
    return _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention, scale 1/sqrt(head_dim).

    q: (B, N, heads*d); k, v: (B, M, heads*d) -> (B, N, heads*d). Long batches are cut into
    slices of at most MAX_ATTENTION_BATCH_HEADS // heads sequences.
    """
    batch, n, inner = q.shape
    m = k.shape[1]
    d = inner // heads
    backend = _backend_for(q.device)
    step = max(1, MAX_ATTENTION_BATCH_HEADS // heads)
    if batch <= step:
        o = _attend(q.reshape(batch, n, heads, d), k.reshape(batch, m, heads, d), v.reshape(batch, m, heads, d), backend)
        # The fused kernels write (B, N, heads, d) memory: the merge of the heads is then free.
        return o.reshape(batch, n, inner)
    out = torch.empty((batch, n, inner), dtype=q.dtype, device=q.device)
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        bs = stop - start
        # (bs, N, heads*d) -> (bs, N, heads, d): a free view for the contiguous projections
        o = _attend(q[start:stop].reshape(bs, n, heads, d), k[start:stop].reshape(bs, m, heads, d),
                    v[start:stop].reshape(bs, m, heads, d), backend)
        out[start:stop].view(bs, n, heads, d).copy_(o)
    return out


def attention_over_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, frames: int) -> torch.Tensor:
    """Self-attention along the frame axis of frame-major tokens: q, k, v (b, frames*P, heads*d),
    token index = frame * P + position; each position attends over its `frames` tokens.

    The same computation as `attention` on the (b P, frames, heads*d) transpose, without
    materialising it: the kernels read each position's frames by stride.
    """
    batch, tokens, inner = q.shape
    positions = tokens // frames
    d = inner // heads
    backend = _backend_for(q.device)
    step = max(1, MAX_ATTENTION_BATCH_HEADS // heads)
    out = torch.empty_like(q)
    for item in range(batch):
        # (frames*P, heads*d) -> (frames, P, heads, d) views
        qi, ki, vi, oi = (t[item].view(frames, positions, heads, d) for t in (q, k, v, out))
        for start in range(0, positions, step):
            cols = slice(start, min(start + step, positions))
            # (frames, p, heads, d) -> (p, frames, heads, d): sequences of frames, by stride
            o = _attend(qi[:, cols].transpose(0, 1), ki[:, cols].transpose(0, 1), vi[:, cols].transpose(0, 1), backend)
            oi[:, cols].copy_(o.transpose(0, 1))
    return out


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


def _takes_flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether `ops.flash_attention` runs this attention instead of SDPA: with the SDPA backend
    (an explicit xformers choice is kept), for key sequences of at least
    `ops.FLASH_ATTENTION_MIN_KEYS` (the text's 77 keys stay with SDPA), in a layout the
    kernel takes."""
    return (ops.runs_on(q) and k.shape[1] >= ops.FLASH_ATTENTION_MIN_KEYS
            and _backend_for(q.device) == "sdpa" and ops.flash_attention_supported(q, k, v, heads))


def linear_plus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, fused: bool,
                out: torch.Tensor | None = None, persistent: bool = True) -> torch.Tensor:
    """residual + x @ weight.T + bias, x's rows matching residual's in order; written into `out`
    (residual's shape and strides) when given, instead of a temporary and a copy.

    `fused`: one Triton pass (the sum in the matmul's epilogue) where that beat cuBLAS and a
    separate add: inputs up to `ops.LINEAR_ADD_MAX_DIM` wide, and on Hopper-class GPUs the
    shapes of `ops.persistent_linear_add_wins`."""
    if (fused and ops.runs_on(x)
            and (x.shape[-1] <= ops.LINEAR_ADD_MAX_DIM or ops.persistent_linear_add_wins(x, weight, persistent))
            and ops.linear_add_supported(x, weight, residual, out)):
        return ops.linear_add(x, weight, bias, residual, out=out, persistent=persistent)
    y = F.linear(x, weight, bias).view(residual.shape)
    return residual + y if out is None else torch.add(residual, y, out=out)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """q/k/v projections without bias, multi-head attention, output projection with bias."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        # A list so the output Linear is `to_out.0` as in the checkpoint (index 1 was a Dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.self_attention = context_dim is None
        self.fused = False  # output projection + residual in one kernel (set by optimize)
        self.frame_kernel = False  # attention over frames in one Triton kernel (set by optimize)
        self.flash_kernel = False  # long self-attention in one Triton kernel (set by optimize)
        # (3*inner, query_dim) with to_q/to_k/to_v's weights as its row blocks (`fuse_projections`);
        # not persistent: the checkpoint keys stay to_q/to_k/to_v.
        self.register_buffer("qkv_weight", None, persistent=False)

    def fuse_projections(self) -> None:
        """Self-attention only: q, k and v from one matmul against the three weights stacked;
        the Linears' weights become views of that tensor (same names, values and memory)."""
        if not self.self_attention:
            raise ValueError("only a self-attention layer can project q, k and v together")
        inner = self.to_q.out_features
        stacked = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).detach()
        for i, linear in enumerate((self.to_q, self.to_k, self.to_v)):
            linear.weight = nn.Parameter(stacked[i * inner : (i + 1) * inner], requires_grad=False)
        self.qkv_weight = stacked

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1,
                frames: int | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim). context: (B / context_repeats, M, context_dim) or None for
        self-attention; each context row serves `context_repeats` consecutive rows of x (one
        text context per video serves all its frames), so k/v are projected once per video.
        `frames`: x holds frame-major tokens and self-attention runs along the frame axis
        (`attention_over_frames`). `residual` (x's shape), if given, is added to the output."""
        if context is None and self.qkv_weight is not None:
            # (B, N, 3*inner) -> three (B, N, inner) views with row stride 3*inner
            q, k, v = F.linear(x, self.qkv_weight).chunk(3, dim=-1)
        elif context is None:
            q = self.to_q(x)
            k = self.to_k(x)
            v = self.to_v(x)
        else:
            q = self.to_q(x)
            k = self.to_k(context)
            v = self.to_v(context)
            if context_repeats != 1:
                # (b, M, inner) -> ((b f), M, inner)
                k = k.repeat_interleave(context_repeats, dim=0)
                v = v.repeat_interleave(context_repeats, dim=0)
        if frames is not None and self.frame_kernel and ops.runs_on(q) and ops.frame_attention_supported(q, k, v, self.heads, frames):
            out = ops.frame_attention(q, k, v, self.heads, frames)
        elif frames is not None:
            out = attention_over_frames(q, k, v, self.heads, frames)
        elif self.flash_kernel and _takes_flash_kernel(q, k, v, self.heads):
            out = ops.flash_attention(q, k, v, self.heads)
        else:
            out = attention(q, k, v, self.heads)
        if residual is None:
            return self.to_out[0](out)
        return linear_plus(out, self.to_out[0].weight, self.to_out[0].bias, residual, self.fused)


class GEGLU(nn.Module):
    """Linear to twice the hidden width, split into value and gate: value * gelu(gate)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)
        self.fused = False  # one Triton pass instead of gelu + multiply (set by optimize)

    def forward(self, x: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
        """value * gelu(gate); `bias_column` (fused, on a device the kernels take): with the
        columns of `ops.geglu(..., bias_column=True)` appended."""
        if self.fused and ops.runs_on(x) and ops.geglu_matmul_supported(x, self.proj.weight):
            # Up to 1280-wide inputs: the gate in the projection's epilogue (the 2*hidden-wide
            # projection never goes to memory); wider ones may run faster on cuBLAS.
            return ops.geglu_matmul(x, self.proj.weight, self.proj.bias, bias_column=bias_column)
        proj = self.proj(x)
        if bias_column or (self.fused and ops.runs_on(proj)):
            return ops.geglu(proj, bias_column=bias_column)
        value, gate = proj.chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(d -> 4d) then Linear(4d -> d); `net.1` was a Dropout (Identity keeps the indices)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))
        self.fused = False  # see `linear_plus` (set by optimize)
        # (dim, 4*dim + ops.BIAS_COLUMNS) = [W | b | 0] of the down-projection, whose weight and
        # bias are views of it (`join_down_bias`); not persistent: the checkpoint keys stay.
        self.register_buffer("down_with_bias", None, persistent=False)

    def join_down_bias(self) -> None:
        """The down-projection's weight and bias become views of one matrix [W | b | 0] (same
        names, values and memory), so that with the GEGLU output's ones column one cuBLAS matmul
        adds the bias, and with the residual as its accumulator the residual too."""
        down = self.net[2]
        joined = ops.with_bias_column(down.weight, down.bias)
        down.weight = nn.Parameter(joined[:, : down.in_features], requires_grad=False)
        down.bias = nn.Parameter(joined[:, down.in_features], requires_grad=False)
        self.down_with_bias = joined

    def _joined_down_bias(self) -> torch.Tensor | None:
        """`down_with_bias` while the Linear's weight and bias are still its views."""
        joined, down = self.down_with_bias, self.net[2]
        if (joined is None or down.weight.data_ptr() != joined.data_ptr()
                or down.bias.data_ptr() != joined[:, down.in_features].data_ptr()):
            return None
        return joined

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """FF(x), or residual + FF(x) (into `out` if given; `out=residual` adds in place)."""
        geglu, down = self.net[0], self.net[2]
        joined = self._joined_down_bias() if self.fused and ops.runs_on(x) else None
        if residual is not None and out is residual and residual.is_contiguous() and joined is not None:
            # The bias as one more input column and the residual as cuBLAS's accumulator: both
            # sums in the matmul's epilogue, in place (H100, 262144 tokens 1280 -> 320: 0.43 ms
            # against 0.56 for the matmul and a separate add).
            hidden = geglu(x, bias_column=True)
            residual.view(-1, residual.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), joined.T)
            return residual
        hidden = geglu(x)
        if residual is None:
            return down(hidden)
        return linear_plus(hidden, down.weight, down.bias, residual, self.fused, out=out)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that runs the Triton kernel when `fused` is set (by optimize): ~3x faster than
    PyTorch's at these widths (320-1280 features over ~10^6 tokens)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and ops.runs_on(x) and ops.layer_norm_supported(x):
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class TransformerBlock(nn.Module):
    """x += Attn1(LN1(x)); x += Attn2(LN2(x), context); x += FF(LN3(x)).

    With `context_dim=None`, attn2 is a second self-attention (the temporal transformers).
    `ff_chunk_tokens` (None: off) runs LN3 + feed-forward over at most that many tokens at a
    time, bounding the 8x-wide GEGLU intermediate; the result is the same.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        # Registration order follows the checkpoint's key order (attn1, ff, attn2, norms).
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self.ff_chunk_tokens: int | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1,
                frames: int | None = None) -> torch.Tensor:
        """`frames`: x is frame-major and both attentions run along the frames (temporal)."""
        x = self.attn1(self.norm1(x), frames=frames, residual=x)
        return self.after_self_attention(x, context, context_repeats, frames)

    def after_self_attention(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1,
                             frames: int | None = None) -> torch.Tensor:
        """The block from its second attention on, x being `x + attn1(norm1(x))`: a spatial
        block's text-free start can then serve several text contexts."""
        x = self.attn2(self.norm2(x), context, context_repeats, frames=frames, residual=x)
        return self._feed_forward(x)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is attn2's fresh output, so the feed-forward's sum goes into it in place.
        tokens = x.contiguous().view(-1, x.shape[-1])  # (all tokens, dim)
        chunk = self.ff_chunk_tokens or max(tokens.shape[0], 1)
        for start in range(0, tokens.shape[0], chunk):
            part = tokens[start : start + chunk]
            self.ff(self.norm3(part), residual=part, out=part)
        return tokens.view(x.shape)


class PointwiseConv1d(nn.Module):
    """A kernel-size-1 Conv1d as stored in the checkpoint (weight `(out, in, 1)`), applied as a
    Linear over the last axis so token tensors need no channels-first transpose."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1))
        self.bias = nn.Parameter(torch.empty(out_channels))
        bound = 1.0 / math.sqrt(in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, :, 0], self.bias)


class SpatialTransformer(nn.Module):
    """GN - Linear - transformer block over the h*w tokens of each frame (cross-attention to the
    text) - Linear - plus input."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim=context_dim)])
        self.proj_out = nn.Linear(inner, channels)
        self.chunk_tokens: int | None = None
        self.fused = False  # see `linear_plus` (set by optimize)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w); context: (b, M, context_dim), shared by the f frames of a video.

        With `chunk_tokens` set, runs over whole frames of one video at a time, at most that many
        tokens (at least one frame): every step here is per frame, so the result is the same with
        a fraction of the transient memory.
        """
        return self.finish(x, None, context, num_frames)

    def text_free_start(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The layers before the cross-attention (norm, proj_in, self-attention), which every
        text context shares: their tokens ((b f), h*w, inner) for `finish`."""
        passes = self._frame_passes(x, num_frames)
        if len(passes) == 1:
            return self._start_frames(x)
        tokens = None
        for _, first, count in passes:
            part = self._start_frames(x[first : first + count])
            if tokens is None:
                tokens = part.new_empty((x.shape[0], *part.shape[1:]))
            tokens[first : first + count] = part
        return tokens

    def finish(self, x: torch.Tensor, tokens: torch.Tensor | None, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """`forward(x, context, num_frames)` from the tokens of `text_free_start(x, num_frames)`
        (left unchanged, for the next context), or with tokens=None computing them pass by pass."""

        def run(frames: slice, context: torch.Tensor, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
            # No local name for the start tokens: `_finish_frames` drops them once it has used them.
            return self._finish_frames(x[frames], self._start_frames(x[frames]) if tokens is None else tokens[frames],
                                       context, count, out=out)

        passes = self._frame_passes(x, num_frames)
        if len(passes) == 1:
            return run(slice(None), context, num_frames)
        out = torch.empty_like(x)
        for item, first, count in passes:
            frames = slice(first, first + count)
            run(frames, context[item : item + 1], count, out=out[frames])
        return out

    def _frame_passes(self, x: torch.Tensor, num_frames: int) -> list[tuple[int, int, int]]:
        """(video, first frame, frame count) of each pass: whole frames of one video, at most
        `chunk_tokens` tokens (at least one frame); one pass over everything when unchunked."""
        pixels = x.shape[2] * x.shape[3]
        step = num_frames if self.chunk_tokens is None else max(1, self.chunk_tokens // pixels)
        if step >= num_frames:
            return [(0, 0, x.shape[0])]
        return [(item, item * num_frames + start, min(step, num_frames - start))
                for item in range(x.shape[0] // num_frames) for start in range(0, num_frames, step)]

    def _start_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Norm, proj_in and the self-attention on frames x ((b f), c, h, w) -> ((b f), h*w, inner)."""
        bf, c, h, w = x.shape
        tokens = self.norm(x)
        tokens = tokens.permute(0, 2, 3, 1).reshape(bf, h * w, c)  # ((b f), h*w, c)
        tokens = self.proj_in(tokens)
        block = self.transformer_blocks[0]
        return block.attn1(block.norm1(tokens), residual=tokens)

    def _finish_frames(self, x: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor, num_frames: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of the block on frames x with their `_start_frames` tokens; the result is
        written into `out` (x's shape and layout) if given."""
        bf, c, h, w = x.shape
        tokens = self.transformer_blocks[0].after_self_attention(tokens, context, context_repeats=num_frames)
        if x.is_contiguous(memory_format=torch.channels_last):
            # Channels-last frames are token-major in memory: ((b f), c, h, w) -> ((b f), h*w, c) views
            residual = x.permute(0, 2, 3, 1).view(bf, h * w, c)
            target = None if out is None else out.permute(0, 2, 3, 1).view(bf, h * w, c)
            y = linear_plus(tokens, self.proj_out.weight, self.proj_out.bias, residual, self.fused, out=target)
            return y.view(bf, h, w, c).permute(0, 3, 1, 2)
        tokens = self.proj_out(tokens)
        # ((b f), h*w, c) -> ((b f), c, h, w) as a strided view; the add writes a contiguous result
        if out is None:
            return x + tokens.view(bf, h, w, c).permute(0, 3, 1, 2)
        return torch.add(x, tokens.view(bf, h, w, c).permute(0, 3, 1, 2), out=out)


class TemporalTransformer(nn.Module):
    """GN over all frames - 1x1 conv - transformer block over the f frames of each pixel (both
    attentions are self-attention, no positional encoding) - 1x1 conv - plus input."""

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = PointwiseConv1d(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim=None)])
        self.proj_out = PointwiseConv1d(inner, channels)
        # Set by optimize: keep channels-last frames in their memory order (frame-major tokens)
        # instead of transposing to one sequence per pixel and back (two full copies).
        self.frame_major = False
        self.chunk_tokens: int | None = None
        self.fused = False  # see `linear_plus` (set by optimize)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w) -> same shape."""
        bf, c, h, w = x.shape
        b, f = bf // num_frames, num_frames
        # ((b f), c, h, w) -> (b, c, f, h, w) view: GroupNorm statistics span all frames of a clip
        video = x.reshape(b, f, c, h, w).transpose(1, 2)
        if self.frame_major and x.permute(0, 2, 3, 1).is_contiguous():
            table = self.norm.fused_table(video)
            if table is not None:
                # Each pixel range is normalised as it is gathered: no full-size normalised copy
                return self._frame_major(x, None, num_frames, table)
        normed = self.norm(video)
        if self.frame_major and normed.permute(0, 2, 3, 4, 1).is_contiguous() and x.permute(0, 2, 3, 1).is_contiguous():
            return self._frame_major(x, normed, num_frames)
        # (b, c, f, h, w) -> ((b h w), f, c): one sequence of f frames per pixel
        tokens = normed.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)
        tokens = self.proj_in(tokens)
        tokens = self.transformer_blocks[0](tokens)
        tokens = self.proj_out(tokens)
        # ((b h w), f, c) -> (b, f, c, h, w) view; the add writes the per-frame layout
        residual = tokens.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2)
        return (x.reshape(b, f, c, h, w) + residual).reshape(bf, c, h, w)

    def _frame_major(self, x: torch.Tensor, normed: torch.Tensor | None, num_frames: int,
                     table: torch.Tensor | None = None) -> torch.Tensor:
        """forward for channels-last frames, in their memory order: tokens stay frame-major (the
        attention reads each pixel's frames by stride) and run in pixel ranges of at most
        `chunk_tokens` tokens (all frames of each pixel together), which bounds the ~7 full-size
        transients of the block (q, k, v, ...) at the same result. The normalised input is
        `normed`, or (normed=None) x normalised per pixel range with the GroupNorm factors
        `table` (`GroupNorm32.fused_table`)."""
        bf, c, h, w = x.shape
        b, f = bf // num_frames, num_frames
        pixels = h * w
        step = pixels if self.chunk_tokens is None else max(1, min(pixels, self.chunk_tokens // f))
        # memory (b, f, h, w, c) -> (b, f, h*w, c) views of the input, the normed input and the output
        x_tokens = x.permute(0, 2, 3, 1).view(b, f, pixels, c)
        normed_tokens = None if normed is None else normed.permute(0, 2, 3, 4, 1).reshape(b, f, pixels, c)
        out = torch.empty_like(x)
        out_tokens = out.permute(0, 2, 3, 1).view(b, f, pixels, c)
        for item in range(b):
            for start in range(0, pixels, step):
                cols = slice(start, min(start + step, pixels))
                count = cols.stop - cols.start
                # (f, count, c) strided view -> (1, f*count, c) frame-major tokens (gathered by
                # the normalisation, or by the Linear)
                if normed_tokens is None:
                    gathered = ops.group_norm_rows(x_tokens[item, :, cols], table[item])
                else:
                    gathered = normed_tokens[item, :, cols]
                tokens = self.proj_in(gathered.reshape(1, f * count, c))
                tokens = self.transformer_blocks[0](tokens, frames=f)
                linear_plus(tokens, self.proj_out.weight[:, :, 0], self.proj_out.bias, x_tokens[item, :, cols],
                            self.fused, out=out_tokens[item, :, cols])
        return out

