"""`optimize_for_inference`: make a loaded plain network fast in place, same function.

Each layer with a fast twin (`venhancer.runtime.layers`, `.transformer`, `.branches`) has its
class swapped for the twin, which keeps its parameters, buffers and state-dict keys (checkpoints
still load strictly) and reads one shared `RuntimeSettings` at call time. Besides the swap:
- SiLU modules after a GroupNorm are folded into it (an Identity keeps the indices);
- self-attention's q/k/v weights become views of one stacked matrix (`fused_projections`), the
  feed-forward's down-projection weight and bias views of one [W | b | 0] matrix (fused kernels);
- convolution weights, hence activations, go channels-last (`channels_last`).
Calling it again with other settings switches the model to them (the benchmarks' ablations).
"""

from __future__ import annotations

import torch
from torch import nn

from venhancer.models.attention import (
    GEGLU,
    Attention,
    FeedForward,
    SpatialTransformer,
    TemporalTransformer,
    TransformerBlock,
)
from venhancer.models.blocks import UNetBlock
from venhancer.models.controlnet import VideoControlNet
from venhancer.models.layers import GroupNorm32, ResBlock, TemporalConvBlock, Upsample
from venhancer.models.unet import VEnhancerUNet

from .branches import FastUNetBlock, FastVEnhancerUNet, FastVideoControlNet
from .layers import FastGroupNorm, FastResBlock, FastTemporalConvBlock, FastUpsample
from .settings import InferenceOptions, RuntimeSettings
from .transformer import (
    FastAttention,
    FastFeedForward,
    FastGEGLU,
    FastLayerNorm,
    FastSpatialTransformer,
    FastTemporalTransformer,
    FastTransformerBlock,
)

# Plain class -> fast twin (exact types: a subclass of a plain class is left alone).
FAST_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    GroupNorm32: FastGroupNorm,
    nn.LayerNorm: FastLayerNorm,
    GEGLU: FastGEGLU,
    FeedForward: FastFeedForward,
    Attention: FastAttention,
    TransformerBlock: FastTransformerBlock,
    SpatialTransformer: FastSpatialTransformer,
    TemporalTransformer: FastTemporalTransformer,
    ResBlock: FastResBlock,
    TemporalConvBlock: FastTemporalConvBlock,
    Upsample: FastUpsample,
    UNetBlock: FastUNetBlock,
    VideoControlNet: FastVideoControlNet,
    VEnhancerUNet: FastVEnhancerUNet,
}
_TWIN_CLASSES = frozenset(FAST_TWINS.values())

__all__ = ["FAST_TWINS", "InferenceOptions", "RuntimeSettings", "fast_group_norm", "make_fast", "optimize_for_inference",
           "set_conv_weight_layout"]


def make_fast(module: nn.Module, settings: RuntimeSettings) -> nn.Module:
    """Swap `module`'s class for its fast twin (if it has one) and give it `settings`."""
    twin = FAST_TWINS.get(type(module))
    if twin is not None:
        module.__class__ = twin
    if type(module) in _TWIN_CLASSES:
        module.settings = settings
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup()
    return module


def fast_group_norm(norm: nn.GroupNorm, settings: RuntimeSettings | None = None) -> FastGroupNorm:
    """A FastGroupNorm with `norm`'s parameters (values copied), for models built elsewhere (the
    VAE's diffusers GroupNorms)."""
    fast = GroupNorm32(norm.num_channels, eps=norm.eps).to(norm.weight)
    fast.load_state_dict(norm.state_dict())
    return make_fast(fast, settings or RuntimeSettings())


def optimize_for_inference(model: nn.Module, settings: RuntimeSettings | None = None) -> nn.Module:
    """Make `model` (a VEnhancerUNet, or any module built from its layers) fast in place; returns it."""
    settings = settings or RuntimeSettings()
    for module in model.modules():
        make_fast(module, settings)
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], FastGroupNorm) and isinstance(module[i + 1], nn.SiLU):
                    module[i].apply_silu = True
                    module[i + 1] = nn.Identity()
        if isinstance(module, FastAttention) and module.self_attention:
            if not settings.fused_projections:
                module.qkv_weight = None  # the Linears' weights stay views of it: same values
            elif module.qkv_weight is None:
                module.fuse_projections()
        if isinstance(module, FastFeedForward) and settings.fused_kernels and module.down_with_bias is None:
            module.join_down_bias()
    set_conv_weight_layout(model, settings.channels_last)
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
