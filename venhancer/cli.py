"""Command line of `enhance_a_video.py`: the reference's flags plus seed, config, device, dry run.

Every failure the user can cause (bad path, unusable video, bad option, missing or wrong weights,
absent GPU, out of memory) ends as one log line and a non-zero exit code, never a traceback; the
full traceback of an unexpected error is logged at --log_level debug.

A run is a sequence of steps: `check_arguments` (options, videos, prompts; before torch is
imported, so a typo is reported at once), `_prepare` (config, device and precision, save folder),
`_check_videos` (`plan_jobs`: each output, never over an input; then every video probed and
planned), `_load` (every missing weight file asked about before any download), `_run_jobs`, and
the summary.

Under torchrun the same command runs on several processes (venhancer.distributed): rank 0 checks
the inputs and hands out the work, logs at the chosen level and prints the summary; the other
processes log warnings and errors only, prefixed with their rank.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

from tqdm import tqdm

from venhancer.options import DTYPE_ALIASES, MAX_STEPS, PRECISIONS, EnhanceOptions, first_line, precision_name
from venhancer.outputs import (
    check_output_names,
    is_case_insensitive,
    is_finished,
    output_path_for,
)

if TYPE_CHECKING:
    from venhancer.distributed import DistContext
    from venhancer.output_formats import OutputOptions

logger = logging.getLogger("venhancer")

EXIT_OK = 0
EXIT_FAILED = 1  # at least one video failed, or the models could not be loaded
EXIT_USAGE = 2  # bad arguments or inputs: nothing was run
EXIT_INTERRUPTED = 130

INTERRUPTED = "interrupted; finished outputs are kept, the one in progress was removed"


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
    # huggingface_hub gives its loggers a stderr handler of their own: without this, each of its
    # messages would appear twice (once there, once through the root handler above).
    try:
        import huggingface_hub.utils.logging  # noqa: F401  (a light module; it adds that handler)
    except ImportError:
        return
    logging.getLogger("huggingface_hub").handlers.clear()




class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show (not None, not empty, not a bare switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "", False) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = EnhanceOptions.defaults()  # one source for the run settings' defaults
    p = _Parser(
        description="VEnhancer: spatial and temporal super-resolution and refinement of videos "
                    "with one video diffusion model.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--input_path", required=True,
                   help="a video file, or a folder: every mp4/mov/webm/mkv/gif in it, sorted by name")
    p.add_argument("--save_dir", default="results",
                   help="output folder (created if missing); it must not make an output overwrite an input")
    p.add_argument("--version", default="v1", choices=["v1", "v2"],
                   help="checkpoint: v1 = venhancer_paper.pt, v2 = venhancer_v2.pt")
    p.add_argument("--model_path", default="",
                   help="local network checkpoint (default: the config's file, downloaded into ckpts/ if missing)")
    p.add_argument("--prompt", default="a good video", help="text describing the video")
    p.add_argument("--prompt_path", default="",
                   help="text file with one prompt per non-empty line, one per video in sorted order")
    p.add_argument("--filename_as_prompt", action="store_true", help="use each video's file name (stem) as its prompt")
    p.add_argument("--cfg", type=float, default=d["cfg"], help="classifier-free guidance scale (>= 1)")
    p.add_argument("--solver_mode", default=d["solver_mode"], choices=["fast", "normal"],
                   help="fast: 14 fixed network evaluations; normal: --steps")
    p.add_argument("--steps", type=int, default=d["steps"],
                   help=f"denoising steps in normal mode, 1-{MAX_STEPS}; the reference's timestep rule "
                        "gives one more for some counts (94, 108, 189, 200, ...), as --dry_run shows")
    p.add_argument("--noise_aug", type=int, default=d["noise_aug"],
                   help="refinement strength 0-300 (noise added to the input latents; higher changes more)")
    p.add_argument("--target_fps", type=float, default=d["target_fps"],
                   help="output frame rate to aim for (frames are inserted)")
    p.add_argument("--up_scale", type=float, default=d["up_scale"],
                   help="spatial up-scaling factor (0, 8]; the output area is bounded")
    p.add_argument("--s_cond", type=int, default=d["s_cond"], help="scale condition of the ControlNet (an integer >= 0)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed, applied anew to each video")
    p.add_argument("--config", default=None,
                   help="JSON file laid over the packaged configs/venhancer.json (network, weight files, sizes)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="network precision (default auto: fp16 on CUDA, as in the reference; fp32 on the CPU, whose "
                        "half-precision convolutions are slow); fp8 (experimental, not yet measured): fp16 weights "
                        "with 8-bit attention and Linears, on GPUs of compute capability 8.9+ (RTX 40xx, L4, H100)")
    # The deprecated old name of --precision (float16 = fp16, ...), hidden from --help.
    p.add_argument("--dtype", default=None, choices=list(DTYPE_ALIASES), help=argparse.SUPPRESS)
    p.add_argument("--low_vram", action=argparse.BooleanOptionalAction, default=None,
                   help="--low_vram is --max_vram_gb 15 (a 16 GB card); --no-low_vram plans for at least "
                        "21 GB; default: the plan follows --max_vram_gb")
    p.add_argument("--max_vram_gb", type=_gigabytes, default=None,
                   help="GPU memory the run may use, in GB: the fastest memory plan that fits it runs (smaller "
                        "passes, weights streamed block by block, the VAE off the GPU; the same computation), a smaller "
                        "one after running out of memory; default: the free GPU memory at start (and the "
                        "allocator's cap). On the CPU it picks the same plan as on a GPU (default: the fastest)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo videos whose output already exists (an input file is never overwritten)")
    p.add_argument("--dry_run", action="store_true",
                   help="print per video the planned sizes, frame rates, windows and network evaluations; loads no weights")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug adds timings and the traceback of unexpected errors")
    # Outputs for editing (venhancer.output_formats); checked by OutputOptions before any weights load.
    p.add_argument("--codec", default="h264", choices=["h264", "h265", "prores"],
                   help="h264/h265 in .mp4, prores = ProRes 422 HQ (10-bit 4:2:2) in .mov")
    p.add_argument("--crf", type=int, default=None, help="quality of h264/h265, 0-51, lower is better; "
                   "default h264 17 (the reference's), h265 20")
    p.add_argument("--bit_depth", type=int, default=8, choices=[8, 10],
                   help="10: frames quantised to 16 bits and encoded 10-bit (h264 High 10, h265 Main 10, ProRes)")
    p.add_argument("--frames_dir", action="store_true",
                   help="also write the frames as numbered 16-bit PNGs into <save_dir>/<name>_frames/")
    p.add_argument("--no_video", action="store_true", help="with --frames_dir: write the frames only")
    p.add_argument("--color_fix", default="none", choices=["none", "adain", "wavelet"],
                   help="match each output frame's colours to its input frame: adain = per-channel mean "
                        "and std, wavelet = the input's low frequencies under the output's detail")
    return p


def output_options(args: argparse.Namespace) -> "OutputOptions":
    """The output flags as OutputOptions; ValueError (one line) for a bad combination."""
    from venhancer.output_formats import OutputOptions

    output = OutputOptions(codec=args.codec, crf=args.crf, bit_depth=args.bit_depth, frames_dir=args.frames_dir,
                           video=not args.no_video, color_fix=args.color_fix)
    output.check_encoder()
    return output


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
    """The non-empty lines of a UTF-8 text file, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_prompts(videos: Sequence[Path], prompt: str, prompt_path: str, filename_as_prompt: bool) -> list[str]:
    """Per-video prompts. Precedence: file name, then --prompt_path, then the first non-empty line
    of `<stem>.txt` next to the video, then --prompt."""
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
        lines = _read_lines(sidecar) if sidecar.is_file() else []
        prompts.append(lines[0] if lines else prompt)
    return prompts


