"""The optimized inference layout computes the same function as the plain model."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from unet_helpers import call_args, max_abs, rel_l2

from venhancer.models.attention import Attention, TemporalTransformer
from venhancer.models.layers import GroupNorm32, ResBlock, Upsample
from venhancer.runtime import InferenceOptions, RuntimeSettings, optimize_for_inference
from venhancer.runtime.branches import BiasPending, FastVideoControlNet
from venhancer.runtime.layers import FastResBlock, FastUpsample
from venhancer.runtime.transformer import FastTemporalTransformer

REL_L2 = 1e-4
HERE = Path(__file__).resolve().parent


# spatial 320: 2 of the 5 frames per pass at level 0 (10x16 tokens), all 5 at the deeper levels
@pytest.mark.parametrize("chunk, spatial, temporal, resblock, concat",
                         [(None, None, None, None, None), (37, 320, 13, 2, 8), (None, 1, 2**19, 3, 2)])
def test_optimized_tiny_matches_reference(tiny_model, tiny_case, chunk, spatial, temporal, resblock, concat):
    options = InferenceOptions(ff_chunk_tokens=chunk, spatial_chunk_tokens=spatial, temporal_chunk_tokens=temporal,
                               conv_frame_chunk=resblock, concat_frame_chunk=concat)
    model = optimize_for_inference(copy.deepcopy(tiny_model), options)
    with torch.no_grad():
        out = model(*call_args(tiny_case))
    assert rel_l2(out, tiny_case["out"]) <= REL_L2
    assert max_abs(out, tiny_case["out"]) <= 2e-5


def test_zero_conv_biases_fold_into_the_skip_sums(tiny_model, tiny_case):
    model = optimize_for_inference(copy.deepcopy(tiny_model))
    control_net = model.VideoControlNet
    assert isinstance(control_net, FastVideoControlNet) and control_net.settings.fused_kernels
    with torch.no_grad():
        width = control_net.middle_block_out[0].in_channels
        pending = control_net._zero_conv(control_net.middle_block_out, torch.randn(2, width, 3, 4))
        out, control = model(*call_args(tiny_case), return_control=True)
        _, want = tiny_model(*call_args(tiny_case), return_control=True)
    assert isinstance(pending, BiasPending) and pending.bias is control_net.middle_block_out[0].bias
    assert rel_l2(out, tiny_case["out"]) <= REL_L2
    # the residuals handed out carry their biases
    assert len(control) == len(want) and all(isinstance(c, torch.Tensor) and rel_l2(c, w) <= REL_L2
                                             for c, w in zip(control, want))


def test_optimize_keeps_state_dict_and_folds_silu(tiny_model):
    model = optimize_for_inference(copy.deepcopy(tiny_model))
    before, after = tiny_model.state_dict(), model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm32)]
    assert any(m.apply_silu for m in norms)
    assert not any(isinstance(m, nn.SiLU) for seq in model.modules() if isinstance(seq, nn.Sequential) and isinstance(seq[0], GroupNorm32) for m in seq)
    conv = model.VideoControlNet.input_hint_block
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_projections_share_the_weights(tiny_model):
    """Self-attention's stacked q/k/v weight holds the Linears' weights as views: the state dict
    keeps its keys and values, and loading new weights afterwards updates the stacked one too."""
    model = optimize_for_inference(copy.deepcopy(tiny_model))
    fused = [m for m in model.modules() if isinstance(m, Attention) and m.qkv_weight is not None]
    cross = [m for m in model.modules() if isinstance(m, Attention) and not m.self_attention]
    assert fused and cross and all(m.qkv_weight is None for m in cross)
    assert "qkv_weight" not in "".join(model.state_dict())
    state = {k: v + 1 for k, v in tiny_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    attn = fused[0]
    assert torch.equal(attn.qkv_weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert attn.to_q.weight.data_ptr() == attn.qkv_weight.data_ptr()
    with pytest.raises(ValueError, match="self-attention"):
        cross[0].fuse_projections()
    plain = optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(fused_projections=False))
    assert all(m.qkv_weight is None for m in plain.modules() if isinstance(m, Attention))


def test_batch_of_two_matches_items(tiny_model, tiny_case):
    # Frame chunks of 2 over 5-frame items: a chunk never mixes the two items' text contexts.
    model = optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(spatial_chunk_tokens=320))
    x, t, y, hint, t_hint, s_cond, mask = call_args(tiny_case)
    y2 = torch.cat([y, -y])
    with torch.no_grad():
        both = model(torch.cat([x, x]), torch.cat([t, t]), y2, torch.cat([hint, hint]), torch.cat([t_hint, t_hint]), torch.cat([s_cond, s_cond]), torch.cat([mask, mask]))
        second = model(x, t, -y, hint, t_hint, s_cond, mask)
    assert max_abs(both[:1], tiny_case["out"]) <= 2e-5
    assert max_abs(both[1:], second) <= 2e-5


def test_invalid_chunk_rejected():
    with pytest.raises(ValueError, match="ff_chunk_tokens"):
        InferenceOptions(ff_chunk_tokens=0)
    with pytest.raises(ValueError, match="spatial_chunk_tokens .*-1"):
        InferenceOptions(spatial_chunk_tokens=-1)
    with pytest.raises(ValueError, match="temporal_chunk_tokens"):
        InferenceOptions(temporal_chunk_tokens=0)
    with pytest.raises(ValueError, match="conv_frame_chunk .*True"):
        InferenceOptions(conv_frame_chunk=True)
    with pytest.raises(ValueError, match="concat_frame_chunk .*0"):
        InferenceOptions(concat_frame_chunk=0)


def test_concat_frame_chunk_applies_to_the_skip_concatenations_only(tiny_model, tiny_case, monkeypatch):
    """`concat_frame_chunk` runs the decoder ResBlocks (input: x and a skip) over that many frames
    at a time and leaves the other ResBlocks whole; the smaller of it and `conv_frame_chunk`
    wins. The result stays the reference's."""
    frames = tiny_case["x"].shape[2]  # 5
    original = FastResBlock._per_frame
    for conv, concat, plain_passes, concat_passes in [(None, 2, 1, 3), (4, 2, 2, 3), (2, 4, 3, 3), (None, None, 1, 1)]:
        model = optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(conv_frame_chunk=conv, concat_frame_chunk=concat))
        concatenating = {}  # ResBlock -> whether its input is (x, skip)
        for block in model.modules():
            if isinstance(block, ResBlock):
                block.register_forward_pre_hook(lambda m, args: concatenating.__setitem__(m, isinstance(args[0], (tuple, list))))
        passes = {False: [], True: []}  # frames per pass, by input kind

        def per_frame(self, x, emb_out):
            passes[concatenating[self]].append(x.shape[0])
            return original(self, x, emb_out)

        monkeypatch.setattr(FastResBlock, "_per_frame", per_frame)
        with torch.no_grad():
            out = model(*call_args(tiny_case))
        assert rel_l2(out, tiny_case["out"]) <= REL_L2
        for concat_input, expected in ((False, plain_passes), (True, concat_passes)):
            blocks = sum(1 for v in concatenating.values() if v == concat_input)
            assert blocks and len(passes[concat_input]) == blocks * expected
            assert sum(passes[concat_input]) == blocks * frames
    assert model.settings.share_self_attention
    assert not optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(share_self_attention=False)).settings.share_self_attention


