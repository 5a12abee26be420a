"""Video reading and writing through the ffmpeg binary shipped with imageio-ffmpeg.

Reading decodes any container/codec ffmpeg knows (mp4, mov, webm, mkv, gif, ...) to RGB uint8,
every stored frame exactly once and in order (no frame duplicated or dropped for timing), with
the colour matrix the stream declares (BT.601 when it declares none). Frame counts, start times
and rates come from the video stream's own packets, so audio never changes them, and the rate is
kept as an exact fraction (the average rate of a variable-rate stream).

Writing streams frames into H.264 (libx264, CRF 17, yuv420p) under a temporary name in the target
folder. The output's RGB->YUV matrix and its colour tags agree (BT.709 from 720 lines or 1280
columns up, BT.601 tagged smpte170m below). `close()` adds the source's audio (cut or padded to
the video, never the other way round), reads the file back to check its frame count, size and
rate, and only then renames it, with the umask's permissions. ffmpeg is always started with an
argument list, never through a shell.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional

import imageio_ffmpeg
import numpy as np

if TYPE_CHECKING:
    from venhancer.output_formats import Encoding

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".webm", ".mkv", ".gif")
OUTPUT_CRF = 17
# Outputs from this height or width on are converted and tagged BT.709 (what players assume for
# untagged HD), smaller ones BT.601 (smpte170m).
HD_MIN_HEIGHT = 720
HD_MIN_WIDTH = 1280
# Audio codecs an mp4 holds as they are; any other is re-encoded to AAC.
MP4_AUDIO_CODECS = frozenset({"aac", "mp3", "alac", "ac3", "eac3"})
AUDIO_REENCODE = ("-c:a", "aac", "-b:a", "192k")
# Audio ending less than this before the video counts as covering it (AAC frames are ~23 ms).
AUDIO_SHORT_TOLERANCE = Fraction(1, 10)

# Colour matrices as ffmpeg's stream description names them -> the scale filter's names.
_MATRICES = {"bt709": "bt709", "bt470bg": "bt601", "smpte170m": "bt601", "fcc": "fcc",
             "smpte240m": "smpte240m", "bt2020nc": "bt2020", "bt2020c": "bt2020"}
_SCALE_FLAGS = "accurate_rnd+full_chroma_int"
_NOPTS = -(2**63)
# Streams ending before this share of the duration the header promises mean the data stops early.
_TRUNCATION_RATIO = Fraction(3, 4)
_PKT_DISCARD = 0x4  # AV_PKT_FLAG_DISCARD: a packet the demuxer reads but no frame is shown for


class VideoError(ValueError):
    """A video that cannot be used as input; the message is one line and names the file."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int  # of the decoded (rotated) frames
    height: int
    fps: float  # float(rate)
    num_frames: int  # frames stored in the video stream
    codec: str
    audio_codec: Optional[str]
    rate: Optional[Fraction] = None  # exact; None: taken from fps
    sar: Fraction = Fraction(1)  # pixel aspect ratio (width / height of one pixel)
    color_matrix: str = "bt601"  # the scale filter's name of the YUV->RGB matrix used to decode
    start_time: Fraction = Fraction(0)  # seconds, of the first video frame
    audio_start: Optional[Fraction] = None  # seconds, of the first audio stream
    audio_end: Optional[Fraction] = None

    def __post_init__(self) -> None:
        if self.rate is None:
            object.__setattr__(self, "rate", Fraction(self.fps).limit_denominator(1_000_000))

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None

    @property
    def duration(self) -> Fraction:
        """Seconds the video stream plays: frames / average rate."""
        return self.num_frames / self.rate


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


