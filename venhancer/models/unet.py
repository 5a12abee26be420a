"""The VEnhancer denoising network: a ModelScope-style video UNet (SD 2.1 layout plus temporal
layers) steered by a video ControlNet. Its `state_dict()` is the published checkpoint's."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .attention import TransformerBlock
from .blocks import EncoderState, build_decoder, build_encoder, build_middle, encode_rest, encode_text_free
from .config import UNetConfig
from .controlnet import BiasPending, VideoControlNet, control_tensor, network_inputs, plus_control
from .inputs import NetworkInputs
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
        # forward_branches also shares the first spatial transformer's self-attention (set by
        # optimize; costs two more level-0 activations while the branches run).
        self.share_self_attention = True

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
        # The ControlNet first, then the UNet: only the ControlNet's outputs are held across.
        control_state = self.VideoControlNet.start(inp)
        control = control_state.outputs + self.VideoControlNet.finish(control_state, inp.y, consume=True)
        del control_state
        returned = [control_tensor(r) for r in control] if return_control else None
        state = self._start(inp, control)
        v = self._finish(state, inp.y, control, x.dtype, consume=True)
        return (v, returned) if return_control else v

    def forward_branches(self, x: torch.Tensor, t, contexts: Sequence[torch.Tensor], hint: torch.Tensor, t_hint, s_cond,
                         mask_cond) -> list[torch.Tensor]:
        """`[forward(x, t, y, ...) for y in contexts]` (the guidance branches), with everything
        before the first text-reading layer (block 0, the next ResBlock and, with
        `share_self_attention`, the first spatial transformer up to its cross-attention; of the
        UNet and of the ControlNet) computed once for all. Costs two level-0 activations of memory
        (four when sharing the self-attention) while all but the last branch run."""
        inp = network_inputs(self, x, t, contexts[0], hint, t_hint, s_cond, mask_cond)
        for y in contexts[1:]:
            if y.shape != contexts[0].shape:
                raise ValueError(f"all text contexts must have one shape, got {tuple(contexts[0].shape)} and {tuple(y.shape)}")
        ys = [inp.y] + [y.to(inp.y.dtype) for y in contexts[1:]]
        control_state = self.VideoControlNet.start(inp, self.share_self_attention)
        state = self._start(inp, control_state.outputs, self.share_self_attention)
        outputs = []
        for i, y in enumerate(ys):
            last = i == len(ys) - 1  # the shared activations are released as the last branch goes
            control = [None] * state.block + self.VideoControlNet.finish(control_state, y, consume=last)
            outputs.append(self._finish(state, y, control, x.dtype, consume=last))
        return outputs

    def _start(self, inp: NetworkInputs, control: list[torch.Tensor | BiasPending | None],
               self_attention: bool = False) -> EncoderState:
        """The UNet encoder up to its first text-reading layer. `control`: the ControlNet
        residuals, one per encoder block in order (at least of the blocks completed here): each
        is folded into its skip as soon as the skip exists, and its entry released.
        `self_attention`: see `encode_text_free`."""
        b, c, f, h, w = inp.x.shape
        emb = self.time_embed(timestep_sinusoid(inp.t, self.config.dim))  # (b, E)
        emb = emb.repeat_interleave(f, dim=0)  # ((b f), E)
        x = inp.x.transpose(1, 2).reshape(b * f, c, h, w)  # (b, c, f, h, w) -> ((b f), c, h, w)

        def skip(index: int, out: torch.Tensor) -> torch.Tensor:
            folded = plus_control(out, control[index])
            control[index] = None
            return folded

        return encode_text_free(self.input_blocks, x, emb, f, first=0, keep=skip, outputs=[], self_attention=self_attention)

    def _finish(self, state: EncoderState, context: torch.Tensor, control: list[torch.Tensor | BiasPending | None],
                out_dtype: torch.dtype, consume: bool = False) -> torch.Tensor:
        """The UNet from `state` on with one text context. `control`: the ControlNet residuals
        indexed by encoder block (those from `state.block` on are used), then the middle block's.
        `consume`: the last use of `state`, whose activations are then released as they go."""
        f = state.num_frames
        # Skips as a stack (consumed last-in first-out by the decoder); with `consume` the state's
        # own list, so each skip is released once used.
        skips = state.outputs if consume else list(state.outputs)

        def skip(index: int, out: torch.Tensor) -> None:
            skips.append(plus_control(out, control[index]))
            control[index] = None

        x = encode_rest(self.input_blocks, state, context, keep=skip, consume=consume)
        x = self.middle_block(x, state.emb, context, f)
        x = plus_control(x, control[-1])
        for block in self.output_blocks:
            # x comes first in the channel concatenation, which the block's ResBlock forms (per
            # frame chunk when it runs in chunks).
            x = block((x, skips.pop()), state.emb, context, f)
        x = self.out(x)

        bf, c, h, w = x.shape
        v = x.reshape(bf // f, f, c, h, w).transpose(1, 2).to(out_dtype)  # ((b f), c, h, w) -> (b, c, f, h, w)
        return v.contiguous()

    def set_feed_forward_chunk_size(self, tokens: int | None) -> None:
        """Run every transformer feed-forward over at most `tokens` tokens at a time (None: all
        at once). Same result, lower peak memory at large latents."""
        if tokens is not None and tokens <= 0:
            raise ValueError(f"feed-forward chunk size must be positive or None, got {tokens}")
        for module in self.modules():
            if isinstance(module, TransformerBlock):
                module.ff_chunk_tokens = tokens
