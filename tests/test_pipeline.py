"""Enhancer internals with the tiny model set: what reaches the sampler, encoder and writer (SPEC 1)."""

import json
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from make_tiny_models import make_clip, make_tiny_models

import venhancer.output_formats as output_formats
import venhancer.pipeline as pipeline
from venhancer.config import load_config
from venhancer.diffusion import diffuse
from venhancer.memory import PLANS
from venhancer.pipeline import EnhanceError, EnhanceOptions, Enhancer, plan_video
from venhancer.video_io import VideoInfo, probe_video, read_video

NOISE_AUG = 150


@pytest.fixture(scope="module")
def enhancer(tmp_path_factory):
    return Enhancer(make_tiny_models(tmp_path_factory.mktemp("tiny_models")), progress=False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


class Spy:
    """Records the calls of a pipeline function and forwards them (possibly with changed arguments)."""

    def __init__(self, monkeypatch, name, replace=None):
        self.real = getattr(pipeline, name)
        self.calls = []
        self.replace = replace
        monkeypatch.setattr(pipeline, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.replace is not None:
            return self.replace(self.real, *args, **kwargs)
        return self.real(*args, **kwargs)


def fixed_noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_sampler_inputs_follow_spec(enhancer, clip, tmp_path, monkeypatch):
    encode = Spy(monkeypatch, "encode_frames")
    hint_spy = Spy(monkeypatch, "noise_hint",
                   lambda real, z_key, level, generator=None: real(z_key, level, noise=fixed_noise(z_key.shape, 1)))
    start_spy = Spy(monkeypatch, "start_latent",
                    lambda real, z, generator=None: real(z, noise=fixed_noise(z.shape, 2)))
    sampler = Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: torch.zeros_like(x_T))

    result = enhancer.enhance(clip, "a test pattern", up_scale=2, target_fps=16, noise_aug=NOISE_AUG,
                              solver_mode="normal", steps=3, cfg=5.0, s_cond=6, save_dir=tmp_path)

    # Encoder input: frames x/255*2-1, bilinear (align_corners=False, no antialias), padded with +1.
    frames = torch.cat([args[1] for args, _ in encode.calls])
    assert frames.shape == (9, 3, 80, 128)
    source = torch.from_numpy(read_video(clip).frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    resized = F.interpolate(source, size=(72, 112), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(frames[:, :, 4:76, 8:120], resized)
    border = torch.ones_like(frames, dtype=torch.bool)
    border[:, :, 4:76, 8:120] = False
    assert torch.all(frames[border] == 1.0)

    # Latents: n distinct key frames, each repeated k+1 = 2 times, the last once.
    (z_key, level), _ = hint_spy.calls[0]
    assert z_key.shape == (1, 4, 9, 10, 16) and level == NOISE_AUG
    (z,), _ = start_spy.calls[0]
    assert z.shape == (1, 4, 17, 10, 16)
    torch.testing.assert_close(z[:, :, ::2], z_key, rtol=0, atol=0)
    torch.testing.assert_close(z[:, :, 1::2], z_key[:, :, :-1], rtol=0, atol=0)

    (model, x_T, cond, uncond), kwargs = sampler.calls[0]
    assert model is enhancer.unet
    torch.testing.assert_close(x_T, diffuse(z, 899, fixed_noise(z.shape, 2)))
    torch.testing.assert_close(cond["hint"], diffuse(z_key, NOISE_AUG - 1, fixed_noise(z_key.shape, 1)))
    assert cond["t_hint"].tolist() == [NOISE_AUG - 1]
    assert cond["mask_cond"].dtype == torch.int64
    assert cond["mask_cond"].tolist() == [[0, -1, 1, -1, 2, -1, 3, -1, 4, -1, 5, -1, 6, -1, 7, -1, 8]]
    assert cond["s_cond"].tolist() == [6.0]
    assert cond["y"].shape == uncond["y"].shape == (1, 77, 32)
    assert not torch.equal(cond["y"], uncond["y"])  # caption vs negative prompt
    for key in ("hint", "t_hint", "mask_cond", "s_cond"):
        assert uncond[key] is cond[key]
    assert kwargs["solver_mode"] == "normal" and kwargs["steps"] == 3
    assert kwargs["guide_scale"] == 5.0 and kwargs["guide_rescale"] == 0.2
    assert kwargs["windows"] == [(0, 9), (4, 13), (8, 17)]

    assert result.plan.out_frames == 17 and (result.plan.width, result.plan.height) == (112, 72)
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["settings"]["noise_aug"] == NOISE_AUG and sidecar["prompt"] == "a test pattern"
    assert sidecar["output"] == {"path": str(result.output_path), "width": 112, "height": 72, "fps": 16.0,
                                 "frames": 17, "codec": "h264", "crf": 17, "pix_fmt": "yuv420p", "bit_depth": 8,
                                 "color": {"matrix": "smpte170m", "primaries": "smpte170m", "transfer": "smpte170m",
                                           "range": "tv"},
                                 "frames_dir": None, "color_fix": "none"}


def test_prompt_and_negative_prompt_reach_their_branches(enhancer, clip, tmp_path, monkeypatch):
    """The guided branch sees the caption (prompt + suffix), the unguided one the negative prompt."""
    from venhancer.text_encoder import NEGATIVE_PROMPT, build_caption

    sampler = Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: torch.zeros_like(x_T))
    enhancer.enhance(clip, "a red ball", up_scale=2, target_fps=8, save_dir=tmp_path)
    (_, _, cond, uncond), _ = sampler.calls[0]
    with torch.inference_mode():
        emb, _ = enhancer.text_encoder.encode([build_caption("a red ball"), NEGATIVE_PROMPT])
    assert not torch.allclose(emb[0], emb[1])
    torch.testing.assert_close(cond["y"], emb[0:1])
    torch.testing.assert_close(uncond["y"], emb[1:2])


def test_input_streams_and_output_keeps_aspect_audio_and_umask(enhancer, tmp_path, monkeypatch):
    """Frames are decoded batch by batch as the encoder takes them; the output keeps the input's
    pixel aspect ratio and audio, and the video and its sidecar get the umask's permissions."""
    clip = make_clip(tmp_path / "ana.mp4", frames=9, audio=True, extra=("-vf", "setsar=4/3"))
    batches = []

    def recorded(real, *args, **kwargs):
        for batch in real(*args, **kwargs):
            batches.append(batch.shape[0])
            yield batch

    Spy(monkeypatch, "iter_frames", recorded)
    Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: torch.zeros_like(x_T))
    old = os.umask(0o027)
    try:
        result = enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path / "out")
    finally:
        os.umask(old)
    assert batches == [pipeline._FRAME_BATCH, 1]
    info = probe_video(result.output_path)
    assert info.sar == Fraction(4, 3) and info.has_audio and info.num_frames == 17
    assert result.output_path.stat().st_mode & 0o777 == 0o640
    assert result.sidecar_path.stat().st_mode & 0o777 == 0o640


