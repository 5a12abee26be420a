import os
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from make_tiny_models import make_clip

import venhancer.video_io as video_io
from venhancer.config import load_config
from venhancer.pipeline import EnhanceOptions, plan_video
from venhancer.video_io import (
    VideoError,
    VideoWriter,
    ffmpeg_exe,
    iter_frames,
    list_videos,
    probe_video,
    read_video,
)


def smooth_frames(n, height, width):
    """Gradients that drift per frame: survive H.264 almost unchanged, unlike noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [np.stack([(xx * 4 + 9 * i) % 256, (yy * 4 + 5 * i) % 256, np.full_like(xx, 30 * i % 256)], -1)
              for i in range(n)]
    return np.asarray(frames, dtype=np.uint8)


def stream_info(path):
    """ffmpeg's description of the streams (there is no ffprobe in imageio-ffmpeg)."""
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return [line.strip() for line in out.stderr.splitlines() if re.match(r"\s*Stream #", line)]


def test_round_trip_frames_fps_size_and_codec(tmp_path):
    frames = smooth_frames(9, 48, 64)
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, 8, 64, 48) as writer:
        writer.append(frames[:4])  # streaming: several appends, single frames too
        writer.append(frames[4])
        writer.append(frames[5:])
    assert writer.num_frames == 9
    video = read_video(out)
    assert video.frames.shape == (9, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.info.fps == 8 and video.info.num_frames == 9
    assert (video.info.width, video.info.height) == (64, 48)
    assert np.abs(video.frames.astype(int) - frames).mean() < 4
    (line,) = stream_info(out)
    assert "Video: h264" in line and "yuv420p" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temporary left


def test_fractional_fps_is_kept(tmp_path):
    out = tmp_path / "ntsc.mp4"
    with VideoWriter(out, 24000 / 1001, 32, 32) as writer:
        writer.append(smooth_frames(5, 32, 32))
    assert probe_video(out).fps == pytest.approx(24000 / 1001, rel=1e-9)


@pytest.mark.parametrize("width,height", [(57, 33), (97, 65), (64, 31)])
def test_odd_sizes_are_read(tmp_path, width, height):
    video = read_video(make_clip(tmp_path / "odd.mp4", width=width, height=height, frames=4))
    assert video.frames.shape == (4, height, width, 3)


@pytest.mark.parametrize("name", ["c.mov", "c.webm", "c.mkv", "c.gif", "C.MP4"])
def test_containers(tmp_path, name):
    info = probe_video(make_clip(tmp_path / name, width=40, height=30, frames=6, fps=10))
    assert (info.num_frames, info.width, info.height, info.fps) == (6, 40, 30, 10)


def test_odd_output_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="even width and height, got 33x32"):
        VideoWriter(tmp_path / "x.mp4", 8, 33, 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("source", ["a.mp4", "a.webm"])
def test_audio_track_is_kept(tmp_path, source):
    src = make_clip(tmp_path / source, frames=16, fps=8, audio=True)
    assert probe_video(src).has_audio
    out = tmp_path / "out" / "a.mp4"
    out.parent.mkdir()
    with VideoWriter(out, 16, 56, 36, audio_source=src) as writer:
        writer.append(smooth_frames(31, 36, 56))
    info = probe_video(out)
    assert info.has_audio and info.num_frames == 31 and info.fps == 16
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.mp4"]


def test_failure_removes_temporary_and_keeps_existing_output(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, 8, 32, 32) as writer:
            writer.append(smooth_frames(3, 32, 32))
            assert any(p.name.endswith(".partial.mp4") for p in tmp_path.iterdir())
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    assert out.read_bytes() == b"previous result"


def test_bad_frames_and_empty_writer_leave_nothing(tmp_path):
    writer = VideoWriter(tmp_path / "v.mp4", 8, 32, 32)
    with pytest.raises(ValueError, match="frames must be uint8"):
        writer.append(np.zeros((2, 32, 30, 3), np.uint8))
    writer.abort()
    with pytest.raises(ValueError, match="no frames"):
        VideoWriter(tmp_path / "w.mp4", 8, 32, 32).close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    good = make_clip(folder / "good.mp4", frames=24)
    (folder / "text.mp4").write_text("this is not a video\n" * 20)
    (folder / "empty.mp4").write_bytes(b"")
    data = good.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end is lost
    fast = make_clip(folder / "fast.mp4", frames=48, extra=("-movflags", "+faststart"))
    data = fast.read_bytes()
    (folder / "fast_cut.mp4").write_bytes(data[: len(data) // 3])  # index kept, frame data lost
    data = make_clip(folder / "m.mkv", frames=48).read_bytes()
    (folder / "cut.mkv").write_bytes(data[: len(data) // 2])  # no index: the last clusters are lost
    make_clip(folder / "one.mp4", frames=1)
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=1",
                    str(folder / "sound.mp4")], check=True)
    return folder


@pytest.mark.parametrize("name,message", [
    ("missing.mp4", "file not found"),
    ("empty.mp4", "empty file"),
    ("text.mp4", "not a readable video"),
    ("cut.mp4", "not a readable video"),
    ("fast_cut.mp4", "truncated video"),
    ("cut.mkv", "truncated video: the header promises 6.00 s but the data ends after 1.75 s"),
    ("one.mp4", "single frame"),
    ("sound.mp4", "no video stream"),
])
def test_bad_inputs_raise_one_line_video_error(bad_files, name, message):
    with pytest.raises(VideoError) as err:
        read_video(bad_files / name)
    text = str(err.value)
    assert message in text and name in text and "\n" not in text
    with pytest.raises(VideoError, match=message):
        probe_video(bad_files / name)


def test_list_videos_filters_and_sorts(tmp_path):
    for name in ["b.MP4", "a.webm", "c.gif", "d.mkv", "e.mov", "notes.txt", ".x.partial.mp4", "f.avi"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.mp4").mkdir()
    assert [p.name for p in list_videos(tmp_path)] == ["a.webm", "b.MP4", "c.gif", "d.mkv", "e.mov"]


def test_sample_clip():
    info = probe_video(Path(__file__).resolve().parents[1] / "inputs" / "000000.mp4")
    assert (info.width, info.height, info.num_frames, info.fps) == (720, 480, 49, 8)
    assert Fraction(info.fps) == 8


def ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-y", "-loglevel", "error", *map(str, args)], check=True)


def timed_clip(path, pts, frames, rate=48):
    """`frames` testsrc frames at the timestamps `pts` (an ffmpeg expression of N, in units of 1/rate);
    the last one lasts 1/rate."""
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate={rate}", "-vf", f"settb=1/{rate},setpts='{pts}'",
           "-fps_mode", "passthrough", "-frames:v", frames, "-c:v", "libx264", "-pix_fmt", "yuv444p", path)
    return path


def audio_clip(path, video_seconds, audio_seconds, fps=8):
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate={fps}:duration={video_seconds}", "-f", "lavfi",
           "-i", f"sine=frequency=440:duration={audio_seconds}", "-c:v", "libx264", "-c:a", "aac", path)
    return path


def assert_each_frame_once(video):
    """testsrc changes every frame: a duplicated frame shows as two equal neighbours."""
    for a, b in zip(video.frames, video.frames[1:]):
        assert not np.array_equal(a, b)


def test_variable_rate_clip_is_read_frame_by_frame(tmp_path):
    # 20 frames at 15 fps, then 24 at 30 fps: a constant-rate read makes 65 of them.
    clip = timed_clip(tmp_path / "vfr.mp4", "if(lt(N,20),2*N,20+N)", 44, rate=30)
    video = read_video(clip)
    assert video.info.num_frames == 44 and video.frames.shape[0] == 44
    assert_each_frame_once(video)
    # The average rate: frames / the stream's duration (20/15 + 24/30 s).
    assert video.info.rate == Fraction(44) / (Fraction(20, 15) + Fraction(24, 30))
    assert video.info.duration == Fraction(20, 15) + Fraction(24, 30)


def test_timestamp_gaps_and_double_rate_stretch_are_read_as_stored(tmp_path):
    pts = "if(lt(N,10),2*N,if(lt(N,20),2*N+12,if(lt(N,32),52+N-20,74+2*(N-32))))"
    video = read_video(timed_clip(tmp_path / "gaps.mp4", pts, 44))
    assert video.frames.shape[0] == 44
    assert_each_frame_once(video)


def test_late_video_stream_is_not_padded_with_its_first_frame(tmp_path):
    video_only = make_clip(tmp_path / "v.mp4", width=64, height=48, frames=48, fps=24)
    late = tmp_path / "late.mp4"
    ffmpeg("-itsoffset", 0.25, "-i", video_only, "-f", "lavfi", "-i", "sine=duration=2.25",
           "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", late)
    video = read_video(late)
    assert video.frames.shape[0] == 48 and video.info.rate == 24
    assert_each_frame_once(video)
    assert abs(video.info.start_time - Fraction(1, 4)) < Fraction(1, 100)


@pytest.mark.parametrize("rate,name", [("1000/33", "a.mp4"), ("48/7", "b.mp4"), ("1000", "c.mp4"),
                                       ("1000", "d.mkv"), ("30000/1001", "e.mkv"), ("30", "f.webm"),
                                       ("24000/1001", "g.mp4")])
def test_exact_rational_rate(tmp_path, rate, name):
    clip = make_clip(tmp_path / name, width=64, height=48, frames=12, fps=rate)
    info = probe_video(clip)
    assert info.rate == Fraction(rate) and info.fps == float(Fraction(rate)) and info.num_frames == 12


def test_rate_rule_uses_the_exact_rate(tmp_path):
    """24 / (48/7) = 3.5 rounds (half to even) to 4: 3 inserted frames, where 6.86 fps gives 2."""
    info = probe_video(make_clip(tmp_path / "r.mp4", width=64, height=48, frames=5, fps="48/7"))
    plan = plan_video(info, EnhanceOptions(target_fps=24), load_config().planning)
    assert plan.k == 3 and plan.out_rate == Fraction(192, 7)


def test_variable_rate_output_lasts_as_long_as_the_input(tmp_path):
    src = timed_clip(tmp_path / "vfr.mp4", "if(lt(N,20),2*N,20+N)", 44, rate=30)
    info = probe_video(src)
    plan = plan_video(info, EnhanceOptions(target_fps=16), load_config().planning)
    assert plan.k == 0 and plan.out_frames / plan.out_rate == info.duration
    out = tmp_path / "out.mp4"
    with VideoWriter(out, plan.out_rate, 64, 48) as writer:
        writer.append(read_video(src).frames)
    assert probe_video(out).duration == info.duration


def colour_patches(height=48, width=64):
    colours = np.array([[200, 40, 40], [40, 180, 60], [50, 60, 210], [128, 128, 128], [230, 180, 140],
                        [30, 200, 200], [220, 220, 30], [20, 20, 20]], np.uint8)
    cols = np.arange(width) * len(colours) // width
    return np.broadcast_to(colours[cols][None], (height, width, 3)).copy()


def encode_patches(path, rgb, matrix, tags):
    """Lossless yuv444p H.264 of `rgb`, converted with `matrix`, carrying colour `tags` (may be none)."""
    raw = path.with_suffix(".rgb")
    raw.write_bytes(np.stack([rgb, rgb]).tobytes())
    height, width = rgb.shape[:2]
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", 8, "-i", raw,
           "-vf", f"scale=out_color_matrix={matrix}:out_range=tv", "-pix_fmt", "yuv444p",
           *tags, "-c:v", "libx264", "-qp", 0, path)
    return path


def tags(name):
    return ["-colorspace", name, "-color_primaries", name, "-color_trc", name, "-color_range", "tv"]


@pytest.mark.parametrize("matrix,tag_args,read_as", [
    ("bt601", tags("smpte170m"), "bt601"),
    ("bt601", tags("bt470bg")[:2], "bt601"),
    ("bt709", tags("bt709"), "bt709"),
    ("bt601", [], "bt601"),  # untagged: BT.601, as the SPEC says
])
def test_colours_follow_the_input_tags(tmp_path, matrix, tag_args, read_as):
    rgb = colour_patches()
    clip = encode_patches(tmp_path / "c.mp4", rgb, matrix, tag_args)
    video = read_video(clip)
    assert video.info.color_matrix == read_as
    assert np.abs(video.frames.astype(int) - rgb).max() <= 3
    # The tolerance tells the matrices apart: read with the other one, the patches are off.
    other = video_io.VideoInfo(**{**video.info.__dict__, "color_matrix": "bt709" if read_as == "bt601" else "bt601"})
    wrong = np.concatenate(list(iter_frames(other)))
    assert np.abs(wrong.astype(int) - rgb).max() > 3


@pytest.mark.parametrize("width,height,tag", [(1280, 720, "bt709"), (1280, 544, "bt709"), (960, 720, "bt709"),
                                              (320, 240, "smpte170m")])
def test_output_matrix_and_tags_agree(tmp_path, width, height, tag):
    rgb = colour_patches(height, width)
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 8, width, height) as writer:
        writer.append(np.stack([rgb, rgb]))
    (line,) = stream_info(out)
    assert f"yuv420p(tv, {tag}, progressive)" in line
    assert probe_video(out).color_matrix == ("bt709" if tag == "bt709" else "bt601")
    frames = read_video(out).frames.astype(int)
    # Away from the patch edges, where H.264 and chroma subsampling blur the colours.
    patch = width // 8
    for left in range(0, width, patch):
        inner = (slice(None), slice(8, -8), slice(left + 8, left + patch - 8))
        assert np.abs(frames[inner] - rgb[inner[1:]]).max() <= 3


