"""Command line of `enhance_a_video.py`: the reference's flags plus seed, config, device, dry run.

Every failure the user can cause (bad path, unusable video, bad option, missing or wrong weights,
absent GPU, out of memory) ends as one log line and a non-zero exit code, never a traceback; the
full traceback of an unexpected error is logged at --log_level debug.

Under torchrun the same command runs on several processes (venhancer.distributed): rank 0 checks
the inputs and hands out the work, logs at the chosen level and prints the summary; the other
processes log warnings and errors only, prefixed with their rank.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from tqdm import tqdm

if TYPE_CHECKING:
    from venhancer.distributed import DistContext

logger = logging.getLogger("venhancer")

EXIT_OK = 0
EXIT_FAILED = 1  # at least one video failed, or the models could not be loaded
EXIT_USAGE = 2  # bad arguments or inputs: nothing was run
EXIT_INTERRUPTED = 130


class _TqdmHandler(logging.Handler):
    """One line per record on stderr, written around any live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        # Tracebacks only when asked for (--log_level debug logs them with exc_info).
        debug = logging.getLogger("venhancer").isEnabledFor(logging.DEBUG)
        if record.exc_info and debug:
            message += "\n" + self.formatException(record.exc_info)
        if debug:  # a timeline: seconds since logging started (about when the process did)
            message = f"[{record.relativeCreated / 1000:7.2f} s] {message}"
        return self.prefix + message


def setup_logging(level: str, rank: int = 0) -> None:
    """Log lines on stderr; a process other than rank 0 logs warnings and errors only, prefixed."""
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter(f"[rank {rank}] " if rank else ""))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # third-party libraries: warnings and errors only
    package_level = logging.getLevelName(level.upper())
    logging.getLogger("venhancer").setLevel(max(package_level, logging.WARNING) if rank else package_level)


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="enhance_a_video.py",
        description="VEnhancer: spatial and temporal super-resolution and refinement of videos "
                    "with one video diffusion model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input_path", required=True,
                   help="a video file, or a folder: every mp4/mov/webm/mkv/gif in it, sorted by name")
    p.add_argument("--save_dir", default="results", help="output folder (created if missing)")
    p.add_argument("--version", default="v1", choices=["v1", "v2"],
                   help="checkpoint: v1 = venhancer_paper.pt, v2 = venhancer_v2.pt")
    p.add_argument("--model_path", default="", help="local network checkpoint; empty: the config's file, downloaded if missing")
    p.add_argument("--prompt", default="a good video", help="text describing the video")
    p.add_argument("--prompt_path", default="",
                   help="text file with one prompt per non-empty line, one per video in sorted order")
    p.add_argument("--filename_as_prompt", action="store_true", help="use each video's file name (stem) as its prompt")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (>= 1)")
    p.add_argument("--solver_mode", default="fast", choices=["fast", "normal"],
                   help="fast: 15 fixed timesteps; normal: --steps timesteps")
    p.add_argument("--steps", type=int, default=15, help="denoising steps in normal mode")
    p.add_argument("--noise_aug", type=int, default=200,
                   help="refinement strength 0-300 (noise added to the input latents; higher changes more)")
    p.add_argument("--target_fps", type=float, default=24, help="output frame rate to aim for (frames are inserted)")
    p.add_argument("--up_scale", type=float, default=4, help="spatial up-scaling factor (0, 8]; the output area is bounded")
    p.add_argument("--s_cond", type=float, default=8, help="scale condition of the ControlNet")
    p.add_argument("--seed", type=int, default=666, help="random seed, applied anew to each video")
    p.add_argument("--config", default=None, help="JSON model/sizing config (default: configs/venhancer.json)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model precision; auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--low_vram", action=argparse.BooleanOptionalAction, default=None,
                   help="smaller network passes and the VAE off the GPU while denoising, for ~16 GB cards "
                        "(same output, a little slower); default: on when the GPU has under "
                        "21 GB free at start")
    p.add_argument("--max_vram_gb", type=_gigabytes, default=None,
                   help="GPU memory the run may use, in GB: the fastest memory plan that fits it runs (smaller "
                        "passes, weights streamed block by block, the VAE off the GPU; same output), a smaller "
                        "one after running out of memory; default: the free GPU memory at start. On the CPU "
                        "it picks the same plan as on a GPU (default: the fastest)")
    p.add_argument("--overwrite", action="store_true", help="redo videos whose output already exists")
    p.add_argument("--dry_run", action="store_true",
                   help="print per video the planned sizes, frame rates, windows and network evaluations; loads no weights")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


