"""Outputs for editing (venhancer.output_formats, venhancer.color_fix): codecs, bit depths, frame folders,
colour correction, and their command-line checks; the model runs use the tiny model set."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from make_tiny_models import make_clip, make_tiny_models
from test_cli import FAST, error_lines, restore_logging, run_main, stream_lines  # noqa: F401 (autouse fixture)

import venhancer.output_formats as output_formats
from venhancer.color_fix import ColorMatcher, adain, source_position, wavelet, wavelet_lowpass
from venhancer.output_formats import FrameFolderWriter, OutputOptions, OutputSink
from venhancer.video_io import VideoWriter, ffmpeg_exe, probe_video, read_video


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def soft_frames(n=9, height=36, width=56):
    """Low-contrast drifting gradients: colour-corrected outputs stay inside [0, 1] (no clipping)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [np.stack([90 + (xx + 3 * i) % 60, 100 + yy % 50, np.full_like(xx, 110 + 4 * i)], -1) for i in range(n)]
    return np.asarray(frames, dtype=np.uint8)


@pytest.fixture(scope="module")
def soft_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("soft") / "soft.mp4"
    with VideoWriter(path, 8, 56, 36) as writer:
        writer.append(soft_frames())
    return path


def decode(path, pix_fmt, dtype):
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype=dtype)


def read_png(path, height, width):
    return decode(path, "rgb48le", "<u2").reshape(height, width, 3)


def gray_ramp(frames, height, width, bits):
    """A horizontal gray ramp over 16-bit values: 8-bit input can only give 256 luma levels."""
    ramp = np.linspace(0, 65535, width)[None, :, None].repeat(height, 0).repeat(3, 2)
    data = np.stack([ramp] * frames)
    return (data / 257).astype(np.uint8) if bits == 8 else data.round().astype(np.uint16)


CODEC_CASES = [  # codec, bit depth, ffmpeg codec name, stored pixel format
    ("h264", 8, "h264", "yuv420p"),
    ("h264", 10, "h264", "yuv420p10le"),
    ("h265", 8, "hevc", "yuv420p"),
    ("h265", 10, "hevc", "yuv420p10le"),
    ("prores", 8, "prores", "yuv422p10le"),
    ("prores", 10, "prores", "yuv422p10le"),
]


