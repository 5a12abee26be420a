"""The seed clip end to end through the CLI, in a fresh process, on random-weight models.

Called by `bench.py pipeline`. Writes full-size random-weight model files (network fp16
safetensors, the ViT-H-14 text tower, an SVD-config temporal VAE) to a scratch folder, then times
`enhance_a_video.py` on inputs/000000.mp4 (up_scale 4, target 24 fps, noise_aug 250) from process
start. The per-phase timings, the peak GPU memory and the moment denoising started come from the
output's JSON sidecar. `--steps N` runs the normal solver with N steps (the fast mode's 14 steps
take ~14 window passes x 8 windows); the table then also gives the 14-step figure, scaled from
the measured solver steps (the first step once, with any kernel compilation, then the later
steps' median for the remaining 13), and labels it as such.

BENCH_SMOKE=1 runs the same flow on the CPU with the tiny test models (checks the script only).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
FAST_MODE_STEPS = 14
WARM_RUNS = 3  # start-up varies by a few seconds between runs on a shared machine


def write_full_size_models(outdir: Path) -> Path:
    """Random-weight stand-ins of the three real models, in the formats the tool loads."""
    from bench import build_model, svd_vae

    from venhancer.text_encoder import TextEncoder, TextModelConfig

    unet = build_model(torch.float16)
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, str(outdir / "unet.safetensors"))
    del unet
    torch.cuda.empty_cache()
    text = TextEncoder(TextModelConfig.for_arch("ViT-H-14")).half()
    save_file({k: v.detach().contiguous() for k, v in text.state_dict().items()}, str(outdir / "text_encoder.safetensors"))
    del text
    svd_vae().half().save_pretrained(outdir / "vae", variant="fp16")
    config = {
        "checkpoints": {"local_dir": ".", "paths": {"v1": "unet.safetensors", "v2": "unet.safetensors"}},
        "text_encoder": {"path": "text_encoder.safetensors"},
        "vae": {"path": "vae", "variant": "fp16"},
    }
    path = outdir / "config.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def warm_start_seconds(cmd: list[str], env: dict[str, str] | None = None, timeline: Path | None = None,
                       python_flags: tuple[str, ...] = ()) -> float:
    """Process start to the first denoising step of a second run of the same command, as in a
    shell loop over a folder: weights, the fp16 network copy and the compiled Triton kernels are
    on local disk by then. The run is stopped once denoising starts. `timeline`: run it with
    `--log_level debug` and save its log there (every line stamped with seconds since start)."""
    start = time.time()
    extra = ["--overwrite", *(["--log_level", "debug"] if timeline else [])]
    # cmd[0] is the interpreter: flags such as -X importtime go right after it.
    proc = subprocess.Popen([cmd[0], *python_flags, *cmd[1:], *extra], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "denoising:" in line:
                return time.time() - start
        raise RuntimeError(f"second run ended (exit {proc.wait()}) before denoising started")
    finally:
        proc.kill()
        proc.wait()
        if timeline is not None:
            timeline.write_text("".join(lines))


def run_pipeline(args) -> int:
    out_dir = Path(os.environ.get("OUT", "."))
    scratch = Path(tempfile.mkdtemp(prefix="venhancer-bench-"))
    t0 = time.perf_counter()
    if SMOKE:
        from make_tiny_models import make_clip, make_tiny_models

        config = make_tiny_models(scratch)
        clip = make_clip(scratch / "clip.mp4")
        flags = ["--up_scale", "2", "--target_fps", "24"]
    else:
        config = write_full_size_models(scratch)
        clip = ROOT / "inputs" / "000000.mp4"
        flags = ["--up_scale", "4", "--target_fps", "24"]
    write_s = time.perf_counter() - t0
    save_dir = scratch / "results"
    cli_args = ["--input_path", str(clip), "--config", str(config), "--noise_aug", "250", "--solver_mode", "normal",
                "--steps", str(args.steps), "--prompt", "a red ball bouncing over a checkerboard", *flags,
                *(["--low_vram"] if args.low_vram else [])]
    if args.nproc:
        return run_scaling(cli_args, scratch, out_dir, args)
    if getattr(args, "cap_gb", None):
        return run_caps(cli_args, scratch, out_dir, args)
    cmd = [sys.executable, str(ROOT / "enhance_a_video.py"), *cli_args, "--save_dir", str(save_dir)]
    if args.startup_only:
        return run_startup(cmd, out_dir, write_s)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    (out_dir / "pipeline_stderr.log").write_text(proc.stderr[-200_000:])
    if proc.returncode != 0:
        print(proc.stderr[-5000:], file=sys.stderr)
        return proc.returncode
    sidecar = json.loads((save_dir / (clip.stem + ".json")).read_text())
    warm_startup = warm_start_seconds(cmd, timeline=out_dir / "warm_start_timeline.log")
    # The same without the GPU warm-up thread (venhancer.warmup), for its effect.
    warm_startup_no_warmup = warm_start_seconds(cmd, env=dict(os.environ, VENHANCER_CUDA_WARMUP="0"))
    timings = sidecar["timings_s"]
    # The first solver step carries the one-time work (Triton compilation on a cold cache): the
    # fast-mode estimate takes it once and the later steps' median for the other 13.
    steps = sidecar["solver_steps_s"]
    per_step = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
    result = {
        "gpu": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "steps_run": args.steps,
        "low_vram": args.low_vram,
        "model_files_write_s": write_s,
        "process_wall_s": wall,
        "startup_to_denoise_s": sidecar["denoise_start_unix_time"] - start,
        "warm_startup_to_denoise_s": warm_startup,
        "warm_startup_without_cuda_warmup_s": warm_startup_no_warmup,
        "timings_s": timings,
        "model_load_s": sidecar.get("model_load_s", {}),
        "background_load": sidecar["model"].get("background_load", False),
        "solver_steps_s": steps,
        "per_solver_step_s": per_step,
        "fast_mode_total_s_scaled": wall - timings["sample"] + steps[0] + per_step * (FAST_MODE_STEPS - 1),
        "plan": sidecar["plan"],
        "output": sidecar["output"],
    }
    (out_dir / "bench_pipeline.json").write_text(json.dumps(result, indent=1))
    print(f"\nSeed clip end to end on {result['gpu']}{' (--low_vram)' if args.low_vram else ''} ({sidecar['output']['width']}x{sidecar['output']['height']}, "
          f"{sidecar['output']['frames']} frames, {len(sidecar['plan']['windows'])} windows), {args.steps} solver steps measured:")
    print(f"{'phase':<34}{'seconds':>10}")
    print(f"{'process start -> denoising starts':<34}{result['startup_to_denoise_s']:>10.1f}")
    print(f"{'  same, second run (warm caches)':<34}{warm_startup:>10.1f}")
    print(f"{'  same, without the GPU warm-up':<34}{warm_startup_no_warmup:>10.1f}")
    # With the CLI's background load the network and the text encoder load on a worker thread
    # while the VAE loads and the video is read and encoded; the start-up then holds only the
    # wait for them (wait_for_network, and the text phase's wait).
    background = sidecar["model"].get("background_load", False)
    in_background = ("load_network", "load_text_encoder") if background else ()
    for name, seconds in result["model_load_s"].items():
        label = f"  {name}{' (worker thread)' if name in in_background else ''}"
        print(f"{label:<34}{seconds:>10.1f}")
    # Whatever the sidecar does not time: interpreter start, imports, CUDA start, planning.
    foreground = sum(v for k, v in result["model_load_s"].items() if k not in in_background)
    other = result["startup_to_denoise_s"] - foreground - sum(timings[p] for p in ("read", "encode", "text"))
    result["startup_other_s"] = other
    print(f"{'  imports, CUDA start, the rest':<34}{other:>10.1f}")
    for phase in ("read", "encode", "text", "sample", "decode_write", "total"):
        print(f"{phase:<34}{timings[phase]:>10.1f}")
        if phase == "decode_write" and "write_wait" in timings:
            print(f"{'  of which waiting for the writer':<34}{timings['write_wait']:>10.1f}")
    print(f"{'process wall time':<34}{wall:>10.1f}")
    print(f"{'first solver step (all windows)':<34}{steps[0]:>10.1f}")
    print(f"{'later solver steps, median':<34}{per_step:>10.1f}")
    print(f"{'fast mode (14 steps), scaled':<34}{result['fast_mode_total_s_scaled']:>10.1f}")
    peak = timings.get("peak_gpu_memory_reserved_GB")
    if peak is not None:
        print(f"{'peak GPU memory reserved (GB)':<34}{peak:>10.1f}")
    (out_dir / "bench_pipeline.json").write_text(json.dumps(result, indent=1))
    return 0


def requirements_only_env(dest: Path) -> tuple[dict[str, str], list[str]]:
    """An environment in which Python sees only what requirements.txt pulls in: symlinks in
    `dest` to every distribution it names and, recursively, to what those require, as installed
    here; to be run with `python -S` (no site-packages) and PYTHONPATH=dest. A machine that also
    carries other packages can start much slower: diffusers imports peft and transformers (and
    through them scikit-learn) whenever they are installed. Returns the environment and the
    names of required distributions that are not installed here."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (ROOT / "requirements.txt").read_text().splitlines()
    todo = [Requirement(line.split("#")[0].strip()).name for line in lines if line.split("#")[0].strip()]
    seen: set[str] = set()
    missing: list[str] = []
    dest.mkdir(parents=True, exist_ok=True)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            link = dest / top
            if (base / top).exists() and not top.endswith(".pth") and not link.is_symlink():
                link.symlink_to(base / top)
    return dict(os.environ, PYTHONPATH=str(dest)), sorted(missing)


