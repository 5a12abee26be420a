"""Where a run writes: output and sidecar names, their temporary names, and the checks on them.

Pure Python (no torch), so the command line checks every name before loading anything.

Each video gives `<save_dir>/<stem>.mp4` (`.mov` for ProRes, none with `--no_video`), with
`--frames_dir` a folder `<stem>_frames/`, and `<stem>.json`. Each is written under a temporary
name in the same folder and renamed when complete: `.<stem>.XXXXXXXX.partial.mp4` (or `.mov`, by
`video_io.VideoWriter`), `.<stem>_frames.XXXXXXXX.partial/` (by `output_formats.FrameFolderWriter`)
and `.<stem>.XXXXXXXX.partial.json`, XXXXXXXX being tempfile's 8 random characters. The sidecar is
renamed last, so an output counts as finished only when every requested output and the sidecar
exist.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov")  # what the codecs write (venhancer.output_formats)
PARTIAL_SUFFIXES = (".partial.mp4", ".partial.mov", ".partial.json")
FRAMES_SUFFIX = "_frames"  # the frame folder: <stem>_frames
FRAMES_PARTIAL_SUFFIX = ".partial"  # its temporary folder: .<stem>_frames.XXXXXXXX.partial
# tempfile.mkstemp's random part: 8 characters of this alphabet.
_TEMP_CHARS = "a-z0-9_"
_TEMP_LEN = 8
# When the file system cannot say (os.pathconf unavailable): the limit of ext4, NTFS, APFS.
_DEFAULT_NAME_MAX = 255


def output_path_for(video: Path, save_dir: Path, extension: str = ".mp4") -> Path:
    """Output video name: the input stem + `extension` (the codec's; the reference's .mp4 by
    default) inside the save directory."""
    return Path(save_dir) / f"{Path(video).stem}{extension}"


def frames_path_for(video: Path, save_dir: Path) -> Path:
    """The frame folder (`--frames_dir`): `<stem>_frames` inside the save directory."""
    return Path(save_dir) / f"{Path(video).stem}{FRAMES_SUFFIX}"


def sidecar_path_for(output: Path) -> Path:
    """The sidecar of an output video (`<stem>.json` beside it)."""
    return Path(output).with_suffix(".json")


def is_finished(output: Path, others: Sequence[Path] = (), sidecar: Optional[Path] = None) -> bool:
    """The video `output` (or, with `sidecar` given, `output` as it is: a video or a frame folder),
    every one of `others` (e.g. the frame folder) and the sidecar exist (outputs without their
    sidecar are from a run that was stopped)."""
    output = Path(output)
    if sidecar is None:
        if not output.is_file():
            return False
        sidecar = sidecar_path_for(output)
    elif not output.exists():
        return False
    return all(Path(p).exists() for p in others) and Path(sidecar).is_file()


def prepare_save_dir(save_dir: Path) -> Path:
    """Create `save_dir` if needed and prove it is writable; raises OSError with a one-line message."""
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as exc:
        raise OSError(f"save directory {save_dir} cannot be created or written: {exc.strerror or exc}") from exc
    return save_dir


@functools.cache
def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(_existing_ancestor(folder), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _DEFAULT_NAME_MAX


def written_names(output: Path, frames: bool = False) -> list[str]:
    """Every file name a run writes for `output` (named with any of the codecs' extensions), the
    temporary ones with a stand-in random part; `frames`: the frame folder's too."""
    stem = Path(output).stem
    names = [*(f"{stem}{ext}" for ext in VIDEO_EXTENSIONS), sidecar_path_for(output).name,
             *(f".{stem}.{'x' * _TEMP_LEN}{suffix}" for suffix in PARTIAL_SUFFIXES)]
    if frames:
        folder = f"{stem}{FRAMES_SUFFIX}"
        names += [folder, f".{folder}.{'x' * _TEMP_LEN}{FRAMES_PARTIAL_SUFFIX}"]
    return names


def check_output_names(output: Path, frames: bool = False) -> None:
    """ValueError when a name written for `output` (the video's name; with `frames`, the frame
    folder's too) is longer than its folder's file system allows."""
    limit = _name_max(Path(output).parent)
    longest = max(written_names(output, frames), key=lambda name: len(os.fsencode(name)))
    size = len(os.fsencode(longest))
    if size > limit:
        raise ValueError(f"the file name is too long for its output: the temporary file {longest[:40]}... "
                         f"would have {size} bytes, more than the {limit} the file system allows; "
                         f"rename the video (at most {limit - size + len(os.fsencode(Path(output).stem))} "
                         "bytes before the extension)")


def is_case_insensitive(folder: Path) -> bool:
    """Whether names in `folder` (or its nearest existing ancestor) ignore case. Asked of the file
    system through a name it holds; True when no name with letters is there to ask."""
    path = _existing_ancestor(folder)
    for part in (path, *path.parents):
        other = part.with_name(part.name.swapcase()) if part.name else part
        if other != part:
            return other.exists() and os.path.samefile(other, part)
    return True


def stale_partials(output: Path) -> list[Path]:
    """Temporary files of an earlier run for `output` that was killed (names of exactly the
    pattern this tool creates for that stem: videos of any codec, sidecars, and frame folders;
    nothing else)."""
    output = Path(output)
    folder = output.parent
    if not folder.is_dir():
        return []
    suffixes = "|".join(re.escape(s) for s in PARTIAL_SUFFIXES)
    random = rf"[{_TEMP_CHARS}]{{{_TEMP_LEN}}}"
    pattern = re.compile(rf"\.{re.escape(output.stem)}\.{random}(?:{suffixes})")
    frames = re.compile(rf"\.{re.escape(output.stem + FRAMES_SUFFIX)}\.{random}{re.escape(FRAMES_PARTIAL_SUFFIX)}")
    return sorted(p for p in folder.iterdir()
                  if (pattern.fullmatch(p.name) and p.is_file()) or (frames.fullmatch(p.name) and p.is_dir()))


def remove_stale_partials(output: Path, keep: tuple[Path, ...] = ()) -> None:
    """Remove `stale_partials(output)`, except any file in `keep` (the run's inputs)."""
    for path in stale_partials(output):
        if any(k.exists() and os.path.samefile(path, k) for k in keep):
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            logger.info("removed %s, left by an earlier run that was stopped", path)
        except OSError as exc:
            logger.warning("could not remove %s, left by an earlier run: %s", path, exc.strerror or exc)
