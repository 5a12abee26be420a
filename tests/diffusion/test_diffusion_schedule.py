"""Schedule, timestep lists, forward diffusion and hint noising against reference/sampler_ref.*.

The schedule is computed in float32 (as the reference); it matches the stored table to 2.7e-7
relative, while a float64 computation would be 8.4e-5 off.
"""

from __future__ import annotations

import pytest
import torch
from diffusion_helpers import sampler_json, sampler_ref

from venhancer.diffusion import schedule as S


def test_vp_sigmas_match_reference():
    ref = sampler_ref()["schedule_sigmas"]
    ours = S.get_schedule().sigmas
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    assert bool((ours[1:] > ours[:-1]).all())  # increasing with t
    assert float(ours[-1]) == 1.0  # zero terminal SNR


def test_alphas_complement_sigmas():
    sch = S.get_schedule()
    torch.testing.assert_close(sch.alphas**2 + sch.sigmas**2, torch.ones(1000), rtol=0, atol=1e-6)


TABLE = sampler_json()["schedule_table"]


@pytest.mark.parametrize("name", sorted(TABLE))
def test_schedule_table(name):
    row = TABLE[name]
    mode, steps = row["solver_mode"], row["steps_arg"]
    ts = S.discretized_timesteps(mode, steps)
    assert ts.tolist() == row["discretized_timesteps"]  # exact float32 values
    sigmas = S.sampling_sigmas(mode, steps)
    ref_sigmas = torch.tensor(row["sigmas"])
    assert sigmas.shape == ref_sigmas.shape and float(sigmas[-1]) == 0.0
    torch.testing.assert_close(sigmas, ref_sigmas, rtol=1e-4, atol=0)
    sch = S.get_schedule()
    unrounded = sch.ksigma_to_t(sigmas[:-1])
    torch.testing.assert_close(unrounded, torch.tensor(row["unrounded_t"]), rtol=0, atol=1e-3)
    assert sch.ksigma_to_step(sigmas[:-1]).tolist() == row["model_t"]  # exact, half to even
    assert S.num_model_evals(mode, steps) == row["num_model_steps"]
    # One noise injection per step except the final step to sigma 0.
    assert row["num_noise_injections"] == row["num_model_steps"] - 1


def test_half_to_even_rounding_is_used():
    # normal/15 has exact .5 ties: 561.5 -> 562, 336.5 -> 336, 111.5 -> 112.
    t = S.get_schedule().ksigma_to_step(S.sampling_sigmas("normal", 15)[:-1]).tolist()
    assert t[6] == 562 and t[10] == 336 and t[14] == 112


def test_t_ksigma_roundtrip_at_integers():
    sch = S.get_schedule()
    t = torch.arange(0, 999, dtype=torch.float32)
    back = sch.ksigma_to_t(sch.t_to_ksigma(t))
    torch.testing.assert_close(back, t, rtol=0, atol=2e-3)
    vp = sch.sigmas[:999]
    torch.testing.assert_close(sch.t_to_ksigma(t), vp / torch.sqrt(1 - vp**2), rtol=1e-5, atol=0)


def test_fast_mode_ignores_steps_and_counts():
    assert S.num_model_evals("fast", 15) == 14
    assert torch.equal(S.sampling_sigmas("fast", 50), S.sampling_sigmas("fast", 15))
    assert S.num_model_evals("normal", 1) == 1


@pytest.mark.parametrize("bad", [("slow", 15), ("normal", 0), ("normal", 2.5)])
def test_bad_solver_arguments(bad):
    with pytest.raises(ValueError):
        S.sampling_sigmas(*bad)


def test_diffuse_matches_reference():
    d = sampler_ref()
    out = S.diffuse(d["diffuse_x0"], d["diffuse_t"], d["diffuse_noise"])
    torch.testing.assert_close(out, d["diffuse_out"], rtol=0, atol=1e-6)
    # Integer t for a single item, and the start latent helper at t = 899.
    item0 = S.diffuse(d["diffuse_x0"][:1], 199, d["diffuse_noise"][:1])
    torch.testing.assert_close(item0, d["diffuse_out"][:1], rtol=0, atol=1e-6)
    start = S.start_latent(d["diffuse_x0"][1:], d["diffuse_noise"][1:])
    torch.testing.assert_close(start, d["diffuse_out"][1:], rtol=0, atol=1e-6)
    assert list(d["diffuse_t"].tolist()) == [199, S.T_MAX]


def test_noise_hint_levels():
    d = sampler_ref()
    z, eps = d["diffuse_x0"][:1], d["diffuse_noise"][:1]
    hint, t_hint = S.noise_hint(z, 200, noise=eps)
    assert t_hint.dtype == torch.int64 and t_hint.tolist() == [199]
    torch.testing.assert_close(hint, d["diffuse_out"][:1], rtol=0, atol=1e-6)


def test_noise_hint_zero_is_no_noise():
    z = torch.randn(2, 4, 3, 2, 2)
    hint, t_hint = S.noise_hint(z, 0, noise=torch.randn_like(z))
    assert torch.equal(hint, z) and t_hint.tolist() == [0, 0]
    hint, t_hint = S.noise_hint(z, -7)  # clamped up to 0
    assert torch.equal(hint, z) and t_hint.tolist() == [0, 0]


def test_noise_hint_clamps_to_300(caplog):
    z, eps = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)
    with caplog.at_level("WARNING"):
        hint, t_hint = S.noise_hint(z, 1000, noise=eps)
    assert t_hint.tolist() == [299]
    torch.testing.assert_close(hint, S.diffuse(z, 299, eps))
    assert "noise_aug" in caplog.text


def test_noise_hint_generator_is_reproducible():
    z = torch.zeros(1, 4, 2, 2, 2)
    a, _ = S.noise_hint(z, 250, generator=torch.Generator().manual_seed(3))
    b, _ = S.noise_hint(z, 250, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and float(a.abs().sum()) > 0


@pytest.mark.parametrize("bad", [2.5, float("nan"), "200", True])
def test_noise_hint_rejects_non_integers(bad):
    with pytest.raises(ValueError, match="noise_aug"):
        S.noise_hint(torch.zeros(1, 4, 1, 2, 2), bad)


@pytest.mark.parametrize("t", [-1, 1000, torch.tensor([5, 1000])])
def test_diffuse_rejects_out_of_range_t(t):
    x = torch.zeros(2, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="timestep"):
        S.diffuse(x, t, x)
