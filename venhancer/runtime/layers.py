"""Fast twins of the convolutional layers of `venhancer.models.layers`: the same parameters and
state-dict keys (`optimize_for_inference` swaps a module's class for its twin), forwards that
fold SiLU into the GroupNorm before it and conv biases into the next norm or residual sum, run
the Triton ops of `venhancer.runtime.ops`, and bound transients with frame chunks. Each twin reads
its `settings` (a `RuntimeSettings`) at call time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from venhancer.models.layers import GroupNorm32, ResBlock, TemporalConvBlock, Upsample, frames_to_video, video_to_frames

from . import ops
from .settings import RuntimeSettings

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, silu: bool) -> torch.Tensor:
    """GroupNorm (statistics in float32) optionally followed by SiLU, cast back to x's dtype."""
    out = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


class FastGroupNorm(GroupNorm32):
    """GroupNorm32 that can take over the SiLU after it (`apply_silu`, set when the optimizer
    drops that SiLU module) and a per-channel add before it, on the Triton kernel where the
    input's layout allows."""

    settings: RuntimeSettings
    apply_silu: bool = False

    def _takes_kernels(self, x: torch.Tensor) -> bool:
        return self.settings.fused_kernels and ops.runs_on(x) and ops.group_norm_supported(x, self.num_groups)

    def fused_table(self, x: torch.Tensor) -> torch.Tensor | None:
        """Where the Triton kernels take x (and no SiLU follows): this norm as per-channel factors
        of each item, `ops.group_norm_table`, for `ops.group_norm_rows` to apply to parts of x;
        else None."""
        if self.apply_silu or not self._takes_kernels(x):
            return None
        return ops.group_norm_table(x, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise `x`, or `x + add` for `add` of shape (n, c) broadcast over the positions."""
        if self._takes_kernels(x):
            return ops.group_norm(x, self.weight, self.bias, self.eps, self.apply_silu, add=add)
        if add is not None:
            x = x + add.to(x.dtype).reshape(*add.shape, *([1] * (x.ndim - 2)))
        if x.dtype in _HALF_DTYPES or self.apply_silu:
            return _group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, self.apply_silu)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def conv_without_bias(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The convolution of `conv` without its bias (added by a later fused step)."""
    return conv._conv_forward(x, conv.weight, None)


def shortcut_without_bias(shortcut: nn.Module | None, x: torch.Tensor,
                          bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual block's shortcut (None or Identity: x itself; else a convolution) without its
    bias, and `bias` plus that bias (in float32) for the residual sum to add: no pass of its own
    over the activations for the shortcut convolution's bias."""
    if shortcut is None or isinstance(shortcut, nn.Identity):
        return x, bias
    if isinstance(shortcut, (nn.Conv2d, nn.Conv3d)) and shortcut.bias is not None:
        return conv_without_bias(shortcut, x), bias.float() + shortcut.bias.float()
    return shortcut(x), bias


def channel_bias(bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel (axis 1) bias in `like`'s dtype, shaped to broadcast against it."""
    return bias.to(like.dtype).reshape(-1, *([1] * (like.ndim - 2)))


def add_with_channel_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor,
                          scale: torch.Tensor | None = None) -> torch.Tensor:
    """a + b + bias (per channel, axis 1), or with `scale` (one element) a + scale * (b + bias):
    one Triton pass where the layouts allow."""
    if ops.runs_on(a) and ops.add_supported(a, b):
        return ops.add_with_bias(a, b, bias, scale)
    bias = channel_bias(bias, a)
    return a + b + bias if scale is None else a + scale.to(a.dtype) * (b + bias)


def in_frame_chunks(fn, chunk: int | None, *inputs) -> torch.Tensor:
    """fn(*inputs) for a per-frame fn, run over at most `chunk` frames (dim 0) at a time (None:
    all at once). Inputs are tensors or tuples of tensors, sliced alike; the pieces are written
    into one output with the first piece's dtype and memory layout."""
    frames = (inputs[0][0] if isinstance(inputs[0], tuple) else inputs[0]).shape[0]
    if chunk is None or chunk >= frames:
        return fn(*inputs)
    out = None
    for start in range(0, frames, chunk):
        rows = slice(start, start + chunk)
        part = fn(*(tuple(t[rows] for t in x) if isinstance(x, tuple) else x[rows] for x in inputs))
        if out is None:
            channels_last = part.is_contiguous(memory_format=torch.channels_last) and not part.is_contiguous()
            layout = torch.channels_last if channels_last else torch.contiguous_format
            out = torch.empty((frames, *part.shape[1:]), dtype=part.dtype, device=part.device, memory_format=layout)
        out[rows] = part
        del part  # not held while the next piece is computed
    return out


def _concat_channels(parts) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)


class FastTemporalConvBlock(TemporalConvBlock):
    settings: RuntimeSettings

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if not self.settings.fused_kernels:
            return super().forward(x, num_frames)
        video = frames_to_video(x, num_frames)  # ((b f), c, h, w) -> (b, c, f, h, w)
        # Each convolution's bias is added by the norm of the next stage, the last one's by the
        # residual sum: the same sums without a separate pass over the activations for each bias.
        h, bias = video, None
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            norm, *between, conv = stage  # GN, SiLU (Identity once folded) [, Identity], Conv3d
            h = norm(h, add=None if bias is None else bias.expand(h.shape[0], -1))
            for layer in between:
                h = layer(h)
            h = conv_without_bias(conv, h)
            bias = conv.bias
        return video_to_frames(add_with_channel_bias(video, h, bias))


class FastResBlock(ResBlock):
    """ResBlock whose input may be a tuple of tensors to concatenate along the channels (the
    decoder's x and skip: concatenated per frame chunk, never all at once), whose per-frame part
    runs over `conv_frame_chunk` frames at a time (`concat_frame_chunk` for concatenated
    inputs), with the time embedding added by the norm and conv biases folded into later sums."""

    settings: RuntimeSettings

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor], emb: torch.Tensor,
                num_frames: int) -> torch.Tensor:
        """x: ((b f), c_in, h, w) or a tuple of such tensors; emb: ((b f), embed_dim). A list is
        the caller's last reference to its tensors: it is emptied, so that they are freed once the
        per-frame part has read them, before the temporal convolutions' transients exist (at 40
        frames of the decoder's level 0: 3 GB)."""
        if isinstance(x, list):
            parts = tuple(x)
            x.clear()
        else:
            parts = x if isinstance(x, tuple) else (x,)
        chunks = [self.settings.conv_frame_chunk] + ([self.settings.concat_frame_chunk] if len(parts) > 1 else [])
        chunk = min((c for c in chunks if c is not None), default=None)
        emb_out = self.emb_layers(emb)  # ((b f), c_out)
        h = in_frame_chunks(lambda p, e: self._per_frame(_concat_channels(p), e), chunk, parts, emb_out)
        del parts
        return self.temopral_conv(h, num_frames)

    def _per_frame(self, x: torch.Tensor, emb_out: torch.Tensor) -> torch.Tensor:
        """Everything before the temporal convolutions: each frame on its own (GroupNorm of a
        4-D input normalises every frame separately)."""
        in_norm, in_act, in_conv = self.in_layers
        out_norm, out_act, _, out_conv = self.out_layers
        h = in_act(in_norm(x))
        if not self.settings.fused_kernels:
            h = in_conv(h)
            # The norm adds the embedding itself: one pass over h instead of two.
            h = out_act(out_norm(h, add=emb_out))
            return self.skip_connection(x) + out_conv(h)
        # The convolutions' biases join the adds that follow them (the norm's per-channel add,
        # the residual sum) instead of a pass of their own over the activations.
        h = conv_without_bias(in_conv, h)
        h = out_act(out_norm(h, add=emb_out + in_conv.bias.to(emb_out.dtype)))
        shortcut, bias = shortcut_without_bias(self.skip_connection, x, out_conv.bias)
        return add_with_channel_bias(shortcut, conv_without_bias(out_conv, h), bias)


