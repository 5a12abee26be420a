"""Stable Video Diffusion's temporal VAE: per-frame encoding and streaming tiled decoding (SPEC 1.7, 6).

The model itself is diffusers' `AutoencoderKLTemporalDecoder`; this module decides what is fed
to it and how the pieces are put back together, and (`optimize_vae`) runs its blocks with fewer
passes over the activations without changing what they compute.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D, SpatioTemporalResBlock, TemporalResnetBlock
from diffusers.models.upsampling import Upsample2D
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from venhancer.diffusion.chunking import blend_time
from venhancer.models.config import GROUP_NORM_GROUPS
from venhancer.planning import (
    VAE_FRAME_OVERLAP,
    VAE_FRAME_WINDOW,
    VAE_TILE,
    VAE_TILE_OVERLAP,
    gaussian_weights,
    vae_frame_windows,
    vae_tile_windows,
)
from venhancer.runtime.attention import SDPA_FAST_HEAD_DIM, half_products_in_float32, wide_head_attention
from venhancer.runtime.layers import (DerivedWeight, FastGroupNorm, add_with_channel_bias, conv_without_bias,
                                      shortcut_without_bias, upsample_conv_kernel)
from venhancer.runtime.optimize import fast_group_norm, set_conv_weight_layout

logger = logging.getLogger(__name__)

LATENT_SCALE = 0.18215
DOWNSAMPLE = 8


def load_vae(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLTemporalDecoder:
    """Load the temporal VAE from a local diffusers folder (config.json + weights).

    Hub downloads are resolved beforehand by `venhancer.loading.resolve_vae`, which returns such a
    folder. The fp16 variant file is used when the folder has it (that is what the hub repo ships).
    """
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers VAE folder (config.json + weights) at {folder}")
    variant = "fp16" if any(folder.glob("diffusion_pytorch_model.fp16.*")) else None
    # Without `accelerate` diffusers falls back to plain loading anyway, but warns on every
    # run; ask for plain loading directly then.
    low_mem = importlib.util.find_spec("accelerate") is not None
    vae = AutoencoderKLTemporalDecoder.from_pretrained(
        folder, variant=variant, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=low_mem
    )
    logger.info("loaded temporal VAE from %s (variant %s, %s)", folder, variant, dtype)
    return vae.to(device).eval().requires_grad_(False)


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
            return super().forward(input_tensor, temb, *args, **kwargs)
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
        num_frames = image_only_indicator.shape[-1]
        spatial = self.spatial_res_block(hidden_states, None)
        batch_frames, channels, height, width = spatial.shape
        # ((b f), c, h, w) -> (b, c, f, h, w): a view when `spatial` is channels-last
        video = spatial.reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        alpha = self.time_mixer.get_alpha(image_only_indicator, video.ndim)
        if self.time_mixer.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        temporal_block = self.temporal_res_block
        if type(temporal_block) is _FusedTemporalResnetBlock and temporal_block.conv_shortcut is None and alpha.numel() == 1:
            # alpha * video + (1 - alpha) * (video + h + bias) = video + (1 - alpha) * (h + bias):
            # the temporal block's residual sum and the mix in one pass.
            h = _folded_resnet_branch(temporal_block, video)
            mixed = add_with_channel_bias(video, h, temporal_block.conv2.bias, scale=(1.0 - alpha.float()).reshape(1))
        else:
            temporal = temporal_block(video, None)
            mixed = torch.lerp(temporal, video, alpha.to(video.dtype))  # alpha * video + (1 - alpha) * temporal
        return mixed.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


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


def _vae_device(vae: AutoencoderKLTemporalDecoder) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def encode_frames(
    vae: AutoencoderKLTemporalDecoder,
    frames: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Encode frames (n, 3, H, W) in [-1, 1] one by one: posterior sample * 0.18215 -> (1, 4, n, h, w).

    The posterior noise is drawn for all frames up front (or taken from `noise`, shape (n, 4, h, w)),
    so the result does not depend on `batch_size`, which only trades memory for speed.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (n, 3, H, W), got shape {tuple(frames.shape)}")
    n, _, height, width = frames.shape
    if height % DOWNSAMPLE or width % DOWNSAMPLE:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {DOWNSAMPLE}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _vae_device(vae)
    latent_shape = (n, vae.config.latent_channels, height // DOWNSAMPLE, width // DOWNSAMPLE)
    if noise is None:
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != latent_shape:
        raise ValueError(f"noise must have shape {latent_shape}, got {tuple(noise.shape)}")
    latents = []
    for start in range(0, n, batch_size):
        x = frames[start : start + batch_size].to(device=device, dtype=vae.dtype)
        posterior = vae.encode(x).latent_dist
        eps = noise[start : start + batch_size].to(device=device, dtype=torch.float32)
        latents.append((posterior.mean.float() + posterior.std.float() * eps) * LATENT_SCALE)
    return torch.cat(latents).permute(1, 0, 2, 3).unsqueeze(0)


def expand_latents(z_key: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c, n, h, w) key-frame latents -> (b, c, (n-1)(k+1)+1, h, w): each repeated k+1 times, the last once."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"inserted frame count k must be an int >= 0, got {k!r}")
    if z_key.ndim != 5:
        raise ValueError(f"z_key must be (b, c, n, h, w), got shape {tuple(z_key.shape)}")
    repeated = z_key.repeat_interleave(k + 1, dim=2)
    return repeated[:, :, : repeated.shape[2] - k]


def decode_tiled(
    vae: AutoencoderKLTemporalDecoder,
    z: torch.Tensor,
    tile: tuple[int, int] = VAE_TILE,
    tile_overlap: tuple[int, int] = VAE_TILE_OVERLAP,
    frame_window: int = VAE_FRAME_WINDOW,
    frame_overlap: int = VAE_FRAME_OVERLAP,
    progress: Callable[[int, int], None] | None = None,
    to_cpu: bool = True,
) -> Iterator[torch.Tensor]:
    """Decode latents (1, c, F, h, w) tile by tile; yield float32 frames (f, 3, 8h, 8w) in [-1, 1],
    on the CPU, or with `to_cpu=False` on the VAE's device (to post-process them there).

    The reference blends the frame windows of each spatial tile and then blends the tiles. Both
    blends are linear with weights that depend only on positions, and every tile uses the same frame
    windows, so blending the tiles first and the frame windows second gives the same result. That
    order lets frames be handed out as soon as the next window has been blended into them: only one
    frame window of the full-size video is ever held on the device.

    The chunks together hold all F frames in order. Settings are checked at the call, before the
    first chunk is asked for. progress(done, total) is called after each VAE decoder call.
    """
    if z.ndim != 5 or z.shape[0] != 1:
        raise ValueError(f"z must be (1, c, F, h, w), got shape {tuple(z.shape)}")
    _, _, num_frames, height, width = z.shape
    h_windows, w_windows = vae_tile_windows(height, width, tile, tile_overlap)
    t_windows = vae_frame_windows(num_frames, frame_window, frame_overlap)
    tiles = [(h0, h1, w0, w1) for h0, h1 in h_windows for w0, w1 in w_windows]
    chunks = _decode_tiles(vae, z, tiles, t_windows, frame_overlap, progress)
    return (chunk.cpu() for chunk in chunks) if to_cpu else chunks


@torch.no_grad()
def _decode_tiles(
    vae: AutoencoderKLTemporalDecoder,
    z: torch.Tensor,
    tiles: list[tuple[int, int, int, int]],
    t_windows: list[tuple[int, int]],
    frame_overlap: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[torch.Tensor]:
    device = _vae_device(vae)
    out_h, out_w = z.shape[3] * DOWNSAMPLE, z.shape[4] * DOWNSAMPLE
    weights: dict[tuple[int, int], torch.Tensor] = {}
    weight_sum = torch.zeros(out_h, out_w, device=device)
    for h0, h1, w0, w1 in tiles:
        shape = ((h1 - h0) * DOWNSAMPLE, (w1 - w0) * DOWNSAMPLE)
        if shape not in weights:
            weights[shape] = torch.as_tensor(gaussian_weights(*shape), dtype=torch.float32, device=device)
        weight_sum[h0 * DOWNSAMPLE : h1 * DOWNSAMPLE, w0 * DOWNSAMPLE : w1 * DOWNSAMPLE] += weights[shape]

    total = len(t_windows) * len(tiles)
    done = 0
    previous: torch.Tensor | None = None
    for index, (t0, t1) in enumerate(t_windows):
        frames = torch.zeros(t1 - t0, 3, out_h, out_w, device=device)
        for h0, h1, w0, w1 in tiles:
            latent = z[0, :, t0:t1, h0:h1, w0:w1].permute(1, 0, 2, 3) / LATENT_SCALE
            latent = latent.to(device=device, dtype=vae.dtype)
            decoded = vae.decode(latent, num_frames=t1 - t0).sample.float()
            rows = slice(h0 * DOWNSAMPLE, h1 * DOWNSAMPLE)
            cols = slice(w0 * DOWNSAMPLE, w1 * DOWNSAMPLE)
            frames[:, :, rows, cols] += decoded * weights[tuple(decoded.shape[-2:])]
            done += 1
            if progress is not None:
                progress(done, total)
        frames /= weight_sum
        if previous is not None:
            # blend_time works on (b, c, f, h, w); `previous` is the already blended window, as in
            # the reference, which cross-faded its windows in place.
            frames = blend_time(previous.transpose(0, 1)[None], frames.transpose(0, 1)[None], frame_overlap)
            frames = frames[0].transpose(0, 1)
        if index == len(t_windows) - 1:
            yield frames
        else:
            keep = frames.shape[0] - frame_overlap
            yield frames[:keep]
            previous = frames
