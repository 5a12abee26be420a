"""GPU benchmarks of VEnhancer (random weights: same cost as the real ones, no download).

    python benchmarks/bench.py forward  [--frames 31 40] [--ablations] [--profile] [--out bench_forward.json]
    python benchmarks/bench.py vae      [--out bench_vae.json]
    python benchmarks/bench.py matmul   [--out bench_matmul.json]
    python benchmarks/bench.py pipeline [--steps 2] [--low_vram] [--startup_only] [--cap_gb 23 15 11 7]

`forward`: one network evaluation of both guidance branches for a temporal window at the seed
clip's latent size (162x240), for the plain path (the reference's way: fp16 weights under fp16
autocast, PyTorch's default SDPA kernel, branches one after the other) and for our optimized
path, in the same process on the same weights; plus ablations of each optimization, FLOPs
(torch.utils.flop_counter), the achieved rate, peak memory, and the optimized output's error
against the plain one. `optimized_shared_prefix` is the pipeline's way (both branches through
`forward_branches`: the layers before the first cross-attention computed once; its TFLOP/s use
the FLOPs it performs), `optimized_low_vram` the `--low_vram` preset.

`vae`: the temporal VAE (Stable Video Diffusion's config) as diffusers runs it (fp16) and as
`optimize_vae` runs it: one decode tile (5 frames of latent 72x128, what the tiled decode calls
282 times for the seed clip) and one encoded 1296x1920 frame (49 per seed clip).

`matmul`: the fused Triton matmuls (GEGLU projection with its gate; Linear + residual add) against
cuBLAS and a separate pass, at the network's shapes.

`pipeline`: the seed clip (49 frames 720x480 at 8 fps, up_scale 4, target 24 fps, fast mode)
end to end through the CLI in a fresh process, with random-weight checkpoints written to local
disk first; the per-phase timings come from the output's JSON sidecar.

Prints a table last and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# As the CLI does, before CUDA starts: the reserved-memory figures are the tool's.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from venhancer.models import UNetConfig, VEnhancerUNet  # noqa: E402
from venhancer.runtime import InferenceOptions, optimize_for_inference  # noqa: E402

LATENT = (162, 240)  # seed clip: 1254x1880 output padded to 1296x1920 -> latent 162x240
# BENCH_SMOKE=1 runs the same code on the CPU with a tiny network (checks the script, not speed).
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
if SMOKE:
    LATENT = (10, 16)
MATMUL_SIZE = 8192


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fan-in scaled Gaussian weights (the reference vectors' rule, drawn on the GPU)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1, generator=gen)
        else:
            p.normal_(1.0, 0.1, generator=gen)


def build_model(dtype: torch.dtype) -> VEnhancerUNet:
    with torch.device("meta"):
        model = VEnhancerUNet(UNetConfig(dim=32, context_dim=1024, num_heads=2, head_dim=16) if SMOKE else UNetConfig())
    model = model.to_empty(device=DEVICE).to(dtype)
    random_init_(model)
    return model.eval().requires_grad_(False)


def window_inputs(frames: int, k: int = 2, seed: int = 1):
    """One temporal window of the seed clip (k=2: every third frame is a key frame), both
    guidance branches' inputs."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    h, w = LATENT
    n_key = 49
    x = torch.randn(1, 4, frames, h, w, device=DEVICE, generator=gen)
    hint = torch.randn(1, 4, n_key, h, w, device=DEVICE, generator=gen)
    mask = torch.tensor([[j // (k + 1) + 3 if j % (k + 1) == 0 else -1 for j in range(frames)]], device=DEVICE)
    y_c = torch.randn(1, 77, 1024, device=DEVICE, generator=gen)
    y_u = torch.randn(1, 77, 1024, device=DEVICE, generator=gen)
    common = dict(hint=hint, t_hint=torch.tensor([249], device=DEVICE), s_cond=torch.tensor([8], device=DEVICE), mask_cond=mask)
    t = torch.tensor([599], device=DEVICE)
    return x, t, y_c, y_u, common


def cuda_time(fn, reps: int, warmup: bool = True) -> list[float]:
    if SMOKE:
        fn()
        return [1.0] * reps
    if warmup:  # kernel selection, lazy compilation
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def reset_peak() -> None:
    if not SMOKE:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(reserved: bool = False) -> float:
    if SMOKE:
        return 0.0
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 1e9


def matmul_rate() -> float:
    """The bf16 matmul rate (8192^3): the fastest of 5 short trials (the burst rate, ~790
    TFLOP/s on an H100). Longer runs settle at the power limit (~680 after 0.5 s of warm-up on
    an H100), which would flatter the rate target; a single short median read 752-793."""
    if SMOKE:
        return 1.0
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=DEVICE, dtype=torch.bfloat16)
    t = min(statistics.median(cuda_time(lambda: a @ b, 10)) for _ in range(5))
    return 2 * MATMUL_SIZE**3 / t / 1e12




def run_forward(args) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(torch.float32 if SMOKE else torch.float16)
    weights_gb = 0.0 if SMOKE else torch.cuda.memory_allocated() / 1e9
    results = {"gpu": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "weights_GB": weights_gb, "latent": LATENT, "windows": {}}
    results["bf16_matmul_TFLOPs"] = matmul_rate()
    inputs = {frames: window_inputs(frames) for frames in args.frames}

    def calls(frames):
        x, t, y_c, y_u, common = inputs[frames]
        batched_common = {k: torch.cat([v, v]) for k, v in common.items()}

        def plain():
            with torch.autocast(DEVICE, dtype=torch.float16 if not SMOKE else torch.bfloat16):
                return [model(x, t, y, **common) for y in (y_c, y_u)]

        def sequential():
            return [model(x, t, y, **common) for y in (y_c, y_u)]

        def batched():
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y_c, y_u]), **batched_common)
            return list(out.split(1))

        def shared():  # the pipeline's way: the layers before the first cross-attention once for both
            return model.forward_branches(x, t, [y_c, y_u], **common)

        return plain, sequential, batched, shared

    # Plain path first, on the untouched model: PyTorch's default kernels, separate GroupNorm
    # and SiLU, contiguous layout, fp16 autocast.
    refs = {}
    for frames in args.frames:
        plain, _, _, shared = calls(frames)
        row = results["windows"][frames] = {}
        reset_peak()
        refs[frames] = plain()
        row["plain_s"] = cuda_time(plain, args.reps if frames == args.frames[0] else 1)
        row["plain_peak_alloc_GB"] = peak_gb()
        row["plain_peak_reserved_GB"] = peak_gb(reserved=True)
        x, t, y_c, _, common = inputs[frames]
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(DEVICE, dtype=torch.float16 if not SMOKE else torch.bfloat16):
                model(x, t, y_c, **common)
        row["flops_per_branch"] = counter.get_total_flops()
        print(f"plain {frames} frames: {row['plain_s']} s, peak {row['plain_peak_alloc_GB']:.1f} GB, {row['flops_per_branch'] / 1e15:.3f} PFLOP/branch", flush=True)

    # The shared prefix's FLOPs, on the runtime's evaluation order with PyTorch's own kernels: the
    # Triton kernels' matmuls would be invisible to the counter.
    optimize_for_inference(model, InferenceOptions(channels_last=False, fused_kernels=False, tuned_attention=False,
                                                   fused_projections=False, transposed_upsample=False))
    for frames in args.frames:
        _, _, _, shared = calls(frames)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(DEVICE, dtype=torch.float16 if not SMOKE else torch.bfloat16):
                shared()
        results["windows"][frames]["optimized_shared_prefix_flops"] = counter.get_total_flops()

    full = InferenceOptions()
    for frames in args.frames:
        _, sequential, batched, shared = calls(frames)
        row = results["windows"][frames]
        variants = [("optimized_shared_prefix", full, shared), ("optimized_batched", full, batched),
                    ("optimized_sequential", full, sequential),
                    ("optimized_low_vram", InferenceOptions.low_vram(), sequential)]
        if args.ablations and frames == args.frames[0]:
            variants += [
                ("no_fused_kernels", replace(full, fused_kernels=False), sequential),
                ("no_channels_last", replace(full, channels_last=False), sequential),
                ("no_tuned_sdpa", replace(full, tuned_attention=False), sequential),
                ("no_frame_attention_kernel", replace(full, frame_attention_kernel=False), shared),
                ("no_flash_attention_kernel", replace(full, flash_attention_kernel=False), shared),
                ("no_fused_projections", replace(full, fused_projections=False), shared),
                ("no_shared_self_attention", replace(full, share_self_attention=False), shared),
                ("no_concat_frame_chunks", replace(full, concat_frame_chunk=None), shared),
                ("neither_of_these_two", replace(full, frame_attention_kernel=False, fused_projections=False), shared),
                ("no_ff_chunks", replace(full, ff_chunk_tokens=None), sequential),
                ("conv_frame_chunks_8", replace(full, conv_frame_chunk=8), sequential),
            ]
        for name, opts, fn in variants:
            optimize_for_inference(model, opts)
            reset_peak()
            t0 = time.perf_counter()
            out = fn()  # first call after a switch: includes any compilation
            if not SMOKE:
                torch.cuda.synchronize()
            row[f"{name}_first_call_s"] = time.perf_counter() - t0
            row[f"{name}_rel_err_vs_plain"] = max(float((o.float() - r.float()).norm() / r.float().norm()) for o, r in zip(out, refs[frames]))
            del out
            row[f"{name}_s"] = cuda_time(fn, args.reps if name.startswith("optimized") else 1, warmup=False)
            row[f"{name}_peak_alloc_GB"] = peak_gb()
            row[f"{name}_peak_reserved_GB"] = peak_gb(reserved=True)
            if name == "optimized_low_vram" and not SMOKE:
                row["low_vram_fits_16GB_card"] = fits_in(fn, SMALL_CARD_ALLOCATOR_GB)
            print(f"{name} {frames} frames: {row[name + '_s']} s, err {row[name + '_rel_err_vs_plain']:.2e}, "
                  f"peak {row[name + '_peak_alloc_GB']:.1f} GB allocated / {row[name + '_peak_reserved_GB']:.1f} reserved", flush=True)
        optimize_for_inference(model, full)
        if args.profile and frames == args.frames[0]:
            row["top_kernels_optimized"] = profile_top(shared)
    return results


