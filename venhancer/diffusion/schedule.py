"""Noise schedule (SPEC 4): VP sigma/alpha tables, timestep <-> k-diffusion sigma, forward diffusion.

Precision: every table is computed in float32, as the reference does. Computing in float64 and
casting is *further* from the stored reference table (max relative error 8.4e-5 against 2.7e-7 in
float32, mostly near t = 999 where ``1 - sigma^2`` loses precision), so float32 it is.

Units: ``sigma``/``alpha`` (VP, ``alpha^2 + sigma^2 = 1``) are indexed by the integer timestep
``t in [0, 999]``; the solver works in k-diffusion units ``s_k = sigma / alpha``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from venhancer.options import NOISE_AUG_MAX  # the upper clamp of noise_aug (SPEC 1.9), checked there too

__all__ = [
    "NUM_TIMESTEPS",
    "T_MAX",
    "NOISE_AUG_MAX",
    "SolverMode",
    "Schedule",
    "vp_sigmas",
    "get_schedule",
    "discretized_timesteps",
    "sampling_sigmas",
    "num_model_evals",
    "diffuse",
    "start_latent",
    "noise_hint",
]

logger = logging.getLogger(__name__)

NUM_TIMESTEPS: int = 1000
#: Largest timestep the sampler starts from (900 noise levels are used, SPEC 1.10).
T_MAX: int = 899

SolverMode = Literal["fast", "normal"]

_LOGSNR_HALF_RANGE = 7.5  # log-SNR spans [-15, 15]; the cosine is parametrised by half of it.
_SHIFT_LOW = 2.0  # shift scale weighted by t (the low-noise end)
_SHIFT_HIGH = 4.0  # shift scale weighted by 1 - t


def vp_sigmas(n: int = NUM_TIMESTEPS) -> Tensor:
    """The ``n`` VP noise levels (float32, increasing with t) of the interpolated-cosine schedule.

    ``t = linspace(1, 0, n)``; ``logsnr(t) = t * cos_shift(t, 2) + (1 - t) * cos_shift(t, 4)`` with
    ``cos_shift(t, s) = -2 log tan(a_min + t (a_max - a_min)) + 2 log(1/s)``; ``sigma =
    sqrt(sigmoid(-logsnr))``; then rescaled to zero terminal SNR so that ``sigma[-1] == 1``.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n!r}")
    t = torch.linspace(1.0, 0.0, n, dtype=torch.float32)
    a_min = math.atan(math.exp(_LOGSNR_HALF_RANGE))
    a_max = math.atan(math.exp(-_LOGSNR_HALF_RANGE))
    logsnr_cos = -2.0 * torch.log(torch.tan(a_min + t * (a_max - a_min)))
    shift_low = logsnr_cos + 2.0 * math.log(1.0 / _SHIFT_LOW)
    shift_high = logsnr_cos + 2.0 * math.log(1.0 / _SHIFT_HIGH)
    logsnr = t * shift_low + (1.0 - t) * shift_high
    sigmas = torch.sqrt(torch.sigmoid(-logsnr))
    s_min, s_max = sigmas.min(), sigmas.max()
    return s_min + (sigmas - s_min) * (1.0 - s_min) / (s_max - s_min)