def stop_and_read_error(proc: Optional[subprocess.Popen], stderr: IO[bytes]) -> str:
    """Stop `proc` if it still runs; the last line it wrote to `stderr` (a file)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    stderr.seek(0)
    return _last_line(stderr.read())


def feed_frames(proc: subprocess.Popen, stderr: IO[bytes], frames: np.ndarray, dtype: np.dtype,
                size: tuple[int, int], stopped: str) -> int:
    """Write RGB frames (f, h, w, 3) of `dtype` to ffmpeg's stdin; returns how many. `stopped`
    starts the OSError's message when ffmpeg has quit."""
    if frames.dtype != dtype or frames.shape[1:] != (*size, 3):
        raise ValueError(f"frames must be {dtype} (f, {size[0]}, {size[1]}, 3), got {frames.dtype} {tuple(frames.shape)}")
    try:
        # rgb48le: ffmpeg reads little-endian whatever the host's order
        proc.stdin.write(np.ascontiguousarray(frames, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    except (BrokenPipeError, OSError) as exc:
        raise OSError(f"{stopped}: {stop_and_read_error(proc, stderr)}") from exc
    return frames.shape[0]


def _last_line(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


@dataclass
class _Stream:
    """The packets of one stream as ffmpeg's framecrc muxer lists them (no decoding)."""

    media: str = ""
    time_base: Fraction = Fraction(1)
    width: int = 0
    height: int = 0
    sar: Fraction = Fraction(1)
    pts: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)

    def start(self) -> Optional[Fraction]:
        return min(self.pts) * self.time_base if self.pts else None

    def end(self) -> Optional[Fraction]:
        if not self.pts:
            return None
        return max(p + d for p, d in zip(self.pts, self.durations)) * self.time_base


def _parse_framecrc(text: str) -> dict[int, _Stream]:
    streams: dict[int, _Stream] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            m = re.match(r"#(\w+) (\d+): (.*)", line)
            if not m:
                continue
            key, stream, value = m.group(1), streams.setdefault(int(m.group(2)), _Stream()), m.group(3).strip()
            if key == "tb":
                stream.time_base = Fraction(value)
            elif key == "media_type":
                stream.media = value
            elif key == "dimensions":
                stream.width, stream.height = (int(v) for v in value.split("x"))
            elif key == "sar" and not value.startswith("0"):
                stream.sar = Fraction(value)
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        flags = int(parts[6].split("=")[1], 16) if len(parts) > 6 and parts[6].startswith("F=") else 0
        if flags & _PKT_DISCARD:
            continue
        stream = streams.setdefault(int(parts[0]), _Stream())
        dts, pts, duration = int(parts[1]), int(parts[2]), int(parts[3])
        stream.pts.append(pts if pts != _NOPTS else dts)
        stream.durations.append(max(duration, 0))
    return streams


def _header_rates(description: str) -> list[Fraction]:
    """Rates ffmpeg prints for the stream ("29.97 fps", "1k fps"), with the NTSC rational they
    round, as candidates for a stream whose timestamps are rounded to a coarse time base."""
    rates = []
    for number, kilo in re.findall(r"([\d.]+)(k?) (?:fps|tbr)\b", description):
        value = float(number) * (1000 if kilo else 1)
        candidates = [Fraction(round(value)), Fraction(round(value * 1.001) * 1000, 1001)]
        rates += sorted((r for r in candidates if r > 0), key=lambda r: abs(r - Fraction(value)))
    return rates


def _frame_rate(stream: _Stream, description: str) -> Optional[Fraction]:
    """The stream's exact rate. Constant spacing: one over it. Spacing that only jitters by
    rounding to the time base (mkv/webm store milliseconds): the rate the header prints (or its
    NTSC rational) when it fits the timestamps to within one tick, so 30 fps and not 30.009.
    Otherwise (variable rate) the average: frames / duration of the stream."""
    n = len(stream.pts)
    pts = sorted(stream.pts)
    gaps = [b - a for a, b in zip(pts, pts[1:])]
    if gaps and min(gaps) == max(gaps) > 0:
        return 1 / (gaps[0] * stream.time_base)
    span = pts[-1] - pts[0]
    if gaps and max(gaps) - min(gaps) <= 1 and span > 1:
        low, high = (n - 1) / ((span + 1) * stream.time_base), (n - 1) / ((span - 1) * stream.time_base)
        for candidate in _header_rates(description):
            if low <= candidate <= high:
                return candidate
    if all(d > 0 for d in stream.durations):
        span, intervals = max(p + d for p, d in zip(stream.pts, stream.durations)) - pts[0], n
    else:  # no per-packet durations: the n-1 gaps between the frames
        intervals = n - 1
    if span <= 0 or intervals <= 0:
        return None
    return intervals / (span * stream.time_base)


def _video_description(stderr: str) -> Optional[str]:
    for m in re.finditer(r"Stream #0:\d+\S*: Video: (.*)", stderr):
        if "(attached pic)" not in m.group(1):  # cover art, not the video (0:V skips it too)
            return m.group(1)
    return None


def _color_matrix(description: str) -> str:
    # "yuv420p(tv, bt709, progressive)" or "yuv420p(tv, bt470bg/bt709/bt709)": the matrix first.
    m = re.search(r"\w+\(([^)]*)\)", description)
    for item in (m.group(1).split(", ") if m else []):
        name = item.split("/")[0]
        if name in _MATRICES:
            return _MATRICES[name]
    return "bt601"


def _check_duration(path: Path, stderr: str, streams: list[_Stream]) -> None:
    """A container (mkv, webm) cut short loses its last packets without any error; its header
    still gives the full duration. The streams' own end is compared with it (the longest stream:
    audio lasting longer than the video is no sign of damage)."""
    m = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?), start: (-?\d+(?:\.\d+)?)", stderr)
    ends = [s.end() for s in streams if s.pts]
    if not m or not ends:
        return
    hours, minutes, seconds, start = m.groups()
    promised = Fraction(int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
    found = max(ends) - Fraction(start)
    if promised > 0 and found < _TRUNCATION_RATIO * promised:
        raise VideoError(f"{path}: truncated video: the header promises {float(promised):.2f} s but the "
                         f"data ends after {float(found):.2f} s")


def _probe(path: Path) -> VideoInfo:
    """Metadata and packet timing of `path` from one ffmpeg run that copies (does not decode)
    the first video and the first audio stream into a packet listing."""
    if not path.exists():
        raise VideoError(f"{path}: file not found")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-copyts", "-i", str(path),
           "-map", "0:V:0", "-map", "0:a:0?", "-c", "copy", "-f", "framecrc", "-"]
    result = subprocess.run(cmd, capture_output=True, check=False)
    stderr = result.stderr.decode("utf-8", "replace")
    description = _video_description(stderr)
    if description is None:
        if re.search(r"Stream #\S+: Audio:", stderr):
            raise VideoError(f"{path}: has no video stream (audio only)")
        # Not a video, or the container is damaged (e.g. an mp4 cut before its index).
        raise VideoError(f"{path}: not a readable video (corrupt, truncated or not a video file)")
    streams = _parse_framecrc(result.stdout.decode("ascii", "replace"))
    video = next((s for s in streams.values() if s.media == "video"), None)
    audio = next((s for s in streams.values() if s.media == "audio" and s.pts), None)
    if result.returncode != 0 or video is None:
        raise VideoError(f"{path}: not a readable video ({_last_line(stderr)})")
    count = len(video.pts)
    if "partial file" in stderr:
        raise VideoError(f"{path}: truncated video: the file ends after {count} of the frames its index lists")
    _check_duration(path, stderr, [s for s in (video, audio) if s is not None])
    if count == 0:
        raise VideoError(f"{path}: video has no frames")
    if count == 1:
        raise VideoError(f"{path}: video has a single frame; at least 2 are needed")
    rate = _frame_rate(video, description)
    if rate is None:
        raise VideoError(f"{path}: frame rate could not be determined (all {count} frames share one timestamp)")
    width, height, sar = video.width, video.height, video.sar
    rotation = re.search(r"(?i)display ?matrix: rotation of (-?[\d.]+) degrees", stderr)
    if rotation and round(float(rotation.group(1))) % 180 == 90:  # decoded frames are turned upright
        width, height, sar = height, width, 1 / sar
    audio_codec = re.search(r"Stream #0:\d+\S*: Audio: ([\w-]+)", stderr)
    return VideoInfo(path=path, width=width, height=height, fps=float(rate), num_frames=count,
                     codec=description.split()[0].rstrip(","),
                     audio_codec=audio_codec.group(1) if audio_codec and audio is not None else None,
                     rate=rate, sar=sar, color_matrix=_color_matrix(description), start_time=video.start(),
                     audio_start=audio.start() if audio else None, audio_end=audio.end() if audio else None)


def probe_video(path: Path | str) -> VideoInfo:
    """Size, exact frame count and rate, colour matrix, pixel aspect and audio of `path`, from its
    packets without decoding them (fast); raises VideoError. Data that does not decode is found
    by the reader (`iter_frames`, `read_video`)."""
    return _probe(Path(path))


def _read_into(stream: IO[bytes], buffer: bytearray) -> int:
    """Fill `buffer` from `stream` up to its end; returns the bytes read."""
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def iter_frames(source: Path | str | VideoInfo, batch: int = 8) -> Iterator[np.ndarray]:
    """Decode the video stream batch by batch: arrays (<= batch, h, w, 3) uint8 RGB, each stored
    frame once, in order. Memory is bounded by the batch. Raises VideoError when the data yields
    fewer (or more) frames than the stream's packets."""
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    frame_bytes = info.width * info.height * 3
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(info.path),
           "-map", "0:V:0", "-fps_mode", "passthrough",
           "-vf", f"scale=in_color_matrix={info.color_matrix}:flags={_SCALE_FLAGS}",
           "-pix_fmt", "rgb24", "-f", "rawvideo", "-"]
    stderr: IO[bytes] = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    count = 0
    try:
        while True:
            data = bytearray(frame_bytes * batch)  # a new buffer per batch: the caller may keep it
            got = _read_into(proc.stdout, data)
            if got % frame_bytes:
                raise VideoError(f"{info.path}: decoded frame {count + got // frame_bytes} is not "
                                 f"{info.width}x{info.height}")
            if not got:
                break
            frames = np.frombuffer(data, dtype=np.uint8)[:got].reshape(-1, info.height, info.width, 3)
            count += frames.shape[0]
            if count > info.num_frames:
                raise VideoError(f"{info.path}: decodes to more frames than its {info.num_frames} packets")
            yield frames
        code = proc.wait()
        if count < info.num_frames:
            stderr.seek(0)
            why = _last_line(stderr.read()) if code else "no error"
            raise VideoError(f"{info.path}: truncated or corrupt video data after frame {count} of "
                             f"{info.num_frames} ({why})")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        stderr.close()


