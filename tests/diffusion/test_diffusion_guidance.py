"""Guidance arithmetic, single-branch mode, batched branches and the evaluator contract."""

from __future__ import annotations

import pytest
import torch
from diffusion_helpers import Recorder, frame_local_model

from venhancer.diffusion import (
    GuidedDenoiser,
    apply_guidance,
    evaluate_batched,
    evaluate_sequential,
    get_schedule,
    sample,
    sampling_sigmas,
    x0_from_v,
)


def _branches(frames: int = 9, k: int = 3, seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    keys = (frames - 1) // (k + 1) + 1
    mask = torch.tensor([[i // (k + 1) if i % (k + 1) == 0 else -1 for i in range(frames)]] * batch)
    common = {
        "hint": torch.randn(batch, 4, keys, 3, 4, generator=g),
        "mask_cond": mask,
        "s_cond": torch.full((batch,), 8),
        "t_hint": torch.full((batch,), 199),
    }
    cond = {"y": torch.randn(batch, 77, 8, generator=g) + 0.5, **common}
    uncond = {"y": torch.randn(batch, 77, 8, generator=g) - 0.5, **common}
    x = torch.randn(batch, 4, frames, 3, 4, generator=g)
    return x, cond, uncond


def test_apply_guidance_formula():
    g = torch.Generator().manual_seed(1)
    v_c, v_u = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    v = v_u + 7.5 * (v_c - v_u)
    for b in range(2):
        ratio = v_c[b].std() / v[b].std()  # unbiased std over all elements of the item
        expected = v[b] * (0.2 * ratio + 0.8)
        torch.testing.assert_close(apply_guidance(v_c, v_u, 7.5, 0.2)[b], expected)
    torch.testing.assert_close(apply_guidance(v_c, v_u, 7.5, 0.0), v)
    assert apply_guidance(v_c, None, 1.0, 0.2) is v_c


def test_apply_guidance_half_inputs_in_float32():
    g = torch.Generator().manual_seed(2)
    v_c, v_u = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 3, 8, 8, generator=g)
    out = apply_guidance(v_c.half(), v_u.half(), 7.5, 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, apply_guidance(v_c.half().float(), v_u.half().float(), 7.5, 0.2))


def test_x0_uses_integer_table_values():
    sch = get_schedule()
    x, v = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)
    torch.testing.assert_close(x0_from_v(x, v, 500), sch.alphas[500] * x - sch.sigmas[500] * v)


def test_batched_branches_match_two_pass_per_call():
    x, cond, uncond = _branches(batch=2)
    sigma = sampling_sigmas("fast")[3]
    seq = GuidedDenoiser(frame_local_model, cond, uncond, evaluate=evaluate_sequential)(x, sigma)
    rec = Recorder(frame_local_model)
    bat = GuidedDenoiser(rec, cond, uncond, evaluate=evaluate_batched)(x, sigma)
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 4  # 2 items x 2 branches
    torch.testing.assert_close(bat, seq, rtol=0, atol=1e-6)


def test_sample_batch_branches_flag():
    x, cond, uncond = _branches()
    a = sample(frame_local_model, x, cond, uncond, generator=torch.Generator().manual_seed(5))
    b = sample(frame_local_model, x, cond, uncond, generator=torch.Generator().manual_seed(5), batch_branches=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_guide_scale_one_single_branch_counts():
    x, cond, uncond = _branches()
    rec = Recorder(frame_local_model)
    out = sample(rec, x, cond, uncond, guide_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == 14 and all(c["y"] is cond["y"] for c in rec.calls)
    # One branch is the same as guidance with identical branches (v_u + s (v_c - v_u) = v_c).
    same = sample(frame_local_model, x, cond, cond, guide_scale=7.5, guide_rescale=0.2,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, same, rtol=0, atol=1e-5)


def test_custom_evaluator_gets_independent_jobs():
    x, cond, uncond = _branches(frames=13, k=1)
    windows = [(0, 7), (4, 13)]
    seen = []

    def reversed_evaluator(model, jobs):
        # Evaluate in reverse order (as a distributed evaluator might): results must not change.
        seen.append([(j.window, j.branch, j.x.shape[2], j.kwargs["mask_cond"].shape[1]) for j in jobs])
        outs = [model(j.x, j.t, **j.kwargs) for j in reversed(jobs)]
        return outs[::-1]

    sigma = sampling_sigmas("fast")[5]
    ref = GuidedDenoiser(frame_local_model, cond, uncond, windows=windows)(x, sigma)
    got = GuidedDenoiser(frame_local_model, cond, uncond, windows=windows, evaluate=reversed_evaluator)(x, sigma)
    assert torch.equal(ref, got)
    assert seen == [[((0, 7), "cond", 7, 7), ((0, 7), "uncond", 7, 7), ((4, 13), "cond", 9, 9), ((4, 13), "uncond", 9, 9)]]


def test_denoiser_validation():
    x, cond, uncond = _branches()
    with pytest.raises(ValueError, match="uncond"):
        GuidedDenoiser(frame_local_model, cond, None, guide_scale=7.5)
    with pytest.raises(ValueError, match="guide_rescale"):
        GuidedDenoiser(frame_local_model, cond, uncond, guide_rescale=1.5)
    with pytest.raises(ValueError, match="windows"):
        GuidedDenoiser(frame_local_model, cond, uncond, windows=[(0, 5), (3, 8)])(x, torch.tensor(2.0))


class _BranchModel:
    """frame_local_model with a forward_branches that records its calls."""

    def __init__(self):
        self.branch_calls = []
        self.single_calls = 0

    def __call__(self, x, t, **kwargs):
        self.single_calls += 1
        return frame_local_model(x, t, **kwargs)

    def forward_branches(self, x, t, contexts, **kwargs):
        self.branch_calls.append(len(contexts))
        return [frame_local_model(x, t, y=y, **kwargs) for y in contexts]


def test_shared_prefix_evaluator_groups_the_branches_of_each_window():
    from venhancer.diffusion.chunking import evaluate_shared_prefix

    x, cond, uncond = _branches(frames=9, k=3)
    sigma = sampling_sigmas("fast")[3]
    windows = [(0, 6), (4, 9)]
    want = GuidedDenoiser(frame_local_model, cond, uncond, windows=windows, evaluate=evaluate_sequential)(x, sigma)
    model = _BranchModel()
    got = GuidedDenoiser(model, cond, uncond, windows=windows, evaluate=evaluate_shared_prefix)(x, sigma)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.branch_calls == [2, 2] and model.single_calls == 0
    # Branches that differ in more than the text (here the hint) are evaluated one by one.
    other = {**uncond, "hint": uncond["hint"] + 1}
    model = _BranchModel()
    want = GuidedDenoiser(frame_local_model, cond, other, windows=windows, evaluate=evaluate_sequential)(x, sigma)
    got = GuidedDenoiser(model, cond, other, windows=windows, evaluate=evaluate_shared_prefix)(x, sigma)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.branch_calls == [] and model.single_calls == 4
    # A plain function (no forward_branches) is evaluated job by job.
    rec = Recorder(frame_local_model)
    GuidedDenoiser(rec, cond, uncond, windows=windows, evaluate=evaluate_shared_prefix)(x, sigma)
    assert len(rec.calls) == 4
