"""Per-video enhancement (SPEC section 1): read, plan, encode, denoise, decode, write.

`Enhancer` loads the three models once and enhances any number of videos:

    from venhancer.pipeline import Enhancer
    enhancer = Enhancer()                       # default config, v1 checkpoint, auto device
    result = enhancer.enhance("inputs/000000.mp4", "a red ball bouncing", up_scale=2)
    print(result.output_path, result.timings)

`plan_video` computes every size, frame count and window of a run without loading any weights
(the dry run uses it).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from venhancer import __version__
from venhancer.color_fix import ColorMatcher
from venhancer.config import EnhancerConfig, PlanningConfig, load_config
from venhancer.diffusion import T_MAX, noise_hint, num_model_evals, sample, start_latent
from venhancer.diffusion.chunking import evaluate_sequential, evaluate_shared_prefix
from venhancer.distributed import PeerOutOfMemory, solo
from venhancer.loading import (
    check_weights_available,
    load_unet_cached,
    resolve_text_encoder_weights,
    resolve_unet_checkpoint,
    resolve_vae,
)
from venhancer.memory import MemoryPlan, WeightStreamer, budget_gb, choose_plan, next_plan, peak_host_gb
from venhancer.models import VEnhancerUNet
from venhancer.offload import HostCopy
from venhancer.options import MAX_UP_SCALE, SOLVER_MODES, EnhanceOptions, precision_name  # noqa: F401  (this module's API)
from venhancer.output_formats import OutputOptions, OutputSink
from venhancer.outputs import (
    check_output_names,
    is_finished,
    output_path_for,
    prepare_save_dir,
    remove_stale_partials,
)
from venhancer.planning import (
    chunk_windows,
    interp_frames,
    mask_cond,
    output_fps,
    output_frame_count,
    pad_to_fit,
    target_resolution,
)
from venhancer.runtime import RuntimeSettings, fp8_supported, optimize_for_inference
from venhancer.vae import (
    decode_tiled,
    encode_frames,
    expand_latents,
    load_vae,
    optimize_vae,
    set_decoder_frame_chunk,
)
from venhancer.video_io import Video, VideoInfo, apply_umask, iter_frames, probe_video

logger = logging.getLogger(__name__)

VERSIONS = ("v1", "v2")
GUIDE_RESCALE = 0.2
LATENT_FACTOR = 8
# Frames resized and padded at once before encoding: bounds the full-resolution float tensors.
_FRAME_BATCH = 8


class EnhanceError(RuntimeError):
    """A run that failed for a reason the user can act on; the message is one line."""


class ModelLoadError(RuntimeError):
    """The network, loading in the background (`Enhancer(background_load=True)`), failed to load."""


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


@dataclass(frozen=True)
class VideoPlan:
    """Everything a run will produce for one input, computed without any model."""

    input: VideoInfo
    k: int  # frames inserted between consecutive input frames
    out_fps: float
    out_frames: int
    height: int  # output size
    width: int
    padding: tuple[int, int, int, int]  # (left, right, top, bottom) of the network input
    windows: list[tuple[int, int]]  # temporal windows of the denoiser
    denoise_steps: int  # network evaluations per branch and window
    branches: int  # 2 with classifier-free guidance, 1 when cfg == 1
    out_rate: Optional[Fraction] = None  # out_fps exactly (None: from out_fps)

    def __post_init__(self) -> None:
        if self.out_rate is None:
            object.__setattr__(self, "out_rate", Fraction(self.out_fps).limit_denominator(1_000_000))

    @property
    def padded_size(self) -> tuple[int, int]:
        left, right, top, bottom = self.padding
        return self.height + top + bottom, self.width + left + right

    @property
    def latent_size(self) -> tuple[int, int]:
        ph, pw = self.padded_size
        return ph // LATENT_FACTOR, pw // LATENT_FACTOR

    @property
    def network_evals(self) -> int:
        return self.denoise_steps * self.branches * len(self.windows)

    def describe(self) -> str:
        info = self.input
        ph, pw = self.padded_size
        lh, lw = self.latent_size
        return (f"input {info.width}x{info.height} @ {info.fps:g} fps, {info.num_frames} frames -> "
                f"output {self.width}x{self.height} @ {self.out_fps:g} fps, {self.out_frames} frames "
                f"({self.k} inserted per pair); network input {pw}x{ph} (latent {lw}x{lh}); "
                f"temporal windows {self.windows}; network evaluations {self.denoise_steps} steps x "
                f"{self.branches} branches x {len(self.windows)} windows = {self.network_evals}")


def plan_video(info: VideoInfo, options: EnhanceOptions, planning: PlanningConfig) -> VideoPlan:
    """Sizes, frame counts and windows of enhancing `info` (SPEC 1.2, 1.3, 1.6, 5).

    The rates are exact fractions: 24 fps over 48/7 fps is 3.5, which rounds to 4 (k = 3)."""
    # Fractions on both sides: a float target would make the quotient a float again.
    k = interp_frames(info.rate, Fraction(options.target_fps))
    out_rate = output_fps(info.rate, k)
    frames = output_frame_count(info.num_frames, k)
    height, width = target_resolution(info.height, info.width, options.up_scale,
                                      area_min=planning.area_min, area_max=planning.area_max)
    if min(height, width) < 2:
        raise ValueError(f"input {info.width}x{info.height} at up_scale {options.up_scale:g} gives an output of "
                         f"{width}x{height} (the output area is bounded); an aspect ratio this extreme "
                         "cannot be enhanced")
    padding = pad_to_fit(height, width, min_height=planning.pad_min[0], min_width=planning.pad_min[1])
    windows = chunk_windows(frames, k, max_len=planning.chunk_len, overlap=planning.chunk_overlap)
    return VideoPlan(input=info, k=k, out_fps=float(out_rate), out_frames=frames,
                     height=height, width=width, padding=padding, windows=windows,
                     denoise_steps=num_model_evals(options.solver_mode, options.steps),
                     branches=1 if options.cfg == 1 else 2, out_rate=out_rate)


@dataclass
class EnhanceResult:
    input_path: Path
    output_path: Path
    sidecar_path: Optional[Path]
    skipped: bool  # the output already existed and overwrite was off
    prompt: str
    plan: Optional[VideoPlan] = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase


def resolve_device(name: Optional[str] = None) -> torch.device:
    """`None`/"auto": CUDA when available, else CPU. A CUDA device that is not there is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r}: only cpu and cuda are supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available "
                              "(no GPU, or a CPU-only PyTorch build); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


