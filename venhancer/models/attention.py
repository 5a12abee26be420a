"""Attention for the video UNet: the kernel choice, attention/feed-forward layers, and the
spatial (per-frame) and temporal (per-pixel) transformers.

This is the one place that decides how attention is computed: PyTorch's
`scaled_dot_product_attention` (default) or xformers' `memory_efficient_attention` when it is
installed and asked for (`set_attention_backend`).
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, sdpa=None) -> torch.Tensor:
    """Softmax attention on (B, N, heads, d) views (any strides, d contiguous) -> a (B, N, heads, d)
    tensor or view. `sdpa`: the function standing in for F.scaled_dot_product_attention (the
    runtime's per-length kernel order)."""
    if backend == "xformers":
        # xformers takes (batch, seq, heads, d) directly, no transposes needed
        return _xformers_ops.memory_efficient_attention(q, k, v)
    sdpa = sdpa or F.scaled_dot_product_attention
    # (B, N, heads, d) -> (B, heads, N, d) strided views; SDPA accepts them as they are
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, sdpa=None) -> torch.Tensor:
    """Multi-head softmax attention, scale 1/sqrt(head_dim).

    q: (B, N, heads*d); k, v: (B, M, heads*d) -> (B, N, heads*d). Long batches are cut into
    slices of at most MAX_ATTENTION_BATCH_HEADS // heads sequences. `sdpa`: see `_attend`.
    """
    batch, n, inner = q.shape
    m = k.shape[1]
    d = inner // heads
    backend = _backend_for(q.device)
    step = max(1, MAX_ATTENTION_BATCH_HEADS // heads)
    if batch <= step:
        o = _attend(q.reshape(batch, n, heads, d), k.reshape(batch, m, heads, d), v.reshape(batch, m, heads, d), backend, sdpa)
        # The fused kernels write (B, N, heads, d) memory: the merge of the heads is then free.
        return o.reshape(batch, n, inner)
    out = torch.empty((batch, n, inner), dtype=q.dtype, device=q.device)
    for start in range(0, batch, step):
        stop = min(start + step, batch)
        bs = stop - start
        # (bs, N, heads*d) -> (bs, N, heads, d): a free view for the contiguous projections
        o = _attend(q[start:stop].reshape(bs, n, heads, d), k[start:stop].reshape(bs, m, heads, d),
                    v[start:stop].reshape(bs, m, heads, d), backend, sdpa)
        out[start:stop].view(bs, n, heads, d).copy_(o)
    return out


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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1) -> torch.Tensor:
        """x: (B, N, query_dim). context: (B / context_repeats, M, context_dim) or None for
        self-attention; each context row serves `context_repeats` consecutive rows of x (one
        text context per video serves all its frames), so k/v are projected once per video."""
        q, k, v = self.project(x, context, context_repeats)
        out = attention(q, k, v, self.heads)
        return self.to_out[0](out)

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from x, k and v from the context (x for self-attention), each (B, *, inner)."""
        source = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(source)
        v = self.to_v(source)
        if context_repeats != 1:
            # (b, M, inner) -> ((b f), M, inner)
            k = k.repeat_interleave(context_repeats, dim=0)
            v = v.repeat_interleave(context_repeats, dim=0)
        return q, k, v


class GEGLU(nn.Module):
    """Linear to twice the hidden width, split into value and gate: value * gelu(gate)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(d -> 4d) then Linear(4d -> d); `net.1` was a Dropout (Identity keeps the indices)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geglu, _, down = self.net
        return down(geglu(x))


class TransformerBlock(nn.Module):
    """x += Attn1(LN1(x)); x += Attn2(LN2(x), context); x += FF(LN3(x)).

    With `context_dim=None`, attn2 is a second self-attention (the temporal transformers).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        # Registration order follows the checkpoint's key order (attn1, ff, attn2, norms).
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, context_repeats: int = 1) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_repeats)
        x = x + self.ff(self.norm3(x))
        return x


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

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w); context: (b, M, context_dim), shared by the f frames of a video."""
        bf, c, h, w = x.shape
        tokens = self.norm(x)
        tokens = tokens.permute(0, 2, 3, 1).reshape(bf, h * w, c)  # ((b f), c, h, w) -> ((b f), h*w, c)
        tokens = self.proj_in(tokens)
        tokens = self.transformer_blocks[0](tokens, context, context_repeats=num_frames)
        tokens = self.proj_out(tokens)
        return x + tokens.view(bf, h, w, c).permute(0, 3, 1, 2)  # ((b f), h*w, c) -> ((b f), c, h, w)


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

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c, h, w) -> same shape."""
        bf, c, h, w = x.shape
        b, f = bf // num_frames, num_frames
        # ((b f), c, h, w) -> (b, c, f, h, w) view: GroupNorm statistics span all frames of a clip
        video = x.reshape(b, f, c, h, w).transpose(1, 2)
        normed = self.norm(video)
        return self.attend_per_pixel(x, normed, num_frames)

    def attend_per_pixel(self, x: torch.Tensor, normed: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The layers after the norm, one sequence of frames per pixel: x ((b f), c, h, w) and
        its normalised (b, c, f, h, w) view -> x + the block's output."""
        bf, c, h, w = x.shape
        b, f = bf // num_frames, num_frames
        # (b, c, f, h, w) -> ((b h w), f, c): one sequence of f frames per pixel
        tokens = normed.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)
        tokens = self.proj_in(tokens)
        tokens = self.transformer_blocks[0](tokens)
        tokens = self.proj_out(tokens)
        # ((b h w), f, c) -> (b, f, c, h, w) view; the add writes the per-frame layout
        residual = tokens.reshape(b, h, w, f, c).permute(0, 3, 4, 1, 2)
        return (x.reshape(b, f, c, h, w) + residual).reshape(bf, c, h, w)
