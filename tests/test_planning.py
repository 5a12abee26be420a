"""Planning helpers against every row of reference/tables.json, plus input validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from venhancer import planning as P

TABLES = json.loads((Path(__file__).resolve().parent / "fixtures" / "tables.json").read_text())


def _windows(ws):
    return [list(w) for w in ws]


@pytest.mark.parametrize("row", TABLES["adjust_resolution"], ids=lambda r: f"{r['h']}x{r['w']}@{r['up_scale']}")
def test_target_resolution_table(row):
    assert P.target_resolution(row["h"], row["w"], row["up_scale"]) == (row["target_h"], row["target_w"])


def test_target_resolution_custom_bounds():
    # Small bounds so that all three branches are reachable with tiny sizes.
    assert P.target_resolution(10, 20, 1.0, area_min=100, area_max=1000) == (10, 20)  # within
    assert P.target_resolution(10, 20, 0.5, area_min=800, area_max=1000) == (20, 40)  # raised to min
    assert P.target_resolution(10, 20, 4.0, area_min=100, area_max=800) == (20, 40)  # lowered to max
    # Odd products are floored to even numbers.
    assert P.target_resolution(11, 21, 1.0, area_min=1, area_max=10_000) == (10, 20)


@pytest.mark.parametrize("row", TABLES["pad_to_fit"]["rows"], ids=lambda r: f"{r['h']}x{r['w']}")
def test_pad_to_fit_table(row):
    assert P.pad_to_fit(row["h"], row["w"]) == (row["w1"], row["w2"], row["h1"], row["h2"])
    ph, pw = P.padded_size(row["h"], row["w"])
    assert (ph, pw) == (row["padded_h"], row["padded_w"])
    assert (ph / 8, pw / 8) == (row["latent_h"], row["latent_w"])
    assert P.latent_size_ok(ph // 8, pw // 8) == row["latent_ok"]


def test_pad_to_fit_quirk_and_small_sizes():
    assert P.padded_size(1080, 1920) == (1104, 1984)  # 64 extra columns although 1920 % 64 == 0
    assert P.pad_to_fit(481, 721) == (279, 280, 119, 120)  # odd: the extra pixel goes right/bottom
    assert P.pad_to_fit(720, 1280) == (0, 0, 0, 0)


@pytest.mark.parametrize("row", TABLES["make_chunks"]["rows"], ids=lambda r: f"{r['f_num']}k{r['interp_f_num']}")
def test_chunk_windows_table(row):
    assert _windows(P.chunk_windows(row["f_num"], row["interp_f_num"])) == row["chunk_inds"]
    assert P.valid_frame_count(row["f_num"], row["interp_f_num"]) == row["valid_frame_count"]


def test_chunk_windows_readme_examples():
    assert P.chunk_windows(40, 2) == [(0, 40)]
    assert P.chunk_windows(61, 2) == [(0, 31), (15, 46), (30, 61)]
    assert P.chunk_windows(32, 0) == [(0, 32)]
    assert P.chunk_window_params(2) == (31, 16)


@pytest.mark.parametrize("k", range(0, 9))
@pytest.mark.parametrize("frames", [33, 61, 100, 241, 500])
def test_chunk_windows_cover_and_overlap(frames, k):
    length, overlap = P.chunk_window_params(k)
    ws = P.chunk_windows(frames, k)
    assert ws[0][0] == 0 and ws[-1][1] == frames
    for (s0, e0), (s1, _) in zip(ws, ws[1:]):
        assert e0 - s0 == length and e0 - s1 == overlap and s1 % (k + 1) == 0
    assert ws[-1][1] - ws[-1][0] <= round(length * 1.33)


@pytest.mark.parametrize("row", TABLES["make_mask_cond"], ids=lambda r: f"{r['in_f_num']}k{r['interp_f_num']}")
def test_mask_cond_table(row):
    assert P.mask_cond(row["in_f_num"], row["interp_f_num"]) == row["mask_cond"]


@pytest.mark.parametrize("row", TABLES["fps_rule"], ids=lambda r: f"{r['input_fps']}->{r['target_fps']}")
def test_fps_rule_table(row):
    k = P.interp_frames(row["input_fps"], row["target_fps"])
    assert k == row["interp_f_num"]
    assert P.output_fps(row["input_fps"], k) == row["output_fps"]


def test_frame_counts_and_clamp():
    assert P.output_frame_count(25, 1) == 49
    assert P.output_frame_count(1, 3) == 1
    assert P.interp_frames(1, 100) == 8  # clamped to 8
    assert P.interp_frames(30, 24) == 0


def test_tiled_decode_constants():
    c = TABLES["tiled_decode"]["constants"]
    assert P.VAE_TILE == (c["tile_latent_h"], c["tile_latent_w"])
    assert P.VAE_TILE_OVERLAP == (c["overlap_latent_h"], c["overlap_latent_w"])
    assert (P.VAE_FRAME_WINDOW, P.VAE_FRAME_OVERLAP) == (c["frame_window"], c["frame_overlap"])
    assert (P.VAE_TILE[0] * 8, P.VAE_TILE[1] * 8) == (c["tile_img_height"], c["tile_img_width"])


@pytest.mark.parametrize("row", TABLES["tiled_decode"]["spatial"], ids=lambda r: f"{r['latent_h']}x{r['latent_w']}")
def test_vae_tile_windows_table(row):
    hs, ws = P.vae_tile_windows(row["latent_h"], row["latent_w"])
    assert _windows(hs) == row["height_windows"]
    assert _windows(ws) == row["width_windows"]


@pytest.mark.parametrize("row", TABLES["tiled_decode"]["temporal"], ids=lambda r: str(r["num_frames"]))
def test_vae_frame_windows_table(row):
    assert _windows(P.vae_frame_windows(row["num_frames"])) == row["time_windows"]


@pytest.mark.parametrize("row", TABLES["gaussian_weights"]["rows"], ids=lambda r: f"{r['tile_height']}x{r['tile_width']}")
def test_gaussian_weights_table(row):
    g = P.gaussian_weights(row["tile_height"], row["tile_width"])
    assert g.dtype == np.float64
    assert g.shape == (row["tile_height"], row["tile_width"])
    if "weights" in row:
        np.testing.assert_array_equal(g, np.array(row["weights"]))  # bit exact
    else:
        for s in row["samples"]:
            assert g[s["row"], s["col"]] == s["value"]


def test_sliding_windows_basics():
    assert P.sliding_windows(1, 5, 2) == [(0, 1)]
    # round(4 * 1.33) = 5: at start 6, 6 + 5 >= 10 so the last window stretches to (6, 10).
    assert P.sliding_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert P.sliding_windows(8, 4, 1) == [(0, 4), (3, 8)]  # 3 + 5 >= 8: a 5-frame last window
    assert P.sliding_windows(20, 4, 1) == [(0, 4), (3, 7), (6, 10), (9, 13), (12, 16), (15, 20)]


@pytest.mark.parametrize(
    "call",
    [
        lambda: P.interp_frames(0, 24),
        lambda: P.interp_frames(24, -1),
        lambda: P.interp_frames(float("nan"), 24),
        lambda: P.output_fps(-3, 1),
        lambda: P.output_frame_count(0, 1),
        lambda: P.output_frame_count(3, -1),
        lambda: P.target_resolution(480, 720, 0),
        lambda: P.target_resolution(480, 720, -2.0),
        lambda: P.target_resolution(0, 720, 2),
        lambda: P.target_resolution(480, 720, 2, area_min=10, area_max=5),
        lambda: P.pad_to_fit(0, 10),
        lambda: P.mask_cond(0, 1),
        lambda: P.sliding_windows(10, 4, 4),
        lambda: P.sliding_windows(0, 4, 1),
        lambda: P.chunk_windows(0, 1),
        lambda: P.gaussian_weights(0, 4),
    ],
)
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_error_names_the_value():
    with pytest.raises(ValueError, match="up_scale.*-2"):
        P.target_resolution(480, 720, -2.0)
    with pytest.raises(ValueError, match="in_fps.*0"):
        P.interp_frames(0, 24)


def test_numpy_scalars_accepted():
    assert P.target_resolution(np.int64(480), np.int64(720), np.float32(2.0)) == (960, 1440)
    ws = P.chunk_windows(np.int64(61), 2)
    assert ws == [(0, 31), (15, 46), (30, 61)] and all(type(v) is int for w in ws for v in w)


def test_pad_to_fit_custom_minimum():
    # Small minimums (tests / tiny models): centring below, the reference rule above.
    assert P.pad_to_fit(10, 20, min_height=80, min_width=64) == (22, 22, 35, 35)
    assert P.padded_size(90, 64, min_height=80, min_width=64) == (144, 64)
    assert P.latent_size_ok(144 // 8, 64 // 8)
