"""The VEnhancer denoising network: a ModelScope-style video UNet (SD 2.1 layout plus temporal
layers) steered by a video ControlNet. Its `state_dict()` is the published checkpoint's."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import build_decoder, build_encoder, build_middle
from .config import UNetConfig
from .controlnet import VideoControlNet, network_inputs
from .layers import EmbeddingMLP, GroupNorm32, timestep_sinusoid


class VEnhancerUNet(nn.Module):
    """Video UNet + ControlNet predicting v for latents (b, 4, f, h, w).

    Inference only: there are no dropout or activation-checkpointing paths.
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        config = config or UNetConfig()
        self.config = config
        self.time_embed = EmbeddingMLP(config.dim, config.embed_dim)
        self.input_blocks, skip_channels = build_encoder(config)
        self.middle_block = build_middle(config)
        self.output_blocks = build_decoder(config, skip_channels)
        self.out = nn.Sequential(GroupNorm32(config.dim), nn.SiLU(), nn.Conv2d(config.dim, config.out_dim, 3, padding=1))
        # The checkpoint stores the ControlNet under this attribute name.
        self.VideoControlNet = VideoControlNet(config)

    def forward(
        self,
        x: torch.Tensor,
        t,
        y: torch.Tensor,
        hint: torch.Tensor,
        t_hint,
        s_cond,
        mask_cond,
        return_control: bool = False,
    ):
        """v-prediction for the noisy latents.

        x: (b, 4, f, h, w) with h % 8 == 2 and w % 8 == 0 (full config).
        t, t_hint, s_cond: (b,) int or float (a scalar is shared by all items).
        y: (b, 77, context_dim) text context.
        hint: (b, 4, n_key, h, w) latents of all key frames.
        mask_cond: (b, f) int64: for each frame the global index of the key frame it shows, or -1.

        Returns v (b, out_dim, f, h, w) in x's dtype; with `return_control=True`, `(v, control)`
        where control is the ControlNet's list of 13 per-frame tensors.
        """
        inp = network_inputs(self, x, t, y, hint, t_hint, s_cond, mask_cond)
        control = self.VideoControlNet.control_residuals(inp)  # one per encoder block, then the middle's
        b, c, f, h, w = inp.x.shape
        emb = self.time_embed(timestep_sinusoid(inp.t, self.config.dim))  # (b, E)
        emb = emb.repeat_interleave(f, dim=0)  # ((b f), E)

        hidden = inp.x.transpose(1, 2).reshape(b * f, c, h, w)  # (b, c, f, h, w) -> ((b f), c, h, w)
        skips = []
        for block, residual in zip(self.input_blocks, control):
            hidden = block(hidden, emb, inp.y, f)
            skips.append(hidden + residual)
        hidden = self.middle_block(hidden, emb, inp.y, f)
        hidden = hidden + control[-1]
        for block in self.output_blocks:
            hidden = torch.cat([hidden, skips.pop()], dim=1)  # x first, then the skip of the same level
            hidden = block(hidden, emb, inp.y, f)
        hidden = self.out(hidden)

        v = hidden.reshape(b, f, *hidden.shape[1:]).transpose(1, 2)  # ((b f), c, h, w) -> (b, c, f, h, w)
        v = v.to(x.dtype).contiguous()
        return (v, control) if return_control else v
