"""The enhance_a_video.py tool end to end with the tiny offline model set (tests/make_tiny_models.py)."""

import json
import logging
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from make_tiny_models import make_clip, make_tiny_models

from venhancer import cli
from venhancer.video_io import ffmpeg_exe, probe_video

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "enhance_a_video.py"
# 9 frames at 8 fps, up_scale 2, target 16 fps: k = 1, 17 frames at 16 fps, 72x112 padded to 80x128.
FAST = ["--solver_mode", "normal", "--steps", "2", "--up_scale", "2", "--target_fps", "16"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    make_clip(folder / "with_audio.mp4", audio=True)
    make_clip(folder / "one_frame.mp4", frames=1)
    (folder / "not_video.mp4").write_text("plain text, not a video\n" * 10)
    (folder / "empty.mp4").write_bytes(b"")
    data = make_clip(folder / "whole.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main configures logging for a terminal; undo it so other tests see pytest's setup."""
    root, package = logging.getLogger(), logging.getLogger("venhancer")
    saved = (root.handlers[:], root.level, package.level)
    yield
    root.handlers[:], package.level = saved[0], saved[2]
    root.setLevel(saved[1])


def run_tool(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def stream_lines(path):
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return [line.strip() for line in out.stderr.splitlines() if line.strip().startswith("Stream #")]


def test_end_to_end_with_audio(tiny_config, clips, tmp_path):
    save = tmp_path / "results"
    proc = run_tool("--config", tiny_config, "--input_path", clips / "with_audio.mp4", "--save_dir", save, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = save / "with_audio.mp4"
    assert sorted(p.name for p in save.iterdir()) == ["with_audio.json", "with_audio.mp4"]
    info = probe_video(out)
    assert (info.num_frames, info.fps, info.width, info.height) == ((9 - 1) * 2 + 1, 16, 112, 72)
    video, audio = stream_lines(out)
    assert "Video: h264" in video and "yuv420p" in video and "112x72" in video
    assert "Audio: aac" in audio
    sidecar = json.loads((save / "with_audio.json").read_text())
    assert sidecar["settings"] == {"up_scale": 2.0, "target_fps": 16.0, "noise_aug": 200, "solver_mode": "normal",
                                   "steps": 2, "cfg": 7.5, "s_cond": 8.0, "seed": 666}
    assert sidecar["input"]["frames"] == 9 and sidecar["output"]["frames"] == 17
    assert sidecar["model"]["version"] == "v1" and sidecar["prompt"] == "a good video"
    assert set(sidecar["timings_s"]) == {"read", "encode", "text", "sample", "decode_write", "write_wait",
                                           "total"}
    assert "summary: 1 enhanced, 0 skipped (output exists), 0 failed" in proc.stderr


def test_folder_run_skips_bad_videos_resumes_and_overwrites(tiny_config, clips, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "b_good.mp4")
    (folder / "b_good.txt").write_text("a test pattern\nsecond line ignored\n")
    (folder / "a_corrupt.mp4").write_bytes((clips / "not_video.mp4").read_bytes())
    (folder / "c_single.MOV").write_bytes((clips / "one_frame.mp4").read_bytes())
    (folder / "notes.txt").write_text("not a video")
    save = tmp_path / "results"

    code, log = run_main(capsys, "--config", tiny_config, "--input_path", folder, "--save_dir", save, *FAST)
    assert code == 1
    assert sorted(p.name for p in save.iterdir()) == ["b_good.json", "b_good.mp4"]
    assert "summary: 1 enhanced, 0 skipped (output exists), 2 failed" in log
    assert re.search(r"failed: a_corrupt\.mp4: .*not a readable video", log)
    assert re.search(r"failed: c_single\.MOV: .*single frame", log)
    assert json.loads((save / "b_good.json").read_text())["prompt"] == "a test pattern"
    first = (save / "b_good.mp4").stat().st_mtime_ns

    # A rerun resumes: the finished output is skipped and no model is loaded.
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", folder, "--save_dir", save, *FAST)
    assert code == 1
    assert "0 enhanced, 1 skipped (output exists), 2 failed" in log and "loading network" not in log
    assert (save / "b_good.mp4").stat().st_mtime_ns == first

    (folder / "a_corrupt.mp4").unlink()
    (folder / "c_single.MOV").unlink()
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", folder, "--save_dir", save,
                         "--overwrite", *FAST)
    assert code == 0
    assert "1 enhanced, 0 skipped (output exists), 0 failed" in log
    assert (save / "b_good.mp4").stat().st_mtime_ns != first
    assert sorted(p.name for p in save.iterdir()) == ["b_good.json", "b_good.mp4"]


def test_first_video_is_decoded_once(tiny_config, tmp_path, capsys, monkeypatch):
    """Every video's frames are decoded once, by its run (the input check only probes). Two copies
    of one clip give the same output."""
    import venhancer.pipeline as pipeline
    import venhancer.video_io as video_io

    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "a.mp4")
    (folder / "b.mp4").write_bytes((folder / "a.mp4").read_bytes())
    decodes = []
    decode = video_io.iter_frames

    def counted(source, *args, **kwargs):
        decodes.append(Path(getattr(source, "path", source)).name)
        return decode(source, *args, **kwargs)

    monkeypatch.setattr(video_io, "iter_frames", counted)
    monkeypatch.setattr(pipeline, "iter_frames", counted)
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", folder, "--save_dir", save, *FAST)
    assert code == 0, log
    assert decodes == ["a.mp4", "b.mp4"]
    first, second = (video_io.read_video(save / name).frames for name in ("a.mp4", "b.mp4"))
    assert np.array_equal(first, second)


def test_interrupt_leaves_no_partial_file(tiny_config, tmp_path, capsys, monkeypatch):
    import venhancer.pipeline as pipeline

    real_decode = pipeline.decode_tiled

    def interrupted_decode(*args, **kwargs):
        chunks = real_decode(*args, **kwargs)
        yield next(chunks)
        assert any(p.name.endswith(".partial.mp4") for p in (tmp_path / "results").iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "decode_tiled", interrupted_decode)
    clip = make_clip(tmp_path / "clip.mp4")
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", tmp_path / "results",
                         *FAST)
    assert code == 130 and "interrupted" in error_lines(log)[0]
    assert list((tmp_path / "results").iterdir()) == []


def bogus_weights_config(tiny_config, tmp_path):
    config = json.loads(Path(tiny_config).read_text())
    config["checkpoints"]["paths"] = {"v1": str(tmp_path / "nope.pt"), "v2": str(tmp_path / "nope.pt")}
    config["text_encoder"]["path"] = str(tmp_path / "nope.safetensors")
    config["vae"]["path"] = str(tmp_path / "no_vae")
    path = tmp_path / "bogus.json"
    path.write_text(json.dumps(config))
    return path


def test_dry_run_loads_no_weights(tiny_config, clips, tmp_path, capsys):
    config = bogus_weights_config(tiny_config, tmp_path)
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", config, "--input_path", clips / "with_audio.mp4", "--save_dir", save,
                         "--dry_run", "--noise_aug", "400", *FAST)
    assert code == 0, log
    assert "warning: noise_aug 400 is outside [0, 300]; using 300" in log
    assert ("input 56x36 @ 8 fps, 9 frames -> output 112x72 @ 16 fps, 17 frames (1 inserted per pair); "
            "network input 128x80 (latent 16x10); temporal windows [(0, 9), (4, 13), (8, 17)]; "
            "network evaluations 2 steps x 2 branches x 3 windows = 12") in log
    assert "loading" not in log
    assert not save.exists()
    # The same config without --dry_run fails cleanly on the missing weights.
    code, log = run_main(capsys, "--config", config, "--input_path", clips / "with_audio.mp4", "--save_dir", save, *FAST)
    assert code == 1
    assert error_lines(log) and "could not load the models" in error_lines(log)[0]
    assert list(save.iterdir()) == []


