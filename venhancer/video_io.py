"""Video reading and writing through the ffmpeg binary shipped with imageio-ffmpeg.

Reading decodes any container/codec ffmpeg knows (mp4, mov, webm, mkv, gif, ...) to RGB uint8.
Writing streams frames into H.264 (libx264, CRF 17, yuv420p) under a temporary name in the target
folder and renames the file only once it is complete, so an interrupted run never leaves a file
that looks finished. ffmpeg is always started with an argument list, never through a shell.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional

import imageio_ffmpeg
import numpy as np

if TYPE_CHECKING:
    from venhancer.outputs import Encoding

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".webm", ".mkv", ".gif")
OUTPUT_CRF = 17

# A decoded count below this share of what the header promises means the data stops early.
_TRUNCATION_RATIO = 0.75


class VideoError(ValueError):
    """A video that cannot be used as input; the message is one line and names the file."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    num_frames: int
    codec: str
    audio_codec: Optional[str]

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


@dataclass(frozen=True)
class Video:
    info: VideoInfo
    frames: np.ndarray  # (n, h, w, 3) uint8 RGB


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


def list_videos(folder: Path) -> list[Path]:
    """Video files directly inside `folder`, sorted by name (hidden/partial files excluded)."""
    return sorted((p for p in folder.iterdir() if is_video_file(p)), key=lambda p: p.name)


def _exact_fps(reported: float) -> float:
    # ffmpeg prints rates with 4 significant digits, so 24000/1001 shows as 23.98; recover the
    # NTSC rational so that output fps and durations stay exact.
    if reported <= 0 or float(reported).is_integer():
        return float(reported)
    ntsc = round(reported * 1.001)
    if ntsc > 0 and abs(reported * 1.001 - ntsc) < 0.01:
        return ntsc * 1000 / 1001
    return float(reported)


def _decode(path: Path, keep_frames: bool) -> tuple[VideoInfo, Optional[np.ndarray]]:
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: file not found")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        try:
            meta = next(reader)
        except (OSError, RuntimeError, StopIteration, IndexError, AttributeError, ValueError) as exc:
            if re.search(r"Stream #\S+: Audio:", str(exc)) and not re.search(r"Stream #\S+: Video:", str(exc)):
                raise VideoError(f"{path}: has no video stream (audio only)") from exc
            # ffmpeg found no decodable video stream: not a video, or the container is damaged
            # (e.g. an mp4 cut before its index).
            raise VideoError(f"{path}: not a readable video (corrupt, truncated or not a video file)") from exc
        width, height = meta["size"]
        frames: list[np.ndarray] = []
        count = 0
        try:
            for raw in reader:
                count += 1
                if keep_frames:
                    frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
        except RuntimeError as exc:
            raise VideoError(f"{path}: truncated or corrupt video data after frame {count}") from exc
    finally:
        reader.close()

    fps = _exact_fps(float(meta.get("fps") or 0.0))
    expected = round(float(meta.get("duration") or 0.0) * fps)
    if expected >= 2 and count < _TRUNCATION_RATIO * expected:
        raise VideoError(f"{path}: truncated video: the header promises about {expected} frames "
                         f"but only {count} could be decoded")
    if count == 0:
        raise VideoError(f"{path}: video has no frames")
    if count == 1:
        raise VideoError(f"{path}: video has a single frame; at least 2 are needed")
    if fps <= 0:
        raise VideoError(f"{path}: frame rate could not be determined")
    info = VideoInfo(path=path, width=width, height=height, fps=fps, num_frames=count,
                     codec=str(meta.get("codec", "")).rstrip(","),
                     audio_codec=meta["audio_codec"].rstrip(",") if meta.get("audio_codec") else None)
    return info, (np.stack(frames) if keep_frames else None)


def read_video(path: Path | str) -> Video:
    """Decode every frame of `path` as RGB uint8 plus its metadata; raises VideoError."""
    info, frames = _decode(Path(path), keep_frames=True)
    assert frames is not None
    return Video(info=info, frames=frames)


def probe_video(path: Path | str) -> VideoInfo:
    """Decode `path` without keeping frames: exact frame count and the same checks as read_video."""
    info, _ = _decode(Path(path), keep_frames=False)
    return info


