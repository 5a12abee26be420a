"""Tiny network (tiny_config.json, weights seed 1) against the reference vectors of case A."""

import pytest
import torch
from unet_helpers import call_args, max_abs, rel_l2

import venhancer.models.attention as attention_module

REL_L2 = 1e-4  # acceptance bound; measured errors are ~1e-6 (see README of the reference)


def _run_with_probes(model, case, monkeypatch):
    """Forward pass recording the reference's probe tensors via hooks."""
    probes = {}
    handles = []
    f = case["x"].shape[2]
    cn = model.VideoControlNet

    original_frame_embedding = cn.frame_embedding

    def frame_embedding(*args, **kwargs):
        probes["cn_emb"] = original_frame_embedding(*args, **kwargs)
        return probes["cn_emb"]

    monkeypatch.setattr(cn, "frame_embedding", frame_embedding)

    def save_first_temporal_input(module, args):
        x = args[0]  # ((b f), c, h, w) -> (b, c, f, h, w) as stored
        bf, c, h, w = x.shape
        probes["cn_after_hint"] = x.view(bf // f, f, c, h, w).transpose(1, 2)

    handles.append(cn.input_blocks[0][1].register_forward_pre_hook(save_first_temporal_input))
    handles.append(
        model.time_embed.register_forward_hook(lambda m, a, out: probes.__setitem__("unet_emb", out.repeat_interleave(f, 0)))
    )
    handles.append(model.middle_block.register_forward_hook(lambda m, a, out: probes.__setitem__("unet_middle", out)))
    for i, block in enumerate(model.output_blocks):
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: probes.__setitem__(f"dec_{i}", out)))
    try:
        with torch.no_grad():
            out, control = model(*call_args(case), return_control=True)
    finally:
        for h in handles:
            h.remove()
    return out, control, probes


def test_tiny_case_a_output_controls_and_probes(tiny_model, tiny_case, monkeypatch):
    out, control, probes = _run_with_probes(tiny_model, tiny_case, monkeypatch)

    assert out.shape == tiny_case["out"].shape and out.dtype == torch.float32
    assert rel_l2(out, tiny_case["out"]) <= REL_L2
    assert max_abs(out, tiny_case["out"]) <= 2e-5  # the reference README's suggested check

    assert len(control) == 13
    for i, c in enumerate(control):
        ref = tiny_case[f"control_{i}"]
        assert c.shape == ref.shape, i
        assert rel_l2(c, ref) <= REL_L2, i
        assert max_abs(c, ref) <= 2e-5 * float(ref.abs().max()), i

    names = ["cn_emb", "unet_emb", "cn_after_hint", "unet_middle"] + [f"dec_{i}" for i in range(12)]
    for name in names:
        ref = tiny_case[name]
        assert probes[name].shape == ref.shape, name
        assert rel_l2(probes[name], ref) <= REL_L2, name
        assert max_abs(probes[name], ref) <= 2e-5 * float(ref.abs().max()), name


def test_controlnet_callable_on_its_own(tiny_model, tiny_case):
    with torch.no_grad():
        control = tiny_model.VideoControlNet(*call_args(tiny_case))
    for i, c in enumerate(control):
        assert rel_l2(c, tiny_case[f"control_{i}"]) <= REL_L2, i


def test_batch_of_two_equals_items_one_at_a_time(tiny_model, tiny_case):
    """cond + uncond batched: different text and (per item) different masks."""
    x, t, y, hint, t_hint, s_cond, mask = call_args(tiny_case)
    y2 = torch.flip(y, dims=[1]) * 0.5 - 0.25
    mask2 = torch.tensor([[0, -1, -1, -1, 2]])
    items = [(y, mask), (y2, mask2)]
    with torch.no_grad():
        singles = [tiny_model(x, t, yi, hint, t_hint, s_cond, mi) for yi, mi in items]
        batched = tiny_model(
            x.repeat(2, 1, 1, 1, 1), t.repeat(2), torch.cat([y, y2]), hint.repeat(2, 1, 1, 1, 1),
            t_hint.repeat(2), s_cond.repeat(2), torch.cat([mask, mask2]),
        )
    assert rel_l2(singles[0], tiny_case["out"]) <= REL_L2
    for i in range(2):
        assert max_abs(batched[i : i + 1], singles[i]) <= 2e-5, i
    assert max_abs(singles[0], singles[1]) > 1e-2  # the two items really differ


def test_scalar_and_float_conditioning_values_and_shared_mask(tiny_model, tiny_case):
    x, t, y, hint, t_hint, s_cond, mask = call_args(tiny_case)
    with torch.no_grad():
        out = tiny_model(x, float(t[0]), y, hint, t_hint.double(), int(s_cond[0]), mask[0].tolist())
        pair = tiny_model(x.repeat(2, 1, 1, 1, 1), t, y.repeat(2, 1, 1), hint.repeat(2, 1, 1, 1, 1), t_hint, s_cond, mask)
    assert rel_l2(out, tiny_case["out"]) <= REL_L2
    assert max_abs(pair[1:], tiny_case["out"]) <= 2e-5


def test_attention_slicing_gives_the_same_result(tiny_model, tiny_case, monkeypatch):
    # 3 sequences x 2 heads per kernel call: slices the temporal (160 pixels) and spatial attention
    monkeypatch.setattr(attention_module, "MAX_ATTENTION_BATCH_HEADS", 6)
    with torch.no_grad():
        out = tiny_model(*call_args(tiny_case))
    assert max_abs(out, tiny_case["out"]) <= 2e-5


@pytest.mark.parametrize("h, w", [(8, 16), (10, 12), (11, 16)])
def test_unsupported_latent_sizes_are_rejected(tiny_model, tiny_case, h, w):
    x, t, y, hint, t_hint, s_cond, mask = call_args(tiny_case)
    with pytest.raises(ValueError, match="latent size"):
        tiny_model(x[..., :1, :1].expand(-1, -1, -1, h, w), t, y, hint[..., :1, :1].expand(-1, -1, -1, h, w), t_hint, s_cond, mask)


@pytest.mark.parametrize("bad_mask", [[[0, -1, 3, -1, 2]], [[0, -2, 1, -1, 2]], [[0, 1, 2]]])
def test_bad_masks_are_rejected(tiny_model, tiny_case, bad_mask):
    x, t, y, hint, t_hint, s_cond, _ = call_args(tiny_case)
    with pytest.raises(ValueError, match="mask_cond"):
        tiny_model(x, t, y, hint, t_hint, s_cond, torch.tensor(bad_mask))


def test_other_latent_sizes_and_frame_counts_run(tiny_model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 18, 8, generator=g)
    hint = torch.randn(1, 4, 1, 18, 8, generator=g)
    y = torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        out = tiny_model(x, 500, y, hint, 0, 8, [[0, -1]])
    assert out.shape == x.shape and torch.isfinite(out).all()
