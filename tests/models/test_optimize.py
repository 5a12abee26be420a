"""The optimized inference layout computes the same function as the plain model."""

import copy

import pytest
import torch
from torch import nn

from unet_helpers import call_args, max_abs, rel_l2
from venhancer.models.layers import GroupNorm32
from venhancer.models.optimize import InferenceOptions, optimize_for_inference

REL_L2 = 1e-4


@pytest.mark.parametrize("chunk, frames", [(None, None), (37, 2), (None, 1)])
def test_optimized_tiny_matches_reference(tiny_model, tiny_case, chunk, frames):
    options = InferenceOptions(ff_chunk_tokens=chunk, spatial_frame_chunk=frames)
    model = optimize_for_inference(copy.deepcopy(tiny_model), options)
    with torch.no_grad():
        out = model(*call_args(tiny_case))
    assert rel_l2(out, tiny_case["out"]) <= REL_L2
    assert max_abs(out, tiny_case["out"]) <= 2e-5


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


def test_batch_of_two_matches_items(tiny_model, tiny_case):
    # Frame chunks of 2 over 5-frame items: a chunk never mixes the two items' text contexts.
    model = optimize_for_inference(copy.deepcopy(tiny_model), InferenceOptions(spatial_frame_chunk=2))
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
    with pytest.raises(ValueError, match="spatial_frame_chunk .*-1"):
        InferenceOptions(spatial_frame_chunk=-1)


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


def test_fused_norm_falls_back_when_compilation_fails(monkeypatch, caplog):
    from venhancer.models import layers

    def broken(*args):
        raise RuntimeError("no working C compiler")

    monkeypatch.setattr(layers, "_compiled_group_norm_act", broken)
    monkeypatch.setattr(layers, "_compile_failed", False)
    x, w, b = torch.randn(2, 64, 3, 4), torch.randn(64), torch.randn(64)
    with caplog.at_level("WARNING"):
        out = layers._fused_group_norm_act(x, w, b, 32, 1e-5, True)
    assert torch.allclose(out, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-5)), atol=1e-6)
    assert "no working C compiler" in caplog.text and layers._compile_failed


def test_fused_norm_matches_eager_on_every_layout():
    """The compiled kernel (CPU inductor here; CUDA in use) gives the eager result for the
    layouts the network hands it: per-frame channels-last and the 5-D temporal views."""
    from venhancer.models import layers

    w, b = torch.randn(64), torch.randn(64)
    inputs = [
        torch.randn(6, 64, 5, 8).contiguous(memory_format=torch.channels_last),
        torch.randn(1, 64, 6, 5, 8).contiguous(memory_format=torch.channels_last_3d),
        torch.randn(1, 6, 64, 5, 8).transpose(1, 2),
    ]
    for x in inputs:
        for silu in (True, False):
            got = layers._fused_group_norm_act(x, w, b, 32, 1e-6, silu)
            assert torch.allclose(got, layers._group_norm_act(x, w, b, 32, 1e-6, silu), atol=1e-5)