def run_startup(cmd: list[str], out_dir: Path, write_s: float) -> int:
    """Start-up only (~1-2 minutes of GPU time instead of ~5): process start to the first
    denoising step, a first run (fills the bytecode and Triton caches) then warm runs as in a
    shell loop, with the debug timeline, without the GPU warm-up thread, and with Python's
    `-X importtime` (its report saved to import_times.log); then warm runs in an environment
    with only the requirements installed (`requirements_only_env`)."""
    first = warm_start_seconds(cmd)
    warm = [warm_start_seconds(cmd, timeline=out_dir / "warm_start_timeline.log")]
    warm += [warm_start_seconds(cmd) for _ in range(WARM_RUNS - 1)]
    no_warmup = warm_start_seconds(cmd, env=dict(os.environ, VENHANCER_CUDA_WARMUP="0"))
    imports = warm_start_seconds(cmd, timeline=out_dir / "import_times.log", python_flags=("-X", "importtime"))
    env, missing = requirements_only_env(Path(tempfile.mkdtemp(prefix="venhancer-requirements-only-")))
    only = [warm_start_seconds(cmd, env=env, python_flags=("-S",), timeline=out_dir / "requirements_only_timeline.log")]
    only += [warm_start_seconds(cmd, env=env, python_flags=("-S",)) for _ in range(WARM_RUNS)]
    result = {"gpu": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
              "model_files_write_s": write_s, "first_run_to_denoise_s": first, "warm_to_denoise_s": warm,
              "warm_median_s": statistics.median(warm), "warm_without_cuda_warmup_s": no_warmup,
              "warm_with_importtime_s": imports, "requirements_only_first_s": only[0],
              "requirements_only_warm_s": only[1:], "requirements_only_median_s": statistics.median(only[1:]),
              "requirements_not_installed": missing}
    (out_dir / "bench_startup.json").write_text(json.dumps(result, indent=1))
    print(f"\nStart-up of the seed clip's command on {result['gpu']} (process start -> denoising starts):")
    print(f"{'first run (fills the caches)':<40}{first:>8.1f} s")
    print(f"{'warm runs (as in a shell loop), median':<40}{result['warm_median_s']:>8.1f} s "
          f"({', '.join(f'{t:.1f}' for t in warm)})")
    print(f"{'warm, without the GPU warm-up thread':<40}{no_warmup:>8.1f} s")
    print(f"{'warm, under -X importtime':<40}{imports:>8.1f} s (import_times.log)")
    print(f"{'warm, only the requirements installed':<40}{result['requirements_only_median_s']:>8.1f} s "
          f"({', '.join(f'{t:.1f}' for t in only[1:])}; first {only[0]:.1f})"
          + (f"; not installed here: {', '.join(missing)}" if missing else ""))
    return 0


