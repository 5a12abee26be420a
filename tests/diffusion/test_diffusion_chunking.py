"""Temporal chunking: the cross-fade, window merging, and chunked vs whole-clip sampling."""

from __future__ import annotations

import pytest
import torch
from diffusion_helpers import Recorder, frame_local_model, tables

from venhancer.diffusion import GuidedDenoiser, blend_time, merge_windows, sample, sampling_sigmas
from venhancer.diffusion.schedule import get_schedule
from venhancer.planning import chunk_windows, mask_cond


def _as_clip(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, -1, 1, 1)


def test_blend_time_table():
    row = tables()["blend_time"]
    a, b = _as_clip(row["a"]), _as_clip(row["b"])
    out = blend_time(a, b, row["blend_extent"])
    assert out.flatten().tolist() == row["result"]  # exact (float64)
    assert b.flatten().tolist() == row["b"]  # inputs are not modified


def test_blend_time_formula():
    prev, nxt = torch.randn(1, 2, 7, 2, 2), torch.randn(1, 2, 6, 2, 2)
    out = blend_time(prev, nxt, 4)
    for j in range(4):
        torch.testing.assert_close(out[:, :, j], prev[:, :, 3 + j] * (1 - j / 4) + nxt[:, :, j] * (j / 4))
    assert torch.equal(out[:, :, 4:], nxt[:, :, 4:])


def test_merge_windows_layout():
    windows = [(0, 31), (15, 46), (30, 61)]
    full = torch.randn(1, 2, 61, 1, 1)
    # Windows cut from one clip blend back to the same clip (weights sum to one).
    merged = merge_windows([full[:, :, s:e] for s, e in windows], windows)
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-6)
    # Distinct constants per window show who contributes where. With k = 2 (L = 31, O = 16) the
    # middle window's head and tail overlaps share frame 30: the blend with the last window starts
    # from the middle window *after* its own blend with the first (sequential, in-place semantics).
    parts = [torch.full((1, 1, e - s, 1, 1), float(i)) for i, (s, e) in enumerate(windows)]
    m = merge_windows(parts, windows).flatten()
    expected = torch.zeros(61)
    expected[15:31] = torch.tensor([j / 16 for j in range(16)])  # 0 -> 1 over frames 15..30
    expected[31:46] = torch.tensor([1 * (1 - j / 16) + 2 * (j / 16) for j in range(1, 16)])
    expected[46:] = 2
    torch.testing.assert_close(m, expected)


def test_merge_windows_rejects_gaps():
    with pytest.raises(ValueError):
        merge_windows([torch.zeros(1, 1, 5, 1, 1), torch.zeros(1, 1, 5, 1, 1)], [(0, 5), (5, 10)])
    with pytest.raises(ValueError):
        merge_windows([torch.zeros(1, 1, 4, 1, 1)], [(0, 5)])


def _clip(frames: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = (frames - 1) // (k + 1) + 1
    common = {
        "hint": torch.randn(1, 4, keys, 2, 3, generator=g),
        "mask_cond": torch.tensor([mask_cond(keys, k)]),
        "s_cond": torch.tensor([8]),
        "t_hint": torch.tensor([199]),
    }
    cond = {"y": torch.randn(1, 77, 8, generator=g) + 0.5, **common}
    uncond = {"y": torch.randn(1, 77, 8, generator=g) - 0.5, **common}
    x_T = torch.randn(1, 4, frames, 2, 3, generator=g)
    return x_T, cond, uncond


@pytest.mark.parametrize("frames,k", [(61, 2), (49, 1), (97, 3)])
def test_chunked_equals_whole_clip_for_frame_local_model(frames, k):
    # The fake model is frame-local and guidance without rescale is per-frame arithmetic, so each
    # window's x0 equals the whole-clip x0 on its frames and the cross-fade (weights summing to one)
    # must reproduce it. The model also sees global key-frame indices and the full hint.
    windows = chunk_windows(frames, k)
    assert len(windows) >= 2
    x_T, cond, uncond = _clip(frames, k)
    rec = Recorder(frame_local_model)
    chunked = sample(rec, x_T, cond, uncond, guide_rescale=0.0, windows=windows,
                     generator=torch.Generator().manual_seed(1))
    whole = sample(frame_local_model, x_T, cond, uncond, guide_rescale=0.0,
                   generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert len(rec.calls) == 14 * 2 * len(windows)
    frames_seen = [c["x"].shape[2] for c in rec.calls[: 2 * len(windows)]]
    assert frames_seen == [e - s for s, e in windows for _ in range(2)]
    for call, (s, e) in zip(rec.calls[0::2], windows * 14):
        assert torch.equal(call["mask_cond"], cond["mask_cond"][:, s:e])  # global indices kept
    # All windows of one solver call share the timestep.
    ts = torch.stack([c["t"] for c in rec.calls]).reshape(14, -1)
    assert (ts == ts[:, :1]).all()


def test_chunked_rescale_is_per_window():
    frames, k = 61, 2
    windows = chunk_windows(frames, k)
    x_T, cond, uncond = _clip(frames, k, seed=3)
    sigma = sampling_sigmas("fast")[2]
    x = x_T * 6.0
    got = GuidedDenoiser(frame_local_model, cond, uncond, guide_scale=7.5, guide_rescale=0.2, windows=windows)(x, sigma)
    # Manual: per-window guidance with the window's own std, x0 at the integer t, then cross-fade.
    t = int(get_schedule().ksigma_to_step(sigma))
    x_in = x / torch.sqrt(sigma**2 + 1)
    tt = torch.tensor([t])
    parts = []
    for s, e in windows:
        kw_c = {**cond, "mask_cond": cond["mask_cond"][:, s:e]}
        kw_u = {**uncond, "mask_cond": uncond["mask_cond"][:, s:e]}
        v_c = frame_local_model(x_in[:, :, s:e], tt, **kw_c)
        v_u = frame_local_model(x_in[:, :, s:e], tt, **kw_u)
        v = v_u + 7.5 * (v_c - v_u)
        v = v * (0.2 * v_c.std() / v.std() + 0.8)
        parts.append(get_schedule().alphas[t] * x_in[:, :, s:e] - get_schedule().sigmas[t] * v)
    out = parts[0]
    pieces = []
    for (ps, pe), (ns, _), nxt in zip(windows, windows[1:], parts[1:]):
        o = pe - ns
        blended = nxt.clone()
        for j in range(o):
            blended[:, :, j] = out[:, :, out.shape[2] - o + j] * (1 - j / o) + nxt[:, :, j] * (j / o)
        pieces.append(out[:, :, : ns - ps])
        out = blended
    expected = torch.cat(pieces + [out], dim=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    # And it differs from whole-clip rescaling (std over all 61 frames), so chunking matters here.
    whole = GuidedDenoiser(frame_local_model, cond, uncond, guide_scale=7.5, guide_rescale=0.2)(x, sigma)
    assert float((whole - got).abs().max()) > 1e-4
