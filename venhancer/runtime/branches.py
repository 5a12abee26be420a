"""The optimized network's evaluation order: everything before the first text-reading layer
computed once for all guidance branches (`forward_branches`), the ControlNet's zero-convolution
biases added with the UNet's skip sums (`BiasPending`), the decoder's skip concatenations formed
per frame chunk, and activations released as soon as their last use has run (`consume`).

`FastVEnhancerUNet`, `FastVideoControlNet` and `FastUNetBlock` are the twins that
`optimize_for_inference` swaps in for the plain classes: same parameters and state-dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from venhancer.models.attention import SpatialTransformer
from venhancer.models.blocks import UNetBlock
from venhancer.models.controlnet import VideoControlNet, network_inputs
from venhancer.models.inputs import NetworkInputs
from venhancer.models.layers import timestep_sinusoid
from venhancer.models.unet import VEnhancerUNet

from .layers import add_with_channel_bias, channel_bias, conv_without_bias
from .parking import HostParking, Parked, prefetch, unpark
from .settings import RuntimeSettings


class BiasPending(NamedTuple):
    """A zero convolution's output without its bias: `plus_control` adds the bias together with
    the residual, one pass fewer over the activations. `conv_out` may wait in host memory."""

    conv_out: torch.Tensor | Parked
    bias: torch.Tensor


Residual = torch.Tensor | BiasPending | Parked


def control_tensor(residual: Residual) -> torch.Tensor:
    """A ControlNet residual as a tensor (back from host memory, its pending bias added)."""
    if isinstance(residual, BiasPending):
        conv_out = unpark(residual.conv_out)
        return conv_out + channel_bias(residual.bias, conv_out)
    return unpark(residual)


def plus_control(h: torch.Tensor, residual: Residual, then: Residual | None = None) -> torch.Tensor:
    """h + a ControlNet residual (with a pending bias: one fused pass). `then`: the residual
    needed next, brought back from host memory meanwhile if parked."""
    if isinstance(residual, BiasPending):
        out = add_with_channel_bias(h, unpark(residual.conv_out), residual.bias)
    else:
        out = h + unpark(residual)
    prefetch_residual(then)
    return out


def prefetch_residual(residual: Residual | None) -> None:
    """Start bringing a ControlNet residual back from host memory if it is parked."""
    prefetch(residual.conv_out if isinstance(residual, BiasPending) else residual)


def parking_for(module: nn.Module, device: torch.device) -> HostParking | None:
    """The module's `HostParking` for `device` when its settings park activations, else None."""
    if not module.settings.park_activations:
        return None
    parking = getattr(module, "_parking", None)
    if parking is None or parking.device != device:
        parking = module._parking = HostParking(device)
    return parking


def parked(value: torch.Tensor | BiasPending, parking: HostParking | None):
    """`value` (or a pending-bias residual's convolution output) parked in host memory, when parking."""
    if parking is None:
        return value
    if isinstance(value, BiasPending):
        return BiasPending(parking.park(value.conv_out), value.bias)
    return parking.park(value)




class FastUNetBlock(UNetBlock):
    """A UNetBlock that can run a range of its layers (a block split around its first text
    layer), and whose first layer may take the decoder's (x, skip) pair to concatenate."""

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...], emb: torch.Tensor, context: torch.Tensor | None,
                num_frames: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """emb: ((b f), embed_dim) per-frame embedding; context: (b, M, context_dim) text.
        A decoder block gets x as (x, skip) or [x, skip] (which its ResBlock empties: see
        `FastResBlock.forward`): its first layer, a ResBlock, concatenates them.
        `start`/`stop` run only layers [start, stop)."""
        for layer in list(self)[start:stop]:
            x = self.run_layer(layer, x, emb, context, num_frames)
        return x

    def text_free_layers(self) -> int:
        """How many leading layers do not read the text context (all of them: len(self))."""
        return next((i for i, layer in enumerate(self) if isinstance(layer, SpatialTransformer)), len(self))


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
        layers = block.text_free_layers() if isinstance(block, FastUNetBlock) else None
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