@dataclass
class Job:
    video: Path
    prompt: str
    output: Path


class UsageError(ValueError):
    """Bad arguments or inputs detected before anything runs."""


def collect_videos(input_path: Path) -> list[Path]:
    from venhancer.video_io import VIDEO_EXTENSIONS, list_videos

    if not input_path.exists():
        raise UsageError(f"input path not found: {input_path}")
    if input_path.is_dir():
        videos = list_videos(input_path)
        if not videos:
            raise UsageError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) in folder {input_path}")
        return videos
    return [input_path]


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_prompts(videos: Sequence[Path], prompt: str, prompt_path: str, filename_as_prompt: bool) -> list[str]:
    """Per-video prompts. Precedence: file name, then --prompt_path, then `<stem>.txt`, then --prompt."""
    if filename_as_prompt:
        return [v.stem for v in videos]
    if prompt_path:
        lines = _read_lines(Path(prompt_path))
        if len(lines) != len(videos):
            raise UsageError(f"prompt file {prompt_path} has {len(lines)} non-empty lines but there are "
                             f"{len(videos)} videos; give one prompt per video, in sorted order")
        return lines
    prompts = []
    for video in videos:
        sidecar = video.with_suffix(".txt")
        first = ""
        if sidecar.is_file():
            try:
                first = sidecar.read_text(encoding="utf-8").splitlines()[0].strip() if sidecar.stat().st_size else ""
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read prompt file {sidecar}: {exc}") from exc
        prompts.append(first or prompt)
    return prompts


def _summary(done: list[str], skipped: list[str], failed: list[tuple[str, str]], verb: str) -> None:
    parts = [f"{len(done)} {verb}", f"{len(skipped)} skipped (output exists)", f"{len(failed)} failed"]
    logger.info("summary: %s", ", ".join(parts))
    for name, reason in failed:
        logger.error("failed: %s: %s", name, reason)


def _failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Before CUDA starts: growable segments keep fragmentation (reserved minus allocated memory)
    # low across the differently sized windows, tiles and frames of a run.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    # After parsing (torch is heavy): --help stays instant.
    from venhancer.distributed import CommunicationError, DistContext

    try:
        dist = DistContext.from_env()  # torchrun's WORLD_SIZE / RANK / LOCAL_RANK, else one process
    except ValueError as exc:
        setup_logging(args.log_level)
        logger.error("%s", exc)
        return EXIT_USAGE
    setup_logging(args.log_level, rank=dist.rank)
    warmup = None
    if not args.dry_run:
        from venhancer.warmup import start_cuda_warmup

        # GPU libraries start on a thread while the models' code is imported (venhancer.warmup).
        warmup = start_cuda_warmup(dist.device_name(args.device))
    try:
        code = _main(args, dist)
        dist.barrier()  # every process has logged what it had to
        return code
    except KeyboardInterrupt:
        logger.error("interrupted; finished outputs are kept, the one in progress was removed")
        return EXIT_INTERRUPTED
    except CommunicationError as exc:  # a process died or a timeout passed: nothing more can be agreed
        logger.error("%s", _failure(exc))
        return EXIT_FAILED
    finally:
        dist.close()
        if warmup is not None:
            # A run that stops early must not exit while that thread is inside the CUDA libraries.
            warmup.join(timeout=60)