# What PyTorch's allocator may hold on a 16 GB card: the CUDA context and the driver take the rest.
SMALL_CARD_ALLOCATOR_GB = 15.0


def fits_in(fn, gigabytes: float) -> bool:
    """Whether fn runs with the allocator capped at `gigabytes` (a smaller card, emulated)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(gigabytes * 1e9 / total)
    try:
        fn()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def profile_top(fn, top: int = 25) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_time_total > 0 and e.key and not e.key.startswith("aten::"))
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[: top * 3]:
        if e.key.startswith(("aten::", "cuda", "Memcpy", "Memset")) and "Memcpy" not in e.key:
            continue
        rows.append([e.key[:90], round(e.device_time_total / 1e3, 1), e.count])
        if len(rows) == top:
            break
    return {"total_ms": round(total / 1e3, 1), "kernels": rows}


def print_forward_table(res: dict) -> None:
    rate = res["bf16_matmul_TFLOPs"]
    print(f"\nGPU: {res['gpu']} | torch {res['torch']} | bf16 matmul {rate:.0f} TFLOP/s | weights {res['weights_GB']:.1f} GB")
    for frames, row in res["windows"].items():
        flops = 2 * row["flops_per_branch"]
        print(f"\n{frames}-frame window at latent {LATENT[0]}x{LATENT[1]}, both branches:")
        print(f"{'path':<24}{'median s':>10}{'speed-up':>10}{'TFLOP/s':>10}{'%matmul':>9}{'rel err':>10}{'peak GB':>9}{'reserved':>9}")
        base = statistics.median(row["plain_s"])
        for key in [k[:-2] for k in row if k.endswith("_s") and isinstance(row[k], list)]:
            t = statistics.median(row[f"{key}_s"])
            tf = row.get(f"{key}_flops", flops) / t / 1e12
            err = row.get(f"{key}_rel_err_vs_plain", 0.0)
            peak = row.get(f"{key}_peak_alloc_GB", float("nan"))
            reserved = row.get(f"{key}_peak_reserved_GB", float("nan"))
            print(f"{key:<24}{t:>10.3f}{base / t:>10.2f}{tf:>10.0f}{100 * tf / rate:>8.0f}%{err:>10.1e}{peak:>9.1f}{reserved:>9.1f}")
        if "low_vram_fits_16GB_card" in row:
            verdict = "runs" if row["low_vram_fits_16GB_card"] else "does NOT run"
            print(f"low-VRAM preset {verdict} with the allocator capped at {SMALL_CARD_ALLOCATOR_GB:g} GB (a 16 GB card)")


def svd_vae():
    """Stable Video Diffusion's temporal VAE (the SD encoder 128-256-512-512 with 2 layers per
    block, and the temporal decoder) with diffusers' random initialisation, float32 on the CPU;
    the tiny test config under BENCH_SMOKE."""
    from diffusers import AutoencoderKLTemporalDecoder

    channels = (32, 32, 32, 32) if SMOKE else (128, 256, 512, 512)
    return AutoencoderKLTemporalDecoder(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                                        layers_per_block=1 if SMOKE else 2, latent_channels=4, sample_size=768,
                                        scaling_factor=0.18215)


def build_vae(dtype: torch.dtype):
    torch.manual_seed(0)
    vae = svd_vae()
    for name, p in vae.named_parameters():
        if name.endswith("mix_factor"):
            p.data.fill_(0.5)  # both paths of the spatio-temporal mix matter
    return vae.to(DEVICE, dtype).eval().requires_grad_(False)


@torch.no_grad()
def run_vae(args) -> dict:
    import copy

    from venhancer.planning import VAE_FRAME_WINDOW, VAE_TILE
    from venhancer.vae import optimize_vae

    plain = build_vae(torch.float32 if SMOKE else torch.float16)
    fast = optimize_vae(copy.deepcopy(plain))
    dtype = next(plain.parameters()).dtype
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    tile = (8, 16) if SMOKE else VAE_TILE
    z = torch.randn(VAE_FRAME_WINDOW, 4, *tile, device=DEVICE, generator=gen, dtype=dtype)
    size = (64, 96) if SMOKE else (LATENT[0] * 8, LATENT[1] * 8)
    frame = (torch.rand(1, 3, *size, device=DEVICE, generator=gen) * 2 - 1).to(dtype)
    res = {"gpu": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    outs = {}
    for name, vae in (("plain", plain), ("optimized", fast)):
        decode = lambda: vae.decode(z, num_frames=z.shape[0]).sample  # noqa: E731
        encode = lambda: vae.encode(frame).latent_dist.mean  # noqa: E731
        reset_peak()
        outs[name] = (decode().float(), encode().float())
        res["rows"][f"{name}_decode_tile_s"] = cuda_time(decode, args.reps + 1)
        res["rows"][f"{name}_decode_peak_alloc_GB"] = peak_gb()
        res["rows"][f"{name}_encode_frame_s"] = cuda_time(encode, args.reps + 1)
    for i, part in enumerate(("decode", "encode")):
        ref, got = outs["plain"][i], outs["optimized"][i]
        res["rows"][f"optimized_{part}_rel_err"] = float((got - ref).norm() / ref.norm())
    return res


# The network's narrow Linears at the seed clip's sizes: (tokens, input width, output width).
GEGLU_SHAPES = [(2**18, 320, 1280), (2**18, 512, 2048), (2**18, 640, 2560)]
RESIDUAL_SHAPES = [(8 * 38880, 320, 320), (2**18, 512, 512), (8 * 9720, 640, 640), (2**18, 1280, 320)]


@torch.no_grad()
def run_matmul(args) -> dict:
    """The fused Triton matmuls against cuBLAS + a separate pass, per shape (the network uses the
    fused ones where they won: kernels.geglu_matmul_supported, and for Linear + residual up to
    kernels.LINEAR_ADD_MAX_DIM wide inputs or kernels.persistent_linear_add_wins)."""
    import torch.nn.functional as F

    from venhancer.runtime import ops as kernels

    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    half = dict(device=DEVICE, dtype=torch.float16)
    for kind, shapes in (("geglu", GEGLU_SHAPES), ("linear_add", RESIDUAL_SHAPES)):
        for rows, dim, width in shapes:
            x = torch.randn(rows, dim, generator=gen, **half)
            out_width = 2 * width if kind == "geglu" else width
            w = torch.randn(out_width, dim, generator=gen, **half) / dim**0.5
            b = torch.randn(out_width, generator=gen, **half)
            if kind == "geglu":
                base, fused = (lambda: kernels.geglu(F.linear(x, w, b))), (lambda: kernels.geglu_matmul(x, w, b))
            else:
                r = torch.randn(rows, width, generator=gen, **half)
                base, fused = (lambda: r + F.linear(x, w, b)), (lambda: kernels.linear_add(x, w, b, r))
            ref = base().float()
            err = float((fused().float() - ref).norm() / ref.norm())
            t_base, t_fused = (statistics.median(cuda_time(fn, 5)) for fn in (base, fused))
            used = (kernels.geglu_matmul_supported(x, w) if kind == "geglu"
                    else dim <= kernels.LINEAR_ADD_MAX_DIM or kernels.persistent_linear_add_wins(x, w))
            res["rows"].append({"kind": kind, "tokens": rows, "in": dim, "out": width, "cublas_s": t_base,
                                "fused_s": t_fused, "rel_err": err, "used_by_network": used})
    return res


def print_matmul_table(res: dict) -> None:
    print(f"\nFused matmuls on {res['gpu']} | torch {res['torch']}")
    print(f"{'kernel':<12}{'tokens':>8}{'in':>6}{'out':>6}{'cuBLAS+pass ms':>16}{'fused ms':>10}{'speed-up':>10}{'rel err':>10}  used")
    for r in res["rows"]:
        print(f"{r['kind']:<12}{r['tokens']:>8}{r['in']:>6}{r['out']:>6}{1e3 * r['cublas_s']:>16.3f}{1e3 * r['fused_s']:>10.3f}"
              f"{r['cublas_s'] / r['fused_s']:>10.2f}{r['rel_err']:>10.1e}  {'yes' if r['used_by_network'] else 'no'}")


def print_vae_table(res: dict) -> None:
    rows = res["rows"]
    print(f"\nTemporal VAE on {res['gpu']} | torch {res['torch']}")
    print(f"{'call':<36}{'plain s':>10}{'optimized s':>13}{'speed-up':>10}{'rel err':>10}")
    for part, label in (("decode", "decode tile (5 x 72x128 latents)"), ("encode", "encode one 1296x1920 frame")):
        key = "decode_tile" if part == "decode" else "encode_frame"
        a, b = statistics.median(rows[f"plain_{key}_s"]), statistics.median(rows[f"optimized_{key}_s"])
        print(f"{label:<36}{a:>10.3f}{b:>13.3f}{a / b:>10.2f}{rows[f'optimized_{part}_rel_err']:>10.1e}")
    print(f"peak allocated in a decode tile: plain {rows['plain_decode_peak_alloc_GB']:.1f} GB, "
          f"optimized {rows['optimized_decode_peak_alloc_GB']:.1f} GB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["forward", "vae", "matmul", "pipeline"])
    parser.add_argument("--frames", type=int, nargs="+", default=[31, 40])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=2, help="pipeline: solver steps to run (normal mode)")
    parser.add_argument("--low_vram", action="store_true", help="pipeline: run the CLI with --low_vram")
    parser.add_argument("--nproc", type=int, nargs="+", default=None,
                        help="pipeline: one run per process count (torchrun for more than 1), for multi-GPU scaling")
    parser.add_argument("--cap_gb", type=float, nargs="+", default=None,
                        help="pipeline: one uncapped run, then one run per GPU memory cap in GB (allocator "
                             "capped for the whole run, benchmarks/capped_cli.py): plan, time, peaks, same video")
    parser.add_argument("--startup_only", action="store_true",
                        help="pipeline: only the start-up (process start to the first denoising step), several runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not SMOKE:
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.part == "forward":
        res = run_forward(args)
        out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_forward.json")
        Path(out).write_text(json.dumps(res, indent=1))
        if "top_kernels_optimized" in next(iter(res["windows"].values())):
            prof = next(iter(res["windows"].values()))["top_kernels_optimized"]
            print(f"\nTop kernels, optimized path, one window both branches (total {prof['total_ms']} ms):")
            for name, ms, count in prof["kernels"]:
                print(f"{ms:>9.1f} ms {count:>6}  {name}")
        print_forward_table(res)
    elif args.part == "matmul":
        if SMOKE:
            print("the matmul part needs a CUDA GPU (Triton kernels)", file=sys.stderr)
            return 2
        res = run_matmul(args)
        Path(args.out or os.path.join(os.environ.get("OUT", "."), "bench_matmul.json")).write_text(json.dumps(res, indent=1))
        print_matmul_table(res)
    elif args.part == "vae":
        res = run_vae(args)
        out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_vae.json")
        Path(out).write_text(json.dumps(res, indent=1))
        print_vae_table(res)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pipeline_bench import run_pipeline

        return run_pipeline(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
