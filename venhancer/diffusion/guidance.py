"""Classifier-free guidance and the x0 denoiser the solver calls (SPEC 4, 5).

:class:`GuidedDenoiser` turns the v-predicting network ``model(x, t, **kwargs)`` into the
k-diffusion style denoiser ``denoiser(x, sigma) -> x0``:

1. ``x_in = x * c_in`` with ``c_in = 1 / sqrt(sigma^2 + 1)``; ``t = round(t_of(sigma))`` (half to even);
2. one :class:`~venhancer.diffusion.chunking.Job` per (window, branch), run by the evaluator;
3. per window ``v = v_u + s (v_c - v_u)``, rescaled ``v *= r std(v_c) / std(v) + (1 - r)``;
4. per window ``x0 = alpha[t] x_in - sigma[t] v`` (table values at the integer t, not the
   continuous sigma), then windows are cross-faded into the full clip.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .chunking import Evaluator, Job, ModelFn, evaluate_sequential, merge_windows, slice_window_kwargs
from .schedule import Schedule, get_schedule

__all__ = ["COND", "UNCOND", "apply_guidance", "x0_from_v", "GuidedDenoiser"]

COND = "cond"
UNCOND = "uncond"

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _per_item_std(v: Tensor) -> Tensor:
    """Unbiased std over all elements of each batch item, shaped to broadcast against ``v``."""
    return v.flatten(1).std(dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def apply_guidance(
    v_cond: Tensor, v_uncond: Optional[Tensor], guide_scale: float, guide_rescale: float
) -> Tensor:
    """Classifier-free guidance on v-predictions, with guidance rescale.

    ``v = v_u + s (v_c - v_u)``; if ``guide_rescale > 0``:
    ``v *= guide_rescale * std(v_c) / std(v) + (1 - guide_rescale)`` (per batch item, unbiased std
    over all its elements). ``v_uncond=None`` (single-branch sampling) returns ``v_cond``.
    """
    if v_uncond is None:
        return v_cond
    if v_cond.dtype in _LOW_PRECISION:
        # Half-precision network outputs: do the guidance (and its std) in float32.
        v_cond, v_uncond = v_cond.float(), v_uncond.float()
    v = v_uncond + guide_scale * (v_cond - v_uncond)
    if guide_rescale > 0:
        # The clamp only guards a constant prediction (std 0); it never changes realistic values.
        ratio = _per_item_std(v_cond) / _per_item_std(v).clamp_min(1e-12)
        v = v * (guide_rescale * ratio + (1.0 - guide_rescale))
    return v


def x0_from_v(x_in: Tensor, v: Tensor, t: int, schedule: Optional[Schedule] = None) -> Tensor:
    """x0 estimate from a v-prediction at integer timestep ``t``: ``alpha[t] x_in - sigma[t] v``."""
    sched = schedule or get_schedule()
    return sched.alpha(t, x_in) * x_in - sched.sigma(t, x_in) * v


class GuidedDenoiser:
    """``denoiser(x, sigma) -> x0`` around a v-prediction network, with guidance and windows.

    Args:
        model: ``model(x, t, **kwargs) -> v``; ``t`` is a (b,) int64 tensor.
        cond: model keywords of the conditional branch (``y, hint, mask_cond, s_cond, t_hint``).
        uncond: keywords of the unconditional branch; unused (may be None) when ``guide_scale == 1``,
            in which case only the conditional branch is evaluated.
        guide_scale, guide_rescale: guidance strength and rescale factor.
        windows: temporal windows (``planning.chunk_windows``) or None for the whole clip. Windows
            must start at 0, end at the clip length and overlap consecutively.
        evaluate: runs the jobs of one call (default :func:`evaluate_sequential`).
        schedule: noise schedule (default :func:`get_schedule`).

    ``num_calls`` counts denoiser calls; ``last_t`` is the integer timestep of the latest call.
    """

    def __init__(
        self,
        model: ModelFn,
        cond: Mapping[str, Any],
        uncond: Optional[Mapping[str, Any]] = None,
        *,
        guide_scale: float = 7.5,
        guide_rescale: float = 0.2,
        windows: Optional[Sequence[tuple[int, int]]] = None,
        evaluate: Optional[Evaluator] = None,
        schedule: Optional[Schedule] = None,
    ) -> None:
        if guide_rescale < 0 or guide_rescale > 1:
            raise ValueError(f"guide_rescale must be in [0, 1], got {guide_rescale!r}")
        self.single_branch = guide_scale == 1
        if uncond is None and not self.single_branch:
            raise ValueError(f"uncond keywords are required when guide_scale != 1 (got {guide_scale!r})")
        self.model = model
        self.cond = dict(cond)
        self.uncond = None if uncond is None else dict(uncond)
        self.guide_scale = guide_scale
        self.guide_rescale = guide_rescale
        self.windows = None if windows is None else [(int(s), int(e)) for s, e in windows]
        self.evaluate = evaluate or evaluate_sequential
        self.schedule = schedule or get_schedule()
        self.num_calls = 0
        self.last_t: Optional[int] = None

    def _windows_for(self, num_frames: int) -> list[tuple[int, int]]:
        if self.windows is None:
            return [(0, num_frames)]
        windows = self.windows
        if windows[0][0] != 0 or windows[-1][1] != num_frames:
            raise ValueError(f"windows {windows} do not cover the {num_frames} frames of the latent")
        return windows

    def make_jobs(self, x_in: Tensor, t: Tensor, windows: Sequence[tuple[int, int]]) -> list[Job]:
        """Jobs of one call in reference order: for each window, cond then uncond."""
        branches: list[tuple[str, Mapping[str, Any]]] = [(COND, self.cond)]
        if not self.single_branch:
            assert self.uncond is not None
            branches.append((UNCOND, self.uncond))
        jobs = []
        for window in windows:
            start, end = window
            x_win = x_in[:, :, start:end]
            for name, kwargs in branches:
                jobs.append(Job(window, name, x_win, t, slice_window_kwargs(kwargs, window)))
        return jobs

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x0 estimate of ``x`` (k-diffusion scaling) at k-diffusion sigma ``sigma`` (0-d tensor)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.numel() != 1:
            raise ValueError("all batch items must share one sigma")
        sigma = sigma.reshape(())
        x_in = x * (1.0 / torch.sqrt(sigma**2 + 1.0)).to(x.device)
        t_int = int(self.schedule.ksigma_to_step(sigma.cpu()))
        t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=x.device)
        windows = self._windows_for(x.shape[2])
        jobs = self.make_jobs(x_in, t, windows)
        outputs = self.evaluate(self.model, jobs)
        if len(outputs) != len(jobs):
            raise RuntimeError(f"evaluator returned {len(outputs)} outputs for {len(jobs)} jobs")
        per_branch = 1 if self.single_branch else 2
        x0_parts = []
        for w in range(len(windows)):
            v_cond = outputs[w * per_branch]
            v_uncond = None if self.single_branch else outputs[w * per_branch + 1]
            v = apply_guidance(v_cond, v_uncond, self.guide_scale, self.guide_rescale)
            x0_parts.append(x0_from_v(jobs[w * per_branch].x, v, t_int, self.schedule))
        self.num_calls += 1
        self.last_t = t_int
        return x0_parts[0] if len(windows) == 1 else merge_windows(x0_parts, windows)
