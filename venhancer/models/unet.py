"""The VEnhancer denoising network: a ModelScope-style video UNet (SD 2.1 layout plus temporal
layers) steered by a video ControlNet. Its `state_dict()` is the published checkpoint's."""

from __future__ import annotations

import torch
from torch import nn

from .attention import TransformerBlock
from .blocks import build_decoder, build_encoder, build_middle
from .config import UNetConfig
from .controlnet import VideoControlNet, model_input_dtype
from .inputs import prepare_inputs
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
        cfg = self.config
        out_dtype = x.dtype
        inp = prepare_inputs(
            x, t, y, hint, t_hint, s_cond, mask_cond,
            in_dim=cfg.in_dim, context_dim=cfg.context_dim, num_levels=len(cfg.dim_mult),
            dtype=model_input_dtype(self, x.device),
        )
        b, c, f, h, w = inp.x.shape
        control = self.VideoControlNet.run(inp)

        emb = self.time_embed(timestep_sinusoid(inp.t, cfg.dim))  # (b, E)
        emb = emb.repeat_interleave(f, dim=0)  # ((b f), E)
        context = inp.y  # (b, M, context_dim), shared by the frames of each item

        x = inp.x.transpose(1, 2).reshape(b * f, c, h, w)  # (b, c, f, h, w) -> ((b f), c, h, w)
        # Each ControlNet residual is folded into its skip as soon as the skip exists, and
        # released: the same sums the decoder would form, without holding both sets at once.
        pending = list(control)
        if not return_control:
            control = None
        skips = []
        for i, block in enumerate(self.input_blocks):
            x = block(x, emb, context, f)
            skips.append(x + pending[i])
            pending[i] = None
        x = self.middle_block(x, emb, context, f)
        x = x + pending.pop()
        for block in self.output_blocks:
            # Skips are consumed last-in first-out; x comes first in the channel concatenation,
            # which the block's ResBlock forms (per frame chunk when it runs in chunks).
            x = block((x, skips.pop()), emb, context, f)
        x = self.out(x)

        v = x.reshape(b, f, -1, h, w).transpose(1, 2).to(out_dtype)  # ((b f), c, h, w) -> (b, c, f, h, w)
        v = v.contiguous()
        if return_control:
            return v, control
        return v

    def set_feed_forward_chunk_size(self, tokens: int | None) -> None:
        """Run every transformer feed-forward over at most `tokens` tokens at a time (None: all
        at once). Same result, lower peak memory at large latents."""
        if tokens is not None and tokens <= 0:
            raise ValueError(f"feed-forward chunk size must be positive or None, got {tokens}")
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.ff_chunk_tokens = tokens
