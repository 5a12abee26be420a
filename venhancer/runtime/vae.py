"""`optimize_vae`: the temporal VAE (diffusers' AutoencoderKLTemporalDecoder) made fast in place,
same function: its blocks' classes swapped for fused twins (same parameters and names), its
GroupNorms on the Triton kernel, its wide attention heads on `wide_head_attention`."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.autoencoders.autoencoder_kl_temporal_decoder import TemporalDecoder
from diffusers.models.resnet import ResnetBlock2D, SpatioTemporalResBlock, TemporalResnetBlock
from diffusers.models.upsampling import Upsample2D
from torch import nn

from venhancer.models.config import GROUP_NORM_GROUPS

from .attention import SDPA_FAST_HEAD_DIM, half_products_in_float32, wide_head_attention
from .layers import (
    DerivedWeight,
    FastGroupNorm,
    add_with_channel_bias,
    conv_without_bias,
    in_frame_chunks,
    shortcut_without_bias,
    upsample_conv_kernel,
)
from .optimize import fast_group_norm, set_conv_weight_layout
from .settings import check_chunk


def _folded_resnet_branch(block: ResnetBlock2D | TemporalResnetBlock, x: torch.Tensor) -> torch.Tensor:
    """norm1 (+SiLU) -> conv1 -> norm2 (+SiLU) -> conv2 without conv2's bias, for a block whose
    norms apply the SiLU themselves; conv1's bias is added by norm2."""
    h = block.norm1(x)
    h = conv_without_bias(block.conv1, h)
    h = block.norm2(h, add=block.conv1.bias.expand(h.shape[0], -1))  # GroupNorm(h + bias) + SiLU
    return conv_without_bias(block.conv2, h)


def _folded_resnet_forward(block: ResnetBlock2D | TemporalResnetBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's branch (`_folded_resnet_branch`) plus the shortcut, conv2's bias added by the
    residual sum."""
    h = _folded_resnet_branch(block, x)
    shortcut, bias = shortcut_without_bias(block.conv_shortcut, x, block.conv2.bias)  # its bias joins conv2's
    return add_with_channel_bias(shortcut, h, bias)


class _FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D as the VAE uses it (no time embedding, no resampling, output
    scale 1), with SiLU in its norms' pass, conv1's bias added by norm2 and conv2's bias by the
    residual sum: the same sums in 3 fewer passes over the activations."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if temb is not None or args or kwargs:
            # named, not super(): `_FrameChunkedResnetBlock2D` calls this forward on its instances
            return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kwargs)
        return _folded_resnet_forward(self, input_tensor)


class _FusedTemporalResnetBlock(TemporalResnetBlock):
    """TemporalResnetBlock (no time embedding) on (b, c, f, h, w) with the same folding."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if temb is not None:
            return super().forward(input_tensor, temb)
        return _folded_resnet_forward(self, input_tensor)


class _FusedSpatioTemporalResBlock(SpatioTemporalResBlock):
    """SpatioTemporalResBlock whose spatial/temporal mix joins the temporal block's residual sum
    (one pass, float math) instead of alpha * x_spatial + (1 - alpha) * x_temporal in three."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                image_only_indicator: torch.Tensor | None = None) -> torch.Tensor:
        if temb is not None:
            return super().forward(hidden_states, temb, image_only_indicator)
        return _temporal_and_mix(self, self.spatial_res_block(hidden_states, None), image_only_indicator)


def _temporal_and_mix(block: SpatioTemporalResBlock, spatial: torch.Tensor,
                      image_only_indicator: torch.Tensor) -> torch.Tensor:
    """The rest of a SpatioTemporalResBlock (no time embedding) after its spatial resnet block:
    the temporal block and the mix, folded as `_FusedSpatioTemporalResBlock` does for that class,
    as diffusers' forward does for the stock one."""
    num_frames = image_only_indicator.shape[-1]
    batch_frames, channels, height, width = spatial.shape
    # ((b f), c, h, w) -> (b, c, f, h, w): a view when `spatial` is channels-last
    video = spatial.reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
    if type(block) is not _FusedSpatioTemporalResBlock:
        mixed = block.time_mixer(x_spatial=video, x_temporal=block.temporal_res_block(video, None),
                                 image_only_indicator=image_only_indicator)
        return mixed.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)
    alpha = block.time_mixer.get_alpha(image_only_indicator, video.ndim)
    if block.time_mixer.switch_spatial_to_temporal_mix:
        alpha = 1.0 - alpha
    temporal_block = block.temporal_res_block
    if type(temporal_block) is _FusedTemporalResnetBlock and temporal_block.conv_shortcut is None and alpha.numel() == 1:
        # alpha * video + (1 - alpha) * (video + h + bias) = video + (1 - alpha) * (h + bias):
        # the temporal block's residual sum and the mix in one pass.
        h = _folded_resnet_branch(temporal_block, video)
        mixed = add_with_channel_bias(video, h, temporal_block.conv2.bias, scale=(1.0 - alpha.float()).reshape(1))
    else:
        temporal = temporal_block(video, None)
        mixed = torch.lerp(temporal, video, alpha.to(video.dtype))  # alpha * video + (1 - alpha) * temporal
    return mixed.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


