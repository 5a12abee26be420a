"""DPM-Solver++(2M) SDE (SPEC 4) and the sampling entry point.

:func:`sample_dpmpp_2m_sde` is a pure k-diffusion style solver over ``denoiser(x, sigma) -> x0``;
:func:`sample` wires schedule, guidance, temporal windows and noise together the way the
reference pipeline does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .chunking import Evaluator, ModelFn, evaluate_batched, evaluate_sequential
from .guidance import GuidedDenoiser
from .schedule import SolverMode, sampling_sigmas

__all__ = [
    "Denoiser",
    "NoiseSampler",
    "StepInfo",
    "gaussian_noise_sampler",
    "sample_dpmpp_2m_sde",
    "sample",
]

logger = logging.getLogger(__name__)

#: ``denoiser(x, sigma) -> x0`` with ``sigma`` a 0-d float32 tensor in k-diffusion units.
Denoiser = Callable[[Tensor, Tensor], Tensor]
#: ``noise_sampler(sigma, sigma_next) -> N(0, 1) tensor shaped like x``.
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What the solver reports after each step ``i`` (0-based) of ``total``."""

    i: int
    total: int
    sigma: Tensor
    sigma_next: Tensor
    x: Tensor
    denoised: Tensor


def gaussian_noise_sampler(like: Tensor, generator: Optional[torch.Generator] = None) -> NoiseSampler:
    """i.i.d. standard normal noise shaped like ``like`` (same device/dtype), drawn from ``generator``.

    The reference draws from a Brownian tree instead; for a fixed step sequence the increments have
    the same distribution. ``generator`` must live on ``like``'s device.
    """

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    return draw


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    noise_sampler: Optional[NoiseSampler] = None,
    callback: Optional[Callable[[StepInfo], None]] = None,
    disable_progress: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) SDE, eta 1, midpoint variant, from ``sigmas[0]`` down to ``sigmas[-1]``.

    ``x`` is already at noise level ``sigmas[0]`` (k-diffusion units). For each step with
    ``h = log(s_i / s_{i+1})``: ``x = (s_{i+1}/s_i) e^{-h} x + (1 - e^{-2h}) x0``; from the second
    step on ``x += 0.5 (1 - e^{-2h}) / r (x0 - x0_prev)`` with ``r = h_prev / h``; then
    ``x += s_{i+1} sqrt(1 - e^{-2h}) noise_sampler(s_i, s_{i+1})``. A step to sigma 0 returns x0.
    Sigma arithmetic is float32 (as in the reference).
    """
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    if noise_sampler is None:
        noise_sampler = gaussian_noise_sampler(x)
    total = int(sigmas.shape[0]) - 1
    steps = range(total)
    if not disable_progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="denoising", unit="step")
    x0_prev: Optional[Tensor] = None
    h_prev: Optional[Tensor] = None
    for i in steps:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = sigma.log() - sigma_next.log()
            # 1 - exp(-2h) via expm1 keeps precision for small steps.
            one_minus = -torch.expm1(-2.0 * h)
            x = (sigma_next / sigma) * torch.exp(-h) * x + one_minus * x0
            if x0_prev is not None:
                assert h_prev is not None
                r = h_prev / h
                x = x + 0.5 * one_minus * (1.0 / r) * (x0 - x0_prev)
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * one_minus.sqrt()
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(StepInfo(i, total, sigma, sigma_next, x, x0))
    return x


@torch.no_grad()
def sample(
    model: ModelFn,
    x_T: Tensor,
    cond: Mapping[str, Any],
    uncond: Optional[Mapping[str, Any]],
    *,
    solver_mode: SolverMode = "fast",
    steps: int = 15,
    guide_scale: float = 7.5,
    guide_rescale: float = 0.2,
    windows: Optional[Sequence[tuple[int, int]]] = None,
    noise_sampler: Optional[NoiseSampler] = None,
    generator: Optional[torch.Generator] = None,
    batch_branches: bool = False,
    evaluate: Optional[Evaluator] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, int], None]] = None,
) -> Tensor:
    """Denoise the SDEdit start latent ``x_T`` (VP space) to x0, as the reference pipeline does.

    Args:
        model: ``model(x, t, **kwargs) -> v`` (v-prediction; ``t`` a (b,) int64 tensor).
        x_T: ``alpha[899] z + sigma[899] eps`` (:func:`~venhancer.diffusion.schedule.start_latent`);
            the solver starts from ``x_T * s_k[0]`` (**quirk**: multiplied by s_k, not divided by alpha).
        cond, uncond: model keywords ``y, hint, mask_cond, s_cond, t_hint`` of the two branches
            (``uncond`` may be None when ``guide_scale == 1``: one branch only).
        solver_mode, steps: ``"fast"`` (14 network steps, ``steps`` ignored) or ``"normal"``.
        windows: temporal windows (``planning.chunk_windows``); None denoises the whole clip at once.
        noise_sampler: SDE noise source; default i.i.d. Gaussian from ``generator`` (x's device/dtype).
        batch_branches: run cond and uncond as one batch per window (ignored if ``evaluate`` given).
        evaluate: custom job evaluator (e.g. spreading jobs over devices).
        progress: show a tqdm bar over solver steps.
        callback: ``callback(step_index, total)`` after each solver step.
    """
    sigmas = sampling_sigmas(solver_mode, steps)
    if evaluate is None:
        evaluate = evaluate_batched if batch_branches else evaluate_sequential
    denoiser = GuidedDenoiser(
        model,
        cond,
        uncond,
        guide_scale=guide_scale,
        guide_rescale=guide_rescale,
        windows=windows,
        evaluate=evaluate,
    )
    x = x_T * sigmas[0].to(device=x_T.device, dtype=x_T.dtype)
    if noise_sampler is None:
        noise_sampler = gaussian_noise_sampler(x, generator)
    step_cb = None if callback is None else (lambda info: callback(info.i, info.total))
    logger.debug(
        "sampling: mode=%s, %d steps, windows=%s, guide_scale=%s",
        solver_mode,
        sigmas.shape[0] - 1,
        windows,
        guide_scale,
    )
    return sample_dpmpp_2m_sde(
        denoiser, x, sigmas, noise_sampler=noise_sampler, callback=step_cb, disable_progress=not progress
    )
