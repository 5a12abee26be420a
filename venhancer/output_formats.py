"""What a run writes (`--codec`, `--crf`, `--bit_depth`, `--frames_dir`, `--no_video`, `--color_fix`).

The default (`OutputOptions()`) is the reference's output: H.264 CRF 17 yuv420p 8-bit in an mp4,
fed RGB frames truncated to uint8 (SPEC 1.12), through exactly the writer call it always used, so
that its bytes do not change. Other choices:

- codecs: h264 (libx264), h265 (libx265, tagged hvc1 so that Apple players open it), prores
  (prores_ks, ProRes 422 HQ, always 10-bit 4:2:2, in a .mov);
- bit depth 10: the decoded frames are quantised to 16 bits on the device and reach ffmpeg as rgb48,
  which converts them to 10-bit YUV (h264 High 10, h265 Main 10, ProRes);
- a frame folder: numbered 16-bit RGB PNGs, written into a hidden folder that is renamed when
  complete (like the video's temporary file);
- a colour correction towards the input (venhancer.color_fix).

Every video gets the writer's RGB -> YUV conversion and matching colour tags (BT.709 for HD,
BT.601 below: venhancer.video_io.output_color), whatever its codec and bit depth. The encoders and
pixel formats the bundled ffmpeg has are checked before any weights load.

Output names and their checks are venhancer.outputs'. This module imports torch only where frames
are quantised, so that the command line checks the output flags before torch loads.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional

import numpy as np

from venhancer.outputs import frames_path_for, output_path_for, sidecar_path_for
from venhancer.video_io import (
    OUTPUT_CRF,
    ClosesOnSuccess,
    VideoWriter,
    _umask,
    feed_frames,
    ffmpeg_exe,
    output_color,
    stop_and_read_error,
)

if TYPE_CHECKING:
    import torch

CODECS: tuple[str, ...] = ("h264", "h265", "prores")
# The colour corrections of venhancer.color_fix (which imports torch, and this list from here).
COLOR_FIXES: tuple[str, ...] = ("none", "adain", "wavelet")
BIT_DEPTHS: tuple[int, ...] = (8, 10)
# x265 documents its CRF 28 as about x264's 23; 20 (not 17 + 5) errs towards quality, for editing.
DEFAULT_CRF = {"h264": OUTPUT_CRF, "h265": 20}
CRF_RANGE = (0, 51)
PNG_DIGITS = 6


@dataclass(frozen=True)
class Encoding:
    """How one video is encoded: ffmpeg's input format, codec arguments and what they produce."""

    codec: str
    encoder: str  # ffmpeg's encoder
    pix_fmt: str  # stored pixel format
    input_pix_fmt: str  # what the writer is fed: rgb24 (uint8) or rgb48le (uint16)
    container: str  # ffmpeg muxer
    suffix: str
    args: tuple[str, ...]  # ffmpeg's codec arguments (the writer adds the colour conversion)
    crf: Optional[int]

    @property
    def bits(self) -> int:
        return 16 if self.input_pix_fmt == "rgb48le" else 8

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.bits == 16 else np.uint8)


def colour_tags(width: int, height: int) -> dict[str, str]:
    """The colour tags VideoWriter writes at this size (its conversion matches them)."""
    _, tag = output_color(width, height)
    return {"matrix": tag, "primaries": tag, "transfer": tag, "range": "tv"}


@functools.lru_cache(maxsize=None)
def _encoder_pix_fmts(ffmpeg: str, encoder: str) -> Optional[frozenset[str]]:
    """Pixel formats `encoder` accepts in this ffmpeg; None when it has no such encoder."""
    listed = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, check=False)
    if not re.search(rf"^\s*V\S*\s+{re.escape(encoder)}\s", listed.stdout, re.MULTILINE):
        return None
    info = subprocess.run([ffmpeg, "-hide_banner", "-h", f"encoder={encoder}"], capture_output=True, text=True,
                          check=False)
    match = re.search(r"Supported pixel formats:([^\n]*)", info.stdout)
    return frozenset(match.group(1).split()) if match else frozenset()


