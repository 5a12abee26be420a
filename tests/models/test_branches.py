"""The runtime's own evaluation paths on the tiny network: the guidance branches' shared prefix
(`forward_branches`) and the chunked feed-forward give what the plain network gives."""

import copy
from dataclasses import replace

import pytest
import torch
from unet_helpers import call_args, max_abs, rel_l2

from venhancer.models.attention import SpatialTransformer
from venhancer.runtime import RuntimeSettings, optimize_for_inference
from venhancer.runtime.layers import FastResBlock
from venhancer.runtime.transformer import FastAttention

REL_L2 = 1e-4

# The twins on the plain model's kernels and layout, one pass per layer: only the setting under
# test differs from the plain forward.
PLAIN_LIKE = RuntimeSettings(channels_last=False, fused_kernels=False, tuned_attention=False, fused_projections=False,
                             ff_chunk_tokens=None, spatial_chunk_tokens=None, temporal_chunk_tokens=None,
                             concat_frame_chunk=None, share_self_attention=False, transposed_upsample=False)


def test_feed_forward_chunking_gives_the_same_result(tiny_model, tiny_case):
    model = optimize_for_inference(copy.deepcopy(tiny_model), replace(PLAIN_LIKE, ff_chunk_tokens=37))
    with torch.no_grad():
        out = model(*call_args(tiny_case))
    assert max_abs(out, tiny_case["out"]) <= 2e-5
    with pytest.raises(ValueError):
        replace(PLAIN_LIKE, ff_chunk_tokens=0)


@pytest.mark.parametrize("share_self_attention, spatial_chunk_tokens", [(False, None), (True, None), (True, 160)])
def test_branches_share_the_text_free_layers(tiny_model, tiny_case, monkeypatch, share_self_attention, spatial_chunk_tokens):
    """forward_branches gives each text context exactly what forward gives it, and runs the
    layers before the first text-reading one (block 0 and the next ResBlock of both encoders,
    and with `share_self_attention` the first spatial transformer's self-attention) once for all
    branches, also when the spatial transformers run in frame passes (160 tokens: one of the
    case's 5 frames of 10x16 per pass at level 0)."""
    model = optimize_for_inference(copy.deepcopy(tiny_model), replace(PLAIN_LIKE, share_self_attention=share_self_attention,
                                                                      spatial_chunk_tokens=spatial_chunk_tokens))
    x, t, y, hint, t_hint, s_cond, mask = call_args(tiny_case)
    contexts = [y, torch.flip(y, dims=[1]) * 0.5 - 0.25, -y]
    calls = {FastResBlock: 0, "spatial self-attention": 0}
    forward, attention_forward = FastResBlock.forward, FastAttention.forward
    spatial_attentions = {id(m.transformer_blocks[0].attn1) for m in model.modules() if isinstance(m, SpatialTransformer)}

    def counted(self, *args, **kwargs):
        calls[FastResBlock] += 1
        return forward(self, *args, **kwargs)

    def counted_attention(self, *args, **kwargs):
        calls["spatial self-attention"] += id(self) in spatial_attentions
        return attention_forward(self, *args, **kwargs)

    monkeypatch.setattr(FastResBlock, "forward", counted)
    monkeypatch.setattr(FastAttention, "forward", counted_attention)
    with torch.no_grad():
        singles = [model(x, t, yi, hint, t_hint, s_cond, mask) for yi in contexts]
        per_forward = {key: n // len(contexts) for key, n in calls.items()}
        calls.update({key: 0 for key in calls})
        shared = model.forward_branches(x, t, contexts, hint, t_hint, s_cond, mask)
    assert rel_l2(shared[0], tiny_case["out"]) <= REL_L2
    for got, want in zip(shared, singles):
        assert torch.equal(got, want)
    # One ResBlock per encoder (UNet, ControlNet) runs once instead of once per branch, and so,
    # when shared, does the self-attention of the spatial transformer after it (once per pass).
    passes = 1 if spatial_chunk_tokens is None else x.shape[2]
    assert calls[FastResBlock] == len(contexts) * per_forward[FastResBlock] - 2 * (len(contexts) - 1)
    saved = 2 * passes * (len(contexts) - 1) if share_self_attention else 0
    assert per_forward["spatial self-attention"] > 2 * passes
    assert calls["spatial self-attention"] == len(contexts) * per_forward["spatial self-attention"] - saved
    with pytest.raises(ValueError, match="one shape"):
        model.forward_branches(x, t, [y, y[:, :5]], hint, t_hint, s_cond, mask)