def read_video(path: Path | str) -> Video:
    """Decode every frame of `path` as RGB uint8 plus its metadata; raises VideoError, or
    MemoryError when the frames do not fit in memory (`iter_frames` streams them instead)."""
    info = probe_video(path)
    shape = (info.num_frames, info.height, info.width, 3)
    try:
        frames = np.empty(shape, dtype=np.uint8)
    except MemoryError as exc:
        raise MemoryError(f"{info.path}: not enough memory to hold its {info.num_frames} frames of "
                          f"{info.width}x{info.height} ({np.prod(shape) / 1e9:.1f} GB)") from exc
    done = 0
    for batch in iter_frames(info):
        frames[done:done + batch.shape[0]] = batch
        done += batch.shape[0]
    return Video(info=info, frames=frames)


def _run_ffmpeg(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)


def _umask() -> int:
    # Linux reports it; setting and restoring it instead would briefly give files that other
    # threads create meanwhile (the background model load, say) a umask of 0.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path | str) -> None:
    """Give a file made by mkstemp (always 0600) the permissions a plain open() would have."""
    os.chmod(path, 0o666 & ~_umask())


def output_color(width: int, height: int) -> tuple[str, str]:
    """(scale filter matrix, colour tag) of an output of this size."""
    if height >= HD_MIN_HEIGHT or width >= HD_MIN_WIDTH:
        return "bt709", "bt709"
    return "bt601", "smpte170m"


