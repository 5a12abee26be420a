"""Temporal chunking of denoiser calls (SPEC 5) as independent jobs, plus the temporal cross-fade.

At every solver call the denoiser needs one network evaluation per (temporal window, guidance
branch). Each such evaluation is a :class:`Job`; an *evaluator* ``evaluate(model, jobs) -> outputs``
runs a list of jobs and returns the network outputs in job order. The default runs them one after
the other; :func:`evaluate_batched` fuses the branches of a window into one batch. A multi-device
evaluator only has to honour the same contract (jobs are independent of each other).

The windows' x0 estimates are then merged by :func:`merge_windows` with the linear cross-fade of
:func:`blend_time`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "FRAME_KWARGS",
    "ModelFn",
    "Job",
    "Evaluator",
    "slice_window_kwargs",
    "evaluate_sequential",
    "evaluate_batched",
    "evaluate_shared_prefix",
    "blend_time",
    "merge_windows",
]

#: ``model(x, t, **kwargs) -> v``: the v-predicting network (x: (b, c, f, h, w), t: (b,) int64).
ModelFn = Callable[..., Tensor]

#: Model keyword arguments indexed by frame (dim 1) that are sliced per window. Everything else is
#: passed whole: in particular ``hint`` keeps all key frames, since ``mask_cond`` holds *global*
#: key-frame indices.
FRAME_KWARGS: frozenset[str] = frozenset({"mask_cond"})


@dataclass(frozen=True)
class Job:
    """One network evaluation: ``model(x, t, **kwargs)`` for one window and one guidance branch.

    ``x`` is the already scaled latent slice ``x_in[:, :, start:end]``; ``t`` the (b,) int64
    timestep; ``kwargs`` the branch's model keywords with frame-indexed entries sliced.
    """

    window: tuple[int, int]
    branch: str
    x: Tensor
    t: Tensor
    kwargs: Mapping[str, Any]


#: ``evaluate(model, jobs) -> [model output per job, in job order]``.
Evaluator = Callable[[ModelFn, Sequence[Job]], list[Tensor]]


def slice_window_kwargs(kwargs: Mapping[str, Any], window: tuple[int, int]) -> dict[str, Any]:
    """Copy of ``kwargs`` with the entries of :data:`FRAME_KWARGS` restricted to ``window``."""
    start, end = window
    return {k: (v[:, start:end] if k in FRAME_KWARGS else v) for k, v in kwargs.items()}


def evaluate_sequential(model: ModelFn, jobs: Sequence[Job]) -> list[Tensor]:
    """Run every job on its own, in order (the reference's call pattern)."""
    return [model(job.x, job.t, **job.kwargs) for job in jobs]


def _concat_kwargs(group: Sequence[Job]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, first in group[0].kwargs.items():
        values = [job.kwargs[key] for job in group]
        if isinstance(first, Tensor):
            merged[key] = torch.cat(values, dim=0)
        else:
            # Non-tensor settings cannot be batched; they must agree across the fused jobs.
            if any(v != first for v in values[1:]):
                raise ValueError(f"cannot batch jobs whose non-tensor argument {key!r} differs")
            merged[key] = first
    return merged


def evaluate_batched(model: ModelFn, jobs: Sequence[Job]) -> list[Tensor]:
    """Fuse consecutive jobs of the same window (the guidance branches) into one batched call.

    Inputs and every tensor keyword are concatenated along the batch dimension; the output is split
    back. Same result as :func:`evaluate_sequential` up to float rounding of batched kernels.
    """
    outputs: list[Tensor] = []
    i = 0
    while i < len(jobs):
        j = i + 1
        while j < len(jobs) and jobs[j].window == jobs[i].window:
            j += 1
        group = jobs[i:j]
        if len(group) == 1:
            outputs.append(model(group[0].x, group[0].t, **group[0].kwargs))
        else:
            x = torch.cat([job.x for job in group], dim=0)
            t = torch.cat([job.t for job in group], dim=0)
            out = model(x, t, **_concat_kwargs(group))
            outputs.extend(out.split([job.x.shape[0] for job in group], dim=0))
        i = j
    return outputs


def _same_view(a: Any, b: Any) -> bool:
    """Whether two keyword values are one and the same input (tensors: the same view of the same
    memory, which needs no device sync to check)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a is b or (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
                          and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())
    return a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)


def _differ_only_in_text(a: Job, b: Job) -> bool:
    return (a.window == b.window and _same_view(a.x, b.x) and _same_view(a.t, b.t)
            and a.kwargs.keys() == b.kwargs.keys() and "y" in a.kwargs
            and all(_same_view(a.kwargs[k], b.kwargs[k]) for k in a.kwargs if k != "y"))


def evaluate_shared_prefix(model: ModelFn, jobs: Sequence[Job]) -> list[Tensor]:
    """:func:`evaluate_sequential`, except that consecutive jobs differing only in their text
    context ``y`` (the guidance branches of a window) go to ``model.forward_branches(x, t, [y, ...],
    **other kwargs)`` together when the model has that method, which computes the layers before
    the first cross-attention once. Same outputs, fewer operations, a little more memory."""
    forward_branches = getattr(model, "forward_branches", None)
    if forward_branches is None:
        return evaluate_sequential(model, jobs)
    outputs: list[Tensor] = []
    i = 0
    while i < len(jobs):
        j = i + 1
        while j < len(jobs) and _differ_only_in_text(jobs[i], jobs[j]):
            j += 1
        first = jobs[i]
        if j == i + 1:
            outputs.append(model(first.x, first.t, **first.kwargs))
        else:
            shared = {k: v for k, v in first.kwargs.items() if k != "y"}
            outputs.extend(forward_branches(first.x, first.t, [job.kwargs["y"] for job in jobs[i:j]], **shared))
        i = j
    return outputs


def blend_time(prev: Tensor, nxt: Tensor, overlap: int) -> Tensor:
    """Cross-fade the start of ``nxt`` with the end of ``prev`` along frames (dim 2).

    For ``j < e = min(overlap, prev frames, nxt frames)``:
    ``out[j] = prev[-e + j] * (1 - j / e) + nxt[j] * (j / e)``; later frames are ``nxt``'s.
    Returns a new tensor (the reference modified ``nxt`` in place).
    """
    extent = min(overlap, prev.shape[2], nxt.shape[2])
    out = nxt.clone()
    offset = prev.shape[2] - extent
    for j in range(extent):
        w = j / extent
        out[:, :, j] = prev[:, :, offset + j] * (1 - w) + nxt[:, :, j] * w
    return out


def merge_windows(parts: Sequence[Tensor], windows: Sequence[tuple[int, int]]) -> Tensor:
    """Assemble per-window tensors ``(b, c, end - start, h, w)`` into the full clip along dim 2.

    Consecutive windows must overlap (``next.start < prev.end``); each window is cross-faded with
    its predecessor over the overlap, and each window except the last contributes its frames before
    the next window starts (SPEC 5).

    The predecessor is taken *after* its own blend (the reference blends in place, window after
    window). That matters when a window's head and tail overlaps share frames, e.g. k = 2 gives
    L = 31, O = 16, so frame 15 of the middle windows belongs to both cross-fades.
    """
    if len(parts) != len(windows) or not parts:
        raise ValueError(f"need one part per window, got {len(parts)} parts for {len(windows)} windows")
    for part, (start, end) in zip(parts, windows):
        if part.shape[2] != end - start:
            raise ValueError(f"part with {part.shape[2]} frames for window ({start}, {end})")
    pieces: list[Tensor] = []
    prev = parts[0]
    for k in range(1, len(parts)):
        (p_start, p_end), (n_start, _) = windows[k - 1], windows[k]
        overlap = p_end - n_start
        if overlap <= 0 or n_start <= p_start:
            raise ValueError(f"windows {windows[k - 1]} and {windows[k]} do not overlap")
        pieces.append(prev[:, :, : n_start - p_start])
        prev = blend_time(prev, parts[k], overlap)
    pieces.append(prev)
    return torch.cat(pieces, dim=2)