def test_low_vram_preset_matches_reference(tiny_model, tiny_case):
    """The low-memory preset only changes pass sizes: the result is the reference's. The
    ResBlocks really run in chunks (the decoder's skips concatenated per chunk)."""
    options = InferenceOptions.low_vram()
    assert options.conv_frame_chunk and options.spatial_chunk_tokens
    model = optimize_for_inference(copy.deepcopy(tiny_model), options)
    seen = []
    for block in model.modules():
        if isinstance(block, ResBlock):
            block.register_forward_pre_hook(lambda m, args: seen.append(isinstance(args[0], (tuple, list))))
    calls, upsampled = [], []
    for block in model.modules():
        if isinstance(block, ResBlock):
            original = block._per_frame
            block._per_frame = lambda x, e, _o=original: (calls.append(x.shape[0]), _o(x, e))[1]
        if isinstance(block, Upsample):
            original = block._upsample
            block._upsample = lambda x, _o=original: (upsampled.append(x.shape[0]), _o(x))[1]
    with torch.no_grad():
        out = model(*call_args(tiny_case))
    assert any(seen) and not all(seen)  # decoder blocks get (x, skip), encoder blocks a tensor
    frames = tiny_case["x"].shape[2]
    assert max(calls) <= options.conv_frame_chunk < frames
    assert upsampled and max(upsampled) <= options.conv_frame_chunk
    assert rel_l2(out, tiny_case["out"]) <= REL_L2
    assert max_abs(out, tiny_case["out"]) <= 2e-5