def test_pixel_aspect_ratio_is_read_and_written(tmp_path):
    src = make_clip(tmp_path / "ana.mp4", width=64, height=48, frames=4, extra=("-vf", "setsar=4/3"))
    info = probe_video(src)
    assert info.sar == Fraction(4, 3)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 8, 128, 96, sar=info.sar) as writer:
        writer.append(smooth_frames(4, 96, 128))
    (line,) = stream_info(out)
    assert "SAR 4:3 DAR 16:9" in line and probe_video(out).sar == Fraction(4, 3)


def audio_span(path):
    info = probe_video(path)
    return float(info.audio_start), float(info.audio_end)


@pytest.mark.parametrize("audio_seconds", [1.5, 2.99, 3.0, 6.0])
def test_audio_is_cut_or_padded_to_the_video(tmp_path, audio_seconds):
    src = audio_clip(tmp_path / "src.mp4", 3, audio_seconds)
    info = probe_video(src)
    assert info.num_frames == 24 and info.duration == 3  # the audio never changes the video's count
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()
    with VideoWriter(out, 8, 64, 48, audio_source=src) as writer:
        writer.append(smooth_frames(24, 48, 64))
    result = probe_video(out)
    assert result.num_frames == 24 and result.has_audio
    start, end = audio_span(out)
    assert abs(start) < 0.03 and abs(end - 3) < 0.1