def encoder_supports(encoder: str, pix_fmt: str) -> bool:
    formats = _encoder_pix_fmts(ffmpeg_exe(), encoder)
    return formats is not None and (not formats or pix_fmt in formats)


@dataclass(frozen=True)
class OutputOptions:
    """What a run writes; defaults are the reference's. Invalid values raise ValueError.

    crf: None for the codec's default (h264 17, h265 20); ProRes has no CRF.
    frames_dir: also write `<name>_frames/` with one 16-bit PNG per frame. video: False writes the
    frames only. color_fix: "none", "adain" or "wavelet" (venhancer.color_fix).
    """

    codec: str = "h264"
    crf: Optional[int] = None
    bit_depth: int = 8
    frames_dir: bool = False
    video: bool = True
    color_fix: str = "none"

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if isinstance(self.bit_depth, bool) or self.bit_depth not in BIT_DEPTHS:
            raise ValueError(f"bit_depth must be 8 or 10, got {self.bit_depth!r}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, got {self.color_fix!r}")
        if self.crf is not None:
            if isinstance(self.crf, bool) or not isinstance(self.crf, int):
                raise ValueError(f"crf must be an integer, got {self.crf!r}")
            if self.codec not in DEFAULT_CRF:
                raise ValueError(f"crf {self.crf} does not apply to {self.codec} (it has no CRF; only h264 "
                                 "and h265 take one)")
            if not CRF_RANGE[0] <= self.crf <= CRF_RANGE[1]:
                raise ValueError(f"crf must be in [{CRF_RANGE[0]}, {CRF_RANGE[1]}], got {self.crf}")
        if not self.video:
            if not self.frames_dir:
                raise ValueError("no video and no frames_dir: nothing would be written")
            if self.codec != "h264" or self.crf is not None or self.bit_depth != 8:
                raise ValueError(f"codec {self.codec}, crf {self.crf} and bit_depth {self.bit_depth} "
                                 "apply to the video, which is not written (the frames are 16-bit PNGs)")

    @property
    def is_reference(self) -> bool:
        """The reference's video and nothing else: written through the unchanged default writer."""
        return self == OutputOptions(crf=self.crf) and self.crf in (None, OUTPUT_CRF)

    @property
    def effective_crf(self) -> Optional[int]:
        return self.crf if self.crf is not None else DEFAULT_CRF.get(self.codec)

    @property
    def suffix(self) -> str:
        return ".mov" if self.codec == "prores" else ".mp4"

    def video_path(self, video: Path | str, save_dir: Path | str) -> Optional[Path]:
        return output_path_for(Path(video), Path(save_dir), self.suffix) if self.video else None

    def frames_path(self, video: Path | str, save_dir: Path | str) -> Optional[Path]:
        return frames_path_for(Path(video), Path(save_dir)) if self.frames_dir else None

    def targets(self, video: Path | str, save_dir: Path | str) -> list[Path]:
        """Every path a run on `video` produces (the sidecar aside), the main one first."""
        return [p for p in (self.video_path(video, save_dir), self.frames_path(video, save_dir)) if p is not None]

    def sidecar_path(self, video: Path | str, save_dir: Path | str) -> Path:
        """`<stem>.json`, whatever is written (venhancer.outputs.sidecar_path_for)."""
        return sidecar_path_for(output_path_for(Path(video), Path(save_dir), self.suffix))

    def check_encoder(self) -> None:
        """ValueError (one line) when the bundled ffmpeg cannot write this video."""
        if not self.video:
            return
        encoding = self.encoding()
        if _encoder_pix_fmts(ffmpeg_exe(), encoding.encoder) is None:
            raise ValueError(f"codec {self.codec} needs ffmpeg's {encoding.encoder} encoder, which the bundled "
                             f"ffmpeg ({ffmpeg_exe()}) lacks")
        if not encoder_supports(encoding.encoder, encoding.pix_fmt):
            raise ValueError(f"bit_depth {self.bit_depth} with codec {self.codec} needs {encoding.encoder} to "
                             f"encode {encoding.pix_fmt}, which the bundled ffmpeg ({ffmpeg_exe()}) cannot")

    def encoding(self) -> Encoding:
        """ffmpeg settings of this video."""
        crf = self.effective_crf
        if self.codec == "prores":
            # Profile 3 = 422 HQ; the vendor tag makes Apple software treat it as its own.
            encoder, pix_fmt, codec_args = "prores_ks", "yuv422p10le", ["-profile:v", "3", "-vendor", "apl0"]
        elif self.codec == "h265":
            pix_fmt = "yuv420p10le" if self.bit_depth == 10 else "yuv420p"
            encoder = "libx265"
            codec_args = ["-crf", str(crf), "-profile:v", "main10" if self.bit_depth == 10 else "main",
                          "-tag:v", "hvc1", "-x265-params", "log-level=error"]
        else:
            pix_fmt = "yuv420p10le" if self.bit_depth == 10 else "yuv420p"
            encoder = "libx264"
            codec_args = ["-crf", str(crf)] + (["-profile:v", "high10"] if self.bit_depth == 10 else [])
        args = ("-c:v", encoder, *codec_args, "-pix_fmt", pix_fmt)
        return Encoding(codec=self.codec, encoder=encoder, pix_fmt=pix_fmt,
                        input_pix_fmt="rgb48le" if self.bit_depth == 10 else "rgb24",
                        container="mov" if self.codec == "prores" else "mp4", suffix=self.suffix,
                        args=args, crf=None if self.codec == "prores" else crf)

    def describe(self, width: int, height: int) -> str:
        parts = []
        if self.video:
            enc = self.encoding()
            crf = f" CRF {enc.crf}" if enc.crf is not None else ""
            colour = colour_tags(width, height)
            parts.append(f"{self.codec}{crf} {enc.pix_fmt} from {enc.bits}-bit frames in {enc.suffix} "
                         f"({colour['matrix']} {colour['range']} range)")
        if self.frames_dir:
            parts.append("16-bit PNG frames")
        return f"writes {' + '.join(parts)}; color fix {self.color_fix}"

    def record(self, width: int, height: int, video: Path | str, save_dir: Path | str) -> dict[str, Any]:
        """The sidecar's description of the output files of `video`."""
        frames = self.frames_path(video, save_dir)
        extra = {"frames_dir": str(frames) if frames is not None else None, "color_fix": self.color_fix}
        if not self.video:
            return {"codec": None, "crf": None, "pix_fmt": None, "bit_depth": None, "color": None, **extra}
        enc = self.encoding()
        return {"codec": self.codec, "crf": enc.crf, "pix_fmt": enc.pix_fmt, "bit_depth": self.bit_depth,
                "color": colour_tags(width, height), **extra}