def test_window_uses_global_key_indices(tiny_model, tiny_case):
    """A window sees the whole clip's hint and global indices; only the referenced key frames
    are projected, so extra unreferenced key frames on either side change nothing."""
    x, t, y, hint, t_hint, s_cond, mask = call_args(tiny_case)
    extra = torch.randn(1, hint.shape[1], 2, *hint.shape[3:])
    wider = torch.cat([extra, hint, extra], dim=2)
    shifted = torch.where(mask >= 0, mask + 2, mask)
    with torch.no_grad():
        out = tiny_model(x, t, y, wider, t_hint, s_cond, shifted)
    assert max_abs(out, tiny_case["out"]) <= 2e-5


def test_kernels_run_the_tiny_model_under_the_interpreter():
    """The Triton kernels (GroupNorm+SiLU with the fused embedding add, GEGLU) and the frame-major
    temporal attention, run by Triton's CPU interpreter, reproduce the reference output. A
    subprocess, because the interpreter is chosen when Triton is imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpreted_kernels.py")],
                          env=env, capture_output=True, text=True, cwd=HERE.parents[1], timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_frame_major_temporal_path_matches_reference(tiny_model, tiny_case):
    """Channels-last without the Triton kernels: frame-major temporal attention by strides."""
    model = optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(fused_kernels=False, temporal_chunk_tokens=17))
    temporal = [m for m in model.modules() if isinstance(m, TemporalTransformer)]
    assert temporal and all(isinstance(m, FastTemporalTransformer) and m.settings.channels_last for m in temporal)
    with torch.no_grad():
        out = model(*call_args(tiny_case))
    assert max_abs(out, tiny_case["out"]) <= 2e-5


@pytest.mark.parametrize("height, width", [(2, 3), (5, 7), (9, 4)])
def test_transposed_upsample_matches_interpolate_crop_conv(height, width):
    """The decoder's nearest x2 + crop + 3x3 conv as one transposed convolution: the same
    function in float64 (the two edge rows, which the crop makes special, included)."""
    torch.manual_seed(0)
    up = Upsample(6).double()
    x = torch.randn(3, 6, height, width, dtype=torch.float64)
    with torch.no_grad():
        ref = up(x)
        optimize_for_inference(up, RuntimeSettings(channels_last=False, transposed_upsample=True))
        out = up(x)
    assert out.shape == ref.shape == (3, 6, 2 * height - 2, 2 * width)
    assert max_abs(out, ref) <= 1e-12


def test_transposed_upsample_follows_new_weights_and_stays_out_of_the_state_dict():
    torch.manual_seed(0)
    up = optimize_for_inference(Upsample(4), RuntimeSettings(channels_last=False, transposed_upsample=True))
    x = torch.randn(2, 4, 5, 6)
    keys = list(up.state_dict())
    with torch.no_grad():
        up(x)
        up.load_state_dict({k: v * 2 + 1 for k, v in up.state_dict().items()}, strict=True)  # in place
        out = up(x)
        up.settings = RuntimeSettings(channels_last=False, transposed_upsample=False)
        ref = up(x)
    assert list(up.state_dict()) == keys
    assert max_abs(out, ref) <= 1e-5


def test_optimize_sets_transposed_upsample(tiny_model):
    model = optimize_for_inference(copy.deepcopy(tiny_model))
    ups = [m for m in model.modules() if isinstance(m, Upsample)]
    assert ups and all(isinstance(m, FastUpsample) and m.settings.transposed_upsample for m in ups)
    plain = optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(transposed_upsample=False))
    assert not any(m.settings.transposed_upsample for m in plain.modules() if isinstance(m, Upsample))


def test_fp8_setting_changes_nothing_without_fp8_tensor_cores(tiny_model, tiny_case):
    """RuntimeSettings(fp8=True) on a device without FP8 support (the CPU): the FP8 ops decline
    and the output is bit-identical to the default settings' (fp8=False)."""
    default = optimize_for_inference(copy.deepcopy(tiny_model), RuntimeSettings())
    fp8 = optimize_for_inference(copy.deepcopy(tiny_model), RuntimeSettings(fp8=True, fp8_pv=True, fp8_linear=True))
    assert not RuntimeSettings().fp8 and fp8.settings.fp8_linears and fp8.settings.fp8_attention_kernel
    with torch.no_grad():
        assert torch.equal(default(*call_args(tiny_case)), fp8(*call_args(tiny_case)))
