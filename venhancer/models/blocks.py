"""The encoder / middle / decoder block lists shared by the UNet and the video ControlNet.

Each block is a `UNetBlock`: an indexed list of layers (the indices are part of the checkpoint
keys, e.g. `input_blocks.4.1.proj_in.weight`) run in order, each layer given the inputs it needs.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import SpatialTransformer, TemporalTransformer
from .config import UNetConfig
from .layers import Downsample, ResBlock, Upsample


class UNetBlock(nn.ModuleList):
    """Layers applied in order to per-frame activations `((b f), c, h, w)`."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """emb: ((b f), embed_dim) per-frame embedding; context: (b, M, context_dim) text."""
        for layer in self:
            x = self.run_layer(layer, x, emb, context, num_frames)
        return x

    @staticmethod
    def run_layer(layer: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                  num_frames: int) -> torch.Tensor:
        """One layer, given the inputs its kind takes."""
        if isinstance(layer, ResBlock):
            return layer(x, emb, num_frames)
        if isinstance(layer, SpatialTransformer):
            return layer(x, context, num_frames)
        if isinstance(layer, TemporalTransformer):
            return layer(x, num_frames)
        return layer(x)  # Conv2d, Upsample


class DownsampleBlock(Downsample):
    """A Downsample that is an encoder block on its own: the checkpoint stores it without a list
    index (`input_blocks.3.op.weight`), so it takes the block call signature directly."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None, num_frames: int | None = None) -> torch.Tensor:
        return self.op(x)


def _attention_layers(config: UNetConfig, channels: int) -> list[nn.Module]:
    heads = channels // config.head_dim
    return [
        SpatialTransformer(channels, heads, config.head_dim, config.context_dim),
        TemporalTransformer(channels, heads, config.head_dim),
    ]


def build_encoder(config: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """`input_blocks` and the channel count of every block's output (the skips), in order."""
    dim = config.dim
    # Block 0: stem conv, then a temporal transformer num_heads x head_dim wide (512 on 320
    # channels in the full model), unlike the later ones whose width equals their channels.
    blocks = nn.ModuleList(
        [UNetBlock([nn.Conv2d(config.in_dim, dim, 3, padding=1), TemporalTransformer(dim, config.num_heads, config.head_dim)])]
    )
    skip_channels = [dim]
    channels = dim
    for level, width in enumerate(config.widths):
        for _ in range(config.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(channels, width, config.embed_dim)]
            channels = width
            if config.level_has_attention(level):
                layers += _attention_layers(config, channels)
            blocks.append(UNetBlock(layers))
            skip_channels.append(channels)
        if level != len(config.widths) - 1:
            blocks.append(DownsampleBlock(channels))
            skip_channels.append(channels)
    return blocks, skip_channels


def build_middle(config: UNetConfig) -> UNetBlock:
    channels = config.widths[-1]
    return UNetBlock(
        [
            ResBlock(channels, channels, config.embed_dim),
            *_attention_layers(config, channels),
            ResBlock(channels, channels, config.embed_dim),
        ]
    )


def build_decoder(config: UNetConfig, skip_channels: list[int]) -> nn.ModuleList:
    """`output_blocks`: per level (deepest first) num_res_blocks+1 blocks, each taking the
    concatenation of x and one skip (popped last-in first-out), upsampling at the end of every
    level but the shallowest."""
    skips = list(skip_channels)
    blocks = nn.ModuleList()
    channels = config.widths[-1]
    num_levels = len(config.widths)
    for level in reversed(range(num_levels)):
        width = config.widths[level]
        for i in range(config.num_res_blocks + 1):
            layers: list[nn.Module] = [ResBlock(channels + skips.pop(), width, config.embed_dim)]
            channels = width
            if config.level_has_attention(level):
                layers += _attention_layers(config, channels)
            if level != 0 and i == config.num_res_blocks:
                layers.append(Upsample(channels))
            blocks.append(UNetBlock(layers))
    return blocks
