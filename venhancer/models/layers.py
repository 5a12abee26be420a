"""Convolutional building blocks of the video UNet: normalisation, timestep embedding,
ResBlock with its temporal convolution, down- and upsampling.

Activations travel between blocks in per-frame layout `((b f), c, h, w)` (frame index fastest
inside each batch item); layers that mix frames take `num_frames` to undo the folding.
Attribute names follow the checkpoint's state-dict keys (including its `temopral_conv` typo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GROUP_NORM_GROUPS

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are always computed in float32.

    The reference ran in fp16 under autocast, where GroupNorm runs in fp32; a half-precision
    model would otherwise accumulate the mean/variance of ~10^6 elements in half precision.
    A 5-D input `(b, c, f, h, w)` gets statistics over all frames, as the temporal layers need.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(GROUP_NORM_GROUPS, num_channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _HALF_DTYPES:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`[cos(t * f), sin(t * f)]` with `f = 10000^(-i / (dim/2))`, shape `(len(t), dim)`.

    Always float32 (the reference computes it in float32 even under autocast; at t ~ 1000 the
    argument's rounding already differs between float32 and float64 by ~1e-4).
    """
    half = dim // 2
    t = t.to(torch.float32)
    exponents = -torch.arange(half, dtype=torch.float32, device=t.device).div(half)
    freqs = torch.pow(10000, exponents)
    args = torch.outer(t, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class EmbeddingMLP(nn.Sequential):
    """Linear(in, out) - SiLU - Linear(out, out); indices 0 and 2 match the checkpoint keys."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        # The sinusoid is built in float32; a half-precision model needs it cast (under autocast
        # this is the same cast autocast would do).
        return super().forward(sinusoid.to(self[0].weight.dtype))


def frames_to_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """((b f), c, h, w) -> (b, c, f, h, w) for GroupNorm over frames and Conv3d.

    Channels-last input becomes a channels-last-3d view (no copy: both keep channels
    innermost and frames outermost); otherwise a contiguous copy, which GroupNorm and Conv3d
    would make internally anyway.
    """
    bf, c, h, w = x.shape
    b = bf // num_frames
    if x.is_contiguous(memory_format=torch.channels_last):
        # memory (b f h w c) -> (b, f, h, w, c) -> (b, c, f, h, w)
        return x.permute(0, 2, 3, 1).view(b, num_frames, h, w, c).permute(0, 4, 1, 2, 3)
    return x.view(b, num_frames, c, h, w).permute(0, 2, 1, 3, 4).contiguous()


def video_to_frames(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> ((b f), c, h, w), a view for channels-last-3d input."""
    b, c, f, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        # memory (b f h w c) -> ((b f), h, w, c) -> ((b f), c, h, w) channels-last
        return x.permute(0, 2, 3, 4, 1).reshape(b * f, h, w, c).permute(0, 3, 1, 2)
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


class TemporalConvBlock(nn.Module):
    """Four GN - SiLU - Conv3d(3,1,1) stages mixing neighbouring frames, residual around all four.

    Index 2 of stages 2-4 held a Dropout in the checkpoint's layout; an Identity keeps the
    convolution at index 3 so the parameter names line up.
    """

    def __init__(self, channels: int):
        super().__init__()

        def stage(with_dropout_slot: bool) -> nn.Sequential:
            layers = [GroupNorm32(channels), nn.SiLU()]
            if with_dropout_slot:
                layers.append(nn.Identity())
            layers.append(nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0)))
            return nn.Sequential(*layers)

        self.conv1 = stage(with_dropout_slot=False)
        self.conv2 = stage(with_dropout_slot=True)
        self.conv3 = stage(with_dropout_slot=True)
        self.conv4 = stage(with_dropout_slot=True)


    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        video = frames_to_video(x, num_frames)  # ((b f), c, h, w) -> (b, c, f, h, w)
        h = self.conv1(video)
        h = self.conv2(h)
        h = self.conv3(h)
        h = self.conv4(h)
        return video_to_frames(video + h)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added in between, a skip, then a
    temporal convolution block over the frames."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_channels))
        # Index 2 was a Dropout; Identity keeps the conv at index 3 for the checkpoint keys.
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        if in_channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)
        self.temopral_conv = TemporalConvBlock(out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: ((b f), c_in, h, w); emb: ((b f), embed_dim)."""
        in_norm, in_act, in_conv = self.in_layers
        out_norm, out_act, _, out_conv = self.out_layers
        h = in_conv(in_act(in_norm(x)))
        emb_out = self.emb_layers(emb).to(h.dtype)  # ((b f), c_out)
        h = h + emb_out[:, :, None, None]
        h = out_conv(out_act(out_norm(h)))
        h = self.skip_connection(x) + h
        return self.temopral_conv(h, num_frames)


class Downsample(nn.Module):
    """3x3 stride-2 convolution padded by 2 rows and 1 column (a reference quirk: the extra
    rows are why latent heights must be 2 mod 8)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, drop the first and last row (undoing Downsample's extra rows), 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = x[..., 1:-1, :]  # (n, c, 2h, 2w) -> (n, c, 2h-2, 2w)
        return self.conv(x)