class FastVideoControlNet(VideoControlNet):
    """VideoControlNet split at its first text-reading layer (`start`, then `finish` once per
    text context), whose zero convolutions hand their bias on (`BiasPending`) when the fused
    kernels are on."""

    settings: RuntimeSettings

    def forward(self, x, t, y, hint, t_hint, s_cond, mask_cond) -> list[torch.Tensor]:
        return self.control_residuals(network_inputs(self, x, t, y, hint, t_hint, s_cond, mask_cond))

    def control_residuals(self, inp: NetworkInputs) -> list[torch.Tensor]:
        state = self.start(inp)
        return [control_tensor(r) for r in state.outputs + self.finish(state, inp.y, consume=True)]

    def _zero_conv(self, conv: nn.Sequential, x: torch.Tensor) -> Residual:
        if self.settings.fused_kernels:
            residual = BiasPending(conv_without_bias(conv[0], x), conv[0].bias)
        else:
            residual = conv(x)
        return parked(residual, parking_for(self, x.device))

    def start(self, inp: NetworkInputs, self_attention: bool = False) -> EncoderState:
        """Every layer before the first one that reads the text: its results serve all guidance
        branches (`finish` takes one text context each). `state.outputs` holds the residuals of
        the encoder blocks completed so far. `self_attention`: see `encode_text_free`."""
        x, emb = self.first_block(inp)
        f = inp.num_frames
        return encode_text_free(self.input_blocks, x, emb, f, first=1, outputs=[self._zero_conv(self.zero_convs[0], x)],
                                keep=lambda index, out: self._zero_conv(self.zero_convs[index], out),
                                self_attention=self_attention)

    def finish(self, state: EncoderState, context: torch.Tensor, consume: bool = False) -> list[torch.Tensor]:
        """The residuals after `state.outputs`, for text context (b, M, context_dim). `consume`:
        the state's last use (its activation is released as the blocks go)."""
        outputs = []
        x = encode_rest(self.input_blocks, state, context, consume=consume,
                        keep=lambda index, out: outputs.append(self._zero_conv(self.zero_convs[index], out)))
        x = self.middle_block(x, state.emb, context, state.num_frames)
        outputs.append(self._zero_conv(self.middle_block_out, x))
        return outputs


class FastVEnhancerUNet(VEnhancerUNet):
    """VEnhancerUNet evaluated through the branch-sharing machinery: `forward` holds only the
    ControlNet's outputs across the UNet and releases activations as they are used;
    `forward_branches` evaluates several text contexts (the guidance branches) sharing
    everything before the first text-reading layer."""

    settings: RuntimeSettings

    def forward(self, x: torch.Tensor, t, y: torch.Tensor, hint: torch.Tensor, t_hint, s_cond, mask_cond,
                return_control: bool = False):
        """As `VEnhancerUNet.forward`."""
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
        share = self.settings.share_self_attention
        control_state = self.VideoControlNet.start(inp, share)
        state = self._start(inp, control_state.outputs, share)
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

        parking = parking_for(self, x.device)
        prefetch_residual(control[0])

        def skip(index: int, out: torch.Tensor) -> torch.Tensor | Parked:
            # (`control` may end with the blocks this call completes: the shared-prefix path)
            folded = plus_control(out, control[index], then=control[index + 1] if index + 1 < len(control) else None)
            control[index] = None
            return parked(folded, parking)

        return encode_text_free(self.input_blocks, x, emb, f, first=0, keep=skip, outputs=[], self_attention=self_attention)

    def _finish(self, state: EncoderState, context: torch.Tensor, control: list[torch.Tensor | BiasPending | None],
                out_dtype: torch.dtype, consume: bool = False) -> torch.Tensor:
        """The UNet from `state` on with one text context. `control`: the ControlNet residuals
        indexed by encoder block (those from `state.block` on are used), then the middle block's.
        `consume`: the last use of `state`, whose activations are then released as they go."""
        f = state.num_frames
        parking = parking_for(self, state.emb.device)
        # Skips as a stack (consumed last-in first-out by the decoder); with `consume` the state's
        # own list, so each skip is released once used.
        skips = state.outputs if consume else list(state.outputs)
        shared = len(skips)  # the first ones, made before the branches split

        def skip(index: int, out: torch.Tensor) -> None:
            skips.append(parked(plus_control(out, control[index], then=control[index + 1]), parking))
            control[index] = None

        x = encode_rest(self.input_blocks, state, context, keep=skip, consume=consume)
        x = self.middle_block(x, state.emb, context, f)
        x = plus_control(x, control[-1], then=skips[-1])
        for block in self.output_blocks:
            skip_in = skips.pop()
            # Skips shared with later guidance branches (not `consume`) stay in host memory.
            skip_in = unpark(skip_in, keep=not consume and len(skips) < shared)
            # x comes first in the channel concatenation, which the block's ResBlock forms (per
            # frame chunk when it runs in chunks). A list hands the block the last references.
            inputs = [x, skip_in]
            x = skip_in = None
            x = block(inputs, state.emb, context, f, stop=1)
            # A parked next skip comes back while the block's later layers run, once its ResBlock
            # has freed the two tensors it read (at level 0, 40 frames: 3 GB).
            prefetch(skips[-1] if skips else None)
            x = block(x, state.emb, context, f, start=1)
        x = self.out(x)

        bf, c, h, w = x.shape
        v = x.reshape(bf // f, f, c, h, w).transpose(1, 2).to(out_dtype)  # ((b f), c, h, w) -> (b, c, f, h, w)
        return v.contiguous()