class GpuMemoryPeaks:
    """Highest memory in use on each GPU while the block runs, polled from nvidia-smi every
    0.2 s (all processes on the GPU and their CUDA contexts included): the per-GPU peak of a
    torchrun run, whose sidecar holds only rank 0's allocator peak. Empty without nvidia-smi."""

    def __init__(self):
        self.peaks_mib: dict[int, int] = {}
        self._proc = None
        self._thread = None

    def __enter__(self):
        try:
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                           "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi (the CPU smoke run)
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            fields = line.split(",")
            if len(fields) == 2 and fields[0].strip().isdigit() and fields[1].strip().isdigit():
                index, used = int(fields[0]), int(fields[1])
                self.peaks_mib[index] = max(used, self.peaks_mib.get(index, 0))

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)
        return False


def run_scaling(cli_args: list[str], scratch: Path, out_dir: Path, args) -> int:
    """The seed clip once per process count in `args.nproc` (one plain process for 1, torchrun
    for more), one after the other on the same model files and kernel cache: per-phase times of
    rank 0 (which decodes and writes), the denoising speed-up over the first count, each GPU's peak
    memory in use, and whether every run wrote the same video (MD5 of the MP4)."""
    runs = []
    for count in args.nproc:
        save_dir = scratch / f"results_{count}"
        launcher = [] if count == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(count),
                                          "--master_port", str(29400 + count)]
        cmd = [sys.executable, *launcher, str(ROOT / "enhance_a_video.py"), *cli_args, "--save_dir", str(save_dir)]
        # On the CPU (smoke run) results depend on the thread count, which torchrun sets to 1.
        env = dict(os.environ, OMP_NUM_THREADS="1") if SMOKE else None
        start = time.time()
        with GpuMemoryPeaks() as memory:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.time() - start
        (out_dir / f"pipeline_nproc{count}_stderr.log").write_text(proc.stderr[-200_000:])
        if proc.returncode != 0:
            print(proc.stderr[-5000:], file=sys.stderr)
            return proc.returncode
        stem = Path(cli_args[cli_args.index("--input_path") + 1]).stem
        sidecar = json.loads((save_dir / f"{stem}.json").read_text())
        steps = sidecar["solver_steps_s"]
        runs.append({
            "processes": count,
            "process_wall_s": wall,
            "startup_to_denoise_s": sidecar["denoise_start_unix_time"] - start,
            "timings_s": sidecar["timings_s"],
            "solver_steps_s": steps,
            # The first step carries any compilation: the later steps' median when there are any.
            "per_solver_step_s": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
            "gpu_peak_memory_used_GB": {str(i): mib * 2**20 / 1e9 for i, mib in sorted(memory.peaks_mib.items())},
            "distributed": sidecar.get("distributed"),
            "output_md5": hashlib.md5((save_dir / f"{stem}.mp4").read_bytes()).hexdigest(),
        })
    base = runs[0]
    for run in runs:
        run["denoise_step_speedup"] = base["per_solver_step_s"] / run["per_solver_step_s"]
        run["output_identical_to_first"] = run["output_md5"] == base["output_md5"]
    result = {"gpu": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "gpus_visible": torch.cuda.device_count(),
              "torch": torch.__version__, "steps_run": args.steps, "low_vram": args.low_vram, "runs": runs}
    (out_dir / "bench_pipeline_scaling.json").write_text(json.dumps(result, indent=1))
    print(f"\nSeed clip on {result['gpu']} x {result['gpus_visible']}, {args.steps} solver steps per run, "
          f"one run per process count (speed-up: later solver steps against {base['processes']} process):")
    print(f"{'processes':>9} {'start->denoise':>14} {'encode':>7} {'denoise':>8} {'per step':>9} {'speed-up':>9} "
          f"{'decode+write':>13} {'wall':>7}  peak GB per GPU (nvidia-smi)  same video")
    for run in runs:
        t = run["timings_s"]
        peaks = " ".join(f"{v:.1f}" for v in run["gpu_peak_memory_used_GB"].values()) or "-"
        print(f"{run['processes']:>9} {run['startup_to_denoise_s']:>14.1f} {t['encode']:>7.1f} {t['sample']:>8.1f} "
              f"{run['per_solver_step_s']:>9.2f} {run['denoise_step_speedup']:>8.2f}x {t['decode_write']:>13.1f} "
              f"{run['process_wall_s']:>7.1f}  {peaks:<28} {'yes' if run['output_identical_to_first'] else 'NO'}")
    return 0 if all(run["output_identical_to_first"] for run in runs) else 1