def test_wrong_checkpoint_is_reported(tiny_config, clips, tmp_path, capsys):
    from safetensors.torch import save_file

    wrong = tmp_path / "other_model.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(wrong))
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", save, "--model_path", wrong, *FAST)
    assert code == 1
    assert "not a VEnhancer network checkpoint" in error_lines(log)[0]
    assert list(save.iterdir()) == []


BAD_VIDEOS = [
    ("missing.mp4", 2, "input path not found"),
    ("not_video.mp4", 1, "not a readable video"),
    ("empty.mp4", 1, "empty file"),
    ("truncated.mp4", 1, "not a readable video"),
    ("one_frame.mp4", 1, "single frame"),
]


@pytest.mark.parametrize("name,code,message", BAD_VIDEOS)
def test_bad_videos(tiny_config, clips, tmp_path, capsys, name, code, message):
    save = tmp_path / "results"
    got, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / name, "--save_dir", save, *FAST)
    assert got == code
    assert message in error_lines(log)[0] and name in error_lines(log)[0]
    assert "Traceback" not in log and "loading network" not in log
    assert not save.exists() or list(save.iterdir()) == []


BAD_OPTIONS = [
    (["--up_scale", "0"], "up_scale must be in (0, 8], got 0.0"),
    (["--up_scale", "8.5"], "up_scale must be in (0, 8], got 8.5"),
    (["--target_fps", "0"], "target_fps must be > 0, got 0.0"),
    (["--target_fps", "nan"], "target_fps must be a finite number"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--cfg", "0.5"], "cfg (guidance scale) must be >= 1, got 0.5"),
    (["--s_cond", "-1"], "s_cond must be >= 0"),
    (["--seed", "-1"], "seed must be in [0, 2**63), got -1"),
    (["--precision", "fp16", "--dtype", "float32"], "--precision fp16 and --dtype float32 disagree; "
                                                    "give --precision alone (--dtype is its deprecated old name)"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS)
def test_bad_options(tiny_config, clips, tmp_path, capsys, args, message):
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", save, *FAST, *args)
    assert code == 2
    assert error_lines(log) == [f"error: {message}"] or message in error_lines(log)[0]
    assert not save.exists()


def test_unwritable_save_dir(tiny_config, clips, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", blocker / "results", *FAST)
    assert code == 2
    assert "cannot be created or written" in error_lines(log)[0]


def test_prompt_count_mismatch(tiny_config, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (folder / name).write_bytes(b"unused: the count is checked first")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only one prompt\n\n")
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", folder, "--prompt_path", prompts,
                         "--save_dir", tmp_path / "results", *FAST)
    assert code == 2
    assert "has 1 non-empty lines but there are 2 videos" in error_lines(log)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(tiny_config, clips, tmp_path, capsys):
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", tmp_path / "results", "--device", "cuda", *FAST)
    assert code == 2
    assert "CUDA is not available" in error_lines(log)[0]


def test_bad_input_from_the_command_line_has_no_traceback(tiny_config, clips, tmp_path):
    proc = run_tool("--config", tiny_config, "--input_path", clips / "one_frame.mp4", "--save_dir", tmp_path / "r")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "single frame" in error_lines(proc.stderr)[0]


def test_prompt_precedence(tmp_path):
    videos = [tmp_path / "a clip.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"]
    (tmp_path / "a clip.txt").write_text("from sidecar\nignored\n")
    (tmp_path / "c.txt").write_text("")
    assert cli.resolve_prompts(videos, "default", "", False) == ["from sidecar", "default", "default"]
    assert cli.resolve_prompts(videos, "default", "", True) == ["a clip", "b", "c"]
    listed = tmp_path / "prompts.txt"
    listed.write_text("one\n\n two \nthree\n")
    assert cli.resolve_prompts(videos, "default", str(listed), False) == ["one", "two", "three"]
    assert cli.resolve_prompts(videos, "default", str(listed), True) == ["a clip", "b", "c"]


def test_help_lists_every_reference_flag():
    text = cli.build_parser().format_help()
    for flag in ["--input_path", "--save_dir", "--version", "--model_path", "--prompt", "--prompt_path",
                 "--filename_as_prompt", "--cfg", "--solver_mode", "--steps", "--noise_aug", "--target_fps",
                 "--up_scale", "--s_cond", "--seed", "--config", "--device", "--overwrite", "--dry_run",
                 "--log_level"]:
        assert flag in text
    args = vars(cli.build_parser().parse_args(["--input_path", "x"]))
    expected = {"save_dir": "results", "version": "v1", "model_path": "", "prompt": "a good video",
                "prompt_path": "", "filename_as_prompt": False, "cfg": 7.5, "solver_mode": "fast", "steps": 15,
                "noise_aug": 200, "target_fps": 24, "up_scale": 4, "s_cond": 8, "seed": 666, "device": "auto",
                "overwrite": False, "dry_run": False, "low_vram": None}
    assert {k: args[k] for k in expected} == expected
    parse = cli.build_parser().parse_args
    assert parse(["--input_path", "x", "--low_vram"]).low_vram is True
    assert parse(["--input_path", "x", "--no-low_vram"]).low_vram is False


def test_debug_log_is_a_timeline(tiny_config, clips, tmp_path, capsys):
    """--log_level debug prefixes every line with the seconds since start and logs each phase's time."""
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", tmp_path / "results", "--log_level", "debug", *FAST)
    assert code == 0, log
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines and all(re.match(r"\[ *\d+\.\d\d s\] ", line) for line in lines), lines[:5]
    for phase in ("read", "encode", "text", "sample", "decode_write"):
        assert re.search(rf"\] {phase} took \d+\.\d\d s", log), phase
    assert re.search(r"\] encoded frames 0-7 at \d+\.\d\d s", log) and "encoded frames 8-8 at" in log


# ------------------------------------------------------------------ issue 25: never lose a file, never a traceback

def digest(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_no_output_is_written_over_an_input(tiny_config, tmp_path, capsys):
    """save_dir = the input folder with --overwrite: a.mov's output a.mp4 is the input a.mp4."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.mp4", "a.mov", "c.mp4"):
        make_clip(folder / name)
    before = {p.name: digest(p) for p in folder.iterdir()}
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", folder, "--save_dir", folder,
                         "--overwrite", *FAST)
    assert code == 1
    assert {p.name: digest(p) for p in folder.iterdir()} == before
    for name in ("a.mov", "a.mp4", "c.mp4"):
        assert re.search(rf"failed: {re.escape(name)}: its output would overwrite the input .*", log), (name, log)
    assert "loading network" not in log and "Traceback" not in log


def test_sidecar_is_never_written_over_an_input(tiny_config, tmp_path, capsys):
    """The config file sits where the sidecar would go."""
    save = tmp_path / "results"
    save.mkdir()
    config = save / "clip.json"
    tiny = Path(tiny_config).parent
    data = json.loads(Path(tiny_config).read_text())
    data["checkpoints"] = {"local_dir": str(tiny), "paths": {v: str(tiny / "unet.safetensors") for v in ("v1", "v2")}}
    data["text_encoder"]["path"] = str(tiny / "text_encoder.safetensors")
    data["vae"]["path"] = str(tiny / "vae")
    config.write_text(json.dumps(data))
    before = digest(config)
    clip = make_clip(tmp_path / "clip.mp4")
    code, log = run_main(capsys, "--config", config, "--input_path", clip, "--save_dir", save, *FAST)
    assert code == 1 and "would overwrite the input" in error_lines(log)[0]
    assert digest(config) == before and not (save / "clip.mp4").exists()


def test_video_without_sidecar_is_not_finished(tiny_config, tmp_path, capsys, monkeypatch):
    """Disk full at the sidecar: the video is there, its .json is not; the next run makes it again."""
    import errno

    import venhancer.pipeline as pipeline

    clip = make_clip(tmp_path / "clip.mp4")
    save = tmp_path / "results"

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "_write_json_atomic", disk_full)
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", save, *FAST)
    assert code == 1 and "No space left on device" in log
    monkeypatch.undo()
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", save, *FAST)
    assert code == 0, log
    assert "warning: clip.mp4: " in log and "has no clip.json" in log
    assert "1 enhanced, 0 skipped" in log
    assert sorted(p.name for p in save.iterdir()) == ["clip.json", "clip.mp4"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert (save / "clip.json").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", save, *FAST)
    assert code == 0 and "0 enhanced, 1 skipped" in log


def test_overwrite_that_stops_leaves_an_unfinished_output(tiny_config, tmp_path, capsys, monkeypatch):
    """--overwrite replaces the video, then the sidecar: stopped between, the old sidecar must not
    vouch for the new video."""
    import venhancer.pipeline as pipeline

    clip = make_clip(tmp_path / "clip.mp4")
    save = tmp_path / "results"
    assert run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", save, *FAST)[0] == 0

    def stopped(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_json_atomic", stopped)
    code, _ = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", save, "--overwrite",
                       *FAST)
    assert code == 130
    assert sorted(p.name for p in save.iterdir()) == ["clip.mp4"]


def test_too_long_name_fails_before_loading(tiny_config, clips, tmp_path, capsys):
    """The temporary name is 23 bytes longer than the stem: checked before any weights load."""
    folder = tmp_path / "in"
    folder.mkdir()
    long_clip = folder / ("x" * 240 + ".mp4")
    long_clip.write_bytes((clips / "whole.mp4").read_bytes())
    config = bogus_weights_config(tiny_config, tmp_path)
    code, log = run_main(capsys, "--config", config, "--input_path", folder, "--save_dir", tmp_path / "results",
                         *FAST)
    assert code == 1
    assert "file name is too long" in error_lines(log)[0] and len(error_lines(log)) == 2  # + the summary's
    assert "loading" not in log and "Traceback" not in log


def test_stale_partials_of_the_videos_to_write_are_removed(tiny_config, tmp_path, capsys):
    clip = make_clip(tmp_path / "clip.mp4")
    save = tmp_path / "results"
    save.mkdir()
    stale = [save / ".clip.a1b2c3d_.partial.mp4", save / ".clip.zzzzzzzz.partial.json"]
    kept = [save / ".clip.short.partial.mp4", save / ".clipx.a1b2c3d4.partial.mp4", save / "clip.partial.mp4",
            save / ".clip.a1b2c3d4.partial.mp4.txt", save / "notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"left over")
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", save, *FAST)
    assert code == 0, log
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"left over" for p in kept)
    assert log.count("left by an earlier run that was stopped") == 2


def unet_config(tiny_config, tmp_path, **unet):
    config = json.loads(Path(tiny_config).read_text())
    config["unet"].update(unet)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(config))
    return path


def deep_config(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def latin1_config(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"unet": {"dim": 32}, "note": "caf\u00e9"}'.encode("latin-1"))
    return path


UNFRIENDLY = [
    (lambda cfg, tmp: ["--config", cfg, "--device", "mps"], 2, "unsupported device 'mps'"),
    (lambda cfg, tmp: ["--config", cfg, "--device", "meta"], 2, "unsupported device 'meta'"),
    (lambda cfg, tmp: ["--config", unet_config(cfg, tmp, dim_mult=3)], 2, "config section 'unet'"),
    (lambda cfg, tmp: ["--config", deep_config(tmp)], 2, "deep.json is nested too deeply"),
    (lambda cfg, tmp: ["--config", latin1_config(tmp)], 2, "latin1.json is not UTF-8 text"),
    (lambda cfg, tmp: ["--config", cfg, "--steps", "1000000000000", "--dry_run"], 2, "steps must be in [1, 1000]"),
    (lambda cfg, tmp: ["--config", cfg, "--s_cond", "7.5"], 2, "argument --s_cond: invalid int value: '7.5'"),
]


@pytest.mark.parametrize("make_args,code,message", UNFRIENDLY)
def test_unfriendly_inputs_give_one_line(tiny_config, clips, tmp_path, capsys, make_args, code, message):
    args = [*FAST, *make_args(tiny_config, tmp_path)]
    try:
        got, log = run_main(capsys, "--input_path", clips / "with_audio.mp4", "--save_dir", tmp_path / "r", *args)
    except SystemExit as exit_:  # argparse
        got, log = exit_.code, capsys.readouterr().err
    assert got == code, log
    assert "Traceback" not in log
    assert len(error_lines(log)) == 1 and message in error_lines(log)[0], log


def test_extreme_aspect_ratio_names_the_input(tiny_config):
    from types import SimpleNamespace

    from venhancer.config import load_config
    from venhancer.pipeline import EnhanceOptions, plan_video

    info = SimpleNamespace(width=8000, height=2, fps=8.0, rate=Fraction(8), num_frames=9)
    with pytest.raises(ValueError, match=r"input 8000x2 at up_scale 4 gives an output of \d+x0"):
        plan_video(info, EnhanceOptions(), load_config(tiny_config).planning)


def test_interrupt_before_the_run_is_one_line(tiny_config, clips, tmp_path, capsys, monkeypatch):
    """Ctrl-C while torch and the models' code are imported."""
    import venhancer.distributed as distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed.DistContext, "from_env", interrupted)
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", tmp_path / "r", *FAST)
    assert code == 130 and len(error_lines(log)) == 1 and "interrupted" in error_lines(log)[0]


def test_missing_input_is_reported_before_torch_loads(tmp_path):
    script = ("import sys; from venhancer import cli; "
              "code = cli.main(['--input_path', 'no/such/clip.mp4']); "
              "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip() == "torch not loaded"
    assert error_lines(proc.stderr) == ["error: input path not found: no/such/clip.mp4"]
    proc = subprocess.run([sys.executable, "-c", script.replace("'no/such/clip.mp4'", "'x', '--config', 'no.json'")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.strip() == "torch not loaded" and proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: config file not found: no.json"]


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--steps", "3"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the following arguments are required: --input_path (see --help)"]


def test_help_shows_each_default_once():
    text = " ".join(cli.build_parser().format_help().split())
    assert "(default: None)" not in text
    assert "(default: info)" in text
    config_help = text[text.rindex("--config CONFIG"):text.rindex("--device DEVICE")]
    assert config_help.count("default") == 0 and "configs/venhancer.json" in config_help


def test_offline_without_weights_is_one_short_line(tmp_path, clips, capsys, monkeypatch):
    """The packaged config with nothing downloaded and no network: no download is tried, nothing
    is left in ckpts/."""
    import venhancer.loading as loading

    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loading, "try_to_load_from_cache", lambda repo_id, filename: None)

    def no_download(**kwargs):
        raise AssertionError("no download may be tried")

    monkeypatch.setattr(loading, "hf_hub_download", no_download)
    monkeypatch.chdir(tmp_path)
    code, log = run_main(capsys, "--input_path", clips / "with_audio.mp4", "--up_scale", "1", "--device", "cpu")
    assert code == 1
    assert len(error_lines(log)) == 1 and len(error_lines(log)[0].replace(str(tmp_path), "")) < 330, log
    assert "could not load the models" in log and "HF_HUB_OFFLINE" in log
    assert not (tmp_path / "ckpts").exists()


def test_hub_messages_are_not_doubled():
    cli.setup_logging("info")
    assert logging.getLogger("huggingface_hub").handlers == []


@pytest.mark.parametrize("target_fps", [40, 56, 72])  # 4, 6 and 8 frames inserted per pair
def test_tiny_config_plans_every_interpolation(tiny_config, clips, tmp_path, capsys, target_fps):
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4",
                         "--save_dir", tmp_path / "r", "--dry_run", "--target_fps", target_fps)
    assert code == 0, log
    assert f"({target_fps // 8 - 1} inserted per pair)" in log


# ------------------------------------------------------------------ issue 24: reference details

def test_s_cond_is_an_integer():
    from venhancer.pipeline import EnhanceOptions

    assert cli.build_parser().parse_args(["--input_path", "x", "--s_cond", "7"]).s_cond == 7
    with pytest.raises(ValueError, match="s_cond must be an integer, got 7.5"):
        EnhanceOptions(s_cond=7.5)
    assert EnhanceOptions(s_cond=7.0).s_cond == 7 and isinstance(EnhanceOptions(s_cond=7.0).s_cond, int)


def test_prompt_sidecar_first_non_empty_line(tmp_path):
    video = tmp_path / "clip.mp4"
    (tmp_path / "clip.txt").write_text("\n   \nthe real prompt\nsecond\n")
    assert cli.resolve_prompts([video], "default", "", False) == ["the real prompt"]


def test_failed_video_is_named_once(tiny_config, tmp_path, capsys, monkeypatch):
    import venhancer.pipeline as pipeline

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(pipeline.Enhancer, "_denoise", out_of_memory)
    clip = make_clip(tmp_path / "000000.mp4")
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clip, "--save_dir", tmp_path / "r", *FAST)
    assert code == 1
    assert re.search(r"^error: failed: 000000\.mp4: out of CPU memory while denoising", log, re.M), log
    assert "000000.mp4: 000000.mp4" not in log


def test_console_script_is_the_tool():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["venhancer"] == "venhancer.cli:main"
    assert "main" in (ROOT / "enhance_a_video.py").read_text()
    listed = {line.split(">=")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert listed == {d.split(">=")[0] for d in project["dependencies"]}


def test_run_defaults_have_one_source():
    from venhancer.options import EnhanceOptions

    args = vars(cli.build_parser().parse_args(["--input_path", "x"]))
    assert {k: args[k] for k in EnhanceOptions.defaults()} == EnhanceOptions.defaults()


def test_case_insensitive_file_systems_are_respected(tmp_path, monkeypatch):
    """Where names ignore case, a.mov's output a.mp4 is the input A.mp4."""
    from venhancer.options import EnhanceOptions

    folder = tmp_path / "in"
    folder.mkdir()
    videos = [folder / "A.mp4", folder / "a.mov"]
    for video in videos:
        video.write_bytes(b"x")
    request = cli.Request(EnhanceOptions(), videos, ["p", "p"], folder, videos)
    assert [name for name, _ in cli.plan_jobs(request, overwrite=True).failed] == ["A.mp4"]
    monkeypatch.setattr(cli, "is_case_insensitive", lambda folder: True)
    failed = cli.plan_jobs(request, overwrite=True).failed
    assert [name for name, _ in failed] == ["A.mp4", "a.mov"]
    assert "would overwrite the input" in failed[1][1] and "A.mp4" in failed[1][1]


def test_fp8_is_refused_on_the_cpu_in_one_line(tiny_config, clips, tmp_path):
    proc = run_tool("--config", tiny_config, "--input_path", clips / "with_audio.mp4", "--save_dir", tmp_path / "r",
                    "--device", "cpu", "--precision", "fp8", *FAST)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: --precision fp8 needs a GPU with FP8 tensor cores (compute capability "
                                        "8.9 or newer, e.g. RTX 40xx, L4, H100); the device is the CPU"]
    assert not (tmp_path / "r").exists()


def test_precision_bf16_runs_on_the_cpu_and_is_recorded(tiny_config, clips, tmp_path, capsys):
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", clips / "with_audio.mp4", "--save_dir", save,
                         "--device", "cpu", "--precision", "bf16", *FAST)
    assert code == 0, log
    assert probe_video(save / "with_audio.mp4").num_frames == 17
    model = json.loads((save / "with_audio.json").read_text())["model"]
    assert (model["precision"], model["dtype"]) == ("bf16", "bfloat16")
    assert "precision bf16: memory plan 'full'" in log and "(cpu, bf16)" in log


def test_dtype_still_works_deprecated_and_hidden(clips, caplog):
    args = cli.build_parser().parse_args(["--input_path", str(clips / "with_audio.mp4"), "--dtype", "bfloat16"])
    with caplog.at_level(logging.WARNING, logger="venhancer"):
        assert cli.check_arguments(args).precision == "bf16"
    assert "--dtype is deprecated: use --precision bf16" in caplog.text
    args = cli.build_parser().parse_args(["--input_path", str(clips / "with_audio.mp4")])
    assert cli.check_arguments(args).precision == "auto"
    assert "--dtype" not in cli.build_parser().format_help()
