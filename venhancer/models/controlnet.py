"""The video ControlNet: a copy of the UNet's encoder and middle block that sees the key-frame
latents (the "hint") and returns one residual per UNet skip plus one for the middle block."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import build_encoder, build_middle
from .config import UNetConfig
from .inputs import NetworkInputs, prepare_inputs
from .layers import EmbeddingMLP, timestep_sinusoid


def model_input_dtype(module: nn.Module, device: torch.device) -> torch.dtype | None:
    """dtype to cast float inputs to: the parameters' dtype, or None under autocast (which
    casts per operation, as the reference ran)."""
    if torch.is_autocast_enabled(device.type):
        return None
    return next(module.parameters()).dtype


def network_inputs(module: nn.Module, x, t, y, hint, t_hint, s_cond, mask_cond) -> NetworkInputs:
    """The call arguments of `module` (UNet or ControlNet, with a `config`) checked and cast."""
    cfg = module.config
    return prepare_inputs(
        x, t, y, hint, t_hint, s_cond, mask_cond,
        in_dim=cfg.in_dim, context_dim=cfg.context_dim, num_levels=len(cfg.dim_mult),
        dtype=model_input_dtype(module, x.device),
    )


class VideoControlNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        config = config or UNetConfig()
        self.config = config
        # Registration order follows the checkpoint's key order.
        self.time_embed = EmbeddingMLP(config.dim, config.embed_dim)
        self.hint_time_zero_linear = nn.Linear(config.embed_dim, config.embed_dim)
        self.scale_cond = EmbeddingMLP(config.dim, config.embed_dim)
        self.input_blocks, skip_channels = build_encoder(config)
        # One 1x1 "zero conv" per encoder block (zero-initialised in training, hence the name).
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1)) for c in skip_channels])
        self.middle_block = build_middle(config)
        width = config.widths[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1))
        self.input_hint_block = nn.Conv2d(config.in_dim, config.hint_dim, 3, padding=1)

    def forward(self, x, t, y, hint, t_hint, s_cond, mask_cond) -> list[torch.Tensor]:
        """Arguments as `VEnhancerUNet.forward`. Returns 13 tensors (for the default 4 levels x
        2 ResBlocks) in per-frame layout `((b f), c, h', w')`: one per encoder block, then the
        middle block's."""
        return self.control_residuals(network_inputs(self, x, t, y, hint, t_hint, s_cond, mask_cond))

    def control_residuals(self, inp: NetworkInputs) -> list[torch.Tensor]:
        """`forward` on already checked and cast inputs."""
        f = inp.num_frames
        x, emb = self.first_block(inp)
        residuals = [self.zero_convs[0](x)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            x = block(x, emb, inp.y, f)
            residuals.append(zero_conv(x))
        x = self.middle_block(x, emb, inp.y, f)
        residuals.append(self.middle_block_out(x))
        return residuals

    def first_block(self, inp: NetworkInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder block 0 with the key-frame hint added after its conv: its output ((b f), c, h, w)
        and the per-frame embedding ((b f), embed_dim) the later blocks take."""
        b, c, f, h, w = inp.x.shape
        emb = self.frame_embedding(inp.t, inp.t_hint, inp.s_cond, inp.mask_cond)  # ((b f), embed_dim)
        hint_add = self.hint_features(inp.hint, inp.mask_cond)  # ((b f), hint_dim, h, w)

        x = inp.x.transpose(1, 2).reshape(b * f, c, h, w)  # (b, c, f, h, w) -> ((b f), c, h, w)
        stem_conv, first_temporal = self.input_blocks[0]
        x = stem_conv(x)
        # The hint enters once, between block 0's conv and its temporal transformer.
        x = x + hint_add
        x = first_temporal(x, f)
        return x, emb

    def frame_embedding(self, t: torch.Tensor, t_hint: torch.Tensor, s_cond: torch.Tensor, mask_cond: torch.Tensor) -> torch.Tensor:
        """Per-frame embedding ((b f), embed_dim): time embedding of t for every frame; key frames
        (mask >= 0) also get the noise-level embedding of t_hint and the scale embedding."""
        dim = self.config.dim
        b, f = mask_cond.shape
        emb = self.time_embed(timestep_sinusoid(t, dim))  # (b, E)
        hint_time = self.hint_time_zero_linear(self.time_embed(timestep_sinusoid(t_hint, dim)))
        # scale_cond takes the sinusoid directly (no time_embed in between).
        scale = self.scale_cond(timestep_sinusoid(s_cond, dim))
        extra = hint_time + scale  # (b, E)
        is_key = (mask_cond >= 0)[:, :, None]  # (b, f, 1)
        # (b, E) -> (b, f, E): inserted frames get exactly the time embedding
        emb = emb[:, None, :] + torch.where(is_key, extra[:, None, :], torch.zeros_like(extra[:, None, :]))
        return emb.reshape(b * f, -1)

    def hint_features(self, hint: torch.Tensor, mask_cond: torch.Tensor) -> torch.Tensor:
        """Hint-conv features of key frame mask[j] for each frame j with mask >= 0, zeros (not
        even the bias) elsewhere: ((b f), hint_dim, h, w)."""
        b, c, n_key, h, w = hint.shape
        f = mask_cond.shape[1]
        # A temporal window references only a few of the clip's key frames: project just the
        # range it uses (the conv is per frame, so this is exact).
        used = mask_cond[mask_cond >= 0]
        first = int(used.min()) if used.numel() else 0
        last = int(used.max()) if used.numel() else 0
        n_used = last - first + 1
        # (b, c, n, h, w) -> ((b n), c, h, w)
        frames = hint[:, :, first : last + 1].transpose(1, 2).reshape(b * n_used, c, h, w)
        feats = self.input_hint_block(frames).reshape(b, n_used, -1, h, w)
        item = torch.arange(b, device=hint.device)[:, None]  # (b, 1)
        gathered = feats[item, (mask_cond - first).clamp(min=0)]  # (b, f, hint_dim, h, w)
        is_key = (mask_cond >= 0)[:, :, None, None, None]
        add = torch.where(is_key, gathered, torch.zeros_like(gathered))
        return add.reshape(b * f, -1, h, w)