def _run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, str, float, float]:
    """Exit code, stderr, wall seconds and the child's own peak resident memory in GB
    (ru_maxrss, page-locked host buffers included)."""
    start = time.time()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - start
        err.seek(0)
        stderr = err.read()
    return proc.returncode, stderr, wall, usage.ru_maxrss * 1024 / 1e9


def _max_level_difference(a: Path, b: Path) -> int:
    from venhancer.video_io import read_video

    x, y = read_video(a).frames, read_video(b).frames
    if x.shape != y.shape:
        return 255
    return int(abs(x.astype("int16") - y.astype("int16")).max())


def _max_frame_folder_difference(a: Path, b: Path) -> float:
    """Largest difference, in 8-bit levels, between two `--frames_dir` folders of 16-bit PNGs
    (the frames before the video encoder, which can turn a one-level difference into many)."""
    from torchvision.io import ImageReadMode, read_image

    names = sorted(p.name for p in a.glob("*.png"))
    if names != sorted(p.name for p in b.glob("*.png")) or not names:
        return 255.0
    largest = max(int((read_image(str(a / n), ImageReadMode.RGB).int() - read_image(str(b / n), ImageReadMode.RGB).int())
                      .abs().max()) for n in names)
    return round(largest / 257, 2)  # 65535 / 255 = 257 sixteen-bit steps per 8-bit level


