"""Attention kernel choice, slicing and the half-precision GroupNorm."""

import logging
import types

import pytest
import torch
import torch.nn.functional as F

import venhancer.models.attention as attention_module
import venhancer.runtime.attention as fast_attention
from venhancer.models import get_attention_backend, set_attention_backend, xformers_available
from venhancer.models.layers import GroupNorm32


@pytest.fixture(autouse=True)
def restore_backend():
    saved = get_attention_backend()
    yield
    attention_module._requested_backend = saved
    attention_module._logged_choices.clear()


def _qkv(batch=5, n=7, m=9, heads=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, heads * d, generator=g), torch.randn(batch, m, heads * d, generator=g),
            torch.randn(batch, m, heads * d, generator=g))


def _plain_attention(q, k, v, heads):
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="flash"):
        set_attention_backend("flash")


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here")
def test_xformers_requested_but_missing():
    with pytest.raises(ValueError, match="xformers"):
        set_attention_backend("xformers")
    assert set_attention_backend("auto") == "sdpa"


def test_sdpa_matches_plain_softmax_attention():
    q, k, v = _qkv()
    torch.testing.assert_close(attention_module.attention(q, k, v, 3), _plain_attention(q, k, v, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_rows", [1, 3, 7, 100])
def test_wide_head_attention_matches_plain_softmax_attention(score_rows):
    """Query rows in chunks (one row, uneven, exact, all at once), keys longer than queries."""
    q, k, v = _qkv(batch=2, n=7, m=9, heads=1, d=40)
    out = fast_attention.wide_head_attention(q, k, v, score_bytes=4 * 9 * score_rows)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, _plain_attention(q, k, v, 1), atol=1e-6, rtol=1e-6)


def test_wide_head_attention_rejects_mismatched_shapes():
    q, k, v = _qkv(batch=2, n=7, m=9, heads=1, d=8)
    with pytest.raises(ValueError, match=r"k \(2, 9, 8\), v \(2, 8, 8\)"):
        fast_attention.wide_head_attention(q, k, v[:, :8])


def test_slicing_of_long_batches(monkeypatch):
    q, k, v = _qkv(batch=11)
    full = attention_module.attention(q, k, v, 3)
    monkeypatch.setattr(attention_module, "MAX_ATTENTION_BATCH_HEADS", 7)  # 2 sequences x 3 heads per call
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape[0] * args[0].shape[1])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    sliced = attention_module.attention(q, k, v, 3)
    assert len(calls) == 6 and max(calls) <= 7
    torch.testing.assert_close(sliced, full, atol=1e-6, rtol=1e-6)


def test_default_limit_keeps_fused_kernels_within_grid_limits():
    # 65535 is the largest grid dimension the fused CUDA kernels can launch along batch/heads.
    assert attention_module.MAX_ATTENTION_BATCH_HEADS <= 65535


def test_xformers_layout_via_a_stand_in(monkeypatch):
    """The xformers path hands (batch, seq, heads, d) tensors and reads the same layout back."""
    seen = []

    def memory_efficient_attention(q, k, v):
        seen.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    monkeypatch.setattr(attention_module, "_xformers_ops", types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention))
    monkeypatch.setattr(attention_module, "_backend_for", lambda device: "xformers")
    q, k, v = _qkv()
    got = attention_module.attention(q, k, v, 3)
    assert seen == [torch.Size([5, 7, 3, 4])]
    torch.testing.assert_close(got, _plain_attention(q, k, v, 3), atol=1e-5, rtol=1e-5)


def test_auto_with_xformers_uses_it_only_on_cuda(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "_xformers_ops", types.SimpleNamespace(memory_efficient_attention=None))
    assert set_attention_backend("auto") == "xformers"
    with caplog.at_level(logging.INFO, logger="venhancer"):
        assert attention_module._backend_for(torch.device("cpu")) == "sdpa"
        assert attention_module._backend_for(torch.device("cpu")) == "sdpa"
        assert attention_module._backend_for(torch.device("cuda")) == "xformers"
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("venhancer")]
    assert len(messages) == 2  # once per (choice, device), not per call
    assert "sdpa" in messages[0] and "xformers" in messages[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_computes_in_float32_for_half_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    x = (torch.randn(2, 64, 3, 5, 4, generator=g) * 3 + 100).to(dtype)  # large mean: fp16 stats would drift
    norm = norm.to(dtype)
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-5).to(dtype)
    got = norm(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