def test_long_audio_does_not_make_a_short_video_truncated(tmp_path):
    info = probe_video(audio_clip(tmp_path / "long.mp4", 2, 4))
    assert info.num_frames == 16 and info.duration == 2 and float(info.audio_end) > 3.9


def test_audio_is_aligned_to_the_first_video_frame(tmp_path):
    """The source's audio is silent until its first video frame (0.25 s): the output's starts loud."""
    video_only = make_clip(tmp_path / "v.mp4", width=64, height=48, frames=48, fps=24)
    late = tmp_path / "late.mp4"
    ffmpeg("-itsoffset", 0.25, "-i", video_only, "-f", "lavfi", "-i", "aevalsrc='if(gte(t,0.25),sin(2*PI*440*t),0)':d=2.25",
           "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", late)
    out = tmp_path / "out" / "late.mp4"
    out.parent.mkdir()
    with VideoWriter(out, 24, 64, 48, audio_source=late) as writer:
        writer.append(smooth_frames(48, 48, 64))
    assert abs(audio_span(out)[1] - 2) < 0.1
    pcm = subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(out), "-map", "0:a", "-t", "0.2",
                          "-f", "s16le", "-ac", "1", "-"], capture_output=True, check=True).stdout
    samples = np.frombuffer(pcm, np.int16).astype(float)
    assert np.sqrt(np.mean(samples[2000:] ** 2)) > 1000  # not the 0.25 s of silence before the picture


