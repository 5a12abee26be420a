"""Checking and normalising the network's call arguments (shared by UNet and ControlNet)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def latent_size_ok(h: int, w: int, num_levels: int) -> bool:
    """Whether a latent of size (h, w) survives the down/up path with matching skip sizes.

    Each Downsample maps h -> (h+1)//2 + 1 (2 rows of padding) and w -> (w-1)//2 + 1; each
    Upsample maps h -> 2h - 2 and w -> 2w. With 4 levels this means h % 8 == 2 and w % 8 == 0.
    """
    sizes = [(h, w)]
    for _ in range(num_levels - 1):
        ph, pw = sizes[-1]
        sizes.append(((ph + 1) // 2 + 1, (pw - 1) // 2 + 1))
    for level in range(num_levels - 1, 0, -1):
        uh, uw = sizes[level]
        if (2 * uh - 2, 2 * uw) != sizes[level - 1]:
            return False
    return True


def _batch_vector(value, batch: int, name: str, device: torch.device) -> torch.Tensor:
    """A per-item scalar (timestep, t_hint, s_cond) as a (batch,) tensor; a scalar or a
    length-1 value is shared by all items."""
    v = torch.as_tensor(value, device=device)
    if v.ndim == 0:
        v = v.expand(batch)
    elif v.ndim == 1 and v.shape[0] == 1 and batch != 1:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(v.shape)}")
    return v


@dataclass
class NetworkInputs:
    """Validated arguments of one network call (see `VEnhancerUNet.forward`)."""

    x: torch.Tensor  # (b, c, f, h, w)
    t: torch.Tensor  # (b,)
    y: torch.Tensor  # (b, M, context_dim)
    hint: torch.Tensor  # (b, c, n_key, h, w)
    t_hint: torch.Tensor  # (b,)
    s_cond: torch.Tensor  # (b,)
    mask_cond: torch.Tensor  # (b, f) int64, key-frame index or -1

    @property
    def num_frames(self) -> int:
        return self.x.shape[2]


def prepare_inputs(x, t, y, hint, t_hint, s_cond, mask_cond, *, in_dim: int, context_dim: int, num_levels: int, dtype: torch.dtype | None) -> NetworkInputs:
    """Check shapes and values, broadcast per-item scalars and the mask, cast the float inputs
    to `dtype` (None: leave them, e.g. under autocast)."""
    if x.ndim != 5 or x.shape[1] != in_dim:
        raise ValueError(f"x must be (b, {in_dim}, f, h, w), got {tuple(x.shape)}")
    b, _, f, h, w = x.shape
    if not latent_size_ok(h, w, num_levels):
        rule = " (height % 8 == 2 and width % 8 == 0)" if num_levels == 4 else ""
        raise ValueError(f"latent size {h}x{w} does not fit the network's down/up path{rule}; pad the input first")
    device = x.device
    if y.ndim != 3 or y.shape[0] != b or y.shape[2] != context_dim:
        raise ValueError(f"y must be ({b}, tokens, {context_dim}), got {tuple(y.shape)}")
    if hint.ndim != 5 or hint.shape[0] != b or hint.shape[1] != in_dim or tuple(hint.shape[3:]) != (h, w):
        raise ValueError(f"hint must be ({b}, {in_dim}, n_key, {h}, {w}), got {tuple(hint.shape)}")
    n_key = hint.shape[2]

    mask = torch.as_tensor(mask_cond, device=device).long()
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape[0] == 1 and b != 1:
        mask = mask.expand(b, -1)
    if mask.shape != (b, f):
        raise ValueError(f"mask_cond must have shape ({b}, {f}) (one entry per frame), got {tuple(mask.shape)}")
    # An out-of-range index would be a device-side assert on CUDA: check here, once per call.
    lo, hi = int(mask.min()), int(mask.max())
    if lo < -1 or hi >= n_key:
        raise ValueError(f"mask_cond entries must be -1 or a key-frame index in [0, {n_key}), got range [{lo}, {hi}]")

    if dtype is not None:
        x, y, hint = x.to(dtype), y.to(dtype), hint.to(dtype)
    return NetworkInputs(
        x=x,
        t=_batch_vector(t, b, "t", device),
        y=y,
        hint=hint,
        t_hint=_batch_vector(t_hint, b, "t_hint", device),
        s_cond=_batch_vector(s_cond, b, "s_cond", device),
        mask_cond=mask,
    )