def test_host_memory_shortage_is_reported_as_such(enhancer, clip, tmp_path, monkeypatch):
    def no_memory(real, *args, **kwargs):
        raise MemoryError("cannot allocate 3.0 GB")

    Spy(monkeypatch, "iter_frames", no_memory)
    with pytest.raises(EnhanceError, match=r"clip\.mp4: out of host memory while encoding frames: cannot allocate"):
        enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_noise_aug_zero_keeps_key_latents(enhancer, clip, tmp_path, monkeypatch):
    sampler = Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: torch.zeros_like(x_T))
    hint_spy = Spy(monkeypatch, "noise_hint")
    enhancer.enhance(clip, up_scale=2, target_fps=8, noise_aug=0, save_dir=tmp_path)
    (z_key, _), _ = hint_spy.calls[0]
    (_, x_T, cond, _), _ = sampler.calls[0]
    assert cond["hint"] is z_key and cond["t_hint"].tolist() == [0]
    assert x_T.shape[2] == 9 and cond["mask_cond"].tolist() == [list(range(9))]  # k = 0 at 8 -> 8 fps


def test_decode_crop_clamp_and_truncation(enhancer, clip, tmp_path, monkeypatch):
    Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: torch.zeros_like(x_T))
    inner = torch.tensor([-1.5, -1.0, 2 * 10.9 / 255 - 1, 0.0, 2.0])  # -> 0, 0, 10 (not 11), 127, 255
    expected = np.array([0, 0, 10, 127, 255], np.uint8)

    def fake_decode(vae, x0, **kwargs):
        assert x0.shape == (1, 4, 17, 10, 16)
        frames = torch.full((17, 3, 80, 128), 0.7)  # padding: must be cropped away
        frames[:, :, 4:76, 8:120] = inner.repeat(72 * 112 * 3 * 17 // 5 + 1)[: 17 * 3 * 72 * 112].reshape(17, 3, 72, 112)
        yield frames[:10]
        yield frames[10:]

    monkeypatch.setattr(pipeline, "decode_tiled", fake_decode)
    written = []

    class Writer(output_formats.VideoWriter):
        def append(self, frames):
            written.append(frames.copy())
            super().append(frames)

    monkeypatch.setattr(output_formats, "VideoWriter", Writer)  # the writer OutputSink opens
    enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path)
    pixels = np.concatenate(written)
    assert pixels.shape == (17, 72, 112, 3) and pixels.dtype == np.uint8
    channels_first = pixels.transpose(0, 3, 1, 2).reshape(-1)
    assert np.array_equal(channels_first, np.resize(expected, channels_first.shape))