class _LeanTemporalDecoder(TemporalDecoder):
    """diffusers' TemporalDecoder (inference) whose up blocks' spatio-temporal resnet blocks let
    go of their input once their spatial part has run (`set_decoder_frame_chunk`): the input
    waits in a list the block empties, not in the loop's variable. The first block of the last
    up block takes the upsampled 256-channel full-resolution frames (2.1 GB for the seven frames
    of a last window of one 72x128 tile), which need not outlive its spatial part."""

    def forward(self, sample: torch.Tensor, image_only_indicator: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(sample, image_only_indicator, num_frames)
        sample = self.conv_in(sample)
        upscale_dtype = next(itertools.chain(self.up_blocks.parameters(), self.up_blocks.buffers())).dtype
        sample = self.mid_block(sample, image_only_indicator=image_only_indicator).to(upscale_dtype)
        for up_block in self.up_blocks:
            for resnet in up_block.resnets:
                held = [sample]
                del sample
                sample = _spatio_temporal_emptying(resnet, held, image_only_indicator)
            for upsampler in up_block.upsamplers or ():
                sample = upsampler(sample)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        batch_frames, channels, height, width = sample.shape
        # ((b f), c, h, w) -> (b, c, f, h, w) for the closing temporal convolution, and back
        video = sample.reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        video = self.time_conv_out(video)
        return video.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


def _spatio_temporal_emptying(block: SpatioTemporalResBlock, held: list[torch.Tensor],
                              image_only_indicator: torch.Tensor) -> torch.Tensor:
    """`block` on held's one tensor, which is taken out of the list and released after the
    spatial resnet block (the caller keeps no other reference)."""
    x = held.pop()
    spatial = block.spatial_res_block(x, None)
    del x
    return _temporal_and_mix(block, spatial, image_only_indicator)


class _FrameChunkedResnetBlock2D(ResnetBlock2D):
    """A decoder's spatial ResnetBlock2D over ((b f), c, h, w) in pieces of `frame_chunk` frames
    (`set_decoder_frame_chunk`), each through the block's own forward (`_unchunked_class`, fused or
    not). Its GroupNorms and convolutions treat every frame alone, so the pieces compute each
    frame's sums as the whole batch does; only the pieces' temporaries are smaller (cuDNN may pick
    another algorithm for fewer frames, so the last bits may differ)."""

    frame_chunk: int
    _unchunked_class: type

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        forward = self._unchunked_class.forward
        if temb is not None or args or kwargs:
            return forward(self, input_tensor, temb, *args, **kwargs)
        return in_frame_chunks(lambda frames: forward(self, frames, None), self.frame_chunk, input_tensor)


def set_decoder_frame_chunk(vae: AutoencoderKLTemporalDecoder, frame_chunk: int | None) -> None:
    """The decoder's smallest-memory way, in place and reversibly (None: diffusers' own): its
    spatial resnet blocks `frame_chunk` frames at a time (`_FrameChunkedResnetBlock2D`) and each
    spatio-temporal block's input released after its spatial part (`_LeanTemporalDecoder`). The
    largest activations of a decode are a window's frames (5, the last up to 7) of one 576x1024
    tile at 256 and 128 channels, 0.3 GB per frame at 256."""
    check_chunk("frame_chunk", frame_chunk)
    decoder = vae.decoder
    if type(decoder) in (TemporalDecoder, _LeanTemporalDecoder):
        decoder.__class__ = TemporalDecoder if frame_chunk is None else _LeanTemporalDecoder
    for module in decoder.modules():
        if not isinstance(module, SpatioTemporalResBlock):
            continue
        block = module.spatial_res_block
        if type(block) is _FrameChunkedResnetBlock2D:
            if frame_chunk is None:
                block.__class__ = block._unchunked_class
                del block._unchunked_class, block.frame_chunk
            else:
                block.frame_chunk = frame_chunk
        elif frame_chunk is not None:
            block._unchunked_class = type(block)
            block.frame_chunk = frame_chunk
            block.__class__ = _FrameChunkedResnetBlock2D


class _TransposedUpsample2D(Upsample2D):
    """diffusers' Upsample2D as the decoder uses it (nearest x2, then a 3x3 convolution) as one
    transposed convolution of stride 2 (`venhancer.runtime.layers.upsample_conv_kernel`): the
    same sums with the taps that meet one input pixel pre-added, 4/9 of the multiply-adds and
    no 4x interpolated copy."""

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None or args or kwargs:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        return F.conv_transpose2d(hidden_states, self._kernel(self.conv.weight), self.conv.bias, stride=2, padding=1)


class _WideHeadAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, with the attention itself as `wide_head_attention` where the
    heads are wider than SDPA's fast kernels take (the VAE's mid-blocks: one 512-wide head over
    every latent pixel of a frame). Anything else (masks, cross-attention, spatial norms, q/k
    norms, narrow heads, half precision on a PyTorch without `half_products_in_float32`) goes to
    the stock processor."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        heads = attn.heads
        if (encoder_hidden_states is not None or attention_mask is not None or temb is not None or args or kwargs
                or hidden_states.ndim != 4 or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None
                or attn.inner_dim // heads <= SDPA_FAST_HEAD_DIM
                or (hidden_states.dtype in (torch.float16, torch.bfloat16) and not half_products_in_float32())):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        # (b, c, h, w) -> (b, h*w, c)
        tokens = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = key.shape[-1] // heads
        # (b, n, heads*d) -> (b*heads, n, d): views for one head
        q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2).reshape(batch * heads, -1, head_dim)
                   for t in (query, key, value))
        out = wide_head_attention(q, k, v)
        # (b*heads, n, d) -> (b, n, heads*d)
        out = out.view(batch, heads, -1, head_dim).transpose(1, 2).reshape(batch, -1, heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        # (b, h*w, c) -> (b, c, h, w)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _transposable_upsample(block: nn.Module) -> bool:
    """An Upsample2D that is exactly nearest x2 followed by a 3x3 / padding 1 convolution."""
    if type(block) is not Upsample2D:
        return False
    conv = getattr(block, "conv", None)
    return (block.use_conv and not block.use_conv_transpose and block.norm is None and block.interpolate
            and block.name == "conv" and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _foldable_resnet(block: nn.Module) -> bool:
    """A diffusers resnet block whose forward the fused subclasses reproduce exactly."""
    if type(block) is ResnetBlock2D:
        if (block.upsample is not None or block.downsample is not None or block.output_scale_factor != 1
                or block.time_embedding_norm != "default"):
            return False
    elif type(block) is not TemporalResnetBlock:
        return False
    return (block.time_emb_proj is None and isinstance(block.nonlinearity, nn.SiLU)
            and isinstance(block.norm1, FastGroupNorm) and isinstance(block.norm2, FastGroupNorm)
            and block.dropout.p == 0 and block.conv1.bias is not None and block.conv2.bias is not None)


def optimize_vae(vae: AutoencoderKLTemporalDecoder) -> AutoencoderKLTemporalDecoder:
    """Same function, fewer passes and faster kernels, in place. Parameter values and names are
    untouched (the block subclasses only replace `forward`):
    - channels-last convolution weights (cuDNN's NHWC kernels; activations follow the weights);
    - diffusers' GroupNorms on the Triton kernel (`venhancer.runtime.ops`, float32 statistics)
      where the layout allows, with the SiLU after them in the same pass;
    - in the resnet blocks, conv biases folded into the next norm / residual sum and the
      spatial/temporal mix in the temporal block's residual sum (see the `_Fused*` classes);
    - the decoder's upsamplers as one transposed convolution each (`_TransposedUpsample2D`);
    - the mid-blocks' 512-wide attention head as two cuBLAS products around a float32 softmax
      (`_WideHeadAttnProcessor`) instead of SDPA's memory-efficient kernel.
    """
    for module in list(vae.modules()):
        for name, child in module.named_children():
            if type(child) is nn.GroupNorm and child.affine and child.num_groups == GROUP_NORM_GROUPS:
                setattr(module, name, fast_group_norm(child))
    for module in vae.modules():
        if _foldable_resnet(module):
            module.norm1.apply_silu = module.norm2.apply_silu = True
            module.nonlinearity = nn.Identity()
            module.__class__ = _FusedResnetBlock2D if type(module) is ResnetBlock2D else _FusedTemporalResnetBlock
        elif type(module) is SpatioTemporalResBlock:
            module.__class__ = _FusedSpatioTemporalResBlock
        elif _transposable_upsample(module):
            module.__class__ = _TransposedUpsample2D
            module._kernel = DerivedWeight(upsample_conv_kernel)  # derived from conv.weight on first use
        if isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
            module.set_processor(_WideHeadAttnProcessor())
        # The encoder's and decoder's closing norm + activation (used nowhere else).
        norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if isinstance(norm, FastGroupNorm) and isinstance(act, nn.SiLU):
            norm.apply_silu = True
            module.conv_act = nn.Identity()
    set_conv_weight_layout(vae, channels_last=True)
    return vae