class ClosesOnSuccess:
    """`with` support for writers: leaving the block normally calls `close()` (the output gets its
    final name), leaving it by an exception calls `abort()` (nothing half-written stays)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(ClosesOnSuccess):
    """Streams RGB uint8 frames into an H.264 mp4 at `path`.

    fps: the output rate (a Fraction keeps it exact). sar: the pixel aspect ratio to carry into
    the file (the input's, so that an anamorphic video keeps its display shape). Frames go to
    ffmpeg as they are produced (`append`). `close()` finishes the encode, adds the first audio
    track of `audio_source` when it has one (aligned to its first video frame, cut or padded to
    the video's length), checks the file, and only then renames it onto `path`. `abort()` (also
    called when the `with` block raises) removes every temporary file.

    `encoding` (venhancer.output_formats) replaces the H.264 settings: another codec, container and bit
    depth (uint16 frames for rgb48 input); the colour conversion and tags stay this writer's.
    None is the reference's encode.
    """

    def __init__(self, path: Path | str, fps: float | Fraction, width: int, height: int,
                 audio_source: Path | str | None = None, crf: int = OUTPUT_CRF,
                 sar: Fraction | float | None = None, encoding: Optional["Encoding"] = None):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"yuv420p output needs a positive even width and height, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"output fps must be positive, got {fps}")
        if sar is not None and sar <= 0:
            raise ValueError(f"pixel aspect ratio must be positive, got {sar}")
        self.path = Path(path)
        self.width, self.height = width, height
        # The average rate of a variable-rate input can have a huge denominator; H.264 and mp4
        # store the rate in 32-bit fields, and 1e-6 relative is far below what anyone can see.
        self.rate = Fraction(fps).limit_denominator(100_000)
        self.fps = float(self.rate)
        self.sar = Fraction(sar).limit_denominator(10_000) if sar is not None else Fraction(1)
        self.audio_source = Path(audio_source) if audio_source is not None else None
        self.num_frames = 0
        self.encoding = encoding
        self._suffix, self._container = (encoding.suffix, encoding.container) if encoding else (".mp4", "mp4")
        self._dtype = encoding.dtype if encoding else np.dtype(np.uint8)
        self._tmp_files: list[Path] = []
        self._video_tmp = self._new_tmp()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        matrix, tag = output_color(width, height)
        # setparams: the encoder takes the tags from the frames, not from -color_* options.
        filters = (f"scale=out_color_matrix={matrix}:out_range=tv:flags={_SCALE_FLAGS},setsar={self.sar},"
                   f"setparams=range=tv:colorspace={tag}:color_primaries={tag}:color_trc={tag}")
        in_fmt = encoding.input_pix_fmt if encoding else "rgb24"
        codec_args = list(encoding.args) if encoding else ["-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p"]
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", in_fmt, "-s", f"{width}x{height}", "-r", str(self.rate), "-i", "-",
               "-an", "-vf", filters, *codec_args,
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

    def append(self, frames: np.ndarray) -> None:
        """Write frames (f, H, W, 3) or one frame (H, W, 3), RGB uint8 (uint16 for a 16-bit encoding)."""
        if self._proc is None:
            raise RuntimeError(f"{self.path}: writer is already closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        self.num_frames += feed_frames(self._proc, self._stderr, frames, self._dtype, (self.height, self.width),
                                       f"{self.path}: ffmpeg stopped while encoding")

    def _ffmpeg_error(self) -> str:
        return stop_and_read_error(self._proc, self._stderr)

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

    @property
    def duration(self) -> Fraction:
        return self.num_frames / self.rate

    def _mux_audio(self, source: VideoInfo) -> Path:
        """The encoded video plus `source`'s first audio stream, from the source's first video
        frame on, cut at the video's end; stream-copied when mp4 can hold it and it lasts to the
        video's end, else re-encoded to AAC and padded with silence. Any failure is an OSError:
        a result that lost its audio to a fault (e.g. a full disk) is not a result."""
        assert source.audio_start is not None and source.audio_end is not None
        muxed = self._new_tmp()
        duration = self.duration
        # Input -ss counts from the file's start (its earliest stream); the audio before the
        # first video frame is dropped so that picture and sound stay in step.
        audio_input = ["-ss", f"{float(source.start_time - min(source.start_time, source.audio_start)):.6f}"]
        if source.audio_start > source.start_time:  # audio starting after the picture keeps its delay
            audio_input = []
        covers = source.audio_end - source.start_time >= duration - AUDIO_SHORT_TOLERANCE
        copy = source.audio_codec in MP4_AUDIO_CODECS and covers
        codecs = ["-c:a", "copy"] if copy else [*AUDIO_REENCODE, "-af", f"apad=whole_dur={float(duration):.6f}"]
        result = _run_ffmpeg(["-i", str(self._video_tmp), *audio_input, "-i", str(source.path),
                              "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *codecs,
                              "-t", f"{float(duration):.6f}", "-movflags", "+faststart", "-f", self._container,
                              str(muxed)])
        if result.returncode != 0:
            raise OSError(f"{self.path}: could not add the audio track of {source.path}: {_last_line(result.stderr)}")
        if not copy:
            why = "it ends before the video" if not covers else f"mp4 cannot hold {source.audio_codec}"
            logger.info("%s: audio re-encoded to AAC (%s)", self.path.name, why)
        return muxed

    def _verify(self, tmp: Path, audio: bool) -> None:
        """Read the finished file back: every frame sent, at the size and rate asked for."""
        try:
            info = probe_video(tmp)
        except VideoError as exc:
            raise OSError(f"{self.path}: the written file cannot be read back: {exc}") from exc
        problems = []
        if info.num_frames != self.num_frames:
            problems.append(f"{info.num_frames} frames instead of {self.num_frames}")
        if (info.width, info.height) != (self.width, self.height):
            problems.append(f"size {info.width}x{info.height} instead of {self.width}x{self.height}")
        if abs(info.rate - self.rate) > self.rate * Fraction(1, 10_000):
            problems.append(f"{info.fps:g} fps instead of {self.fps:g}")
        if audio and not info.has_audio:
            problems.append("no audio track")
        if problems:
            raise OSError(f"{self.path}: the written file has {', '.join(problems)}")

    def close(self) -> Path:
        """Finish and check the file and move it to its final name; returns that path."""
        try:
            if self.num_frames == 0:
                raise ValueError(f"{self.path}: no frames were written")
            self._finish_encode()
            final_tmp = self._video_tmp
            source = probe_video(self.audio_source) if self.audio_source is not None else None
            if source is not None and source.has_audio:
                final_tmp = self._mux_audio(source)
            self._verify(final_tmp, audio=source is not None and source.has_audio)
            apply_umask(final_tmp)
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
