"""FP8 probe for the opt-in FP8 path (RuntimeSettings.fp8), in one GPU run (~2-4 minutes on an H200,
Triton compilation included):

    python3 benchmarks/fp8_probe.py --out $OUT/fp8_probe.json [--network] [--fp32_reference]

1. Attention at the spatial transformers' level-0 and level-1 shapes (8 frames; 5 heads x 38,880
   tokens and 10 heads x 9,720 tokens; head width 64; fp16 q/k/v as the strided views of a fused
   q/k/v projection, as the runtime passes them): SDPA (the runtime's tuned order), the fp16 flash
   kernel (`ops.flash_attention`), and `ops.fp8_attention` with q.k in int8 and in e4m3, each
   with P V in fp16 (a) and in e4m3 (b) (variants int8_pv16, int8_pv8, e4m3_pv16, e4m3_pv8), the
   8-bit pre-pass timed on its own as well. Error: relative L2 against float32 SDPA on the first
   frame's first two heads.
2. Linears at the network's shapes (tokens x in x out): fp16 F.linear against `ops.fp8_linear`
   (activation quantisation included; weights quantised beforehand, as the runtime holds them),
   with the quantisation pass and torch._scaled_mm timed apart; for the GEGLU projection also the
   fp16 fused `ops.geglu_matmul` against the FP8 product plus `ops.geglu`. Error: relative L2
   against the float32 product.
3. With --network: the full-size network (random weights, as benchmarks/bench.py builds it),
   `forward_branches` on a 31-frame 162x240 window (--frames), for the fp16 optimized path,
   8-bit attention only (int8 q.k, fp16 P V) and 8-bit attention + FP8 Linears (default
   variants; --variants for others): median of 3 timed calls after a first (compiling) one, and
   each output's relative L2 against the fp16 optimized output at that window. With
   --fp32_reference also against a float32 plain (unoptimized) run on the same weights and
   inputs, at a smaller window (--reference_frames, 8 by default, to keep float32 time and
   memory small): every variant's output is recomputed at that window for this column.

Each measurement that fails prints one line and the probe goes on; the JSON is written after
each part (and once more if a part raises). Prints tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402

from venhancer.models.attention import attention  # noqa: E402
from venhancer.runtime import (  # noqa: E402
    RuntimeSettings,
    ops,  # noqa: E402
    optimize_for_inference,
    quant,
)
from venhancer.runtime.attention import tuned_sdpa  # noqa: E402
from venhancer.runtime.ops.fp8_attention import attend_quantized, quantize_attention_inputs  # noqa: E402

HEAD_DIM = 64
# (name, frames, heads, tokens per frame)
ATTENTION_SHAPES = [("level0", 8, 5, 38880), ("level1", 8, 10, 9720)]
# (tokens, in, out); GEGLU: the projection to 2 x 1280 of the level-0 feed-forward
LINEAR_SHAPES = [(305040, 320, 320), (305040, 320, 2560), (305040, 1280, 320), (78120, 640, 640),
                 (78120, 1280, 1280), (19530, 1280, 1280), (305040, 640, 640)]
GEGLU_SHAPE = (305040, 320, 2560)
# attention variants of ops.fp8_attention: (q.k format, P V in e4m3)
FP8_ATTENTION_VARIANTS = {"int8_pv16": ("int8", False), "int8_pv8": ("int8", True),
                          "e4m3_pv16": ("e4m3", False), "e4m3_pv8": ("e4m3", True)}
NETWORK_VARIANTS = {
    "fp16": RuntimeSettings(),
    "attn8": RuntimeSettings(fp8=True),  # int8 q.k, fp16 P V (--precision fp8)
    "attn8_linear8": RuntimeSettings(fp8=True, fp8_linear=True),  # the same + FP8 Linears
    "attn8_pv8": RuntimeSettings(fp8=True, fp8_pv=True),
    "attn8_e4m3": RuntimeSettings(fp8=True, fp8_qk="e4m3"),
    "attn8_e4m3_linear8": RuntimeSettings(fp8=True, fp8_qk="e4m3", fp8_linear=True),
    "linear8": RuntimeSettings(fp8=True, fp8_attention=False, fp8_linear=True),
}
# Three evaluations each at 31 frames (~5 s apiece expected on an H200): what fits the probe's
# few minutes.
DEFAULT_NETWORK_VARIANTS = ["fp16", "attn8", "attn8_linear8"]
SETTINGS_FIELDS = ("fp8", "fp8_attention", "fp8_linear", "fp8_pv", "fp8_qk")


def median_s(fn, reps: int) -> float:
    return statistics.median(bench.cuda_time(fn, reps))


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().float(), expected.detach().float()
    return float((a - e).norm() / e.norm())


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def attempt(label: str, fn, failures: dict):
    """fn(), or None with the failure printed in one line and recorded."""
    try:
        return fn()
    except Exception as error:  # a variant that does not compile or run must not stop the probe
        failures[label] = one_line(error)
        print(f"  {label}: FAILED {failures[label]}", flush=True)
        torch.cuda.empty_cache()
        return None


@torch.no_grad()
def probe_attention(args, failures: dict) -> list[dict]:
    rows = []
    for name, frames, heads, tokens in ATTENTION_SHAPES:
        inner = heads * HEAD_DIM
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        qkv = torch.randn(frames, tokens, 3 * inner, device="cuda", generator=gen, dtype=torch.float16) * args.input_std
        q, k, v = qkv.chunk(3, dim=-1)  # (frames, tokens, inner) views with row stride 3*inner

        # float32 reference on frame 0, heads 0-1: (1, 2, tokens, d)
        def first_heads(t):
            return t[:1, :, : 2 * HEAD_DIM].float().reshape(1, tokens, 2, HEAD_DIM).transpose(1, 2)

        ref = F.scaled_dot_product_attention(first_heads(q), first_heads(k), first_heads(v))
        ref = ref.transpose(1, 2).reshape(1, tokens, 2 * HEAD_DIM)
        flops = 4 * frames * heads * tokens * tokens * HEAD_DIM
        variants = {
            "sdpa": lambda: attention(q, k, v, heads, sdpa=tuned_sdpa),
            "flash_fp16": lambda: ops.flash_attention(q, k, v, heads),
        }
        for variant, (qk, pv) in FP8_ATTENTION_VARIANTS.items():
            variants[variant] = lambda qk=qk, pv=pv: ops.fp8_attention(q, k, v, heads, fp8_pv=pv, qk=qk)
        print(f"attention {name}: {frames} frames x {heads} heads x {tokens} tokens", flush=True)
        for variant, fn in variants.items():
            label = f"attention {name} {variant}"
            row = {"shape": name, "frames": frames, "heads": heads, "tokens": tokens, "variant": variant}

            def measure(fn=fn, row=row, variant=variant):
                out = fn()
                row["rel_l2"] = rel_l2(out[:1, :, : 2 * HEAD_DIM], ref)
                del out
                row["total_s"] = median_s(fn, args.reps)
                row["TFLOPs"] = flops / row["total_s"] / 1e12
                if variant in FP8_ATTENTION_VARIANTS:
                    qk, pv = FP8_ATTENTION_VARIANTS[variant]
                    row["prepass_s"] = median_s(lambda: quantize_attention_inputs(q, k, v, heads, pv, qk), args.reps)
                    prepared = quantize_attention_inputs(q, k, v, heads, pv, qk)
                    row["kernel_s"] = median_s(lambda: attend_quantized(prepared, frames, heads, q.dtype), args.reps)
                return row

            if attempt(label, measure, failures) is not None:
                rows.append(row)
                extra = f", pre-pass {1e3 * row['prepass_s']:.2f} ms + kernel {1e3 * row['kernel_s']:.2f} ms" \
                    if "prepass_s" in row else ""
                print(f"  {variant:<11} {1e3 * row['total_s']:8.2f} ms {row['TFLOPs']:6.0f} TFLOP/s "
                      f"rel L2 {row['rel_l2']:.2e}{extra}", flush=True)
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def probe_linears(args, failures: dict) -> list[dict]:
    rows = []
    for tokens, dim, n_out in LINEAR_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(tokens + dim + n_out)
        x = torch.randn(tokens, dim, device="cuda", generator=gen, dtype=torch.float16)
        weight = (torch.randn(n_out, dim, device="cuda", generator=gen) / dim**0.5).half()
        bias = (torch.randn(n_out, device="cuda", generator=gen) * 0.1).half()
        row = {"tokens": tokens, "in": dim, "out": n_out}
        label = f"linear {tokens}x{dim}x{n_out}"

        def measure(x=x, weight=weight, bias=bias, row=row, dim=dim, n_out=n_out, tokens=tokens):
            ref = F.linear(x.float(), weight.float(), bias.float())
            weight_fp8, weight_scale = quant.quantize_weight(weight)
            row["fp16_s"] = median_s(lambda: F.linear(x, weight, bias), args.reps)
            row["fp16_rel_l2"] = rel_l2(F.linear(x, weight, bias), ref)
            fp8 = lambda: ops.fp8_linear(x, weight_fp8, weight_scale, bias)  # noqa: E731
            row["fp8_rel_l2"] = rel_l2(fp8(), ref)
            del ref
            row["fp8_s"] = median_s(fp8, args.reps)
            row["quantize_s"] = median_s(lambda: ops.quantize_rows(x), args.reps)
            x8, x_scale = ops.quantize_rows(x)
            row["scaled_mm_s"] = median_s(lambda: torch._scaled_mm(x8, weight_fp8.t(), scale_a=x_scale,
                                                                   scale_b=weight_scale, out_dtype=torch.bfloat16),
                                          args.reps)
            row["speedup"] = row["fp16_s"] / row["fp8_s"]
            row["used_by_network"] = ops.fp8_linear_wins(tokens, weight)
            if (tokens, dim, n_out) == GEGLU_SHAPE:
                row["geglu_fp16_fused_s"] = median_s(lambda: ops.geglu_matmul(x, weight, bias), args.reps)
                row["geglu_fp8_s"] = median_s(lambda: ops.geglu(fp8()), args.reps)
            return row

        if attempt(label, measure, failures) is not None:
            rows.append(row)
            geglu = (f" | GEGLU fused fp16 {1e3 * row['geglu_fp16_fused_s']:.2f} ms, fp8 + gate "
                     f"{1e3 * row['geglu_fp8_s']:.2f} ms") if "geglu_fp8_s" in row else ""
            print(f"{label:<28} fp16 {1e3 * row['fp16_s']:7.2f} ms  fp8 {1e3 * row['fp8_s']:7.2f} ms "
                  f"(quantise {1e3 * row['quantize_s']:.2f} + scaled_mm {1e3 * row['scaled_mm_s']:.2f}) "
                  f"x{row['speedup']:.2f}  rel L2 fp16 {row['fp16_rel_l2']:.1e} fp8 {row['fp8_rel_l2']:.1e}{geglu}",
                  flush=True)
        del x, weight, bias
        torch.cuda.empty_cache()
    return rows


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def probe_network(args, failures: dict, result: dict) -> dict:
    """Fills `result` (the caller's, so that what was measured survives a later failure)."""
    model = bench.build_model(torch.float16)
    x, t, y_c, y_u, common = bench.window_inputs(args.frames)
    result.update({"frames": args.frames, "latent": list(bench.LATENT), "variants": {}})
    reference = small = None
    if args.fp32_reference:
        result["reference_frames"] = args.reference_frames
        small = bench.window_inputs(args.reference_frames)
        sx, st, sy_c, sy_u, scommon = small

        def plain_float32():  # the plain network (not optimized) on a float32 copy of the same weights
            full = copy.deepcopy(model).float()
            with torch.autocast("cuda", enabled=False):
                outs = [full(sx, st, y, **scommon) for y in (sy_c, sy_u)]
            del full
            return outs

        reference = attempt("network float32 reference", plain_float32, failures)
        empty_cache()
        print(f"network: float32 plain reference at {args.reference_frames} frames "
              f"{'done' if reference is not None else 'failed'}; the 'vs fp32' column recomputes each variant "
              f"at {args.reference_frames} frames", flush=True)
    base = base_small = None
    for name in args.variants:
        settings = NETWORK_VARIANTS[name]
        label = f"network {name}"

        def measure(settings=settings):
            optimize_for_inference(model, settings)
            fn = lambda: model.forward_branches(x, t, [y_c, y_u], **common)  # noqa: E731
            synchronize()
            start = time.perf_counter()
            out = fn()
            synchronize()
            row = {"first_call_s": time.perf_counter() - start,
                   "settings": {k: getattr(settings, k) for k in SETTINGS_FIELDS}}
            row["times_s"] = bench.cuda_time(fn, 3, warmup=False)
            row["median_s"] = statistics.median(row["times_s"])
            return row, out

        got = attempt(label, measure, failures)
        if got is None:
            continue
        row, out = got
        if name == "fp16":
            base = out
        if base is not None:
            row["rel_l2_vs_fp16"] = max(rel_l2(o, b) for o, b in zip(out, base))
        del out
        if reference is not None:
            sx, st, sy_c, sy_u, scommon = small
            outs_small = attempt(f"{label} at {args.reference_frames} frames",
                                 lambda: model.forward_branches(sx, st, [sy_c, sy_u], **scommon), failures)
            if outs_small is not None:
                row["rel_l2_vs_float32"] = max(rel_l2(o, r) for o, r in zip(outs_small, reference))
                if name == "fp16":
                    base_small = outs_small
                elif base_small is not None:
                    row["rel_l2_vs_fp16_small"] = max(rel_l2(o, b) for o, b in zip(outs_small, base_small))
            del outs_small
        if "fp16" in result["variants"]:
            row["speedup_vs_fp16"] = result["variants"]["fp16"]["median_s"] / row["median_s"]
        result["variants"][name] = row
        print(f"{label:<26} {row['median_s']:.3f} s (first call {row['first_call_s']:.1f} s)"
              f"  x{row.get('speedup_vs_fp16', 1.0):.2f}  rel L2 vs fp16 {row.get('rel_l2_vs_fp16', 0.0):.2e}"
              + (f" | at {args.reference_frames} frames: vs float32 {row['rel_l2_vs_float32']:.2e}"
                 if "rel_l2_vs_float32" in row else ""), flush=True)
        empty_cache()
    return result


def print_tables(res: dict) -> None:
    print(f"\n{res['gpu']} | torch {res['torch']} | triton {res['triton']} | _scaled_mm way: {res.get('scaled_mm_way')}")
    if res.get("attention"):
        print(f"\n{'attention':<10}{'variant':<12}{'ms':>9}{'TFLOP/s':>9}{'pre-pass':>10}{'kernel':>9}{'rel L2':>10}")
        for r in res["attention"]:
            pre = f"{1e3 * r['prepass_s']:>10.2f}{1e3 * r['kernel_s']:>9.2f}" if "prepass_s" in r else f"{'':>19}"
            print(f"{r['shape']:<10}{r['variant']:<12}{1e3 * r['total_s']:>9.2f}{r['TFLOPs']:>9.0f}{pre}{r['rel_l2']:>10.2e}")
    if res.get("linears"):
        print(f"\n{'tokens x in x out':<22}{'fp16 ms':>9}{'fp8 ms':>9}{'quant':>8}{'mm':>8}{'speed-up':>9}"
              f"{'err fp16':>10}{'err fp8':>10}  used")
        for r in res["linears"]:
            print(f"{r['tokens']}x{r['in']}x{r['out']:<8}{1e3 * r['fp16_s']:>9.2f}{1e3 * r['fp8_s']:>9.2f}"
                  f"{1e3 * r['quantize_s']:>8.2f}{1e3 * r['scaled_mm_s']:>8.2f}{r['speedup']:>9.2f}"
                  f"{r['fp16_rel_l2']:>10.1e}{r['fp8_rel_l2']:>10.1e}  {'yes' if r['used_by_network'] else 'no'}")
    network = res.get("network")
    if network and network["variants"]:
        print(f"\nnetwork, forward_branches, {network['frames']} frames at latent {network['latent'][0]}x{network['latent'][1]}"
              " (median of 3; 'vs fp16': rel L2 against the fp16 optimized output at this window)")
        if "reference_frames" in network:
            print(f"'vs fp32': rel L2 against a float32 plain run at {network['reference_frames']} frames, each variant "
                  f"recomputed at {network['reference_frames']} frames for it")
        print(f"{'variant':<20}{'median s':>10}{'speed-up':>10}{'vs fp16':>10}{'vs fp32':>10}  settings")
        for name, r in network["variants"].items():
            vs32 = f"{r['rel_l2_vs_float32']:>10.2e}" if "rel_l2_vs_float32" in r else f"{'-':>10}"
            print(f"{name:<20}{r['median_s']:>10.3f}{r.get('speedup_vs_fp16', float('nan')):>10.2f}"
                  f"{r.get('rel_l2_vs_fp16', float('nan')):>10.2e}{vs32}  {r['settings']}")
    if res["failures"]:
        print("\nfailures:")
        for label, error in res["failures"].items():
            print(f"  {label}: {error}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/fp8_probe.json or ./fp8_probe.json)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per op measurement (median)")
    parser.add_argument("--input_std", type=float, default=1.0, help="standard deviation of the attention's q/k/v")
    parser.add_argument("--skip_ops", action="store_true", help="only the network part")
    parser.add_argument("--skip_linears", action="store_true", help="no linear table")
    parser.add_argument("--network", action="store_true", help="also the full-size network's forward_branches")
    parser.add_argument("--frames", type=int, default=31)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_NETWORK_VARIANTS, choices=list(NETWORK_VARIANTS),
                        help="network variants (fp16 first: the others' baseline)")
    parser.add_argument("--fp32_reference", action="store_true",
                        help="network: also a float32 plain run of both branches (a copy of the weights in float32), "
                             "at --reference_frames")
    parser.add_argument("--reference_frames", type=int, default=8,
                        help="window of the float32 reference (every variant recomputed at it for that column)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this probe needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton

    from venhancer.runtime import fp8_supported

    res = {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
           "torch": torch.__version__, "triton": triton.__version__, "fp8_supported": fp8_supported("cuda"),
           "failures": {}}
    print(f"{res['gpu']} (capability {res['capability']}) | torch {res['torch']} | triton {res['triton']} "
          f"| fp8_supported {res['fp8_supported']}", flush=True)
    fp8_linear_module = sys.modules["venhancer.runtime.ops.fp8_linear"]
    res["scaled_mm_way"] = attempt("scaled_mm way", lambda: fp8_linear_module._scaled_mm_way(torch.float16, torch.device("cuda")),
                                   res["failures"])
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "fp8_probe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def write():
        res["probe_s"] = time.perf_counter() - started
        out.write_text(json.dumps(res, indent=1, default=str))

    parts = [] if args.skip_ops else [("attention", lambda: probe_attention(args, res["failures"])),
                                      ("linears", lambda: probe_linears(args, res["failures"]))]
    if args.skip_linears:
        parts = [part for part in parts if part[0] != "linears"]
    if args.network:
        res["network"] = {}
        parts.append(("network", lambda: probe_network(args, res["failures"], res["network"])))
    for part, fn in parts:
        try:
            got = fn()
            if part != "network":
                res[part] = got
        except Exception as error:  # a part that fails outside its measurements: record, go on
            res["failures"][part] = one_line(error)
            print(f"{part}: FAILED {res['failures'][part]}", flush=True)
            empty_cache()
        write()
    write()
    try:
        print_tables(res)
    except Exception as error:
        print(f"tables: FAILED {one_line(error)}")
    print(f"\nwrote {out} ({res['probe_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