@pytest.mark.parametrize("codec,bits,name,pix_fmt", CODEC_CASES)
def test_each_codec_and_bit_depth_reads_back(tmp_path, codec, bits, name, pix_fmt):
    width, height, frames, fps = 320, 16, 5, 12
    options = OutputOptions(codec=codec, bit_depth=bits)
    encoding = options.encoding()
    out = tmp_path / f"clip{options.suffix}"
    with VideoWriter(out, fps, width, height, encoding=encoding) as writer:
        writer.append(gray_ramp(frames, height, width, 16 if bits == 10 else 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    info = probe_video(out)
    assert (info.num_frames, info.fps, info.width, info.height) == (frames, fps, width, height)
    (line,) = stream_lines(out)
    assert f"Video: {name}" in line and f"{pix_fmt}(tv, smpte170m" in line, line
    assert out.suffix == (".mov" if codec == "prores" else ".mp4")
    if pix_fmt.endswith("10le"):
        # The luma plane comes first in the planar 10-bit frame.
        luma = decode(out, pix_fmt, "<u2")[: width * height]
        levels = len(np.unique(luma))
        assert levels > 256 if bits == 10 else levels <= 256
    else:
        assert len(np.unique(decode(out, pix_fmt, np.uint8)[: width * height])) <= 256


def test_prores_mov_keeps_the_audio(tmp_path):
    source = make_clip(tmp_path / "source.mp4", audio=True)
    out = tmp_path / "clip.mov"
    with VideoWriter(out, 16, 64, 16, audio_source=source,
                     encoding=OutputOptions(codec="prores", bit_depth=10).encoding()) as writer:
        writer.append(gray_ramp(17, 16, 64, 16))
    video, audio = stream_lines(out)
    assert "Video: prores (HQ)" in video and "Audio: aac" in audio
    assert probe_video(out).num_frames == 17


def test_hd_output_is_tagged_bt709(tmp_path):
    out = tmp_path / "hd.mp4"
    options = OutputOptions(codec="h265", bit_depth=10)
    with VideoWriter(out, 4, 1280, 720, encoding=options.encoding()) as writer:
        writer.append(gray_ramp(2, 720, 1280, 16))
    (line,) = stream_lines(out)
    assert "yuv420p10le(tv, bt709" in line
    assert options.record(1280, 720, "a.mp4", tmp_path)["color"] == {
        "matrix": "bt709", "primaries": "bt709", "transfer": "bt709", "range": "tv"}


def test_frame_folder_is_atomic_and_16_bit(tmp_path):
    frames = gray_ramp(3, 8, 64, 16)
    target = tmp_path / "clip_frames"
    writer = FrameFolderWriter(target, 64, 8)
    writer.append(frames[:2])
    assert not target.exists()  # only the hidden folder so far
    writer.append(frames[2:])
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_frames"]
    assert sorted(p.name for p in target.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert "rgb48be" in stream_lines(target / "000001.png")[0]
    np.testing.assert_array_equal(read_png(target / "000002.png", 8, 64), frames[2])

    # An overwrite replaces the folder only when the new one is complete; an abort leaves the old.
    again = FrameFolderWriter(target, 64, 8)
    again.append(frames[:1])
    again.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_frames"]
    assert len(list(target.iterdir())) == 3
    again = FrameFolderWriter(target, 64, 8)
    again.append(frames[:1])
    again.close()
    assert sorted(p.name for p in target.iterdir()) == ["000000.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_frames"]


def test_reference_output_keeps_the_old_writer_and_truncation(tmp_path, monkeypatch):
    """No new option: the writer is called as before (no encoding) and fed the same bytes as the
    previous code's ((x * 0.5 + 0.5).clamp(0, 1) * 255).to(uint8)."""
    made = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            made.append((args, kwargs))

    monkeypatch.setattr(output_formats, "VideoWriter", Recorder)
    sink = OutputSink(OutputOptions(), tmp_path / "a.mp4", None, 16, 8, 6, audio_source=None)
    assert made == [((tmp_path / "a.mp4", 16, 8, 6), {"audio_source": None, "sar": None})]
    chunk = torch.randn(3, 3, 6, 8, generator=torch.Generator().manual_seed(0)) * 0.7
    before = ((chunk.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    video, frames = sink.quantise(chunk.float() * 0.5 + 0.5)
    assert frames is None and video.dtype == np.uint8
    np.testing.assert_array_equal(video, before)
    assert OutputOptions(crf=17).is_reference and not OutputOptions(crf=18).is_reference


BAD_COMBINATIONS = [
    (dict(codec="prores", crf=20), "crf 20 does not apply to prores"),
    (dict(codec="vp9"), "codec must be one of h264, h265, prores, got 'vp9'"),
    (dict(bit_depth=12), "bit_depth must be 8 or 10, got 12"),
    (dict(crf=60), "crf must be in [0, 51], got 60"),
    (dict(color_fix="histogram"), "color_fix must be one of none, adain, wavelet, got 'histogram'"),
    (dict(video=False), "no video and no frames_dir: nothing would be written"),
    (dict(video=False, frames_dir=True, codec="prores"), "apply to the video, which is not written"),
]


@pytest.mark.parametrize("kwargs,message", BAD_COMBINATIONS)
def test_bad_combinations_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OutputOptions(**kwargs)


def test_missing_encoder_support_is_reported(monkeypatch):
    # An ffmpeg whose libx264 has no 10-bit formats and which lacks libx265 altogether.
    table = {"libx264": frozenset({"yuv420p", "yuv444p"}), "libx265": None,
             "prores_ks": frozenset({"yuv422p10le"})}
    monkeypatch.setattr(output_formats, "_encoder_pix_fmts", lambda ffmpeg, encoder: table[encoder])
    OutputOptions(codec="h264", bit_depth=8).check_encoder()
    OutputOptions(codec="prores").check_encoder()
    with pytest.raises(ValueError, match=r"bit_depth 10 with codec h264 needs libx264 to encode yuv420p10le"):
        OutputOptions(codec="h264", bit_depth=10).check_encoder()
    with pytest.raises(ValueError, match=r"codec h265 needs ffmpeg's libx265 encoder"):
        OutputOptions(codec="h265").check_encoder()


def test_bundled_ffmpeg_has_every_choice():
    for codec, bits, _, _ in CODEC_CASES:
        OutputOptions(codec=codec, bit_depth=bits).check_encoder()


CLI_ERRORS = [
    (["--codec", "prores", "--crf", "18"], "crf 18 does not apply to prores"),
    (["--no_video"], "no video and no frames_dir: nothing would be written"),
    (["--no_video", "--frames_dir", "--bit_depth", "10"], "apply to the video, which is not written"),
    (["--crf", "-1"], "crf must be in [0, 51], got -1"),
]


@pytest.mark.parametrize("args,message", CLI_ERRORS)
def test_bad_combinations_on_the_command_line(tiny_config, soft_clip, tmp_path, capsys, args, message):
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save,
                         *FAST, *args)
    assert code == 2
    assert len(error_lines(log)) == 1 and message in error_lines(log)[0]
    assert "loading" not in log and not save.exists()


def test_missing_10_bit_h264_is_a_usage_error(tiny_config, soft_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(output_formats, "_encoder_pix_fmts", lambda ffmpeg, encoder: frozenset({"yuv420p"}))
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir",
                         tmp_path / "r", *FAST, "--bit_depth", "10")
    assert code == 2 and "needs libx264 to encode yuv420p10le" in error_lines(log)[0]
    assert "loading" not in log


def test_dry_run_and_resume_follow_the_codec(tiny_config, soft_clip, tmp_path, capsys):
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--dry_run", "--codec", "prores", "--frames_dir", "--color_fix", "wavelet")
    assert code == 0, log
    assert (f"output {save / 'soft.mov'} (writes prores yuv422p10le from 8-bit frames in .mov "
            "(smpte170m tv range) + 16-bit PNG frames; color fix wavelet)") in log
    # The .mov and the frame folder both exist: skipped; one missing: run.
    save.mkdir()
    (save / "soft.mov").write_bytes(b"finished earlier")
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--dry_run", "--codec", "prores", "--frames_dir")
    assert "0 planned, 0 skipped" not in log and "1 planned" in log
    (save / "soft_frames").mkdir()
    (save / "soft.json").write_text("{}")  # a run is finished when its sidecar is there too
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--dry_run", "--codec", "prores", "--frames_dir")
    assert "soft.mp4: output exists, would be skipped" in log
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--dry_run", "--codec", "prores", "--frames_dir", "--overwrite")
    assert "1 planned" in log
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--dry_run")  # the default's soft.mp4 is not there
    assert "1 planned" in log


def test_adain_matches_mean_and_std():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 60, generator=g) * 0.5 + 0.4
    ref = torch.rand(2, 3, 40, 60, generator=g) * 0.3 + 0.1
    out = adain(x, ref)
    torch.testing.assert_close(out.mean((-2, -1)), ref.mean((-2, -1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.std((-2, -1)), ref.std((-2, -1)), rtol=1e-4, atol=1e-5)
    # The detail is the output's: a per-channel affine map of it.
    corr = np.corrcoef(out[0, 0].flatten().numpy(), x[0, 0].flatten().numpy())[0, 1]
    assert corr > 0.9999


def smooth_ref(height=72, width=112):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return (torch.stack([xx, yy, 0.5 * (xx + yy)])[None] * 0.8 + 0.1)


def test_wavelet_takes_the_reference_low_pass_and_keeps_the_detail():
    ref = smooth_ref()
    detail = 0.1 * torch.rand(1, 3, 72, 112, generator=torch.Generator().manual_seed(0))
    x = ref * 0.6 + 0.3 + detail  # drifted colours, plus detail the reference lacks
    out = wavelet(x, ref)
    assert (wavelet_lowpass(x) - wavelet_lowpass(ref)).abs().max() * 255 > 20  # the drift to remove
    assert (wavelet_lowpass(out) - wavelet_lowpass(ref)).abs().max() * 255 < 1
    # The finest band (one blur) is the output's detail, kept.
    fine_x, fine_out = x - wavelet_lowpass(x, 1), out - wavelet_lowpass(out, 1)
    assert float((fine_out - fine_x).abs().mean()) < 0.1 * float(fine_x.abs().mean())


def test_reference_frames_of_inserted_frames_blend_their_neighbours():
    assert [source_position(j, 2) for j in range(4)] == [(0, 0.0), (0, 1 / 3), (0, 2 / 3), (1, 0.0)]
    source = np.stack([np.full((4, 6, 3), v, np.uint8) for v in (30, 90, 210)])
    matcher = ColorMatcher("adain", source, k=1, size=(8, 12), device=torch.device("cpu"))
    values = [float(matcher.reference(j).mean()) * 255 for j in range(5)]
    assert values == pytest.approx([30, 60, 90, 150, 210], abs=1e-3)
    with pytest.raises(IndexError):
        matcher.reference(5)


def resized_input(clip, height, width):
    src = torch.from_numpy(read_video(clip).frames).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(src, size=(height, width), mode="bilinear", align_corners=False)


def test_h265_10_bit_with_frames_and_adain(tiny_config, soft_clip, tmp_path, capsys):
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--codec", "h265", "--bit_depth", "10", "--crf", "12", "--frames_dir",
                         "--color_fix", "adain")
    assert code == 0, log
    assert sorted(p.name for p in save.iterdir()) == ["soft.json", "soft.mp4", "soft_frames"]
    info = probe_video(save / "soft.mp4")
    assert (info.num_frames, info.fps, info.width, info.height) == (17, 16, 112, 72)
    (line,) = stream_lines(save / "soft.mp4")
    assert "Video: hevc (Main 10)" in line and "yuv420p10le(tv, smpte170m" in line
    pngs = sorted((save / "soft_frames").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(17)]
    frames = np.stack([read_png(p, 72, 112) for p in pngs]).astype(np.float64) / 65535
    assert np.any(np.round(frames * 65535) % 257)  # 16-bit values, not 8-bit ones scaled up
    ref = resized_input(soft_clip, 72, 112).numpy().transpose(0, 2, 3, 1)
    refs = {0: ref[0], 4: ref[2], 16: ref[8], 3: (ref[1] + ref[2]) / 2}  # key frames, one inserted frame
    for j, r in refs.items():
        np.testing.assert_allclose(frames[j].mean((0, 1)), r.mean((0, 1)), rtol=0.01)
        np.testing.assert_allclose(frames[j].std((0, 1)), r.std((0, 1)), rtol=0.01)
    output = json.loads((save / "soft.json").read_text())["output"]
    assert {k: output[k] for k in ("codec", "crf", "pix_fmt", "bit_depth", "color_fix", "frames_dir")} == {
        "codec": "h265", "crf": 12, "pix_fmt": "yuv420p10le", "bit_depth": 10, "color_fix": "adain",
        "frames_dir": str(save / "soft_frames")}
    assert output["color"]["matrix"] == "smpte170m"


def test_frames_only_with_wavelet(tiny_config, soft_clip, tmp_path, capsys):
    save = tmp_path / "results"
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--frames_dir", "--no_video", "--color_fix", "wavelet")
    assert code == 0, log
    assert sorted(p.name for p in save.iterdir()) == ["soft.json", "soft_frames"]
    pngs = sorted((save / "soft_frames").iterdir())
    assert len(pngs) == 17
    frames = torch.from_numpy(np.stack([read_png(p, 72, 112) for p in pngs]).astype(np.float32) / 65535)
    frames = frames.permute(0, 3, 1, 2)
    ref = resized_input(soft_clip, 72, 112)
    for j in (0, 8, 16):
        diff = (wavelet_lowpass(frames[j:j + 1]) - wavelet_lowpass(ref[j // 2:j // 2 + 1])).abs().max() * 255
        assert diff < 1, (j, float(diff))
    output = json.loads((save / "soft.json").read_text())["output"]
    assert output["path"] == str(save / "soft_frames") and output["codec"] is None
    # Resumed: the folder exists, nothing runs.
    code, log = run_main(capsys, "--config", tiny_config, "--input_path", soft_clip, "--save_dir", save, *FAST,
                         "--frames_dir", "--no_video", "--color_fix", "wavelet")
    assert code == 0 and "1 skipped" in log and "loading network" not in log


def test_output_flags_default_to_the_reference():
    from venhancer import cli

    args = cli.build_parser().parse_args(["--input_path", "x"])
    assert (args.codec, args.crf, args.bit_depth, args.frames_dir, args.no_video, args.color_fix) == (
        "h264", None, 8, False, False, "none")
    assert cli.output_options(args) == OutputOptions() and OutputOptions().is_reference
    args = cli.build_parser().parse_args(["--input_path", "x", "--codec", "h265", "--crf", "24", "--bit_depth",
                                          "10", "--frames_dir", "--color_fix", "adain"])
    assert cli.output_options(args) == OutputOptions(codec="h265", crf=24, bit_depth=10, frames_dir=True,
                                                     color_fix="adain")


def test_library_call_streams_the_input_into_prores_with_adain(tiny_config, soft_clip, tmp_path, monkeypatch):
    """Without a pre-decoded video the input is streamed batch by batch; the colour correction
    keeps those batches instead of decoding the input again."""
    import venhancer.pipeline as pipeline
    from venhancer.pipeline import Enhancer

    decodes = []
    real = pipeline.iter_frames

    def counted(*args, **kwargs):
        decodes.append(args)
        return real(*args, **kwargs)

    enhancer = Enhancer(tiny_config, progress=False)
    monkeypatch.setattr(pipeline, "iter_frames", counted)
    result = enhancer.enhance(soft_clip, up_scale=2, target_fps=16, solver_mode="normal", steps=2,
                              save_dir=tmp_path, output=OutputOptions(codec="prores", color_fix="adain"))
    assert len(decodes) == 1
    assert result.output_path == tmp_path / "soft.mov"
    (line,) = stream_lines(result.output_path)
    assert "Video: prores (HQ)" in line and "yuv422p10le" in line
    assert probe_video(result.output_path).num_frames == 17
    output = json.loads(result.sidecar_path.read_text())["output"]
    assert (output["codec"], output["crf"], output["color_fix"]) == ("prores", None, "adain")


def test_a_failed_run_leaves_neither_video_nor_frames(tmp_path):
    options = OutputOptions(codec="h265", bit_depth=10, frames_dir=True)
    with pytest.raises(KeyboardInterrupt):
        with OutputSink(options, tmp_path / "a.mp4", tmp_path / "a_frames", 8, 64, 16) as sink:
            sink.append(sink.quantise(torch.rand(2, 3, 16, 64)))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with OutputSink(options, tmp_path / "a.mp4", tmp_path / "a_frames", 8, 64, 16) as sink:
        video, frames = sink.quantise(torch.rand(2, 3, 16, 64))
        assert frames is video and video.dtype == np.uint16  # one 16-bit copy serves both
        sink.append([video, frames])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "a_frames"]


def test_output_names_follow_the_codec_and_the_frame_folder(tmp_path):
    """venhancer.outputs (pure Python) knows the codecs' extensions and the frame folder: names,
    the finished rule (every requested output and the sidecar), name lengths, stale partials."""
    from venhancer import outputs

    assert outputs.output_path_for(Path("in/a.mov"), tmp_path) == tmp_path / "a.mp4"
    assert outputs.output_path_for(Path("in/a.mp4"), tmp_path, ".mov") == tmp_path / "a.mov"
    options = OutputOptions(codec="prores", frames_dir=True)
    assert options.targets("in/a.mp4", tmp_path) == [tmp_path / "a.mov", tmp_path / "a_frames"]
    assert options.sidecar_path("in/a.b.mp4", tmp_path) == tmp_path / "a.b.json"
    frames_only = OutputOptions(frames_dir=True, video=False)
    assert frames_only.targets("a.mp4", tmp_path) == [tmp_path / "a_frames"]
    # finished: the .mov, the folder and the sidecar
    (tmp_path / "a.mov").write_bytes(b"v")
    (tmp_path / "a_frames").mkdir()
    assert not outputs.is_finished(tmp_path / "a.mov", [tmp_path / "a_frames"], tmp_path / "a.json")
    (tmp_path / "a.json").write_text("{}")
    assert outputs.is_finished(tmp_path / "a.mov", [tmp_path / "a_frames"], tmp_path / "a.json")
    assert outputs.is_finished(tmp_path / "a_frames", (), tmp_path / "a.json")
    assert not outputs.is_finished(tmp_path / "a.mp4")
    # the frame folder's temporary name is the longest one written
    limit = outputs._name_max(tmp_path)
    stem = "x" * (limit + 1 - len("._frames.xxxxxxxx.partial"))  # that name: limit + 1 bytes
    outputs.check_output_names(tmp_path / f"{stem}.mp4")
    with pytest.raises(ValueError, match="file name is too long"):
        outputs.check_output_names(tmp_path / f"{stem}.mp4", frames=True)
    # stale partials of a killed run: videos of any codec, sidecars, frame folders; nothing else
    stale = [tmp_path / ".a.abcd_123.partial.mov", tmp_path / ".a.abcd_123.partial.mp4",
             tmp_path / ".a.abcd_123.partial.json"]
    for path in stale:
        path.write_bytes(b"x")
    (tmp_path / ".a_frames.abcd_123.partial").mkdir()
    (tmp_path / ".a_frames.abcd_123.partial" / "000000.png").write_bytes(b"x")
    (tmp_path / ".b.abcd_123.partial.mov").write_bytes(b"x")
    assert outputs.stale_partials(tmp_path / "a.mov") == sorted([*stale, tmp_path / ".a_frames.abcd_123.partial"])
    outputs.remove_stale_partials(tmp_path / "a.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.abcd_123.partial.mov", "a.json", "a.mov", "a_frames"]
