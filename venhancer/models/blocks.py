"""The encoder / middle / decoder block lists shared by the UNet and the video ControlNet.

Each block is a `UNetBlock`: an indexed list of layers (the indices are part of the checkpoint
keys, e.g. `input_blocks.4.1.proj_in.weight`) run in order, each layer given the inputs it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import SpatialTransformer, TemporalTransformer
from .config import UNetConfig
from .layers import Downsample, ResBlock, Upsample


class UNetBlock(nn.ModuleList):
    """Layers applied in order to per-frame activations `((b f), c, h, w)`."""

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...], emb: torch.Tensor, context: torch.Tensor | None,
                num_frames: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """emb: ((b f), embed_dim) per-frame embedding; context: (b, M, context_dim) text.
        A decoder block gets x as (x, skip): its first layer, a ResBlock, concatenates them.
        `start`/`stop` run only layers [start, stop) (a block split around its first text layer)."""
        for layer in list(self)[start:stop]:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, num_frames)
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, num_frames)
            else:  # Conv2d, Upsample
                x = layer(x)
        return x

    def text_free_layers(self) -> int:
        """How many leading layers do not read the text context (all of them: len(self))."""
        return next((i for i, layer in enumerate(self) if isinstance(layer, SpatialTransformer)), len(self))


class DownsampleBlock(Downsample):
    """A Downsample that is an encoder block on its own: the checkpoint stores it without a list
    index (`input_blocks.3.op.weight`), so it takes the block call signature directly."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None, num_frames: int | None = None) -> torch.Tensor:
        return self.op(x)


@dataclass
class EncoderState:
    """An encoder run up to its first text-reading layer: layer `layer` of block `block` (a
    SpatialTransformer) comes next, on per-frame activations x `((b f), c, h, w)` with embedding
    emb `((b f), E)`. `tokens`: that transformer's text-free start on x (its `text_free_start`),
    or None to run it whole. `outputs`: what was kept of each completed block (ControlNet
    residuals, or UNet skips)."""

    x: torch.Tensor
    emb: torch.Tensor
    num_frames: int
    outputs: list[torch.Tensor]
    block: int
    layer: int
    tokens: torch.Tensor | None = None


def encode_text_free(blocks: nn.ModuleList, x: torch.Tensor, emb: torch.Tensor, num_frames: int, first: int,
                     keep: Callable[[int, torch.Tensor], torch.Tensor], outputs: list[torch.Tensor],
                     self_attention: bool = False) -> EncoderState:
    """Run encoder blocks[first:] up to the first layer that reads the text context. Everything
    before it is the same for every guidance branch, so it can be computed once for all of them.
    keep(index, x) gives what to append to `outputs` for each completed block. `self_attention`:
    also run the text-free start of that layer (a SpatialTransformer's self-attention), at the
    cost of holding its tokens too."""
    for index in range(first, len(blocks)):
        block = blocks[index]
        layers = block.text_free_layers() if isinstance(block, UNetBlock) else None
        if layers is not None and layers < len(block):
            x = block(x, emb, None, num_frames, stop=layers)
            tokens = block[layers].text_free_start(x, num_frames) if self_attention else None
            return EncoderState(x, emb, num_frames, outputs, index, layers, tokens)
        x = block(x, emb, None, num_frames)
        outputs.append(keep(index, x))
    raise ValueError("the encoder has no layer that reads the text context")


def encode_rest(blocks: nn.ModuleList, state: EncoderState, context: torch.Tensor,
                keep: Callable[[int, torch.Tensor], None], consume: bool = False) -> torch.Tensor:
    """The encoder blocks from `state` on, with one text context; keep(index, x) is called after
    each block. Returns the last block's output. `consume`: the state's last use; its activation
    is dropped from it, to be freed once the next layer has used it."""
    x, tokens = state.x, state.tokens
    if consume:
        state.x = state.tokens = None
    block, start = blocks[state.block], state.layer
    if tokens is not None:
        x = block[start].finish(x, tokens, context, state.num_frames)
        del tokens
        start += 1
    x = block(x, state.emb, context, state.num_frames, start=start)
    keep(state.block, x)
    for index in range(state.block + 1, len(blocks)):
        x = blocks[index](x, state.emb, context, state.num_frames)
        keep(index, x)
    return x


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