def test_time_spent_waiting_for_the_writer_is_reported(enhancer, clip, tmp_path, monkeypatch):
    """A slow encoder shows up as write_wait, a part of decode_write: the last chunk's append and
    ffmpeg's final flush happen while nothing is left to decode."""
    Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: x_T)

    class SlowWriter(output_formats.VideoWriter):
        def append(self, frames):
            time.sleep(0.25)
            super().append(frames)

        def close(self):
            time.sleep(0.25)
            super().close()

    monkeypatch.setattr(output_formats, "VideoWriter", SlowWriter)
    timings = enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path).timings
    assert 0.45 <= timings["write_wait"] <= timings["decode_write"]
    assert read_video(tmp_path / "clip.mp4").frames.shape == (17, 72, 112, 3)


def test_same_seed_same_output_and_seed_matters(enhancer, clip, tmp_path, monkeypatch):
    starts = []
    Spy(monkeypatch, "sample", lambda real, model, x_T, *a, **kw: starts.append(x_T.clone()) or x_T)
    for seed, folder in ((666, "a"), (666, "b"), (7, "c")):
        enhancer.enhance(clip, up_scale=2, target_fps=16, seed=seed, save_dir=tmp_path / folder)
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])
    frames = [read_video(tmp_path / f / "clip.mp4").frames for f in "abc"]
    assert np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[0], frames[2])


def test_real_sampler_runs(enhancer, clip, tmp_path):
    result = enhancer.enhance(clip, up_scale=2, target_fps=16, solver_mode="normal", steps=1, save_dir=tmp_path)
    assert read_video(result.output_path).frames.shape == (17, 72, 112, 3)
    assert result.timings["sample"] > 0 and not result.skipped
    again = enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path)
    assert again.skipped and again.output_path == result.output_path


def test_out_of_memory_becomes_one_line_advice(enhancer, clip, tmp_path, monkeypatch):
    def oom(real, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    Spy(monkeypatch, "sample", oom)
    # The smallest memory plan: no smaller one to fall back to (tests/test_memory.py).
    monkeypatch.setattr(enhancer, "memory_plan", PLANS[-1])
    with pytest.raises(EnhanceError, match=r"out of CPU memory while denoising \(112x72, 17 frames\): lower --up_scale"):
        enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_low_vram_mode_same_result_in_smaller_passes(enhancer, clip, tmp_path, monkeypatch):
    """Low-VRAM mode: the network runs the small-pass preset, and the denoised latents are
    the normal mode's (pass sizes never change what is computed)."""
    from venhancer.models.layers import ResBlock
    from venhancer.runtime import InferenceOptions

    small = Enhancer(enhancer.config, progress=False, low_vram=True)
    assert small.low_vram and not enhancer.low_vram  # the CPU never turns it on by itself
    chunks = {m.settings.conv_frame_chunk for m in small.unet.modules() if isinstance(m, ResBlock)}
    assert chunks == {InferenceOptions.low_vram().conv_frame_chunk}
    latents = []

    def keep(real, vae, x0, **kwargs):
        latents.append(x0.clone())
        return real(vae, x0, **kwargs)

    Spy(monkeypatch, "decode_tiled", keep)
    shared_calls = []
    forward_branches = type(enhancer.unet).forward_branches

    def counted(self, *args, **kwargs):
        shared_calls.append(self is small.unet)
        return forward_branches(self, *args, **kwargs)

    monkeypatch.setattr(type(enhancer.unet), "forward_branches", counted)
    settings = dict(up_scale=2, target_fps=16, solver_mode="normal", steps=2)
    normal = enhancer.enhance(clip, save_dir=tmp_path / "normal", **settings)
    result = small.enhance(clip, save_dir=tmp_path / "low", **settings)
    # The normal mode evaluates both guidance branches of each window together (sharing their
    # first layers); low-VRAM mode one after the other.
    assert shared_calls and not any(shared_calls)
    assert json.loads(normal.sidecar_path.read_text())["model"]["shared_branch_prefix"] is True
    # Float32 sums in other groupings (kernel batch sizes), through two solver steps: ~1e-5 of
    # latents of size ~1; a wrong chunk (a frame normalised with another) would be off by ~1.
    assert latents[0].abs().max() > 0.5
    torch.testing.assert_close(latents[1], latents[0], atol=2e-4, rtol=1e-3)
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["model"]["low_vram"] is True and sidecar["model"]["shared_branch_prefix"] is False
    # One duration per solver step, which together make up (most of) the sampling phase.
    steps = sidecar["solver_steps_s"]
    assert len(steps) == 2 and all(t > 0 for t in steps)
    assert sum(steps) <= sidecar["timings_s"]["sample"] + 0.01


def test_output_may_not_replace_input(enhancer, clip, tmp_path):
    local = tmp_path / "clip.mp4"
    local.write_bytes(Path(clip).read_bytes())
    with pytest.raises(ValueError, match="overwrite the input"):
        enhancer.enhance(local, save_dir=tmp_path, overwrite=True)


def test_plan_of_the_sample_clip_with_the_reference_config():
    info = VideoInfo(path=Path("000000.mp4"), width=720, height=480, fps=8.0, num_frames=49, codec="h264",
                     audio_codec=None)
    plan = plan_video(info, EnhanceOptions(), load_config().planning)
    # SPEC 1.2/1.3/1.6: k = round(24/8) - 1 = 2; s = sqrt(1152*2048 / (480*720)); height pad
    # ((1254+48)//64)*64 + 64 - 48 - 1254 = 42, width pad (1880//64)*64 + 64 - 1880 = 40.
    assert (plan.k, plan.out_fps, plan.out_frames) == (2, 24.0, 145)
    assert (plan.height, plan.width) == (1254, 1880)
    assert plan.padding == (0, 40, 0, 42) and plan.latent_size == (162, 240)
    assert plan.windows[0] == (0, 31) and plan.windows[-1][1] == 145
    assert plan.network_evals == 14 * 2 * len(plan.windows)


@pytest.mark.parametrize("field,value,message", [
    ("up_scale", 0, "up_scale must be in"),
    ("up_scale", 8.01, "up_scale must be in"),
    ("target_fps", -1, "target_fps must be > 0"),
    ("steps", 0, "steps must be >= 1"),
    ("steps", 2.5, "steps must be an integer, got 2.5"),
    ("cfg", 0.9, "cfg (guidance scale) must be >= 1"),
    ("solver_mode", "slow", "solver_mode must be one of"),
    ("noise_aug", float("inf"), "noise_aug must be an integer"),
])
def test_options_validation(field, value, message):
    with pytest.raises(ValueError) as err:
        EnhanceOptions(**{field: value})
    assert message in str(err.value)


def test_noise_aug_is_clamped_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="venhancer"):
        assert EnhanceOptions(noise_aug=-5).noise_aug == 0
        assert EnhanceOptions(noise_aug=301).noise_aug == 300
    assert "noise_aug 301 is outside [0, 300]; using 300" in caplog.text


