"""The GPU tier: the runtime against the plain network and the torch references on a CUDA GPU.

    python3 -m pytest -q -m gpu tests/runtime/test_gpu.py

The FP8 tests (`-k fp8`, add `-s` for the measured errors) need a GPU with FP8 tensor cores.

Skipped without CUDA. Needs ~45 GB of GPU memory at most (the plain full-size network at the
seed clip's window: latent 162x240, 31 frames, fp16) and a few minutes on an H200; the Triton
ops compile on first use (cached on disk by Triton afterwards). Ops that need a Hopper-class GPU
(TMA: the GEGLU projection, flash attention, the persistent Linear + residual) are checked
there and must decline elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LATENT = (162, 240)  # the seed clip's latent size (1296x1920 padded output)
FRAMES = 31
# Optimized against plain, both fp16: the benchmarks measured 2.7e-3 (plain under autocast).
FORWARD_REL_L2 = 1e-2
# One op against its float64 reference: fp16 inputs and outputs, float32 accumulation.
OP_REL_L2 = 5e-3


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm())


def hopper() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


def load_bench():
    """benchmarks/bench.py as a module: the forward benchmark's model and window inputs."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@torch.no_grad()
def test_fast_twins_match_the_plain_network_at_the_real_window():
    """The full-size network (random weights, fp16) at latent 162x240 x 31 frames: the optimized
    model (all twins, the Triton ops, channels-last, the default chunking), through `forward`
    and through `forward_branches`, against the plain network's fp16 output."""
    from venhancer.runtime import RuntimeSettings, optimize_for_inference
    from venhancer.runtime.branches import FastVEnhancerUNet

    bench = load_bench()
    assert bench.DEVICE == "cuda" and bench.LATENT == LATENT
    model = bench.build_model(torch.float16)  # full config, fan-in scaled random weights
    keys = list(model.state_dict())
    x, t, y_c, y_u, common = bench.window_inputs(FRAMES)
    try:
        plain_c = model(x, t, y_c, **common)
        plain_u = model(x, t, y_u, **common)
        torch.cuda.empty_cache()
        optimize_for_inference(model, RuntimeSettings())
        assert type(model) is FastVEnhancerUNet and list(model.state_dict()) == keys
        fast_c = model(x, t, y_c, **common)
        shared_c, shared_u = model.forward_branches(x, t, [y_c, y_u], **common)
    finally:
        del model
        torch.cuda.empty_cache()
    assert fast_c.shape == plain_c.shape == (1, 4, FRAMES, *LATENT) and fast_c.dtype == plain_c.dtype
    assert torch.isfinite(fast_c).all()
    assert rel_l2(fast_c, plain_c) <= FORWARD_REL_L2
    assert rel_l2(shared_c, plain_c) <= FORWARD_REL_L2
    assert rel_l2(shared_u, plain_u) <= FORWARD_REL_L2
    # the branches differ (the text matters) by far more than the tolerance
    assert rel_l2(plain_u, plain_c) > 10 * FORWARD_REL_L2


# --- each Triton op against its torch reference, at the network's shapes -----------------------


