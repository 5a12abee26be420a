"""The sampler trace of reference/sampler_ref.* reproduced with the documented fake denoiser.

Everything runs in float32 (schedule included), like the reference.
"""

from __future__ import annotations

import torch
from diffusion_helpers import (
    Recorder,
    per_item_fake_model,
    ref_branches,
    reference_fake_model,
    sampler_json,
    sampler_ref,
    stored_noise_sampler,
)

from venhancer.diffusion import GuidedDenoiser, StepInfo, sample, sample_dpmpp_2m_sde, sampling_sigmas


def _run_reference_case(fake=reference_fake_model, **kwargs):
    d = sampler_ref()
    cond, uncond = ref_branches()
    model = Recorder(fake)
    noise, log = stored_noise_sampler()
    out = sample(model, d["noise"], cond, uncond, solver_mode="fast", guide_scale=7.5, guide_rescale=0.2,
                 noise_sampler=noise, **kwargs)
    return out, model, log


def test_final_sample_matches_reference():
    d = sampler_ref()
    out, model, log = _run_reference_case()
    ref = d["out"]
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, rel
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    # Integer timestep of every model call (cond, uncond per step), exactly.
    assert torch.cat([c["t"] for c in model.calls]).tolist() == d["model_t"].tolist()
    branch_y = [c["y"] for c in model.calls]
    assert all(y is d["y_c"] for y in branch_y[0::2]) and all(y is d["y_u"] for y in branch_y[1::2])
    # Noise injections: one per step except the last, at the documented sigma pairs.
    ref_inj = sampler_json()["noise_injections"]
    assert len(log) == len(ref_inj) == 13
    for (s, sn), r in zip(log, ref_inj):
        assert abs(s - r["sigma"]) <= 1e-4 * r["sigma"] and abs(sn - r["sigma_next"]) <= 1e-4 * r["sigma_next"]


def test_sigma_sequence_matches_reference():
    torch.testing.assert_close(sampling_sigmas("fast"), sampler_ref()["sigmas"], rtol=1e-4, atol=0)


def test_per_step_tensors_match_reference():
    d = sampler_ref()
    cond, uncond = ref_branches()
    model = Recorder(reference_fake_model)
    denoiser = GuidedDenoiser(model, cond, uncond, guide_scale=7.5, guide_rescale=0.2)
    sigmas = sampling_sigmas("fast")
    steps: list[StepInfo] = []
    noise, _ = stored_noise_sampler()
    out = sample_dpmpp_2m_sde(denoiser, d["noise"] * sigmas[0], sigmas, noise_sampler=noise, callback=steps.append)
    assert len(steps) == 14 and denoiser.num_calls == 14
    for i, info in enumerate(steps):
        x_in = model.calls[2 * i]["x"]
        assert torch.equal(x_in, model.calls[2 * i + 1]["x"])  # both branches see the same input
        torch.testing.assert_close(x_in, d[f"step_{i}_x_in"], rtol=0, atol=2e-5, msg=f"x_in step {i}")
        torch.testing.assert_close(info.denoised, d[f"step_{i}_denoised"], rtol=0, atol=2e-5, msg=f"x0 step {i}")
    torch.testing.assert_close(out, d["out"], rtol=0, atol=2e-5)


def test_batched_branches_equal_two_pass():
    # The README fake averages y over the whole batch; its per-item twin is the same for batch 1.
    out_seq, seq_model, _ = _run_reference_case(per_item_fake_model)
    out_bat, model, _ = _run_reference_case(per_item_fake_model, batch_branches=True)
    assert len(seq_model.calls) == 28 and all(c["x"].shape[0] == 1 for c in seq_model.calls)
    assert len(model.calls) == 14 and all(c["x"].shape[0] == 2 for c in model.calls)
    assert torch.cat([c["t"] for c in model.calls]).tolist() == sampler_ref()["model_t"].tolist()
    torch.testing.assert_close(out_bat, out_seq, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_bat, sampler_ref()["out"], rtol=0, atol=2e-5)


def test_guide_scale_one_runs_one_branch():
    d = sampler_ref()
    cond, _ = ref_branches()
    model = Recorder(reference_fake_model)
    noise, _ = stored_noise_sampler()
    out = sample(model, d["noise"], cond, None, guide_scale=1.0, noise_sampler=noise)
    assert len(model.calls) == 14 and all(c["y"] is d["y_c"] for c in model.calls)
    assert torch.isfinite(out).all()


def test_progress_and_callback():
    d = sampler_ref()
    cond, uncond = ref_branches()
    seen: list[tuple[int, int]] = []
    out = sample(reference_fake_model, d["noise"], cond, uncond, solver_mode="normal", steps=5,
                 generator=torch.Generator().manual_seed(0), progress=True,
                 callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]
    again = sample(reference_fake_model, d["noise"], cond, uncond, solver_mode="normal", steps=5,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # default noise is reproducible from the generator


def test_solver_last_step_returns_denoised():
    # With a constant denoiser every step pulls towards it, and the final step returns it exactly.
    target = torch.full((1, 2, 3, 2, 2), 0.25)
    sigmas = sampling_sigmas("normal", 4)
    out = sample_dpmpp_2m_sde(lambda x, s: target, torch.randn(1, 2, 3, 2, 2) * sigmas[0], sigmas)
    assert torch.equal(out, target)
