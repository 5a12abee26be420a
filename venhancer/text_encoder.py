"""OpenCLIP ViT-H-14 text conditioning (SPEC section 3).

Only the text tower is built and only its weights are read: the vision tower of the CLIP checkpoint
(about 2.5 GB of the 3.9 GB file) is never materialised.  The last residual block is never run
(the conditioning is the penultimate layer), so it is neither built nor loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, LayerNormFp32, Transformer
from torch import nn

logger = logging.getLogger(__name__)

# Caption strings of the reference (tests/fixtures/prompts.json). The odd spacing is part of the
# strings the published checkpoints were used with; keep it byte for byte.
POSITIVE_SUFFIX = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera,   hyper detailed "
    "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing,  "
    "skin pore detailing, hyper sharpness, perfect without deformations."
)
NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, "
    "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth"
)

DEFAULT_ARCH = "ViT-H-14"


def build_caption(prompt: str) -> str:
    """Conditional caption: the reference appends the suffix with no separator (quirk, SPEC 1.8)."""
    return prompt + POSITIVE_SUFFIX


# open_clip text_cfg keys that only concern pooling/projection, which this encoder does not use.
_IGNORED_CFG_KEYS = frozenset(
    {"pool_type", "proj_type", "proj_bias", "output_tokens", "final_ln_after_pool", "eos_id", "pad_id"}
)


@dataclass(frozen=True)
class TextModelConfig:
    """The open_clip text_cfg fields that shape the token path."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"text model {name} must be a positive int, got {value!r}")
        if not isinstance(self.layers, int) or self.layers < 2:
            # The penultimate layer has to exist.
            raise ValueError(f"text model layers must be an int >= 2, got {self.layers!r}")
        if self.width % self.heads:
            raise ValueError(f"text model width {self.width} is not divisible by heads {self.heads}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"text model mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "TextModelConfig":
        known = {f.name for f in fields(cls)}
        unsupported = sorted(set(cfg) - known - _IGNORED_CFG_KEYS)
        if unsupported:
            raise ValueError(f"unsupported text model config keys: {unsupported}")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @classmethod
    def for_arch(cls, arch: str = DEFAULT_ARCH) -> "TextModelConfig":
        """Text config bundled with open_clip for a built-in architecture (no network)."""
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"open_clip has no bundled config for architecture {arch!r}")
        return cls.from_dict(model_cfg["text_cfg"])


class TextEncoder(nn.Module):
    """Penultimate-layer token features of an OpenCLIP text tower: (b, context_length, width).

    Parameter names match the text keys of an open_clip CLIP state dict, so checkpoint tensors load
    without renaming.
    """

    def __init__(self, cfg: TextModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        # open_clip runs LayerNorm in float32 for half-precision towers; do the same.
        norm_layer = LayerNormFp32 if dtype in (torch.float16, torch.bfloat16) else LayerNorm
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            width=cfg.width,
            layers=cfg.layers - 1,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            ls_init_value=cfg.ls_init_value,
            norm_layer=norm_layer,
        )
        self.ln_final = norm_layer(cfg.width)
        self.tokenizer = SimpleTokenizer(context_length=cfg.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, context_length) int64 -> (b, context_length, width)."""
        x = self.token_embedding(tokens) + self.positional_embedding
        length = x.shape[1]
        attn_mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        # open_clip >= 2.24 builds its attention blocks batch-first by default and records it in
        # `batch_first`; older releases have no such attribute and their blocks take (L, N, D).
        batch_first = getattr(self.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return self.ln_final(x)

    def count_tokens(self, text: str) -> int:
        """Tokens the text needs including start and end tokens (before truncation)."""
        return len(self.tokenizer.encode(text)) + 2

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Encode captions; also says for each whether it was cut to the context length."""
        if isinstance(texts, str):
            raise ValueError(f"texts must be a list of strings, got the string {texts!r}")
        truncated = [self.count_tokens(t) > self.cfg.context_length for t in texts]
        device = self.positional_embedding.device
        tokens = self.tokenizer(list(texts), context_length=self.cfg.context_length).to(device)
        return self.forward(tokens), truncated


def _read_tensors(path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """Read only `keys` from a checkpoint; other entries (the vision tower) are never loaded."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys & set(f.keys())}
    # mmap keeps unread tensors on disk; weights_only refuses arbitrary pickled code.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {k: state[k] for k in keys if k in state}


def load_text_encoder(
    weights_path: str | os.PathLike,
    model_cfg: Mapping[str, Any] | TextModelConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Build the text tower and fill it from an open_clip CLIP checkpoint (.safetensors or .bin/.pt).

    model_cfg: an open_clip text_cfg dict or a TextModelConfig (e.g. `TextModelConfig.for_arch(arch)`);
    None means the bundled ViT-H-14 text config.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"text encoder weights not found: {path}")
    if model_cfg is None:
        cfg = TextModelConfig.for_arch()
    elif isinstance(model_cfg, TextModelConfig):
        cfg = model_cfg
    else:
        cfg = TextModelConfig.from_dict(model_cfg)
    # Built on the meta device: no memory and no random init for weights that are overwritten anyway.
    with torch.device("meta"):
        encoder = TextEncoder(cfg, dtype=dtype)
    wanted = set(encoder.state_dict().keys())
    tensors = _read_tensors(path, wanted)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} text-tower tensors for this config, e.g. {missing[:5]}"
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    del tensors
    encoder.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded text encoder (%d blocks of %d) from %s", cfg.layers - 1, cfg.layers, path)
    return encoder.eval().requires_grad_(False)
