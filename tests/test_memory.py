"""Memory plans (--max_vram_gb): the choice by budget, weight streaming on the CPU ('host' and
'device' both the CPU), the same video from every plan, and the fallback after running out of memory.

On the CPU there is no VRAM: the plan follows the --max_vram_gb number alone (venhancer.memory)."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from make_tiny_models import make_clip, make_tiny_models, tiny_network_inputs
from test_cli import restore_logging  # noqa: F401  (cli.main configures logging; the fixture undoes it)

import venhancer.pipeline as pipeline
from venhancer import cli, memory
from venhancer.memory import PLANS, WeightStreamer, budget_gb, check_budget, choose_plan, next_plan
from venhancer.pipeline import Enhancer
from venhancer.video_io import VideoWriter

FAST = ["--solver_mode", "normal", "--steps", "2", "--up_scale", "2", "--target_fps", "16"]
# One budget per plan (5: below every plan's, the smallest is tried).
BUDGETS = {30: "full", 23: "streamed", 18: "streamed_sequential", 15: "small_passes_streamed", 11: "parked_streamed",
           5: "parked_streamed"}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


def test_plan_follows_the_budget():
    assert {budget: choose_plan(budget).name for budget in BUDGETS} == BUDGETS
    assert choose_plan(None).name == "full"  # CPU, nothing asked: the fastest
    assert budget_gb(None, None, None) is None
    assert budget_gb(11.0, True, 80.0) == 11.0  # an explicit budget wins
    assert budget_gb(None, True, 80.0) == memory.LOW_VRAM_BUDGET_GB
    assert budget_gb(None, None, 16.0) == 16.0  # the free memory at start
    assert choose_plan(budget_gb(None, False, 16.0)).name == "streamed"  # --no-low_vram: no small passes
    assert [next_plan(p).name if next_plan(p) else None for p in PLANS] == [p.name for p in PLANS[1:]] + [None]
    assert all(a.min_budget_gb > b.min_budget_gb for a, b in zip(PLANS, PLANS[1:]))
    for bad in (0, -1, float("nan"), float("inf"), True, "8"):
        with pytest.raises(ValueError, match="max_vram_gb must be a positive number of GB"):
            check_budget(bad)


def _tiny_network(tiny_config):
    enhancer = Enhancer(tiny_config, progress=False)
    return enhancer.unet


def test_streamed_weights_give_the_same_outputs_and_park_between_uses(tiny_config):
    """Units go to the 'device' (a second CPU buffer) when used and back to memory-free NaN
    placeholders after; a weight read while parked would make the output NaN, a wrong offset
    would change it."""
    unet = _tiny_network(tiny_config)
    x, t, y, hint, t_hint, s_cond, mask = tiny_network_inputs(unet.config)
    with torch.inference_mode():
        single = unet(x, t, y, hint, t_hint, s_cond, mask)
        branches = unet.forward_branches(x, t, [y, -y], hint, t_hint, s_cond, mask)
    streamer = WeightStreamer(unet, "cpu", prefetch=2)
    assert len(streamer.units) > 20  # encoder, middle and decoder blocks of both networks
    tensors = [t for unit in streamer.units for t in unit.tensors]
    assert all(t.untyped_storage().nbytes() <= 8 and t.isnan().all() for t in tensors if t.is_floating_point())
    with torch.inference_mode():
        for _ in range(2):  # the first call records the block order, the second replays it
            assert torch.equal(unet(x, t, y, hint, t_hint, s_cond, mask), single)
            got = unet.forward_branches(x, t, [y, -y], hint, t_hint, s_cond, mask)
            assert all(torch.equal(a, b) for a, b in zip(got, branches))
            streamer.end_of_pass()
    assert streamer.prefetch_hits > len(streamer.units)  # the replay copies ahead
    # At most prefetch + 1 units on the 'device' at a time.
    assert len(streamer._resident) <= 3
    streamer.detach()
    with torch.inference_mode():
        assert torch.equal(unet(x, t, y, hint, t_hint, s_cond, mask), single)


def test_resident_tensors_are_exactly_those_outside_the_streamed_blocks(tiny_config):
    """A network loaded into host memory for streaming: `place_resident` moves to the GPU what
    is in no streamed block (embeddings, 1x1 convolutions, output layers), a small part."""
    unet = _tiny_network(tiny_config)
    everything = memory._tensors_of(unet)
    streamer = WeightStreamer(unet, "cpu")
    streamed = {id(t) for unit in streamer.units for t in unit.tensors}
    resident = streamer.resident_tensors()
    assert {id(t) for t in resident} == {id(t) for t in everything} - streamed
    assert resident and not any(t.isnan().any() for t in resident if t.is_floating_point())
    assert sum(t.numel() for t in resident) < 0.2 * sum(t.numel() for t in everything)
    streamer.place_resident()  # on the CPU: nothing to move, nothing changed
    assert all(a is b for a, b in zip(streamer.resident_tensors(), resident))


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_every_budget_gives_the_same_video(tiny_config, clip, tmp_path, capsys, monkeypatch):
    """Through the command line: each budget's plan (float32 on the CPU) writes the default
    plan's MP4 bytes where it runs the network in the same pieces, and frames within one 8-bit
    level where frame chunks change float32 sums in their last bits (the encoder can turn one
    level into more, so those are compared before encoding); the sidecar names the plan."""
    frames: dict[str, list[np.ndarray]] = {}
    append = VideoWriter.append

    def keep(self, pixels):
        frames.setdefault(str(self.path), []).append(pixels.copy())
        return append(self, pixels)

    monkeypatch.setattr(VideoWriter, "append", keep)
    videos = {}
    for budget in [None, *BUDGETS]:
        save = tmp_path / str(budget)
        args = ["--config", tiny_config, "--input_path", clip, "--save_dir", save, *FAST, "--device", "cpu"]
        if budget is not None:
            args += ["--max_vram_gb", budget]
        assert cli.main([str(a) for a in args]) == 0, capsys.readouterr().err
        sidecar = json.loads((save / "clip.json").read_text())
        plan = sidecar["memory"]["plan"]
        assert plan["name"] == (BUDGETS[budget] if budget else "full")
        assert sidecar["memory"]["fallbacks"] == [] and sidecar["memory"]["peak_host_ram_GB"] > 0
        loads = sidecar["memory"]["streamed_block_loads"]
        assert loads > 0 if plan["stream_weights"] else loads is None
        videos[budget] = (save / "clip.mp4", plan["inference"])
    assert "memory plan 'parked_streamed'" in capsys.readouterr().err
    default_path, default_passes = videos[None]
    base = np.concatenate(frames[str(default_path)]).astype(np.int16)
    for budget, (path, passes) in videos.items():
        if passes == default_passes:
            assert _md5(path) == _md5(default_path), budget
        got = np.concatenate(frames[str(path)]).astype(np.int16)
        assert np.abs(got - base).max() <= 1, budget


def test_bad_budget_is_a_one_line_usage_error(tiny_config, clip, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", str(tiny_config), "--input_path", str(clip), "--save_dir", str(tmp_path),
                  "--max_vram_gb", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --max_vram_gb: must be a positive number of GB, got '0'" in err


def test_out_of_memory_falls_back_to_the_next_plan(tiny_config, clip, tmp_path, monkeypatch):
    """A simulated OOM in the first plan's denoising: the run finishes with the next plan, from
    the same random state (the video the next plan gives on its own), and the sidecar says so."""
    settings = dict(up_scale=2, target_fps=16, solver_mode="normal", steps=2)
    reference = Enhancer(tiny_config, progress=False, max_vram_gb=23).enhance(clip, save_dir=tmp_path / "ref", **settings)
    real = pipeline.sample
    calls = []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "sample", first_fails)
    enhancer = Enhancer(tiny_config, progress=False, max_vram_gb=30)
    assert enhancer.memory_plan.name == "full" and enhancer.streamer is None
    result = enhancer.enhance(clip, save_dir=tmp_path / "fallback", **settings)
    assert len(calls) == 2 and enhancer.memory_plan.name == "streamed" and enhancer.streamer is not None
    sidecar = json.loads(result.sidecar_path.read_text())
    assert sidecar["memory"]["plan"]["name"] == "streamed"
    assert sidecar["memory"]["fallbacks"][0]["from"] == "full" and sidecar["memory"]["fallbacks"][0]["to"] == "streamed"
    assert len(sidecar["solver_steps_s"]) == 2  # the failed attempt's steps are not counted
    assert _md5(result.output_path) == _md5(reference.output_path)


def test_smallest_plan_out_of_memory_is_the_one_line_error(tiny_config, clip, tmp_path, monkeypatch):
    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipeline, "sample", always)
    enhancer = Enhancer(tiny_config, progress=False, max_vram_gb=15)
    with pytest.raises(pipeline.EnhanceError, match="out of CPU memory while denoising"):
        enhancer.enhance(clip, up_scale=2, target_fps=16, save_dir=tmp_path)
    assert [f["to"] for f in enhancer.memory_fallbacks] == ["parked_streamed"]


def test_usable_gpu_memory_reads_the_current_device_when_none_is_named(monkeypatch):
    """`cuda` names no index; torch's per-device memory queries need one (an H200 run failed on
    exactly this), so the budget asks about the current device. The allocator's cap wins when it
    is below the free memory."""
    asked = []

    def mem_get_info(index):
        asked.append(("mem", index))
        if not isinstance(index, int):
            raise ValueError("Expected a torch.device with a specified index")
        return 30e9, 80e9

    def get_fraction(index):
        asked.append(("fraction", index))
        if not isinstance(index, int):
            raise ValueError("Expected a torch.device with a specified index")
        return 0.25

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", get_fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert pipeline._usable_gpu_gb(torch.device("cuda")) == pytest.approx(20.0)  # 0.25 x 80 GB < 30 GB free
    assert asked == [("mem", 3), ("fraction", 3)]
    asked.clear()
    assert pipeline._usable_gpu_gb(torch.device("cuda:1")) == pytest.approx(20.0)
    assert asked == [("mem", 1), ("fraction", 1)]
    assert pipeline._usable_gpu_gb(torch.device("cpu")) is None


def test_fp8_applies_on_top_of_every_memory_plan(tiny_config, monkeypatch):
    """--precision fp8 is the chosen plan's runtime settings plus the FP8 kernels, after a fallback
    too; the plans themselves stay as they are. (Only the settings are checked here: the kernels
    need a GPU with FP8 tensor cores.)"""
    monkeypatch.setattr(pipeline, "fp8_supported", lambda device: True)
    enhancer = Enhancer(tiny_config, progress=False, precision="fp8", max_vram_gb=18)

    def settings():
        found = {m.settings for m in enhancer.unet.modules() if hasattr(m, "settings")}
        assert len(found) == 1
        return found.pop()

    plan = enhancer.memory_plan
    assert plan.name == "streamed_sequential" and enhancer.streamer is not None and enhancer.dtype == torch.float16
    # the 8-bit attention only: the FP8 Linears (measured slower) stay off in every plan
    assert settings() == dataclasses.replace(plan.inference, fp8=True) and not plan.inference.fp8
    assert settings().fp8_attention_kernel and not settings().fp8_linears
    smaller = next_plan(plan)
    enhancer._use_plan(smaller)
    assert settings() == dataclasses.replace(smaller.inference, fp8=True)
    assert settings().conv_frame_chunk == 4 and not any(enhancer._runtime_settings(p).fp8_linears for p in PLANS)
    assert not any(p.inference.fp8 for p in PLANS)
    # the sidecar's plan record lists pass sizes only: fp8 is `model.precision`'s, never misreported there
    assert "fp8" not in str(plan.to_json()) and "fp8" not in plan.describe()