def _run_ffmpeg(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


class VideoWriter:
    """Streams RGB uint8 frames into an H.264 mp4 at `path`.

    Frames go to ffmpeg as they are produced (`append`). `close()` finishes the encode, copies the
    audio track of `audio_source` when it has one, and only then renames the temporary file onto
    `path`. `abort()` (also called when the `with` block raises) removes every temporary file.

    `encoding` (venhancer.outputs) replaces the H.264 settings: another codec, container, bit depth
    (uint16 frames for rgb48 input) and explicit colour conversion; None is the reference's encode.
    """

    def __init__(self, path: Path | str, fps: float, width: int, height: int,
                 audio_source: Path | str | None = None, crf: int = OUTPUT_CRF,
                 encoding: Optional["Encoding"] = None):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"yuv420p output needs a positive even width and height, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"output fps must be positive, got {fps}")
        self.path = Path(path)
        self.width, self.height, self.fps = width, height, fps
        self.audio_source = Path(audio_source) if audio_source is not None else None
        self.num_frames = 0
        self.encoding = encoding
        self._suffix, self._container = (encoding.suffix, encoding.container) if encoding else (".mp4", "mp4")
        self._dtype = encoding.dtype if encoding else np.dtype(np.uint8)
        self._tmp_files: list[Path] = []
        self._video_tmp = self._new_tmp()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        rate = Fraction(fps).limit_denominator(1_000_000)
        in_fmt = encoding.input_pix_fmt if encoding else "rgb24"
        codec_args = list(encoding.args) if encoding else ["-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p"]
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", in_fmt, "-s", f"{width}x{height}", "-r", str(rate), "-i", "-",
               "-an", *codec_args,
               "-movflags", "+faststart", "-f", self._container, str(self._video_tmp)]
        self._proc: Optional[subprocess.Popen] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def _new_tmp(self) -> Path:
        # mkstemp both reserves a unique name and proves the folder is writable before any work.
        fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self._suffix}",
                                    dir=self.path.parent)
        os.close(fd)
        tmp = Path(name)
        self._tmp_files.append(tmp)
        return tmp

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, frames: np.ndarray) -> None:
        """Write frames (f, H, W, 3) or one frame (H, W, 3), RGB uint8 (uint16 for a 16-bit encoding)."""
        if self._proc is None:
            raise RuntimeError(f"{self.path}: writer is already closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != self._dtype or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be {self._dtype} (f, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        try:
            # rgb48le: ffmpeg reads little-endian whatever the host's order
            self._proc.stdin.write(np.ascontiguousarray(frames, dtype=self._dtype.newbyteorder("<")).tobytes())
        except (BrokenPipeError, OSError) as exc:
            raise OSError(f"{self.path}: ffmpeg stopped while encoding: {self._ffmpeg_error()}") from exc
        self.num_frames += frames.shape[0]

    def _ffmpeg_error(self) -> str:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.seek(0)
        return _last_line(self._stderr.read())

    def _finish_encode(self) -> None:
        assert self._proc is not None
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        if proc.wait() != 0:
            self._stderr.seek(0)
            codec = self.encoding.codec if self.encoding else "H.264"
            raise OSError(f"{self.path}: {codec} encode failed: {_last_line(self._stderr.read())}")

    def _mux_audio(self) -> Path:
        assert self.audio_source is not None
        muxed = self._new_tmp()
        base = ["-i", str(self._video_tmp), "-i", str(self.audio_source),
                "-map", "0:v:0", "-map", "1:a?", "-shortest", "-movflags", "+faststart", "-f", self._container]
        # Stream copy keeps the audio bit-exact; codecs mp4 cannot hold (e.g. Vorbis) are re-encoded.
        for codecs in (["-c", "copy"], ["-c:v", "copy", "-c:a", "aac", "-b:a", "192k"]):
            result = _run_ffmpeg([*base, *codecs, str(muxed)])
            if result.returncode == 0:
                return muxed
        logger.warning("%s: could not copy the audio track of %s (%s); writing video only",
                       self.path.name, self.audio_source, _last_line(result.stderr))
        return self._video_tmp

    def close(self) -> Path:
        """Finish the file and move it to its final name; returns that path."""
        try:
            if self.num_frames == 0:
                raise ValueError(f"{self.path}: no frames were written")
            self._finish_encode()
            final_tmp = self._mux_audio() if self.audio_source is not None else self._video_tmp
            os.replace(final_tmp, self.path)
            self._tmp_files.remove(final_tmp)
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the temporary files; the final path is never touched."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
            self._proc = None
        self._cleanup()

    def _cleanup(self) -> None:
        for tmp in self._tmp_files:
            tmp.unlink(missing_ok=True)
        self._tmp_files.clear()
        self._stderr.close()