# Nearest x2 upsampling followed by a 3x3 convolution, as one transposed convolution of stride 2:
# output pixel 2i+a sees input pixels i-1, i (a=0) or i, i+1 (a=1), each weighted by the sum of the
# 3x3 taps that land on its copy. Row k of this matrix says which taps feed kernel row k of the
# 4x4 transposed kernel (padding 1: kernel index k = output - 2 * input + 1).
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsample_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """conv2d weight (c_out, c_in, 3, 3) -> conv_transpose2d weight (c_in, c_out, 4, 4) such that
    conv_transpose2d(x, kernel, stride=2, padding=1) == conv2d(nearest_x2(x), weight, padding=1).
    Taps are summed in at least float32 and rounded once to the weight's dtype; the kernel
    takes the weight's memory layout (channels-last for cuDNN's NHWC kernels once optimized)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    taps = torch.tensor(_UPSAMPLE_TAPS, dtype=dtype, device=weight.device)
    kernel = torch.einsum("ya,oiab,xb->ioyx", taps, weight.to(dtype), taps)
    layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return kernel.to(weight.dtype).contiguous(memory_format=layout)


class DerivedWeight:
    """`derive(weight)` for a parameter, made on first use and again whenever the weight is
    replaced or changed in place (as `load_state_dict` does); held outside the state dict, so
    checkpoints load unchanged. For weights that an optimized kernel reads rearranged."""

    def __init__(self, derive):
        self._derive = derive
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        if self._key != key:
            self._value = self._derive(weight)
            self._key = key
        return self._value


class FastUpsample(Upsample):
    """Upsample over `conv_frame_chunk` frames at a time (the 4x larger interpolated input is then
    only ever held for a few frames), with `transposed_upsample` as one transposed convolution
    (`upsample_conv_kernel`): 4/9 of the multiply-adds and no interpolated copy."""

    settings: RuntimeSettings

    def setup(self) -> None:
        if not hasattr(self, "_transposed_kernel"):
            self._transposed_kernel = DerivedWeight(upsample_conv_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transposed = self.settings.transposed_upsample and x.shape[-2] >= 2
        return in_frame_chunks(self._upsample_transposed if transposed else self._upsample, self.settings.conv_frame_chunk, x)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        return Upsample.forward(self, x)

    def _upsample_transposed(self, x: torch.Tensor) -> torch.Tensor:
        # Padding 2 along the rows drops the first and last upsampled row, as the crop does. The
        # crop also puts the convolution's zero padding right next to the first and last kept
        # rows, which the transposed kernel would fill with the dropped copies: those two output
        # rows are recomputed the plain way from the two input rows they depend on.
        out = F.conv_transpose2d(x, self._transposed_kernel(self.conv.weight), self.conv.bias, stride=2, padding=(2, 1))
        out[:, :, :1] = self._upsample(x[:, :, :2])[:, :, :1]
        out[:, :, -1:] = self._upsample(x[:, :, -2:])[:, :, -1:]
        return out