def _gather(table: Tensor, t: Union[int, Tensor], like: Tensor) -> Tensor:
    """``table[t]`` shaped to broadcast against ``like`` (batch first), in ``like``'s dtype/device."""
    n = table.shape[0]
    if isinstance(t, Tensor):
        idx = t.to(device=table.device, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"timesteps must lie in [0, {n - 1}], got {t.tolist()}")
        vals = table[idx].to(device=like.device, dtype=like.dtype)
        if vals.numel() == 1:
            return vals.reshape(())
        if vals.numel() != like.shape[0]:
            raise ValueError(f"t has {vals.numel()} entries but the batch has {like.shape[0]} items")
        return vals.reshape(-1, *([1] * (like.dim() - 1)))
    if not 0 <= int(t) < n:
        raise ValueError(f"timestep must lie in [0, {n - 1}], got {t!r}")
    return table[int(t)].to(device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class Schedule:
    """Discrete VP schedule plus the k-diffusion view of it (all float32, CPU).

    ``sigmas[t]``, ``alphas[t] = sqrt(1 - sigmas[t]^2)`` and ``log_ksigmas[t] = log(s_k(t))`` with
    ``s_k = sqrt(sigma^2 / (1 - sigma^2))`` (the reference's form; ``inf`` at t = 999).
    """

    sigmas: Tensor
    alphas: Tensor
    log_ksigmas: Tensor

    @classmethod
    def create(cls, n: int = NUM_TIMESTEPS) -> "Schedule":
        sigmas = vp_sigmas(n)
        alphas = torch.sqrt(1.0 - sigmas**2)
        log_ksigmas = torch.sqrt(sigmas**2 / (1.0 - sigmas**2)).log()
        return cls(sigmas=sigmas, alphas=alphas, log_ksigmas=log_ksigmas)

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def alpha(self, t: Union[int, Tensor], like: Tensor) -> Tensor:
        """``alpha[t]`` broadcastable against ``like`` (``t``: int, 0-d or per-batch tensor)."""
        return _gather(self.alphas, t, like)

    def sigma(self, t: Union[int, Tensor], like: Tensor) -> Tensor:
        """``sigma[t]`` broadcastable against ``like``."""
        return _gather(self.sigmas, t, like)

    def t_to_ksigma(self, t: Tensor) -> Tensor:
        """k-diffusion sigma at (possibly fractional) timesteps: log-linear between table entries."""
        t = t.to(torch.float32)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        log_s = (1 - w) * self.log_ksigmas[low] + w * self.log_ksigmas[high]
        return log_s.exp()

    def ksigma_to_t(self, ksigma: Tensor) -> Tensor:
        """Continuous timestep of k-diffusion sigmas: inverse of :meth:`t_to_ksigma` (float32).

        The lower bracket is the last table entry whose log-sigma is <= the query (entries are
        increasing); weights are clamped to [0, 1], so out-of-range sigmas saturate.
        """
        table = self.log_ksigmas.to(ksigma.device)
        log_s = ksigma.to(torch.float32).log()
        flat = log_s.reshape(-1)
        low = (flat[:, None] >= table[None, :]).sum(dim=1) - 1
        low = low.clamp(min=0, max=table.shape[0] - 2)
        high = low + 1
        lo_v, hi_v = table[low], table[high]
        w = ((lo_v - flat) / (lo_v - hi_v)).clamp(0, 1)
        return ((1 - w) * low + w * high).reshape(ksigma.shape)

    def ksigma_to_step(self, ksigma: Tensor) -> Tensor:
        """Integer timestep the network sees for a k-diffusion sigma: round half to even, int64."""
        return torch.round(self.ksigma_to_t(ksigma)).long()


@lru_cache(maxsize=1)
def get_schedule() -> Schedule:
    """The (cached) 1000-step schedule used everywhere."""
    return Schedule.create()


def discretized_timesteps(solver_mode: SolverMode = "fast", steps: int = 15) -> Tensor:
    """Float32 "trailing" timesteps from ``T_MAX``, before the last-entry quirk of :func:`sampling_sigmas`.

    normal: ``arange(899, -1, -(900 / (steps + 1)))`` (steps + 1 entries);
    fast (``steps`` ignored): ``arange(899, 499, -100)`` then ``arange(500, -1, -501 / 11)``.
    """
    if solver_mode == "fast":
        coarse = torch.arange(T_MAX, 499, -100, dtype=torch.float32)
        fine = torch.arange(500, -1, -501 / 11, dtype=torch.float32)
        return torch.cat([coarse, fine])
    if solver_mode == "normal":
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return torch.arange(T_MAX, -1, -((T_MAX + 1) / (steps + 1)), dtype=torch.float32)
    raise ValueError(f"solver_mode must be 'fast' or 'normal', got {solver_mode!r}")


def sampling_sigmas(solver_mode: SolverMode = "fast", steps: int = 15) -> Tensor:
    """k-diffusion sigma sequence the solver walks (float32, decreasing, ends in 0).

    The discretised timesteps are converted to sigmas and a 0 is appended, after dropping the last
    non-zero sigma (**quirk**: fast mode therefore makes 14 network evaluations per branch, normal
    mode ``steps``).
    """
    ksigmas = get_schedule().t_to_ksigma(discretized_timesteps(solver_mode, steps))
    return torch.cat([ksigmas[:-1], ksigmas.new_zeros(1)])


def num_model_evals(solver_mode: SolverMode = "fast", steps: int = 15) -> int:
    """Denoiser calls (per guidance branch, per temporal window) of one sampling run."""
    return int(sampling_sigmas(solver_mode, steps).shape[0]) - 1


def diffuse(x0: Tensor, t: Union[int, Tensor], noise: Tensor) -> Tensor:
    """Forward diffusion ``alpha[t] * x0 + sigma[t] * noise``.

    ``t`` is an integer timestep or an int tensor with one entry per batch item.
    """
    sched = get_schedule()
    return sched.alpha(t, x0) * x0 + sched.sigma(t, x0) * noise


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def start_latent(
    z: Tensor, noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None
) -> Tensor:
    """SDEdit start point ``alpha[899] * z + sigma[899] * eps`` (SPEC 1.10)."""
    eps = _randn_like(z, generator) if noise is None else noise
    return diffuse(z, T_MAX, eps)


def noise_hint(
    z_key: Tensor,
    noise_aug: int,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Noise-augmented key-frame latents for the ControlNet hint (SPEC 1.9).

    ``noise_aug`` is clamped to ``[0, 300]`` (with a warning). ``noise_aug == 0`` means no noise
    (**fix**: upstream indexes t = -1 there, i.e. pure noise): returns ``z_key`` and ``t_hint = 0``.
    Otherwise ``t_hint = noise_aug - 1`` and ``hint = alpha[t_hint] * z_key + sigma[t_hint] * eps``.
    Returns ``(hint, t_hint)`` with ``t_hint`` an int64 tensor of shape ``(b,)`` on ``z_key``'s device.
    """
    if isinstance(noise_aug, bool) or not isinstance(noise_aug, (int, float)) or not math.isfinite(noise_aug):
        raise ValueError(f"noise_aug must be a finite integer, got {noise_aug!r}")
    if noise_aug != int(noise_aug):
        raise ValueError(f"noise_aug must be an integer, got {noise_aug!r}")
    level = int(noise_aug)
    clamped = min(max(level, 0), NOISE_AUG_MAX)
    if clamped != level:
        logger.warning("noise_aug %d is outside [0, %d]; using %d", level, NOISE_AUG_MAX, clamped)
    batch = z_key.shape[0]
    if clamped == 0:
        return z_key, torch.zeros(batch, dtype=torch.long, device=z_key.device)
    t_hint = clamped - 1
    eps = _randn_like(z_key, generator) if noise is None else noise
    hint = diffuse(z_key, t_hint, eps)
    return hint, torch.full((batch,), t_hint, dtype=torch.long, device=z_key.device)