def _frames(channels: int, frames: int, h: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(frames, channels, h, w, device="cuda", generator=gen) * 2 + 0.5
    return x.half().contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels, h, w", [(320, 162, 240), (640, 82, 120), (1280, 22, 30)])
def test_group_norm_op(channels, h, w):
    from venhancer.runtime import ops

    x = _frames(channels, FRAMES, h, w, seed=channels)
    weight = torch.randn(channels, device="cuda").half()
    bias = torch.randn(channels, device="cuda").half()
    add = torch.randn(FRAMES, channels, device="cuda").half()
    assert ops.runs_on(x) and ops.SUPPORTED["group_norm"](x, 32)
    got = ops.group_norm(x, weight, bias, 1e-6, True, add=add)
    assert got.stride() == x.stride() and got.dtype == x.dtype
    shifted = x.double() + add.double()[:, :, None, None]
    want = F.silu(F.group_norm(shifted, 32, weight.double(), bias.double(), 1e-6))
    assert rel_l2(got, want) <= OP_REL_L2
    # the temporal layers' view: statistics over all frames of a clip, (b, c, f, h, w)
    video = x.reshape(1, FRAMES, channels, h, w).transpose(1, 2)
    got = ops.group_norm(video, weight, bias, 1e-6, False)
    want = F.group_norm(video.double(), 32, weight.double(), bias.double(), 1e-6)
    assert rel_l2(got, want) <= OP_REL_L2


def test_group_norm_rows_op():
    from venhancer.runtime import ops

    channels, h, w = 320, 40, 60
    x = _frames(channels, FRAMES, h, w, seed=3)
    weight, bias = torch.randn(channels, device="cuda"), torch.randn(channels, device="cuda")
    video = x.reshape(1, FRAMES, channels, h, w).transpose(1, 2)
    table = ops.group_norm_table(video, weight, bias, 1e-6)
    tokens = x.permute(0, 2, 3, 1).reshape(FRAMES, h * w, channels)  # frame-major pixels
    cols = slice(500, 1700)
    got = ops.group_norm_rows(tokens[:, cols], table[0])
    want = F.group_norm(video.double(), 32, weight.double(), bias.double(), 1e-6)
    want = want.permute(0, 2, 3, 4, 1).reshape(FRAMES, h * w, channels)[:, cols].reshape(-1, channels)
    assert rel_l2(got, want) <= OP_REL_L2


@pytest.mark.parametrize("dim", [320, 640, 1280])
def test_layer_norm_op(dim):
    from venhancer.runtime import ops

    x = torch.randn(100_000, dim, device="cuda").half() * 3 + 1
    weight, bias = torch.randn(dim, device="cuda").half(), torch.randn(dim, device="cuda").half()
    assert ops.SUPPORTED["layer_norm"](x)
    got = ops.layer_norm(x, weight, bias, 1e-5)
    want = F.layer_norm(x.double(), (dim,), weight.double(), bias.double(), 1e-5)
    assert rel_l2(got, want) <= OP_REL_L2


def test_bias_add_op():
    from venhancer.runtime import ops

    a, b = _frames(320, FRAMES, 81, 120, seed=5), _frames(320, FRAMES, 81, 120, seed=6)
    bias = torch.randn(320, device="cuda")
    assert ops.SUPPORTED["bias_add"](a, b)
    got = ops.add_with_bias(a, b, bias)
    assert got.stride() == a.stride()
    assert rel_l2(got, a.double() + b.double() + bias.double()[:, None, None]) <= OP_REL_L2
    scale = torch.tensor([0.3], device="cuda")
    got = ops.add_with_bias(a, b, bias, scale)
    assert rel_l2(got, a.double() + 0.3 * (b.double() + bias.double()[:, None, None])) <= OP_REL_L2


def _linear_inputs(rows: int, dim: int, n_out: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, dim, device="cuda", generator=gen).half()
    weight = (torch.randn(n_out, dim, device="cuda", generator=gen) / math.sqrt(dim)).half()
    bias = torch.randn(n_out, device="cuda", generator=gen).half()
    return x, weight, bias


@pytest.mark.parametrize("dim", [320, 640, 1280])
def test_geglu_ops(dim):
    from venhancer.runtime import ops

    x, weight, bias = _linear_inputs(40_000, dim, 8 * dim, seed=dim)
    value, gate = F.linear(x.double(), weight.double(), bias.double()).chunk(2, dim=-1)
    want = value * F.gelu(gate)
    got = ops.geglu(F.linear(x, weight, bias))
    assert rel_l2(got, want) <= OP_REL_L2
    assert ops.SUPPORTED["geglu_matmul"](x, weight) == hopper()
    if hopper():
        got = ops.geglu_matmul(x, weight, bias, bias_column=True)
        assert got.shape == (x.shape[0], 4 * dim + ops.BIAS_COLUMNS)
        assert torch.all(got[:, 4 * dim] == 1) and not got[:, 4 * dim + 1:].any()
        assert rel_l2(got[:, : 4 * dim], want) <= OP_REL_L2


@pytest.mark.parametrize("rows, dim, n_out", [(150_000, 320, 320), (150_000, 512, 512), (150_000, 640, 640),
                                               (20_000, 320, 320)])
@pytest.mark.parametrize("persistent", [True, False])
def test_linear_add_op(rows, dim, n_out, persistent):
    from venhancer.runtime import ops

    x, weight, bias = _linear_inputs(rows, dim, n_out, seed=rows + dim)
    residual = torch.randn(rows, n_out, device="cuda").half()
    want = residual.double() + F.linear(x.double(), weight.double(), bias.double())
    assert ops.SUPPORTED["linear_add"](x, weight, residual)
    takes_persistent = ops.persistent_linear_add_wins(x, weight, persistent)
    assert takes_persistent == (persistent and hopper() and rows >= 100_000)
    if dim > ops.LINEAR_ADD_MAX_DIM and not takes_persistent:
        return  # cuBLAS + an add in the network: the op is not asked
    got = ops.linear_add(x, weight, bias, residual, persistent=persistent)
    assert rel_l2(got, want) <= OP_REL_L2
    # a range of pixels of every frame, read and written in place
    frames = 10
    video = torch.randn(frames, rows // frames + 64, n_out, device="cuda").half()
    cols = slice(32, 32 + rows // frames)
    want = video[:, cols].double() + F.linear(x.double(), weight.double(), bias.double()).view(frames, -1, n_out)
    ops.linear_add(x, weight, bias, video[:, cols], out=video[:, cols], persistent=persistent)
    assert rel_l2(video[:, cols], want) <= OP_REL_L2


def _attention_reference(q, k, v, heads):
    """SDPA in float32 (its error, ~1e-6, is far below the fp16 kernels')."""
    b, n, inner = q.shape
    d = inner // heads

    def split(t):  # (b, n, heads*d) -> (b, heads, n, d)
        return t.float().reshape(b, t.shape[1], heads, d).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, inner)


@pytest.mark.parametrize("frames, heads, positions", [(31, 5, 9720), (40, 10, 2460)])
def test_frame_attention_op(frames, heads, positions):
    from venhancer.runtime import ops

    inner = heads * 64
    gen = torch.Generator(device="cuda").manual_seed(frames)
    qkv = torch.randn(1, frames * positions, 3 * inner, device="cuda", generator=gen).half()
    q, k, v = qkv.chunk(3, dim=-1)  # the strided views of a fused projection
    assert ops.SUPPORTED["frame_attention"](q, k, v, heads, frames)
    got = ops.frame_attention(q, k, v, heads, frames)

    def per_pixel(t):  # (1, frames*P, inner) -> (P, frames, inner)
        return t.reshape(frames, positions, inner).transpose(0, 1)

    want = _attention_reference(per_pixel(q), per_pixel(k), per_pixel(v), heads)
    assert rel_l2(per_pixel(got), want) <= OP_REL_L2


@pytest.mark.parametrize("tokens, heads", [(9720, 5), (660, 20)])
def test_flash_attention_op(tokens, heads):
    from venhancer.runtime import ops

    inner = heads * 64
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    qkv = torch.randn(2, tokens, 3 * inner, device="cuda", generator=gen).half()
    q, k, v = qkv.chunk(3, dim=-1)
    assert ops.SUPPORTED["flash_attention"](q, k, v, heads) == hopper()
    if not hopper():
        return
    got = ops.flash_attention(q, k, v, heads)
    assert rel_l2(got, _attention_reference(q, k, v, heads)) <= OP_REL_L2


# --- the opt-in FP8 path (RuntimeSettings.fp8), on GPUs with FP8 tensor cores ----------------------

# One attention with 8-bit q and k against float32 SDPA, randn inputs (a pessimistic case: the
# outputs average out most of v, so the rounding of the scores stands out). Issue #29 budgets 3e-2.
# Bounds: a float64 emulation of the kernel's rounding (q, k block-quantised as `quant` does, k
# less its mean; P rounded to fp16, or P * 448 and V per channel to e4m3 with fp8_pv) on randn
# fp16 inputs at the test's shapes, against float64 exact attention, plus a margin:
#   (q.k, P V)       38,880 tokens x 5 heads   9,720 tokens x 10 heads   (k + 4: within 1e-3)
#   (int8, fp16)     1.29e-2                   1.29e-2
#   (int8, e4m3)     3.90e-2                   3.93e-2
#   (e4m3, fp16)     4.00e-2                   4.02e-2
#   (e4m3, e4m3)     5.44e-2                   5.47e-2
# (level 0: 2,048 of the queries, all keys and heads). The e4m3 bounds are above issue #29's
# budget, which is why int8 is the default (`RuntimeSettings.fp8_qk`).
FP8_ATTENTION_REL_L2 = {("int8", False): 2.5e-2, ("int8", True): 5e-2, ("e4m3", False): 5e-2, ("e4m3", True): 7e-2}
# One Linear with both operands in e4m3: ~2.5% RMS rounding per operand element on random data.
FP8_LINEAR_REL_L2 = 5e-2
# The whole network, FP8 against the fp16 optimized path: the target of issue #29.
FP8_FORWARD_REL_L2 = 1e-2


def fp8_gpu() -> bool:
    from venhancer.runtime import fp8_supported

    return fp8_supported("cuda")


@pytest.mark.parametrize("qk", ["int8", "e4m3"])
@pytest.mark.parametrize("fp8_pv", [False, True])
@pytest.mark.parametrize("tokens, heads", [(38880, 5), (9720, 10)])
def test_fp8_attention_op(tokens, heads, fp8_pv, qk):
    """2 frames of the level-0 / level-1 spatial self-attention, q/k/v as the fused projection's views."""
    from venhancer.runtime import ops

    inner = heads * 64
    gen = torch.Generator(device="cuda").manual_seed(tokens + fp8_pv)
    qkv = torch.randn(2, tokens, 3 * inner, device="cuda", generator=gen).half()
    q, k, v = qkv.chunk(3, dim=-1)
    assert ops.SUPPORTED["fp8_attention"](q, k, v, heads) == (fp8_gpu() and hopper())
    if not (fp8_gpu() and hopper()):
        return
    got = ops.fp8_attention(q, k, v, heads, fp8_pv=fp8_pv, qk=qk)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    # the reference on the first frame (float32 SDPA of all heads)
    want = _attention_reference(q[:1], k[:1], v[:1], heads)
    error = rel_l2(got[:1], want)
    flash_error = rel_l2(ops.flash_attention(q[:1], k[:1], v[:1], heads), want)
    bound = FP8_ATTENTION_REL_L2[qk, fp8_pv]
    print(f"fp8_attention {tokens} tokens x {heads} heads, qk={qk}, fp8_pv={fp8_pv}: rel L2 {error:.2e} "
          f"(bound {bound:.1e}; fp16 flash {flash_error:.2e})")
    assert error <= bound
    # a common offset on k (softmax ignores it; the kernel subtracts k's mean before rounding)
    shifted = ops.fp8_attention(q[:1], k[:1] + 4, v[:1], heads, fp8_pv=fp8_pv, qk=qk)
    assert rel_l2(shifted, want) <= bound


@pytest.mark.parametrize("rows, dim, n_out", [(78120, 640, 640), (19530, 1280, 1280), (150_000, 1280, 320)])
def test_fp8_linear_op(rows, dim, n_out):
    from venhancer.runtime import ops, quant

    x, weight, bias = _linear_inputs(rows, dim, n_out, seed=rows + dim)
    assert ops.SUPPORTED["fp8_linear"](x, weight) == fp8_gpu()
    if not fp8_gpu():
        return
    weight_fp8, weight_scale = quant.quantize_weight(weight)
    got = ops.fp8_linear(x, weight_fp8, weight_scale, bias)
    assert got.shape == (rows, n_out) and got.dtype == x.dtype
    assert rel_l2(got, F.linear(x.double(), weight.double(), bias.double())) <= FP8_LINEAR_REL_L2
    # the kernel's per-row rounding is the torch helpers': exactly the rounded operands' product
    x8, x_scale = ops.quantize_rows(x)
    want_x8, want_scale = quant.quantize_rows(x)
    assert torch.equal(x_scale, want_scale)
    assert (x8.float() != want_x8.float()).float().mean() < 1e-4  # a division rounded differently, rarely
    rounded = F.linear(quant.dequantize(x8, x_scale, torch.float64), quant.dequantize(weight_fp8, weight_scale.T, torch.float64),
                       bias.double())
    assert rel_l2(got, rounded) <= OP_REL_L2


@torch.no_grad()
def test_fp8_network_stays_near_the_fp16_path_at_the_real_window():
    """The full-size network (random weights) at latent 162x240 x 31 frames, `forward_branches`
    with RuntimeSettings(fp8=True) against the fp16 optimized path."""
    from dataclasses import replace

    from venhancer.runtime import RuntimeSettings, optimize_for_inference

    if not (fp8_gpu() and hopper()):
        pytest.skip("needs a GPU with FP8 tensor cores and TMA (Hopper-class)")
    bench = load_bench()
    model = bench.build_model(torch.float16)
    x, t, y_c, y_u, common = bench.window_inputs(FRAMES)
    try:
        optimize_for_inference(model, RuntimeSettings())
        fp16 = model.forward_branches(x, t, [y_c, y_u], **common)
        errors = {}
        for name, settings in (("fp8", RuntimeSettings(fp8=True)),
                               ("fp8 + FP8 Linears", RuntimeSettings(fp8=True, fp8_linear=True)),
                               ("fp8, e4m3 q.k", RuntimeSettings(fp8=True, fp8_qk="e4m3"))):
            optimize_for_inference(model, settings)
            out = model.forward_branches(x, t, [y_c, y_u], **common)
            assert all(torch.isfinite(o).all() for o in out)
            errors[name] = max(rel_l2(o, r) for o, r in zip(out, fp16))
            del out
        optimize_for_inference(model, replace(RuntimeSettings(), fp8=False))
        again = model.forward_branches(x, t, [y_c, y_u], **common)
    finally:
        del model
        torch.cuda.empty_cache()
    print(f"FP8 network against fp16: {errors}")
    # switching back gives the fp16 path's output again (equal but for a kernel that is not
    # bit-reproducible)
    assert all(rel_l2(a, b) <= 1e-4 for a, b in zip(again, fp16))
    # --precision fp8 (int8 q.k, fp16 P V, no FP8 Linears: 2.3e-3 on an H200) holds the target; the
    # FP8 Linears (3.5e-2 there) and e4m3 q.k are measured for the comparison only
    assert errors["fp8"] <= FP8_FORWARD_REL_L2, errors


# --- the background-loading path ------------------------------------------------------------------


def test_background_load_gives_the_same_video_on_cuda(tmp_path):
    """Enhancer(background_load=True) on the GPU (the network loaded on a worker thread with its
    own CUDA stream) writes the video that background_load=False writes."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "tests"))  # for make_tiny_models
    from make_tiny_models import make_clip, make_tiny_models

    from venhancer.pipeline import Enhancer
    from venhancer.video_io import read_video

    config = make_tiny_models(tmp_path / "tiny_models")
    clip = make_clip(tmp_path / "clip.mp4")
    kwargs = dict(up_scale=2, target_fps=16, noise_aug=200, solver_mode="normal", steps=2)
    outputs = {}
    for background in (False, True):
        enhancer = Enhancer(config, device="cuda", progress=False, background_load=background)
        result = enhancer.enhance(clip, "a test pattern", save_dir=tmp_path / f"background_{background}", **kwargs)
        outputs[background] = read_video(result.output_path).frames
        sidecar = json.loads(result.sidecar_path.read_text())
        assert sidecar["model"]["background_load"] is background
        del enhancer
        torch.cuda.empty_cache()
    plain, background = (np.asarray(outputs[b]).astype(np.int16) for b in (False, True))
    assert plain.shape == background.shape and plain.size > 0
    # the same computation on the same GPU: equal but for the rare last-bit difference of a
    # kernel that is not bit-reproducible, which can move an 8-bit value by one
    assert np.abs(plain - background).max() <= 1
    assert (plain != background).mean() < 1e-3


# --- memory plans: weights streamed, activations parked -------------------------------------------


@torch.no_grad()
def test_streamed_weights_and_parked_activations_change_no_bit_on_cuda():
    """The smallest memory plan's placement on the GPU (network blocks streamed from page-locked
    host memory on a side stream, skips and ControlNet residuals parked in host memory and
    fetched ahead of use) against the same pass sizes with everything resident: the same bits;
    and parking lowers the evaluation's peak (streamed both ways) by at least two level-0 skips."""
    from dataclasses import replace

    from venhancer.memory import PLANS, WeightStreamer
    from venhancer.runtime import optimize_for_inference

    bench = load_bench()
    plan = next(p for p in PLANS if p.inference.park_activations)
    model = bench.build_model(torch.float16)
    optimize_for_inference(model, replace(plan.inference, park_activations=False))
    x, t, y_c, _, common = bench.window_inputs(8)
    reference = model(x, t, y_c, **common)
    streamer = WeightStreamer(model, "cuda", prefetch=plan.prefetch_units)

    def peak_of_call() -> int:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = model(x, t, y_c, **common)
        torch.cuda.synchronize()
        streamer.end_of_pass()
        assert torch.equal(got, reference)
        return torch.cuda.max_memory_allocated() - before

    peak_of_call()  # records the block order
    streamed_peak = peak_of_call()
    streamer.reconfigure(lambda m: optimize_for_inference(m, plan.inference))
    parked_peaks = [peak_of_call() for _ in range(2)]
    level0_skip = 8 * LATENT[0] * LATENT[1] * 320 * 2  # bytes of one fp16 level-0 activation
    assert max(parked_peaks) < streamed_peak - 2 * level0_skip, (parked_peaks, streamed_peak)
    assert streamer.pinned and streamer.prefetch_hits > 0
