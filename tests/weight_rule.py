"""The deterministic synthetic-weight rule with which the reference vectors were made,
re-implemented for the tests (the fingerprint files in tests/fixtures pin it down).

Entry number k (0-based, manifest order) with key `key` and shape `shape`, for a given seed:
    u = numpy PCG64 generator seeded with seed * 1_000_003 + k, `random(prod(shape))` (float64)
    z = (u - 0.5) * sqrt(12)
    2-D or more:          z / sqrt(prod(shape[1:]))
    1-D, key ends "bias": 0.1 * z
    other 1-D:            1 + 0.1 * z
computed in float64, cast to float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """`[(key, shape), ...]` in manifest order from tests/fixtures/<name>."""
    data = json.loads((FIXTURES / name).read_text())
    return [(key, tuple(int(s) for s in shape)) for key, shape in data["entries"]]


def synthetic_tensor(key: str, shape: tuple[int, ...], index: int, seed: int) -> torch.Tensor:
    count = math.prod(shape)
    rng = np.random.Generator(np.random.PCG64(seed * 1_000_003 + index))
    centred = (rng.random(count) - 0.5) * math.sqrt(12.0)  # zero mean, unit variance
    if len(shape) >= 2:
        values = centred / math.sqrt(math.prod(shape[1:]))
    elif key.endswith("bias"):
        values = centred * 0.1
    else:
        values = centred * 0.1 + 1.0
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def synthetic_entries(manifest: list[tuple[str, tuple[int, ...]]], seed: int):
    """Yield (index, key, tensor) one entry at a time (the full model is 8 GB in float32)."""
    for index, (key, shape) in enumerate(manifest):
        yield index, key, synthetic_tensor(key, shape, index, seed)


def fingerprint(tensor: torch.Tensor) -> tuple[list[float], float, float]:
    """First four values, float64 sum and float64 sum of squares."""
    flat = tensor.detach().reshape(-1).to(torch.float64)
    return flat[:4].tolist(), float(flat.sum()), float((flat * flat).sum())


def fill_model(model: torch.nn.Module, manifest, seed: int, on_entry=None) -> torch.nn.Module:
    """Give every parameter of `model` (possibly on the meta device) its synthetic value,
    entry by entry, replacing the parameter (`assign`) so no second copy is made.

    `on_entry(index, key, tensor)` is called for each entry (e.g. to check fingerprints)."""
    params = dict(model.named_parameters())
    if set(params) != {key for key, _ in manifest}:
        raise AssertionError("model parameters do not match the manifest keys")
    for index, key, value in synthetic_entries(manifest, seed):
        if on_entry is not None:
            on_entry(index, key, value)
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if tuple(getattr(module, param_name).shape) != tuple(value.shape):
            raise AssertionError(f"{key}: shape {tuple(value.shape)} vs model {tuple(getattr(module, param_name).shape)}")
        setattr(module, param_name, torch.nn.Parameter(value, requires_grad=False))
    return model
