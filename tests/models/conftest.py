"""Shared fixtures for the network tests: the tiny reference network and its parity case."""

from __future__ import annotations

import json

import pytest
import torch
import unet_helpers  # noqa: F401  (puts tests/ on sys.path for weight_rule)
from safetensors.torch import load_file
from weight_rule import FIXTURES, fill_model, load_manifest

from venhancer.models import UNetConfig, VEnhancerUNet


@pytest.fixture(scope="session")
def tiny_config() -> UNetConfig:
    kwargs = json.loads((FIXTURES / "tiny_config.json").read_text())["constructor_kwargs"]
    return UNetConfig.from_dict(kwargs)


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> VEnhancerUNet:
    """The tiny network with the synthetic weights of seed 1 (as in the reference run)."""
    with torch.device("meta"):
        model = VEnhancerUNet(tiny_config)
    fill_model(model, load_manifest("tiny_manifest.json"), seed=1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_case() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "tiny_case_a.safetensors"))