# The weights' and activations' dtype of each precision: fp8 keeps the fp16 network and only its
# kernels change (RuntimeSettings.fp8).
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def resolve_precision(precision: Optional[str], device: torch.device, dtype: Optional[str | torch.dtype] = None) -> str:
    """The precision a run uses: fp32, fp16, bf16 or fp8. `None`/"auto": fp16 on CUDA (the
    reference's precision), fp32 on the CPU, whose half-precision convolutions are slow or missing.
    `dtype`: the deprecated way to ask (float32, float16, bfloat16, or those torch dtypes).
    ValueError for an unknown value, precision and dtype disagreeing, or fp8 on a device without
    FP8 tensor cores."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPE_NAMES))}, got {dtype}")
        dtype = _DTYPE_NAMES[dtype]
    name = precision_name(precision, dtype)
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if name == "fp8" and not fp8_supported(device):
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names no index
            major, minor = torch.cuda.get_device_capability(index)
            found = f"cuda:{index} is {torch.cuda.get_device_name(index)} ({major}.{minor})"
        else:
            found = "the device is the CPU"
        raise ValueError("--precision fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer, "
                         f"e.g. RTX 40xx, L4, H100); {found}")
    return name


def _usable_gpu_gb(device: torch.device) -> float | None:
    """GPU memory this process can use: the free memory, or the allocator's cap
    (torch.cuda.set_per_process_memory_fraction) if lower; None off a GPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" names no index
    free, total = torch.cuda.mem_get_info(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer PyTorch only
    fraction = 1.0 if get_fraction is None else get_fraction(index)
    return min(free, fraction * total) / 1e9


def _loaded(future: Future, what: str) -> Any:
    """The result of a background load; its failure as ModelLoadError."""
    try:
        return future.result()
    except Exception as exc:
        raise ModelLoadError(f"could not load the {what}: {exc}") from exc


def _keeping(batches: Iterable[np.ndarray], kept: list[np.ndarray]) -> Iterator[np.ndarray]:
    """`batches`, each frame also appended to `kept` (the colour correction needs the input frames
    when decoding: holding the batches costs no copy and spares a second decode)."""
    for batch in batches:
        kept.extend(batch)
        yield batch


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    # The temporary name follows venhancer.outputs (checked, and cleaned after a killed run, there).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ReportingBar:
    """A tqdm bar that also reports its count to `Enhancer.progress_callback` (a disabled tqdm
    bar does not count, and the callback must work without a terminal)."""

    def __init__(self, bar: tqdm, phase: str, total: int, callback: Callable[[str, int, int], None]):
        self.bar, self.phase, self.total, self.done, self.callback = bar, phase, total, 0, callback

    def __enter__(self) -> _ReportingBar:
        self.bar.__enter__()
        self.callback(self.phase, 0, self.total)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.__exit__(*exc_info)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        self.callback(self.phase, self.done, self.total)


class Enhancer:
    """The three models, loaded once; `enhance()` processes one video per call.

    config: an `EnhancerConfig`, a path to a JSON config, or None for the packaged default.
    version: "v1" (venhancer_paper.pt) or "v2" (venhancer_v2.pt); model_path overrides the checkpoint.
    device: "auto"/None, "cpu", "cuda", "cuda:N".
    precision: None/"auto" (fp16 on CUDA, fp32 on the CPU), "fp32", "fp16", "bf16", or "fp8" (fp16
    weights, FP8 kernels; a ValueError on a device without FP8 tensor cores). dtype: its deprecated
    old form (a torch dtype or its name).
    progress: show tqdm bars (on a terminal) for encoding, denoising and decoding.
    progress_callback: called as (phase, done, total) where those bars start and advance, phase
    "encode" or "decode" (frames) or "denoise" (solver steps); on the thread running the video.
    max_vram_gb: the GPU memory the run may use; the fastest `venhancer.memory` plan that fits it
    runs, and a smaller one after running out of memory. None: the GPU's free memory at start (or
    the allocator's cap, if lower); on the CPU the fastest plan unless a number is given.
    low_vram: True is `max_vram_gb=memory.LOW_VRAM_BUDGET_GB`; False plans for at least 21 GB.

    background_load: load the network (then the text encoder) on a worker thread with its own
    CUDA stream, and encode each video's prompt there, while the calling thread loads the VAE and
    reads and encodes the video (the command line does this for one-process runs). On an H100 it
    took ~1.4 s of loading off the start-up's critical path but slowed the encode beside it by
    ~0.8 s. A failed background load raises ModelLoadError when the network is first needed.

    `sharding` (None: this process alone) may be set to a `venhancer.distributed.WindowSharding`:
    every process then enhances the same videos in lockstep, sharing out the network evaluations of
    each solver step, and only its writer process decodes and writes the outputs.
    """

    def __init__(self, config: EnhancerConfig | str | os.PathLike | None = None, version: str = "v1",
                 model_path: str | os.PathLike | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, progress: bool = True, low_vram: bool | None = None,
                 background_load: bool = False,
                 progress_callback: Optional[Callable[[str, int, int], None]] = None,
                 max_vram_gb: float | None = None, precision: str | None = None):
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        self.config = config if isinstance(config, EnhancerConfig) else load_config(config)
        self.version = version
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, dtype)
        if self.precision == "fp8":
            logger.warning("--precision fp8 is experimental: its 8-bit kernels have passed CPU emulation tests only, "
                           "not yet a GPU run, and their effect on the output was not measured")
        self.dtype = PRECISION_DTYPES[self.precision]
        self.progress = progress
        self.progress_callback = progress_callback
        self.budget_gb = budget_gb(max_vram_gb, low_vram, _usable_gpu_gb(self.device))
        self.memory_plan: MemoryPlan = choose_plan(self.budget_gb)
        budget = "no GPU memory limit" if self.budget_gb is None else f"{self.budget_gb:.1f} GB GPU budget"
        logger.info("%s, precision %s: %s", budget, self.precision, self.memory_plan.describe())
        self.memory_fallbacks: list[dict[str, str]] = []  # plans given up after running out of memory
        self.streamer: WeightStreamer | None = None
        self.sharding: Any = None  # venhancer.distributed.WindowSharding, set by the caller
        self.denoise_start_unix_time: float | None = None  # set when the running video starts denoising
        self.solver_step_seconds: list[float] = []  # of the running video, one entry per solver step
        # Resolve (and download if needed) every file before loading any: a missing one fails fast,
        # and an unreachable or gated one before any other is downloaded.
        check_weights_available(self.config, version, model_path or None)
        self.unet_path = resolve_unet_checkpoint(self.config, version, model_path or None)
        text_path = resolve_text_encoder_weights(self.config)
        vae_source = resolve_vae(self.config)
        # Seconds spent loading each model (the start-up benchmark reads them from the sidecar).
        self.load_timings: dict[str, float] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="venhancer-worker") if background_load else None
        self._unet: VEnhancerUNet | None = None
        self._network: Future | None = None
        self._text_loaded: Future | None = None
        if self._worker is not None:
            self._network = self._worker.submit(self._on_worker, self._load_network)
            self._text_loaded = self._worker.submit(self._load_text_encoder, text_path)
        else:
            self._unet = self._load_network()
            self._load_text_encoder(text_path)
        start = time.perf_counter()
        logger.info("loading VAE %s", vae_source)
        self.vae = load_vae(vae_source, device=self.device, dtype=self.dtype)
        if self.device.type == "cuda":
            optimize_vae(self.vae)
        # Plans that offload it: the VAE waits in CPU memory while the network runs.
        self.vae_weights = HostCopy(self.vae) if self.memory_plan.vae_offload and self.device.type == "cuda" else None
        self.load_timings["load_vae"] = time.perf_counter() - start

    def _load_network(self) -> VEnhancerUNet:
        start = time.perf_counter()
        logger.info("loading network %s (%s, %s)", self.unet_path, self.device, self.precision)
        # Streamed weights are loaded into host memory: the whole network never visits the GPU,
        # where it would sit beside the VAE encoder's full-resolution frames (the load runs on
        # the worker thread while the frames are encoded).
        streamed = self.memory_plan.stream_weights
        unet = load_unet_cached(self.unet_path, config=self.config.unet, device="cpu" if streamed else self.device,
                                dtype=self.dtype)
        # Same function, faster kernels and a smaller footprint (venhancer.runtime).
        optimize_for_inference(unet, self._runtime_settings(self.memory_plan))
        if streamed:
            self.streamer = WeightStreamer(unet, self.device, prefetch=self.memory_plan.prefetch_units)
            self.streamer.place_resident()
        self.load_timings["load_network"] = time.perf_counter() - start
        return unet

    def _load_text_encoder(self, text_path: Path) -> None:
        # Imported here, not with this module: with background_load this runs on the worker.
        # open_clip's import (1-2 s of Python) then slows the encode beside it about as much,
        # through the GIL; on the calling thread it cost the same (README, Start-up).
        from venhancer.text_encoder import load_text_encoder

        start = time.perf_counter()
        logger.info("loading text encoder %s", text_path)
        # float32 always: OpenCLIP's LayerNorms compute in float32 and refuse half-precision
        # weights. It runs once per video, so on a GPU it waits in CPU memory and visits the
        # device only for that (1.4 GB less held while denoising).
        self.text_encoder = load_text_encoder(text_path, model_cfg=self.config.text_encoder.model_cfg,
                                              device="cpu", dtype=torch.float32)
        # It visits the GPU once per video; leaving needs no copy back (venhancer.offload).
        self.text_weights = HostCopy(self.text_encoder)
        self.load_timings["load_text_encoder"] = time.perf_counter() - start

    def _on_worker(self, fn, *args):
        """fn(*args) on the worker thread's own CUDA stream (so that its copies and kernels run
        beside the calling thread's instead of queueing behind them), finished before it returns."""
        if self.device.type != "cuda":
            return fn(*args)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            result = fn(*args)
        stream.synchronize()
        return result

    @property
    def unet(self) -> VEnhancerUNet:
        """The optimized network; with background_load, waits for it (ModelLoadError if it failed)."""
        if self._unet is None:
            start = time.perf_counter()
            self._unet = _loaded(self._network, f"network {self.unet_path}")
            self.load_timings["wait_for_network"] = time.perf_counter() - start
        return self._unet

    @property
    def local_evaluator(self):
        """How this process runs its network evaluations: the guidance branches of a window
        together, sharing the layers before the first cross-attention, where memory allows
        (their activations stay in memory meanwhile: 2-3 GB more at the seed clip's size); else
        one by one."""
        evaluate = evaluate_shared_prefix if self.share_branch_prefix else evaluate_sequential
        # The streamer learns the order of the network's blocks from the first solver call.
        return evaluate if self.streamer is None else self.streamer.wrap_evaluator(evaluate)

    @property
    def low_vram(self) -> bool:
        """Whether the network runs in smaller passes than the default (the memory plan's)."""
        return self.memory_plan.small_passes

    @property
    def share_branch_prefix(self) -> bool:
        return self.memory_plan.shared_branch_prefix

    def _runtime_settings(self, plan: MemoryPlan) -> RuntimeSettings:
        """The plan's settings, with the 8-bit attention under precision fp8: every memory plan,
        fallbacks included, runs in the precision asked for. (The FP8 Linears, off by default,
        stay off: they hold e4m3 copies of their weights outside the state dict, which the
        `WeightStreamer` would neither move nor count.)"""
        if self.precision != "fp8":
            return plan.inference
        return replace(plan.inference, fp8=True)

    def _use_plan(self, plan: MemoryPlan) -> None:
        """Switch to a smaller plan. Plans differ in pass sizes and placement only, never in the
        weights' layout, so the network is reconfigured in place."""
        self.memory_plan = plan
        unet = self.unet
        settings = self._runtime_settings(plan)
        if self.streamer is not None:
            self.streamer.reconfigure(lambda model: optimize_for_inference(model, settings))
        else:
            optimize_for_inference(unet, settings)
            if plan.stream_weights:
                self.streamer = WeightStreamer(unet, self.device, prefetch=plan.prefetch_units)
        if plan.vae_offload and self.vae_weights is None and self.device.type == "cuda":
            self.vae_weights = HostCopy(self.vae)
            self.vae_weights.leave()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def planning(self) -> PlanningConfig:
        return self.config.planning

    def enhance(self, path: str | os.PathLike, prompt: str = "a good video", save_dir: str | os.PathLike = "results",
                overwrite: bool = False, output: Optional[OutputOptions] = None, **settings: Any) -> EnhanceResult:
        """Enhance one video into `save_dir/<stem>.mp4` (plus `<stem>.json` with the settings).

        settings: the fields of `EnhanceOptions` (up_scale, target_fps, noise_aug, solver_mode,
        steps, cfg, s_cond, seed), with its defaults. `output`: codec, bit depth, frame folder,
        colour correction (venhancer.output_formats; default: the reference's mp4). A finished
        output (every requested output and the sidecar) is kept (result.skipped) unless overwrite.
        Raises VideoError for unusable input, ValueError for bad settings or an output that would
        replace the input, EnhanceError when the GPU runs out of memory.
        """
        return self.run(path, prompt, EnhanceOptions(**settings), save_dir, overwrite, output=output)

    def run(self, path: str | os.PathLike, prompt: str, options: EnhanceOptions,
            save_dir: str | os.PathLike = "results", overwrite: bool = False,
            video: Optional[Video] = None, output: Optional[OutputOptions] = None) -> EnhanceResult:
        """`enhance` with validated options. `video`: `path` already decoded by `read_video`
        (its frames are used as they are). Without it the input is probed and its frames are
        decoded batch by batch as the encoder takes them, so host memory is bounded by a batch,
        not by the clip (with a colour correction the input frames, at the input's size, are kept
        for the decoder). `output`: what is written (default: the reference's mp4)."""
        path = Path(path)
        # Window sharding: every process runs this in lockstep; a failure on one, up to denoising,
        # stops all (`_together`); only the writer creates, checks and writes outputs.
        writes = self.sharding is None or self.sharding.is_writer
        output = output or OutputOptions()
        targets = output.targets(path, Path(save_dir))
        out_path = targets[0]  # the video, or the frame folder when no video is written
        named = output_path_for(path, Path(save_dir), output.suffix)  # the names' stem and checks
        sidecar = output.sidecar_path(path, Path(save_dir))
        keep_existing = False
        with self._together() as skip:
            if writes:
                output.check_encoder()
                prepare_save_dir(Path(save_dir))
                for target in (*targets, sidecar):
                    if path.exists() and target.exists() and os.path.samefile(target, path):
                        raise ValueError(f"{path}: the output would overwrite the input; choose another save directory")
                check_output_names(named, frames=output.frames_dir)
                skip.value = is_finished(out_path, targets[1:], sidecar) and not overwrite
                if not skip.value:
                    remove_stale_partials(named, keep=(path,))
                # Resuming after a finished run (its sidecar there) with another output asked for
                # keeps the outputs that exist and writes the missing ones; outputs without a
                # sidecar are from a run that was stopped and are made again.
                keep_existing = not overwrite and sidecar.is_file()
        if skip.value:
            logger.info("%s: %s exists, skipping (use --overwrite to redo)", path.name, out_path)
            return EnhanceResult(path, out_path, sidecar if sidecar.exists() else None, True, prompt)

        timings: dict[str, float] = {}
        start = time.perf_counter()
        self.denoise_start_unix_time = None
        self.solver_step_seconds = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        plan: Optional[VideoPlan] = None
        phase = "reading"
        try:
            with torch.inference_mode():
                with self._together():
                    with self._phase("read", timings):
                        info = probe_video(path) if video is None else video.info
                    plan = plan_video(info, options, self.planning)
                    logger.info("%s: %s", path.name, plan.describe())
                    generator = torch.Generator(device=self.device).manual_seed(options.seed)
                    # The prompt on the worker while this thread encodes the frames (not in
                    # low-VRAM mode: the text encoder's 1.4 GB would sit beside the VAE's peak).
                    text = None
                    if self._worker is not None and not self.low_vram and self.sharding is None:
                        text = self._worker.submit(self._on_worker, self._encode_text, prompt, path)
                    phase = "encoding frames"
                    with self._phase("encode", timings):
                        if video is None:
                            batches: Iterable[np.ndarray] = iter_frames(info, batch=_FRAME_BATCH)
                        else:
                            batches = (video.frames[i:i + _FRAME_BATCH]
                                       for i in range(0, info.num_frames, _FRAME_BATCH))
                        kept: list[np.ndarray] = []
                        if output.color_fix != "none" and writes:
                            batches = _keeping(batches, kept)
                        z_key = self._encode(batches, plan, generator)
                    phase = "encoding the prompt"
                    with self._phase("text", timings):  # with the worker: the wait for it
                        if text is None:
                            y_cond, y_uncond = self._encode_text(prompt, path)
                        else:
                            y_cond, y_uncond = text.result()
                            if self.device.type == "cuda":
                                # made on the worker's stream, read on this one: their memory must
                                # not be reused by the worker before this stream is done with them
                                for emb in (y_cond, y_uncond):
                                    emb.record_stream(torch.cuda.current_stream(self.device))
                phase = "denoising"
                with self._phase("sample", timings), self._vae_offloaded():
                    x0 = self._denoise_within_budget(z_key, y_cond, y_uncond, plan, options, generator)
                if not writes:
                    return EnhanceResult(path, out_path, None, False, prompt, plan, timings)
                phase = "decoding"
                # The video is about to be replaced: an old sidecar would vouch for it should this
                # run stop before writing the new one (an output is finished when both exist).
                sidecar.unlink(missing_ok=True)
                with self._phase("decode_write", timings):
                    source = kept or None
                    timings["write_wait"] = self._decode_and_write(x0, plan, out_path, output, source,
                                                                   overwrite=not keep_existing)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                logger.info("%s: %s", path.name, str(exc).splitlines()[0] if str(exc) else "out of memory")
                torch.cuda.empty_cache()
            size = f" ({plan.width}x{plan.height}, {plan.out_frames} frames)" if plan is not None else ""
            where = f"on process {exc.rank}" if isinstance(exc, PeerOutOfMemory) else f"while {phase}"
            hint = "use --low_vram, " if self.device.type == "cuda" and not self.low_vram else ""
            raise EnhanceError(
                f"{path.name}: out of {self.device.type.upper()} memory {where}{size}: "
                f"{hint}lower --up_scale (e.g. 2), lower --target_fps, or enhance a shorter clip") from exc
        except MemoryError as exc:
            raise EnhanceError(f"{path.name}: out of host memory while {phase}: {exc or 'allocation failed'}") from exc
        timings["total"] = time.perf_counter() - start
        if self.device.type == "cuda":
            timings["peak_gpu_memory_reserved_GB"] = torch.cuda.max_memory_reserved(self.device) / 1e9
        _write_json_atomic(sidecar, self._sidecar(path, out_path, prompt, options, plan, timings, output))
        logger.info("%s: wrote %s in %.1f s", path.name, out_path, timings["total"])
        return EnhanceResult(path, out_path, sidecar, False, prompt, plan, timings)

    @contextmanager
    def _vae_offloaded(self) -> Iterator[None]:
        """With plans that offload it, the VAE waits in CPU memory while the network runs (a
        fallback inside may start offloading it)."""
        if self.vae_weights is not None:
            self.vae_weights.leave()
            torch.cuda.empty_cache()  # the encoder's full-resolution transients
        try:
            yield
        finally:
            if self.vae_weights is not None:
                if self.streamer is not None:
                    # The decode gets the memory of the network blocks still on the GPU.
                    self.streamer.release()
                    torch.cuda.empty_cache()
                self.vae_weights.visit(self.device)

    def _denoise_within_budget(self, z_key: torch.Tensor, y_cond: torch.Tensor, y_uncond: torch.Tensor,
                               plan: VideoPlan, options: EnhanceOptions, generator: torch.Generator) -> torch.Tensor:
        """`_denoise`; when it runs out of memory, again with the next smaller memory plan from
        the same random state (the same video), until the smallest plan fails too."""
        state = generator.get_state()
        while True:
            failed = None
            try:
                return self._denoise(z_key, y_cond, y_uncond, plan, options, generator)
            except torch.OutOfMemoryError as exc:
                smaller = next_plan(self.memory_plan)
                if smaller is None or self.sharding is not None:
                    raise
                failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # Outside the except block: the failed attempt's activations are released first.
            logger.warning("%s: out of memory with memory plan %r (%s); falling back to %r",
                           plan.input.path.name, self.memory_plan.name, failed, smaller.name)
            self.memory_fallbacks.append({"from": self.memory_plan.name, "to": smaller.name, "error": failed})
            self._use_plan(smaller)
            logger.info("%s", smaller.describe())
            generator.set_state(state)
            self.solver_step_seconds = []

    def _together(self):  # -> context manager yielding a venhancer.distributed.Agreement
        return solo() if self.sharding is None else self.sharding.together()

    @contextmanager
    def _phase(self, name: str, timings: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            # Kernels run asynchronously; without a sync the time lands in a later phase.
            torch.cuda.synchronize(self.device)
        timings[name] = time.perf_counter() - start
        logger.debug("%s took %.2f s", name, timings[name])

    def _bar(self, total: int, desc: str) -> tqdm | _ReportingBar:
        # disable=None: bars only on a terminal, so logs and pipes stay clean.
        bar = tqdm(total=total, desc=desc, unit="frame" if desc != "denoise" else "step",
                   disable=None if self.progress else True, leave=False, dynamic_ncols=True)
        return bar if self.progress_callback is None else _ReportingBar(bar, desc, total, self.progress_callback)

    def _encode(self, batches: Iterable[np.ndarray], plan: VideoPlan, generator: torch.Generator) -> torch.Tensor:
        """Key-frame latents (1, 4, n, h', w') of the resized, padded input frames (SPEC 1.1, 1.4, 1.6, 1.7).

        batches: the n input frames in order, a few at a time (uint8 RGB (b, h, w, 3))."""
        n = plan.input.num_frames
        lat_h, lat_w = plan.latent_size
        # Posterior noise for all frames up front: the latents do not depend on the batching.
        noise = torch.randn((n, self.vae.config.latent_channels, lat_h, lat_w), generator=generator,
                            device=self.device, dtype=torch.float32)
        latents = []
        started = time.perf_counter()
        begin = 0
        with self._bar(n, "encode") as bar:
            for frames in batches:
                batch = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
                x = batch.permute(0, 3, 1, 2).float() / 255 * 2 - 1
                x = F.interpolate(x, size=(plan.height, plan.width), mode="bilinear",
                                  align_corners=False, antialias=False)
                x = F.pad(x, plan.padding, value=1.0)
                latents.append(encode_frames(self.vae, x, noise=noise[begin:begin + x.shape[0]]))
                bar.update(x.shape[0])
                if logger.isEnabledFor(logging.DEBUG):  # the first batch carries one-time costs
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    logger.debug("encoded frames %d-%d at %.2f s", begin, begin + x.shape[0] - 1,
                                 time.perf_counter() - started)
                begin += x.shape[0]
        if begin != n:
            raise EnhanceError(f"{plan.input.path.name}: {begin} frames were decoded, {n} expected")
        return torch.cat(latents, dim=2)

    def _encode_text(self, prompt: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        if self._text_loaded is not None:
            _loaded(self._text_loaded, "text encoder")
        from venhancer.text_encoder import NEGATIVE_PROMPT, build_caption  # loaded by now (see above)

        self.text_weights.visit(self.device)
        try:
            with torch.inference_mode():  # thread-local: the worker thread needs its own
                emb, truncated = self.text_encoder.encode([build_caption(prompt), NEGATIVE_PROMPT])
        finally:
            self.text_weights.leave()
        if truncated[0]:
            logger.warning("%s: the caption (prompt + quality suffix) is longer than the text encoder's "
                           "77 tokens; the words past the limit are ignored", path.name)
        return emb[0:1], emb[1:2]

    def _denoise(self, z_key: torch.Tensor, y_cond: torch.Tensor, y_uncond: torch.Tensor, plan: VideoPlan,
                 options: EnhanceOptions, generator: torch.Generator) -> torch.Tensor:
        """SPEC 1.5, 1.9-1.11: repeated latents, noised key-frame hint, SDEdit start, guided sampling."""
        unet = self.unet  # with background_load: waits for it here, before denoising "starts"
        if self._worker is not None and self.device.type == "cuda":
            # Memory the worker freed (the text encoder's visit, the network's load) stays cached
            # for the worker's stream, where denoising cannot reuse it: give it back first.
            torch.cuda.empty_cache()
        shard = self.sharding
        if shard is not None:
            # Every process drew the same noise and computed the same values; rank 0's are shared
            # anyway, so the inputs are identical even where GPU kernels are not bit-reproducible.
            z_key, y_cond, y_uncond = shard.share(z_key, y_cond, y_uncond)
            shard.begin(plan.denoise_steps)
        try:
            z = expand_latents(z_key, plan.k)
            hint, t_hint = noise_hint(z_key, options.noise_aug, generator=generator)
            mask = torch.tensor([mask_cond(plan.input.num_frames, plan.k)], dtype=torch.long, device=self.device)
            s_cond = torch.full((1,), options.s_cond, device=self.device)
            cond = {"y": y_cond, "hint": hint, "mask_cond": mask, "s_cond": s_cond, "t_hint": t_hint}
            uncond = {**cond, "y": y_uncond}
            x_T = start_latent(z, generator=generator)
            # Wall-clock time at which denoising starts: the start-up benchmark reads it.
            self.denoise_start_unix_time = time.time()
            logger.info("denoising: %d solver steps x %d windows", plan.denoise_steps, len(plan.windows))
            last = time.perf_counter()

            def step_done(i: int, total: int) -> None:
                nonlocal last
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the step's kernels, not just their launch
                now = time.perf_counter()
                # The first step includes one-time work (kernel compilation on a cold cache).
                self.solver_step_seconds.append(now - last)
                last = now
                bar.update(1)

            with self._bar(plan.denoise_steps, "denoise") as bar:
                x0 = sample(unet, x_T, cond, uncond, solver_mode=options.solver_mode, steps=options.steps,
                            guide_scale=options.cfg, guide_rescale=GUIDE_RESCALE, windows=plan.windows,
                            generator=generator, callback=step_done,
                            evaluate=self.local_evaluator if shard is None else shard.evaluate)
        except Exception as exc:
            if shard is not None:
                shard.finish(exc)  # the other processes learn of it, then all stop
            raise
        if shard is not None:
            shard.finish()
        return x0

    def _decode_and_write(self, x0: torch.Tensor, plan: VideoPlan, out_path: Path,
                          output: Optional[OutputOptions] = None, source: Optional[Sequence[np.ndarray]] = None,
                          overwrite: bool = True) -> float:
        """SPEC 1.12-1.13: tiled decode, crop, [0,1] clamp, *255, truncate to uint8, stream to H.264.
        `output` may ask for other codecs and bit depths, a frame folder, and a colour correction
        towards `source`, the input frames (h, w, 3) (venhancer.output_formats, venhancer.color_fix).

        Frames are cropped and quantised on the device (a quarter of the bytes to copy back) and
        handed to ffmpeg by a writer thread, so the GPU decodes the next window meanwhile.
        Returns the seconds this thread waited for the writer (ffmpeg's final flush included):
        what the encode adds to the decode, the part of the phase a faster GPU would not remove."""
        waited = 0.0

        def wait_for(job: Future) -> None:
            nonlocal waited
            start = time.perf_counter()
            job.result()  # errors of the writer surface here
            waited += time.perf_counter() - start

        left, _, top, _ = plan.padding
        planning = self.planning
        audio = plan.input.path if plan.input.has_audio else None
        output = output or OutputOptions()
        video_path = output.video_path(plan.input.path, out_path.parent)
        frames_path = output.frames_path(plan.input.path, out_path.parent)
        if not overwrite:  # resuming: an output that exists is kept
            video_path, frames_path = [p if p is not None and not p.exists() else None
                                       for p in (video_path, frames_path)]
        matcher = None
        if output.color_fix != "none":
            if source is None:
                source = [frame for batch in iter_frames(plan.input, batch=_FRAME_BATCH) for frame in batch]
            matcher = ColorMatcher(output.color_fix, source, plan.k, (plan.height, plan.width), self.device)
        with OutputSink(output, video_path, frames_path, plan.out_rate, plan.width, plan.height,
                        audio_source=audio, sar=plan.input.sar) as writer, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="venhancer-writer") as pool, \
                self._bar(plan.out_frames, "decode") as bar:
            pending: Future | None = None
            done = 0
            set_decoder_frame_chunk(self.vae, self.memory_plan.decode_frame_chunk)
            for chunk in decode_tiled(self.vae, x0, tile=planning.vae_tile, tile_overlap=planning.vae_tile_overlap,
                                      frame_window=planning.vae_frame_window,
                                      frame_overlap=planning.vae_frame_overlap, to_cpu=False):
                chunk = chunk[:, :, top:top + plan.height, left:left + plan.width]
                frames = chunk.float() * 0.5 + 0.5
                if matcher is not None:
                    frames = matcher(frames, done)
                pixels = writer.quantise(frames)  # on the device; uint8 truncates (SPEC 1.12)
                if pending is not None:
                    wait_for(pending)  # one chunk in flight: bounded memory
                pending = pool.submit(writer.append, pixels)
                done += chunk.shape[0]
                bar.update(chunk.shape[0])
            if pending is not None:
                wait_for(pending)
            if writer.num_frames != plan.out_frames:
                raise RuntimeError(f"decoder produced {writer.num_frames} frames, expected {plan.out_frames}")
            closing = time.perf_counter()
        return waited + time.perf_counter() - closing  # leaving the block closes the writer

    def _sidecar(self, path: Path, out_path: Path, prompt: str, options: EnhanceOptions, plan: VideoPlan,
                 timings: dict[str, float], output: Optional[OutputOptions] = None) -> dict[str, Any]:
        info = plan.input
        return {
            "tool": f"venhancer {__version__}",
            "input": {"path": str(path), "width": info.width, "height": info.height, "fps": info.fps,
                      "frames": info.num_frames, "audio": info.audio_codec, "color_matrix": info.color_matrix,
                      "sar": str(info.sar)},
            "output": {"path": str(out_path), "width": plan.width, "height": plan.height, "fps": plan.out_fps,
                       "frames": plan.out_frames,
                       **(output or OutputOptions()).record(plan.width, plan.height, path, out_path.parent)},
            "prompt": prompt,
            "settings": asdict(options),
            "seed": options.seed,
            "model": {"version": self.version, "checkpoint": str(self.unet_path),
                      "device": str(self.device), "precision": self.precision,
                      "dtype": str(self.dtype).replace("torch.", ""),
                      "low_vram": self.low_vram, "shared_branch_prefix": self.share_branch_prefix,
                      "background_load": self._worker is not None},
            "memory": {"budget_gb": self.budget_gb, "plan": self.memory_plan.to_json(),
                       "fallbacks": list(self.memory_fallbacks),
                       "streamed_block_loads": None if self.streamer is None else self.streamer.loads,
                       "peak_host_ram_GB": round(peak_host_gb(), 3)},
            "plan": {"inserted_frames": plan.k, "padding_lrtb": list(plan.padding),
                     "latent_size": list(plan.latent_size), "windows": [list(w) for w in plan.windows],
                     "network_evals": plan.network_evals, "start_t": T_MAX},
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "model_load_s": {k: round(v, 3) for k, v in self.load_timings.items()},
            "denoise_start_unix_time": self.denoise_start_unix_time,
            "solver_steps_s": [round(t, 3) for t in self.solver_step_seconds],
            "distributed": None if self.sharding is None else self.sharding.describe(),
        }