def _main(args: argparse.Namespace, dist: "DistContext") -> int:
    # Heavy imports (torch, diffusers, open_clip) after argument parsing: --help stays instant.
    from venhancer.config import load_config
    from venhancer.distributed import CommunicationError, PeerFailure, WindowSharding, shard_videos
    from venhancer.loading import (
        CheckpointError,
        WeightsUnavailableError,
        resolve_text_encoder_weights,
        resolve_unet_checkpoint,
        resolve_vae,
    )
    from venhancer.pipeline import (
        EnhanceError,
        Enhancer,
        EnhanceOptions,
        DeviceError,
        ModelLoadError,
        output_path_for,
        plan_video,
        prepare_save_dir,
        resolve_device,
        resolve_dtype,
    )
    from venhancer.video_io import Video, VideoError, probe_video, read_video

    # Under torchrun every step up to the run itself is agreed between the processes, so that none
    # goes on while another has stopped (each returns the same exit code).
    try:
        dist.start()
    except (RuntimeError, ValueError, OSError) as exc:
        logger.error("could not start the process group: %s", _failure(exc))
        return EXIT_FAILED

    error: Optional[str] = None
    device = None
    try:
        options = EnhanceOptions(up_scale=args.up_scale, target_fps=args.target_fps, noise_aug=args.noise_aug,
                                 solver_mode=args.solver_mode, steps=args.steps, cfg=args.cfg,
                                 s_cond=args.s_cond, seed=args.seed)
        config = load_config(args.config)
        videos = collect_videos(Path(args.input_path))
        prompts = resolve_prompts(videos, args.prompt, args.prompt_path, args.filename_as_prompt)
        if not args.dry_run:
            device = resolve_device(dist.device_name(args.device))  # under torchrun: cuda:LOCAL_RANK
            resolve_dtype(args.dtype, device)
            prepare_save_dir(Path(args.save_dir))
    except (ValueError, OSError, DeviceError) as exc:
        error = _failure(exc)
    error = dist.first_error(error)
    if error is None and dist.enabled and device is not None:
        kinds = dist.all_gather_object(device.type)
        if len(set(kinds)) > 1:
            error = f"the processes would run on different kinds of device ({', '.join(kinds)}); give all the same --device"
        else:
            dist.bind(device)
    if error is not None:
        if dist.is_main:
            logger.error("%s", error)
        return EXIT_USAGE

    save_dir = Path(args.save_dir)
    failed: list[tuple[str, str]] = []
    skipped: list[str] = []
    ready: list[Job] = []
    first_frames: Optional[Video] = None  # ready[0] decoded by the check below, for its run
    if dist.is_main:  # rank 0 checks the inputs and tells the others what to do
        jobs: list[Job] = []
        outputs: dict[Path, Path] = {}
        for video, prompt in zip(videos, prompts):
            out = output_path_for(video, save_dir)
            if out in outputs:
                failed.append((video.name, f"output {out.name} is already produced by {outputs[out].name}"))
                continue
            outputs[out] = video
            if out.exists() and out.resolve() == video.resolve():
                failed.append((video.name, "the output would overwrite the input; choose another --save_dir"))
            elif out.exists() and not args.overwrite:
                skipped.append(video.name)
            else:
                jobs.append(Job(video, prompt, out))

        # Check every video before any weights are loaded, so a bad file costs nothing. The first
        # one to run is decoded fully and its frames kept, so that its run does not decode it again.
        for job in jobs:
            try:
                if first_frames is None and not args.dry_run:
                    decoded = read_video(job.video)
                    info = decoded.info
                else:
                    decoded, info = None, probe_video(job.video)
                plan = plan_video(info, options, config.planning)
            except ValueError as exc:  # VideoError, or a video the planning rules reject
                failed.append((job.video.name, _failure(exc)))
                logger.error("%s", _failure(exc))
                continue
            if args.dry_run:
                logger.info("%s: %s; prompt %r; output %s", job.video.name, plan.describe(), job.prompt, job.output)
            if decoded is not None:
                first_frames = decoded
            ready.append(job)
    failed, skipped, ready = dist.broadcast_object((failed, skipped, ready))

    if args.dry_run:
        if dist.is_main:
            for name in skipped:
                logger.info("%s: output exists, would be skipped (use --overwrite to redo)", name)
            _summary([j.video.name for j in ready], skipped, failed, "planned")
        return EXIT_FAILED if failed else EXIT_OK

    # Several processes share out whole videos when each can get one, else each video's windows.
    share_videos = dist.enabled and Path(args.input_path).is_dir() and len(ready) >= dist.world_size
    run_done: list[tuple[int, str]] = []  # (index in ready, name)
    run_failed: list[tuple[int, str, str]] = []  # (index in ready, name, reason)
    if ready:
        load_errors = (CheckpointError, WeightsUnavailableError, DeviceError, OSError, ValueError)
        error = None
        if dist.enabled:
            # Local rank 0 fetches any missing weights first: one download per node.
            try:
                if dist.local_rank == 0:
                    resolve_unet_checkpoint(config, args.version, args.model_path or None)
                    resolve_text_encoder_weights(config)
                    resolve_vae(config)
            except load_errors as exc:
                error = _failure(exc)
            error = dist.first_error(error)
        if error is None:
            try:
                # One process: the network loads while the first video is read and encoded.
                enhancer = Enhancer(config, version=args.version, model_path=args.model_path or None,
                                    device=str(device), dtype=args.dtype, progress=dist.is_main,
                                    low_vram=args.low_vram, background_load=not dist.enabled,
                                    max_vram_gb=args.max_vram_gb)
            except load_errors as exc:
                error = _failure(exc)
            error = dist.first_error(error)
        if error is not None:
            if dist.is_main:
                logger.error("could not load the models: %s", error)
            return EXIT_FAILED
        mine = list(enumerate(ready))
        if share_videos:
            mine = shard_videos(mine, dist.rank, dist.world_size)
        elif dist.enabled:
            enhancer.sharding = WindowSharding(dist, device, local=enhancer.local_evaluator)
        # Sharing windows, rank 0 reports for all (the others fail with it, or for it).
        report = dist.is_main or share_videos
        # The frames decoded by the check go to the run of ready[0] only (sharing out whole videos,
        # that video may be another process's).
        decoded = first_frames if mine and mine[0][0] == 0 else None
        first_frames = None
        for index, job in mine:
            try:
                enhancer.run(job.video, job.prompt, options, save_dir, overwrite=args.overwrite, video=decoded)
                run_done.append((index, job.video.name))
            except ModelLoadError as exc:  # loaded in the background (one process only)
                logger.error("could not load the models: %s", _failure(exc.__cause__ or exc))
                return EXIT_FAILED
            except (VideoError, EnhanceError, ValueError, OSError, PeerFailure) as exc:
                reason = _failure(exc)
                if isinstance(exc, PeerFailure) and job.video.name not in reason:
                    reason = f"{job.video.name}: {reason}"  # another process failed on this video
                run_failed.append((index, job.video.name, reason))
                if report:
                    logger.error("%s", reason)
            except CommunicationError:
                raise
            except Exception as exc:  # keep the folder run going; details at --log_level debug
                run_failed.append((index, job.video.name, f"{type(exc).__name__}: {_failure(exc)}"))
                if report:
                    logger.error("%s: unexpected error: %s: %s", job.video.name, type(exc).__name__,
                                 _failure(exc), exc_info=True)
            finally:
                decoded = None  # the next videos are read by their runs
    # Every process's results (sharing windows, rank 0's stand for all), in the order of the videos.
    results = dist.all_gather_object((run_done, run_failed))
    if not share_videos:
        results = results[:1]
    done = [name for _, name in sorted(d for r in results for d in r[0])]
    failed += [(name, reason) for _, name, reason in sorted(f for r in results for f in r[1])]
    if dist.is_main:
        for name in skipped:
            logger.info("%s: output exists, skipped (use --overwrite to redo)", name)
        _summary(done, skipped, failed, "enhanced")
    return EXIT_FAILED if failed else EXIT_OK
