"""Diffusion: noise schedule, DPM-Solver++(2M) SDE sampler, guidance and temporal chunking.

Typical use (SPEC 1.9-1.11)::

    hint, t_hint = noise_hint(z[:, :, :: k + 1], noise_aug, generator=g)
    x_T = start_latent(z, generator=g)
    x0 = sample(model, x_T, cond, uncond, windows=chunk_windows(F, k), generator=g)
"""

from .chunking import Evaluator, Job, blend_time, evaluate_batched, evaluate_sequential, merge_windows
from .guidance import GuidedDenoiser, apply_guidance, x0_from_v
from .sampler import StepInfo, gaussian_noise_sampler, sample, sample_dpmpp_2m_sde
from .schedule import (
    NOISE_AUG_MAX,
    NUM_TIMESTEPS,
    T_MAX,
    Schedule,
    diffuse,
    discretized_timesteps,
    get_schedule,
    noise_hint,
    num_model_evals,
    sampling_sigmas,
    start_latent,
    vp_sigmas,
)

__all__ = [
    "Evaluator",
    "Job",
    "blend_time",
    "evaluate_batched",
    "evaluate_sequential",
    "merge_windows",
    "GuidedDenoiser",
    "apply_guidance",
    "x0_from_v",
    "StepInfo",
    "gaussian_noise_sampler",
    "sample",
    "sample_dpmpp_2m_sde",
    "NOISE_AUG_MAX",
    "NUM_TIMESTEPS",
    "T_MAX",
    "Schedule",
    "diffuse",
    "discretized_timesteps",
    "get_schedule",
    "noise_hint",
    "num_model_evals",
    "sampling_sigmas",
    "start_latent",
    "vp_sigmas",
]
