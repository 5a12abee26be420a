"""The runtime keeps its state with the model it optimized: no process-wide switches."""

import copy

import pytest
import torch
from torch import nn

from venhancer.models.attention import Attention, TransformerBlock
from venhancer.models.layers import GroupNorm32, ResBlock
from venhancer.runtime import RuntimeSettings, ops, optimize_for_inference
from venhancer.runtime.optimize import FAST_TWINS


def test_interpreter_mode_is_read_at_each_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.interpreting() and ops.runs_on(torch.zeros(1)) == (ops.triton is not None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops.interpreting() and not ops.runs_on(torch.zeros(1))


def test_every_op_family_has_a_support_check():
    assert set(ops.SUPPORTED) == {"group_norm", "layer_norm", "bias_add", "geglu", "geglu_matmul", "linear_add",
                                  "frame_attention", "flash_attention", "fp8_attention", "fp8_linear"}
    assert all(callable(check) for check in ops.SUPPORTED.values())


def test_optimizing_one_model_leaves_another_alone():
    """Twins by class swap on the optimized instance only; the settings live on that instance."""
    torch.manual_seed(0)
    block = nn.Sequential(ResBlock(64, 64, 32), TransformerBlock(64, 2, 32, context_dim=16)).eval()
    other = copy.deepcopy(block)
    fast = optimize_for_inference(block, RuntimeSettings(channels_last=False, ff_chunk_tokens=7))
    assert not any(type(m) in FAST_TWINS for m in fast.modules())  # every layer with a twin swapped
    assert not any(type(m) in FAST_TWINS.values() for m in other.modules())
    assert not any(hasattr(m, "settings") for m in other.modules())
    settings = {id(m.settings) for m in fast.modules() if hasattr(m, "settings")}
    assert len(settings) == 1
    assert isinstance(fast[0].in_layers[0], GroupNorm32) and isinstance(fast[1].attn1, Attention)
    assert list(fast.state_dict()) == list(other.state_dict())


def test_settings_are_immutable_and_checked():
    settings = RuntimeSettings()
    with pytest.raises(AttributeError):
        settings.fused_kernels = False
    with pytest.raises(ValueError, match="temporal_chunk_tokens"):
        RuntimeSettings(temporal_chunk_tokens=0)
    assert RuntimeSettings(fused_kernels=False).frame_attention is False
    assert RuntimeSettings().fp8_qk == "int8" and RuntimeSettings(fp8_qk="e4m3").fp8_qk == "e4m3"
    with pytest.raises(ValueError, match="'int4'"):
        RuntimeSettings(fp8_qk="int4")