def _reason(video: Path, exc: BaseException) -> str:
    """The first line of a video's error, without the video's name or path in front (the summary
    line names the video already)."""
    text = first_line(exc)
    # Another process's failure reads "process N failed: <its message>".
    match = re.match(rf"(process \d+ failed: )?(?:{re.escape(str(video))}|{re.escape(video.name)}): ", text)
    return text if match is None else (match.group(1) or "") + text[match.end():]


def _summary(done: list[str], skipped: list[str], failed: list[tuple[str, str]], verb: str) -> None:
    parts = [f"{len(done)} {verb}", f"{len(skipped)} skipped (output exists)", f"{len(failed)} failed"]
    logger.info("summary: %s", ", ".join(parts))
    for name, reason in failed:
        logger.error("failed: %s: %s", name, reason)


def _env_rank() -> int:
    """This process's rank under torchrun, for log prefixes only (DistContext checks the variable)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _under_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


# ------------------------------------------------------------------------------------- the steps

@dataclass
class Request:
    """What the arguments ask for, checked without torch."""

    options: EnhanceOptions
    videos: list[Path]
    prompts: list[str]
    save_dir: Path
    inputs: list[Path]  # every file the run reads: no output may land on one
    output: Optional["OutputOptions"] = None  # what each run writes (None: the reference's mp4)
    precision: str = "auto"  # as asked for; the device decides what auto means

    @property
    def outputs(self) -> "OutputOptions":
        from venhancer.output_formats import OutputOptions

        return self.output or OutputOptions()


@dataclass
class Checked:
    """The outcome of checking the videos (rank 0), handed to every process."""

    ready: list[Job] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Before CUDA starts: growable segments keep fragmentation (reserved minus allocated memory)
    # low across the differently sized windows, tiles and frames of a run.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank = _env_rank()
    setup_logging("info", rank)
    try:  # Ctrl-C at any moment (torch's import included) ends with one line
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level, rank)
        return _main(args)
    except KeyboardInterrupt:
        logger.error("%s", INTERRUPTED)
        return EXIT_INTERRUPTED


def _main(args: argparse.Namespace) -> int:
    # Checks that need no torch come first: a mistyped path or value is reported at once.
    try:
        request, error = check_arguments(args), None
    except (ValueError, OSError) as exc:
        request, error = None, first_line(exc)
    if error is not None and not _under_torchrun():
        logger.error("%s", error)
        return EXIT_USAGE

    from venhancer.distributed import CommunicationError, DistContext

    try:
        dist = DistContext.from_env()  # torchrun's WORLD_SIZE / RANK / LOCAL_RANK, else one process
        device_name = dist.device_name(args.device)
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    warmup = None
    if not args.dry_run and error is None:
        from venhancer.warmup import start_cuda_warmup

        # GPU libraries start on a thread while the models' code is imported (venhancer.warmup).
        warmup = start_cuda_warmup(device_name)
    try:
        code = _enhance(args, request, error, dist)
        dist.barrier()  # every process has logged what it had to
        return code
    except CommunicationError as exc:  # a process died or a timeout passed: nothing more can be agreed
        logger.error("%s", first_line(exc))
        return EXIT_FAILED
    finally:
        dist.close()
        if warmup is not None:
            # A run that stops early must not exit while that thread is inside the CUDA libraries.
            warmup.join(timeout=60)


def check_arguments(args: argparse.Namespace) -> Request:
    """Options, videos and prompts, without torch; raises ValueError (UsageError) or OSError."""
    options = EnhanceOptions(up_scale=args.up_scale, target_fps=args.target_fps, noise_aug=args.noise_aug,
                             solver_mode=args.solver_mode, steps=args.steps, cfg=args.cfg,
                             s_cond=args.s_cond, seed=args.seed)
    output = output_options(args)  # codec, bit depth, frames, colour fix; the bundled ffmpeg's encoders
    precision = precision_name(args.precision, args.dtype)
    if args.dtype is not None:
        logger.warning("--dtype is deprecated: use --precision %s", precision)
    device = (args.device or "auto").split(":")[0]
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unsupported device {args.device!r}; use auto, cpu, cuda or cuda:N")
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"config file not found: {args.config}")
    videos = collect_videos(Path(args.input_path))
    prompts = resolve_prompts(videos, args.prompt, args.prompt_path, args.filename_as_prompt)
    inputs = [*videos, *(v.with_suffix(".txt") for v in videos)]
    inputs += [Path(p) for p in (args.prompt_path, args.config, args.model_path) if p]
    return Request(options, videos, prompts, Path(args.save_dir), [p for p in inputs if p.is_file()], output,
                   precision)


def _enhance(args: argparse.Namespace, request: Optional[Request], error: Optional[str], dist: "DistContext") -> int:
    """Under torchrun every step up to the run itself is agreed between the processes, so that none
    goes on while another has stopped (each returns the same exit code)."""
    try:
        dist.start()
    except (RuntimeError, ValueError, OSError) as exc:
        logger.error("could not start the process group: %s", first_line(exc))
        return EXIT_FAILED
    setup = _prepare(args, request, error, dist)
    if isinstance(setup, int):
        return setup
    config, device = setup
    checked = Checked()
    if dist.is_main:  # rank 0 checks the inputs and tells the others what to do
        checked = _check_videos(args, request, config)
    checked = dist.broadcast_object(checked)
    if args.dry_run:
        if dist.is_main:
            for name in checked.skipped:
                logger.info("%s: output exists, would be skipped (use --overwrite to redo)", name)
            _summary([j.video.name for j in checked.ready], checked.skipped, checked.failed, "planned")
        return EXIT_FAILED if checked.failed else EXIT_OK
    done: list[str] = []
    if checked.ready:
        result = _run_jobs(args, request, config, device, dist, checked.ready)
        if isinstance(result, int):
            return result
        done, run_failed = result
        checked.failed += run_failed
    if dist.is_main:
        for name in checked.skipped:
            logger.info("%s: output exists, skipped (use --overwrite to redo)", name)
        _summary(done, checked.skipped, checked.failed, "enhanced")
    return EXIT_FAILED if checked.failed else EXIT_OK


def _prepare(args: argparse.Namespace, request: Optional[Request], error: Optional[str],
             dist: "DistContext") -> "tuple[Any, Any] | int":
    """(config, device), or the exit code after one error line; every process agrees."""
    from venhancer.config import load_config
    from venhancer.outputs import prepare_save_dir
    from venhancer.pipeline import DeviceError, resolve_device, resolve_precision

    config = device = None
    if error is None:
        try:
            config = load_config(args.config)
            if not args.dry_run:
                device = resolve_device(dist.device_name(args.device))  # under torchrun: cuda:LOCAL_RANK
                resolve_precision(request.precision, device)  # fp8 on a GPU without FP8 tensor cores
                prepare_save_dir(request.save_dir)
        except (ValueError, OSError, DeviceError) as exc:
            error = first_line(exc)
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
    return config, device


def _file_key(path: Path, fold_case: bool) -> str:
    key = os.path.normcase(str(path.resolve()))
    return key.casefold() if fold_case else key


def _lands_on(output: Path, inputs: dict[str, Path], fold_case: bool) -> Optional[Path]:
    """The input file that writing `output` would replace, if any (same path, or the same file
    reached another way: a link, or another case on a case-insensitive file system)."""
    found = inputs.get(_file_key(output, fold_case))
    if found is not None:
        return found
    if output.exists():
        return next((i for i in inputs.values() if os.path.samefile(output, i)), None)
    return None


def plan_jobs(request: Request, overwrite: bool) -> Checked:
    """Each video's output, the videos to skip, and those that cannot run: an output that would
    replace an input file (whatever --overwrite says), two videos with one output, a name too long.
    A video is skipped when every output asked for (the video in the codec's container, the frame
    folder) and its sidecar exist."""
    fold_case = is_case_insensitive(request.save_dir)
    inputs = {_file_key(p, fold_case): p for p in request.inputs}
    output = request.outputs
    checked = Checked()
    outputs: dict[str, Path] = {}
    for video, prompt in zip(request.videos, request.prompts):
        targets = output.targets(video, request.save_dir)
        out = targets[0]  # the video, or the frame folder when no video is written
        sidecar = output.sidecar_path(video, request.save_dir)
        key = _file_key(out, fold_case)
        victim = next(filter(None, (_lands_on(p, inputs, fold_case) for p in (*targets, sidecar))), None)
        try:
            if victim is not None:
                raise ValueError(f"its output would overwrite the input {victim}; choose another --save_dir")
            if key in outputs:
                raise ValueError(f"output {out.name} is already produced by {outputs[key].name}")
            check_output_names(output_path_for(video, request.save_dir, output.suffix), frames=output.frames_dir)
        except ValueError as exc:
            checked.failed.append((video.name, first_line(exc)))
            logger.error("%s: %s", video.name, first_line(exc))
            continue
        outputs[key] = video
        if not overwrite and is_finished(out, targets[1:], sidecar):
            checked.skipped.append(video.name)
        else:
            if not overwrite and not sidecar.is_file() and any(t.exists() for t in targets):
                logger.warning("%s: %s has no %s (its run was stopped): making it again", video.name,
                               next(t for t in targets if t.exists()), sidecar.name)
            checked.ready.append(Job(video, prompt, out))
    return checked


def _check_videos(args: argparse.Namespace, request: Request, config: Any) -> Checked:
    """Every video is probed (its packets listed, nothing decoded) and planned before any weights
    are loaded, so a bad file costs nothing; each run then streams its own frames."""
    from venhancer.pipeline import plan_video
    from venhancer.video_io import probe_video

    checked = plan_jobs(request, args.overwrite)
    ready, checked.ready = checked.ready, []
    for job in ready:
        try:
            plan = plan_video(probe_video(job.video), request.options, config.planning)
        except ValueError as exc:  # VideoError, or a video the planning rules reject
            checked.failed.append((job.video.name, _reason(job.video, exc)))
            logger.error("%s: %s", job.video.name, _reason(job.video, exc))
            continue
        if args.dry_run:
            logger.info("%s: %s; prompt %r; output %s (%s)", job.video.name, plan.describe(), job.prompt,
                        job.output, request.outputs.describe(plan.width, plan.height))
        checked.ready.append(job)
    return checked


def _load(args: argparse.Namespace, precision: str, config: Any, device: Any, dist: "DistContext") -> Any:
    """The Enhancer, or None after one error line; every process agrees."""
    from venhancer.loading import (
        CheckpointError,
        WeightsUnavailableError,
        check_weights_available,
        resolve_text_encoder_weights,
        resolve_unet_checkpoint,
        resolve_vae,
    )
    from venhancer.pipeline import DeviceError, Enhancer

    load_errors = (CheckpointError, WeightsUnavailableError, DeviceError, OSError, ValueError)
    error = None
    enhancer = None
    if dist.enabled:
        # Local rank 0 fetches any missing weights first: one download per node.
        try:
            if dist.local_rank == 0:
                check_weights_available(config, args.version, args.model_path or None)
                resolve_unet_checkpoint(config, args.version, args.model_path or None)
                resolve_text_encoder_weights(config)
                resolve_vae(config)
        except load_errors as exc:
            error = first_line(exc)
        error = dist.first_error(error)
    if error is None:
        try:
            # One process: the network loads while the first video is read and encoded.
            enhancer = Enhancer(config, version=args.version, model_path=args.model_path or None,
                                device=str(device), precision=precision, progress=dist.is_main,
                                low_vram=args.low_vram, background_load=not dist.enabled,
                                max_vram_gb=args.max_vram_gb)
        except load_errors as exc:
            error = first_line(exc)
        error = dist.first_error(error)
    if error is not None:
        if dist.is_main:
            logger.error("could not load the models: %s", error)
        return None
    return enhancer


def _run_jobs(args: argparse.Namespace, request: Request, config: Any, device: Any, dist: "DistContext",
              ready: list[Job]) -> "tuple[list[str], list[tuple[str, str]]] | int":
    """Enhance the checked videos: (names done, (name, reason) failed), or an exit code."""
    from venhancer.distributed import CommunicationError, PeerFailure, WindowSharding, shard_videos
    from venhancer.pipeline import EnhanceError, ModelLoadError
    from venhancer.video_io import VideoError

    enhancer = _load(args, request.precision, config, device, dist)
    if enhancer is None:
        return EXIT_FAILED
    # Several processes share out whole videos when each can get one, else each video's windows.
    share_videos = dist.enabled and Path(args.input_path).is_dir() and len(ready) >= dist.world_size
    mine = list(enumerate(ready))
    if share_videos:
        mine = shard_videos(mine, dist.rank, dist.world_size)
    elif dist.enabled:
        enhancer.sharding = WindowSharding(dist, device, local=enhancer.local_evaluator)
    # Sharing windows, rank 0 reports for all (the others fail with it, or for it).
    report = dist.is_main or share_videos
    run_done: list[tuple[int, str]] = []  # (index in ready, name)
    run_failed: list[tuple[int, str, str]] = []  # (index in ready, name, reason)
    for index, job in mine:
        name = job.video.name
        try:
            enhancer.run(job.video, job.prompt, request.options, request.save_dir, overwrite=args.overwrite,
                         output=request.output)
            run_done.append((index, name))
        except ModelLoadError as exc:  # loaded in the background (one process only)
            logger.error("could not load the models: %s", first_line(exc.__cause__ or exc))
            return EXIT_FAILED
        except (VideoError, EnhanceError, ValueError, OSError, PeerFailure) as exc:
            run_failed.append((index, name, _reason(job.video, exc)))
            if report:
                logger.error("%s: %s", name, _reason(job.video, exc))
        except CommunicationError:
            raise
        except Exception as exc:  # keep the folder run going; details at --log_level debug
            reason = f"unexpected error: {type(exc).__name__}: {first_line(exc)}"
            run_failed.append((index, name, reason))
            if report:
                logger.error("%s: %s", name, reason, exc_info=True)
    # Every process's results (sharing windows, rank 0's stand for all), in the order of the videos.
    results = dist.all_gather_object((run_done, run_failed))
    if not share_videos:
        results = results[:1]
    done = [name for _, name in sorted(d for r in results for d in r[0])]
    failed = [(name, reason) for _, name, reason in sorted(f for r in results for f in r[1])]
    return done, failed
