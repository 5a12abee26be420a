"""Inference settings that change how the network runs, never what it computes.

`optimize_for_inference` rewires a loaded `VEnhancerUNet` in place:
- SiLU folded into the GroupNorm before it, the ResBlocks' time-embedding add and the conv
  biases folded into the GroupNorm or residual add after them (the ControlNet's zero
  convolutions' biases into the UNet's skip sums), and on CUDA Triton kernels for
  GroupNorm(+SiLU), LayerNorm, the GEGLU gate and bias+residual adds, and for the narrow
  Linears a matmul with the GEGLU gate or the residual add in its epilogue (`venhancer.models.kernels`);
- channels-last weights, so convolutions run in cuDNN's native NHWC layout and the per-frame
  activations keep one layout through convs, norms, the spatial transformers (whose token view
  becomes free), the temporal convs (a channels-last-3d view of the same memory) and the
  temporal transformers (frame-major tokens; on CUDA one Triton kernel attends over each
  pixel's frames by stride and writes the frame-major output directly);
- self-attention's q/k/v projections as one matmul (the three weights become views of one);
- the feed-forward's down-projection as one in-place cuBLAS matmul that also adds its bias (as an
  input column: weight and bias become views of one matrix) and the residual (as the accumulator);
- the decoder's upsampling as one transposed convolution (`layers.upsample_conv_kernel`);
- the SDPA kernel picked per sequence length, and on Hopper-class GPUs the spatial
  self-attentions in a Triton flash-attention kernel (`kernels.flash_attention`);
- the transformers' feed-forward over bounded token chunks, the spatial transformers and the
  decoder ResBlocks that concatenate a skip (and, optionally, every ResBlock's per-frame part and
  the upsampling) over a few frames at a time (lower peak memory, same result);
  `InferenceOptions.low_vram()` makes all of these passes small;
- the guidance branches (`VEnhancerUNet.forward_branches`) sharing the first spatial
  transformer's self-attention as well as the layers before it.
Parameter names and values are untouched, so checkpoints still load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import (GEGLU, Attention, FeedForward, LayerNorm, SpatialTransformer, TemporalTransformer, TransformerBlock,
                        set_tuned_sdpa)
from .controlnet import VideoControlNet
from .layers import GroupNorm32, ResBlock, TemporalConvBlock, Upsample
from .unet import VEnhancerUNet


@dataclass(frozen=True)
class InferenceOptions:
    channels_last: bool = True
    fused_kernels: bool = True
    tuned_attention: bool = True
    # Self-attention's q, k and v from one matmul (`Attention.fuse_projections`).
    fused_projections: bool = True
    # With fused_kernels, the temporal attention as one Triton kernel over frame-major tokens
    # (`kernels.frame_attention`) instead of SDPA on strided views plus a copy of its output.
    frame_attention_kernel: bool = True
    # With fused_kernels, on Hopper-class GPUs, the long spatial self-attentions in one Triton
    # flash-attention kernel (`kernels.flash_attention`) instead of cuDNN's through SDPA.
    flash_attention_kernel: bool = True
    # Tokens per feed-forward chunk; at level 0 of a 31-frame 162x240 window one chunk of
    # 2**18 tokens has a 2.7 GB GEGLU intermediate in fp16 instead of 12 GB unchunked.
    ff_chunk_tokens: int | None = 2**18
    # Tokens per spatial-transformer pass, in whole frames (at least one): bounds its q/k/v and
    # MLP transients (~1 GB per 320-channel tensor at 31 frames of 162x240). At the seed clip's
    # size: 8 frames per pass at level 0, all 31 frames at once at the deeper levels (there, 8
    # frames per pass ran the 40-frame window 1% slower, at the same peak memory; H100).
    spatial_chunk_tokens: int | None = 320_000
    # Tokens (frames x pixels) per temporal-transformer pass in the channels-last layout: at
    # level 0 of a 40-frame window (1.6M tokens) its ~7 full-size transients held ~7 GB at once.
    temporal_chunk_tokens: int | None = 2**19
    # Frames per pass of the per-frame convolution stages (None: all at once): the ResBlocks'
    # first part, the decoder's skip concatenation included, and the upsampling. Bounds the
    # largest transients of the network (a 40-frame level-0 ResBlock input is 3 GB in fp16).
    conv_frame_chunk: int | None = None
    # Frames per pass of just the decoder ResBlocks that concatenate a skip (the smaller of this
    # and conv_frame_chunk applies there). At 8: 40-frame window 23.6 -> 20.7 GB peak reserved
    # (the 3 GB concatenations and their normed copies fragmented the cache), 0.3% slower (H100).
    concat_frame_chunk: int | None = 8
    # `forward_branches` also computes the first spatial transformer's self-attention (UNet and
    # ControlNet) once for all guidance branches: 7% faster at the seed clip's size, its tokens
    # held meanwhile (two more level-0 activations, ~2 GB at 40 frames).
    share_self_attention: bool = True
    # The decoder's upsampling (nearest x2, crop, 3x3 conv) as one transposed convolution: same
    # sums with the taps that meet one input pixel pre-added, 4/9 of the multiply-adds.
    transposed_upsample: bool = True

    @classmethod
    def low_vram(cls) -> "InferenceOptions":
        """Smaller passes everywhere, for cards of ~16 GB: same result, lower peak memory, a
        little slower (see the README's measurements)."""
        return cls(ff_chunk_tokens=2**16, spatial_chunk_tokens=80_000, temporal_chunk_tokens=2**17, conv_frame_chunk=4)

    def __post_init__(self):
        for name in ("ff_chunk_tokens", "spatial_chunk_tokens", "temporal_chunk_tokens", "conv_frame_chunk", "concat_frame_chunk"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def optimize_for_inference(model: nn.Module, options: InferenceOptions | None = None) -> nn.Module:
    options = options or InferenceOptions()
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], GroupNorm32) and isinstance(module[i + 1], nn.SiLU):
                    module[i].apply_silu = True
                    module[i + 1] = nn.Identity()
        if isinstance(module, (GroupNorm32, GEGLU, LayerNorm, Attention, FeedForward, SpatialTransformer, TemporalTransformer)):
            module.fused = options.fused_kernels
        if isinstance(module, Attention):
            module.frame_kernel = options.fused_kernels and options.frame_attention_kernel
            module.flash_kernel = options.fused_kernels and options.flash_attention_kernel
        if isinstance(module, Attention) and module.self_attention:
            if not options.fused_projections:
                module.qkv_weight = None  # the Linears' weights stay views of it: same values
            elif module.qkv_weight is None:
                module.fuse_projections()
        if isinstance(module, FeedForward) and options.fused_kernels and module.down_with_bias is None:
            module.join_down_bias()
        if isinstance(module, (ResBlock, TemporalConvBlock, VideoControlNet)):
            module.fold_conv_bias = options.fused_kernels
        if isinstance(module, (ResBlock, Upsample)):
            module.frame_chunk = options.conv_frame_chunk
        if isinstance(module, ResBlock):
            module.concat_frame_chunk = options.concat_frame_chunk
        if isinstance(module, VEnhancerUNet):
            module.share_self_attention = options.share_self_attention
        if isinstance(module, Upsample):
            module.transposed = options.transposed_upsample
        if isinstance(module, TemporalTransformer):
            module.frame_major = options.channels_last
            module.chunk_tokens = options.temporal_chunk_tokens
        if isinstance(module, TransformerBlock):
            module.ff_chunk_tokens = options.ff_chunk_tokens
        if isinstance(module, SpatialTransformer):
            module.chunk_tokens = options.spatial_chunk_tokens
    set_conv_weight_layout(model, options.channels_last)
    set_tuned_sdpa(options.tuned_attention)
    return model


def set_conv_weight_layout(model: nn.Module, channels_last: bool) -> None:
    """Channels-last (-3d) or contiguous weights for every Conv2d / Conv3d in `model`: cuDNN's
    output follows the weights' layout, so this sets the activations' layout too."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            module.weight.data = module.weight.data.contiguous(memory_format=layout)
        if isinstance(module, nn.Conv3d):
            layout = torch.channels_last_3d if channels_last else torch.contiguous_format
            module.weight.data = module.weight.data.contiguous(memory_format=layout)