def test_audio_mp4_cannot_hold_is_reencoded_to_aac(tmp_path):
    src = make_clip(tmp_path / "a.webm", frames=16, fps=8, audio=True)
    assert probe_video(src).audio_codec == "opus"
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 8, 56, 36, audio_source=src) as writer:
        writer.append(smooth_frames(16, 36, 56))
    assert any("Audio: aac" in line for line in stream_info(out))


def test_audio_mux_fault_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    src = audio_clip(tmp_path / "src.mp4", 2, 2)
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()

    def full_disk(args):
        return subprocess.CompletedProcess(args, 1, b"", b"[out#0/mp4] Error writing trailer: No space left on device\n")

    monkeypatch.setattr(video_io, "_run_ffmpeg", full_disk)
    with pytest.raises(OSError, match=r"o\.mp4: could not add the audio track of .*src\.mp4: .*No space left on device$"):
        with VideoWriter(out, 8, 64, 48, audio_source=src) as writer:
            writer.append(smooth_frames(16, 48, 64))
    assert list(out.parent.iterdir()) == []


def test_written_file_is_verified_before_it_is_renamed(tmp_path, monkeypatch):
    """A step that loses frames after the encoder (as `-shortest` did) fails the run."""
    real_mux = VideoWriter._mux_audio

    def lossy_mux(self, source):
        muxed = real_mux(self, source)
        cut = muxed.with_name(muxed.name.replace(".partial", ".cut.partial"))
        ffmpeg("-i", muxed, "-c", "copy", "-frames:v", 10, cut)
        os.replace(cut, muxed)
        return muxed

    monkeypatch.setattr(VideoWriter, "_mux_audio", lossy_mux)
    src = audio_clip(tmp_path / "src.mp4", 2, 2)
    out = tmp_path / "out" / "o.mp4"
    out.parent.mkdir()
    with pytest.raises(OSError, match=r"o\.mp4: the written file has 10 frames instead of 16$"):
        with VideoWriter(out, 8, 64, 48, audio_source=src) as writer:
            writer.append(smooth_frames(16, 48, 64))
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_permissions_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "o.mp4"
        with VideoWriter(out, 8, 32, 32) as writer:
            writer.append(smooth_frames(2, 32, 32))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode


def test_frames_stream_in_bounded_batches(tmp_path):
    clip = make_clip(tmp_path / "s.mp4", width=64, height=48, frames=19)
    batches = list(iter_frames(clip, batch=8))
    assert [b.shape for b in batches] == [(8, 48, 64, 3), (8, 48, 64, 3), (3, 48, 64, 3)]
    assert np.array_equal(np.concatenate(batches), read_video(clip).frames)


def test_memory_shortage_is_reported_as_such(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "m.mp4", width=64, height=48, frames=4)

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(video_io.np, "empty", no_memory)
    with pytest.raises(MemoryError, match=r"m\.mp4: not enough memory to hold its 4 frames of 64x48"):
        read_video(clip)
