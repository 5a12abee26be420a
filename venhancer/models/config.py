"""Construction settings of the denoising network (UNet + video ControlNet)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

# GroupNorm in every ResBlock, transformer and temporal block uses this many groups; the
# checkpoint's normalisation layers were trained with it, so it is not a setting.
GROUP_NORM_GROUPS = 32

# Keys found in the reference constructor's keyword arguments (see tests/fixtures/tiny_config.json)
# that describe training or alternative code paths this inference-only network does not have.
# They are accepted and ignored so a reference config can be fed to `UNetConfig.from_dict` as is.
REFERENCE_ONLY_KEYS = frozenset(
    {
        "y_dim",
        "use_scale_shift_norm",
        "dropout",
        "temporal_attn_times",
        "temporal_attention",
        "use_checkpoint",
        "use_image_dataset",
        "use_fps_condition",
        "use_sim_mask",
        "training",
        "inpainting",
    }
)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class UNetConfig:
    """Shape settings of `VEnhancerUNet`; the defaults are the published full-size model.

    `dim_mult[i]` gives the width `dim * dim_mult[i]` of encoder level i; a level gets spatial
    and temporal attention when its scale `1 / 2**i` is listed in `attn_scales`.
    """

    in_dim: int = 4
    dim: int = 320
    context_dim: int = 1024
    out_dim: int = 4
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    head_dim: int = 64
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        # Lists from JSON are normalised to tuples so the config stays hashable and comparable.
        object.__setattr__(self, "dim_mult", tuple(self.dim_mult))
        object.__setattr__(self, "attn_scales", tuple(float(s) for s in self.attn_scales))

        for name in ("in_dim", "dim", "context_dim", "out_dim", "num_heads", "head_dim", "num_res_blocks"):
            _check_positive_int(name, getattr(self, name))
        if not self.dim_mult:
            raise ValueError("UNetConfig.dim_mult must list at least one level, got ()")
        for mult in self.dim_mult:
            if isinstance(mult, bool) or not isinstance(mult, int) or mult <= 0:
                raise ValueError(f"UNetConfig.dim_mult entries must be positive integers, got {mult!r} in {self.dim_mult}")
        for width in self.widths:
            if width % GROUP_NORM_GROUPS:
                raise ValueError(
                    f"UNetConfig: level width {width} (dim={self.dim} x mult) must be divisible by "
                    f"{GROUP_NORM_GROUPS} GroupNorm groups"
                )
            if width % self.head_dim:
                raise ValueError(
                    f"UNetConfig: level width {width} must be divisible by head_dim={self.head_dim} "
                    f"(attention heads are width // head_dim)"
                )
        level_scales = [1.0 / 2**i for i in range(len(self.dim_mult))]
        for scale in self.attn_scales:
            if not any(math.isclose(scale, s, rel_tol=1e-9) for s in level_scales):
                raise ValueError(
                    f"UNetConfig.attn_scales entry {scale!r} matches no level; "
                    f"allowed scales for {len(self.dim_mult)} levels: {level_scales}"
                )

    # ------------------------------------------------------------------ derived sizes
    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each encoder level."""
        return tuple(self.dim * m for m in self.dim_mult)

    @property
    def embed_dim(self) -> int:
        """Width of the time embedding (and the ControlNet's extra embeddings)."""
        return 4 * self.dim

    @property
    def hint_dim(self) -> int:
        """Width of the ControlNet's hint projection (320 upstream, which equals `dim` there)."""
        return self.dim

    def level_has_attention(self, level: int) -> bool:
        scale = 1.0 / 2**level
        return any(math.isclose(scale, s, rel_tol=1e-9) for s in self.attn_scales)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Build from a mapping of field values.

        Accepts the reference constructor kwargs (reference-only keys such as `dropout` are
        ignored); any other unknown key is an error so a typo does not go unnoticed.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in REFERENCE_ONLY_KEYS)
        if unknown:
            raise ValueError(f"UNetConfig.from_dict: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dim_mult"] = list(self.dim_mult)
        d["attn_scales"] = list(self.attn_scales)
        return d