class FrameFolderWriter:
    """Streams RGB frames into numbered 16-bit PNGs (`000000.png`, ...) inside `path`.

    The frames go into a hidden folder beside `path`, renamed onto `path` by `close()` once every
    frame is written; an existing `path` (an overwrite) is replaced only then. `abort()` removes
    the hidden folder. ffmpeg's PNG encoder writes the files (one process, fed like the video's).
    """

    def __init__(self, path: Path | str, width: int, height: int):
        self.path = Path(path)
        self.width, self.height = width, height
        self.num_frames = 0
        self._tmp: Optional[Path] = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                                          dir=self.path.parent))
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb48le", "-s", f"{width}x{height}", "-r", "1", "-i", "-",
               "-c:v", "png", "-pix_fmt", "rgb48be", "-start_number", "0", "-f", "image2",
               str(self._tmp / f"%0{PNG_DIGITS}d.png")]
        self._proc: Optional[subprocess.Popen] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def append(self, frames: np.ndarray) -> None:
        """Frames (f, H, W, 3) RGB uint16."""
        if self._proc is None:
            raise RuntimeError(f"{self.path}: writer is already closed")
        self.num_frames += feed_frames(self._proc, self._stderr, frames, np.dtype(np.uint16), (self.height, self.width),
                                       f"{self.path}: ffmpeg stopped while writing PNGs")

    def _error(self) -> str:
        return stop_and_read_error(self._proc, self._stderr)

    def close(self) -> Path:
        try:
            assert self._proc is not None and self._tmp is not None
            proc, self._proc = self._proc, None
            proc.stdin.close()
            if proc.wait() != 0:
                self._proc = proc
                raise OSError(f"{self.path}: PNG encode failed: {self._error()}")
            written = len(list(self._tmp.glob("*.png")))
            if written != self.num_frames or written == 0:
                raise OSError(f"{self.path}: {written} PNG files for {self.num_frames} frames")
            old = None
            if self.path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
                os.replace(self.path, old / self.path.name)
            os.chmod(self._tmp, 0o777 & ~_umask())  # mkdtemp's 0700, as a plain mkdir would not
            os.replace(self._tmp, self.path)
            self._tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self._stderr.close()
        return self.path

    def abort(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            self._proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._stderr.close()


class OutputSink(ClosesOnSuccess):
    """The writers of one run. `quantise` (on the decoding thread: device work) turns float frames
    into the arrays each writer takes; `append` (on the writer thread) hands them over.

    A context manager: leaving it normally closes every writer (each renames its own result), an
    exception aborts them all."""

    def __init__(self, options: OutputOptions, video_path: Optional[Path], frames_path: Optional[Path],
                 fps: float | Fraction, width: int, height: int, audio_source: Optional[Path] = None,
                 sar: Fraction | float | None = None):
        self.video: Optional[VideoWriter] = None
        self.frames: Optional[FrameFolderWriter] = None
        self._video_bits = 8
        try:
            if video_path is not None:
                if options.is_reference:
                    self.video = VideoWriter(video_path, fps, width, height, audio_source=audio_source, sar=sar)
                else:
                    encoding = options.encoding()
                    self._video_bits = encoding.bits
                    self.video = VideoWriter(video_path, fps, width, height, audio_source=audio_source, sar=sar,
                                             encoding=encoding)
            if frames_path is not None:
                self.frames = FrameFolderWriter(frames_path, width, height)
        except BaseException:
            self.abort()
            raise

    @property
    def num_frames(self) -> int:
        writer = self.video if self.video is not None else self.frames
        return writer.num_frames if writer is not None else 0

    def quantise(self, x: torch.Tensor) -> list[Optional[np.ndarray]]:
        """x: (f, 3, H, W) float, 0-1 nominal (unclamped). [video frames, PNG frames] as (f, H, W, 3),
        None where that writer is absent."""
        import torch

        arrays: list[Optional[np.ndarray]] = [None, None]
        x = x.clamp(0, 1)
        if self.video is not None:
            # uint8 truncates (SPEC 1.12)
            pixels = (x * 255).to(torch.uint8) if self._video_bits == 8 else _to_uint16(x)
            arrays[0] = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        if self.frames is not None:
            if self._video_bits == 16 and arrays[0] is not None:
                arrays[1] = arrays[0]
            else:
                arrays[1] = _to_uint16(x).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return arrays

    def append(self, arrays: list[Optional[np.ndarray]]) -> None:
        if self.video is not None:
            self.video.append(arrays[0])
        if self.frames is not None:
            self.frames.append(arrays[1])

    def close(self) -> None:
        try:
            for writer in (self.video, self.frames):
                if writer is not None:
                    writer.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Removes what is unfinished; a writer already closed keeps its complete output."""
        for writer in (self.video, self.frames):
            if writer is not None:
                writer.abort()



def _to_uint16(x: torch.Tensor) -> torch.Tensor:
    import torch

    # Rounded, not truncated: truncation's half-level darkening is what SPEC 1.12 keeps for the
    # 8-bit reference output only.
    return (x * 65535).round().to(torch.uint16)

