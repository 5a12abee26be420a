import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from make_tiny_models import make_clip
from venhancer.video_io import (
    VideoError,
    VideoWriter,
    ffmpeg_exe,
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
