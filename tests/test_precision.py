"""--precision: its names and the deprecated --dtype alias, what auto means on each device, and
fp8 only where the GPU has FP8 tensor cores (GPUs mocked: torch.cuda's queries patched)."""

import pytest
import torch

from venhancer.options import precision_name
from venhancer.pipeline import Enhancer, resolve_precision
from venhancer.runtime import fp8_supported

REFUSAL = ("--precision fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer, "
           "e.g. RTX 40xx, L4, H100); ")


def fake_gpu(monkeypatch, capability, name="NVIDIA A100-SXM4-80GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_dtype_is_the_old_name_of_precision():
    assert precision_name() == "auto"
    assert [precision_name(dtype=d) for d in ("auto", "float32", "float16", "bfloat16")] == ["auto", "fp32", "fp16", "bf16"]
    assert precision_name("bf16", "bfloat16") == "bf16"
    with pytest.raises(ValueError, match=r"^--precision fp16 and --dtype float32 disagree; give --precision alone"):
        precision_name("fp16", "float32")
    with pytest.raises(ValueError, match=r"--precision must be one of auto, fp32, fp16, bf16, fp8, got 'fp4'"):
        precision_name("fp4")
    with pytest.raises(ValueError, match=r"--dtype must be one of auto, float32, float16, bfloat16, got 'half'"):
        precision_name(dtype="half")


def test_auto_is_fp16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision(None, torch.device("cpu"), torch.bfloat16) == "bf16"  # the old API's torch dtype
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_precision(None, torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("capability,supported", [((7, 5), False), ((8, 0), False), ((8, 6), False),
                                                  ((8, 9), True), ((9, 0), True), ((10, 0), True)])
def test_fp8_needs_compute_capability_8_9(monkeypatch, capability, supported):
    assert not fp8_supported("cpu")
    fake_gpu(monkeypatch, capability)
    assert fp8_supported(torch.device("cuda:0")) is supported
    assert not fp8_supported("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not fp8_supported("cuda")


def test_fp8_refusal_names_the_device(monkeypatch):
    with pytest.raises(ValueError) as cpu:
        resolve_precision("fp8", torch.device("cpu"))
    assert str(cpu.value) == REFUSAL + "the device is the CPU"
    fake_gpu(monkeypatch, (8, 0))
    with pytest.raises(ValueError) as a100:
        resolve_precision("fp8", torch.device("cuda"))  # "cuda" names no index: the current device's
    assert str(a100.value) == REFUSAL + "cuda:0 is NVIDIA A100-SXM4-80GB (8.0)"
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    assert resolve_precision("fp8", torch.device("cuda:0")) == "fp8"


def test_enhancer_refuses_fp8_before_loading_anything(monkeypatch):
    """A library user gets the same one line, before any weight file is looked for."""
    import venhancer.pipeline as pipeline

    monkeypatch.setattr(pipeline, "check_weights_available", lambda *a: pytest.fail("weights looked for"))
    with pytest.raises(ValueError, match="^--precision fp8 needs a GPU"):
        Enhancer(device="cpu", precision="fp8", progress=False)
    with pytest.raises(ValueError, match="disagree"):
        Enhancer(device="cpu", precision="bf16", dtype="float16", progress=False)