def test_background_load_gives_the_same_video(enhancer, clip, tmp_path, monkeypatch):
    """With background_load the network and text encoder load on the worker thread and each
    prompt is encoded there while the frames are encoded: same output, bit for bit."""
    threads = []
    encode_text = Enhancer._encode_text

    def spy(self, *args):
        import threading

        threads.append(threading.current_thread().name)
        return encode_text(self, *args)

    monkeypatch.setattr(Enhancer, "_encode_text", spy)
    background = Enhancer(enhancer.config, progress=False, background_load=True)
    kwargs = dict(up_scale=2, target_fps=16, noise_aug=NOISE_AUG, solver_mode="normal", steps=2)
    got = background.enhance(clip, "a test pattern", save_dir=tmp_path / "background", **kwargs)
    want = enhancer.enhance(clip, "a test pattern", save_dir=tmp_path / "plain", **kwargs)
    assert threads[0].startswith("venhancer-worker") and threads[1] == "MainThread"
    np.testing.assert_array_equal(read_video(got.output_path).frames, read_video(want.output_path).frames)
    sidecar = json.loads(got.sidecar_path.read_text())
    assert sidecar["model"]["background_load"] is True
    assert {"load_network", "load_text_encoder", "wait_for_network"} <= set(sidecar["model_load_s"])


def test_background_load_failure_is_reported_when_the_network_is_needed(enhancer, clip, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "other_model.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(wrong))
    background = Enhancer(enhancer.config, model_path=wrong, progress=False, background_load=True)
    with pytest.raises(pipeline.ModelLoadError, match="not a VEnhancer network checkpoint"):
        background.enhance(clip, up_scale=2, target_fps=8, save_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "clip.mp4").exists()


def test_background_text_encoder_failure_is_a_load_error(enhancer, clip, tmp_path):
    from dataclasses import replace

    broken = tmp_path / "text.safetensors"
    broken.write_bytes(b"not a safetensors file")
    config = replace(enhancer.config, text_encoder=replace(enhancer.config.text_encoder, path=broken))
    background = Enhancer(config, progress=False, background_load=True)
    with pytest.raises(pipeline.ModelLoadError, match="could not load the text encoder"):
        background.enhance(clip, up_scale=2, target_fps=8, save_dir=tmp_path / "out")