def run_caps(cli_args: list[str], scratch: Path, out_dir: Path, args) -> int:
    """The seed clip uncapped (the default plan), then once per cap in `args.cap_gb`, each in its
    own process with the allocator capped for the whole run (capped_cli.py): whether it finished,
    the plan it ran (and any fallback), its time against the uncapped run, the peak GPU memory
    reserved, the peak host RAM, and whether it wrote the same video (MD5 of the MP4, else the
    largest difference in 8-bit levels of the decoded frames)."""
    stem = Path(cli_args[cli_args.index("--input_path") + 1]).stem
    cli_args = [*cli_args, "--frames_dir"]  # lossless frames too: the plans' difference before encoding
    runs = []
    for cap in [None, *args.cap_gb]:
        save_dir = scratch / f"results_cap{cap or 0:g}"
        if cap is None:
            cmd = [sys.executable, str(ROOT / "enhance_a_video.py"), *cli_args, "--save_dir", str(save_dir)]
            env = dict(os.environ)
        else:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "capped_cli.py"), *cli_args, "--save_dir", str(save_dir)]
            env = dict(os.environ, VENHANCER_MEMORY_CAP_GB=str(cap))
        code, stderr, wall, host_gb = _run_measured(cmd, env)
        (out_dir / f"pipeline_cap{cap or 0:g}_stderr.log").write_text(stderr[-200_000:])
        run = {"cap_gb": cap, "finished": code == 0, "exit_code": code, "process_wall_s": wall, "peak_host_ram_GB": host_gb}
        sidecar_path, video = save_dir / f"{stem}.json", save_dir / f"{stem}.mp4"
        if code == 0 and sidecar_path.exists():
            sidecar = json.loads(sidecar_path.read_text())
            steps = sidecar["solver_steps_s"]
            per_step = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
            timings = sidecar["timings_s"]
            run.update({
                "plan": sidecar["memory"]["plan"]["name"],
                "fallbacks": sidecar["memory"]["fallbacks"],
                "timings_s": timings,
                "solver_steps_s": steps,
                "fast_mode_total_s_scaled": wall - timings["sample"] + steps[0] + per_step * (FAST_MODE_STEPS - 1),
                "peak_gpu_memory_reserved_GB": timings.get("peak_gpu_memory_reserved_GB"),
                "output_md5": hashlib.md5(video.read_bytes()).hexdigest(),
                "video": str(video),
            })
        else:
            run["error"] = [line for line in stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        runs.append(run)
    base = runs[0]
    for run in runs:
        if run["finished"] and base["finished"]:
            run["ratio_wall"] = run["process_wall_s"] / base["process_wall_s"]
            run["ratio_fast_mode_scaled"] = run["fast_mode_total_s_scaled"] / base["fast_mode_total_s_scaled"]
            same = run["output_md5"] == base["output_md5"]
            run["output_identical"] = same
            run["max_level_difference"] = 0 if same else _max_level_difference(Path(base["video"]), Path(run["video"]))
            frames = [Path(r["video"]).with_name(f"{stem}_frames") for r in (base, run)]
            run["max_level_difference_before_encoding"] = _max_frame_folder_difference(*frames)
    result = {"gpu": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__,
              "steps_run": args.steps, "runs": runs}
    (out_dir / "bench_pipeline_caps.json").write_text(json.dumps(result, indent=1))
    print(f"\nSeed clip on {result['gpu']} under GPU memory caps, {args.steps} solver steps per run "
          f"(ratio: against the uncapped run; 14-step: the fast mode's time scaled from the measured steps):")
    print(f"{'cap GB':>7} {'done':>5} {'plan':<24} {'wall s':>7} {'ratio':>6} {'14-step s':>10} {'ratio':>6} "
          f"{'GPU peak GB':>12} {'host peak GB':>13}  same video")
    for run in runs:
        cap = "none" if run["cap_gb"] is None else f"{run['cap_gb']:g}"
        if not run["finished"]:
            print(f"{cap:>7} {'NO':>5} {'-':<24} {run['process_wall_s']:>7.1f} {'':>6} {'':>10} {'':>6} {'':>12} "
                  f"{run['peak_host_ram_GB']:>13.1f}  {run['error'][0][:80]}")
            continue
        plan = run["plan"] + (" (fallback)" if run["fallbacks"] else "")
        peak = run["peak_gpu_memory_reserved_GB"]
        same = ("identical" if run.get("output_identical") else
                f"max {run.get('max_level_difference')} levels ({run.get('max_level_difference_before_encoding')} "
                f"before encoding)") if "output_identical" in run else "-"
        print(f"{cap:>7} {'yes':>5} {plan:<24} {run['process_wall_s']:>7.1f} {run.get('ratio_wall', float('nan')):>5.2f}x "
              f"{run['fast_mode_total_s_scaled']:>10.1f} {run.get('ratio_fast_mode_scaled', float('nan')):>5.2f}x "
              f"{(peak if peak is not None else float('nan')):>12.1f} {run['peak_host_ram_GB']:>13.1f}  {same}")
    return 0 if all(run["finished"] for run in runs) else 1
