"""Shared helpers of the diffusion tests: fixture loading and fake v-prediction models."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@lru_cache(maxsize=None)
def sampler_ref() -> dict[str, Tensor]:
    return load_file(str(FIXTURES / "sampler_ref.safetensors"))


@lru_cache(maxsize=None)
def sampler_json() -> dict[str, Any]:
    return json.loads((FIXTURES / "sampler_ref.json").read_text())


@lru_cache(maxsize=None)
def tables() -> dict[str, Any]:
    return json.loads((FIXTURES / "tables.json").read_text())


def _per_item(v: Tensor) -> Tensor:
    return v.to(torch.float32).reshape(-1, 1, 1, 1, 1)


def reference_fake_model(xt: Tensor, t: Tensor, y: Tensor, hint: Tensor, mask_cond: Tensor,
                         s_cond: Tensor, t_hint: Tensor) -> Tensor:
    """The closed-form fake denoiser of reference/README.md ("Fake denoiser"), float32.

    The y and hint means are over all elements (so it is only used with batch 1 per branch).
    """
    m = y.mean()
    hm = hint.mean()
    key = (mask_cond >= 0).to(torch.float32).reshape(mask_cond.shape[0], 1, -1, 1, 1)
    return (torch.tanh(0.5 * xt) * (1 + _per_item(t) / 1000 + 0.1 * m) + 0.1 * m + 0.05 * hm
            + key * (0.02 + 0.001 * _per_item(s_cond) + 0.0001 * _per_item(t_hint)))


def per_item_fake_model(xt: Tensor, t: Tensor, y: Tensor, hint: Tensor, mask_cond: Tensor,
                        s_cond: Tensor, t_hint: Tensor) -> Tensor:
    """:func:`reference_fake_model` with the y / hint means taken per batch item.

    Identical formula for batch 1, but batch-separable, so batched branches can be compared.
    """
    b = xt.shape[0]
    m = y.flatten(1).mean(dim=1).reshape(b, 1, 1, 1, 1)
    hm = hint.flatten(1).mean(dim=1).reshape(b, 1, 1, 1, 1)
    key = (mask_cond >= 0).to(torch.float32).reshape(b, 1, -1, 1, 1)
    return (torch.tanh(0.5 * xt) * (1 + _per_item(t) / 1000 + 0.1 * m) + 0.1 * m + 0.05 * hm
            + key * (0.02 + 0.001 * _per_item(s_cond) + 0.0001 * _per_item(t_hint)))


def frame_local_model(xt: Tensor, t: Tensor, y: Tensor, hint: Tensor, mask_cond: Tensor,
                      s_cond: Tensor, t_hint: Tensor) -> Tensor:
    """A fake v-model whose output frame j depends only on input frame j and its own key frame.

    Key frames receive 0.05 * hint[:, :, mask_cond[j]] (a *global* key-frame index into the full
    hint), so it also checks that chunks get the whole hint and unshifted mask indices. Per-item
    means keep it batch-separable (for batched-branch tests).
    """
    b, _, f = xt.shape[:3]
    assert mask_cond.shape == (b, f), (mask_cond.shape, xt.shape)
    m = y.flatten(1).mean(dim=1).reshape(b, 1, 1, 1, 1)
    key = (mask_cond >= 0).to(xt.dtype).reshape(b, 1, f, 1, 1)
    idx = mask_cond.clamp(min=0)
    gathered = torch.stack([hint[i][:, idx[i]] for i in range(b)])  # (b, c, f, h, w)
    return (torch.tanh(0.5 * xt) * (1 + _per_item(t) / 1000 + 0.1 * m) + 0.1 * m
            + key * (0.02 + 0.001 * _per_item(s_cond) + 0.0001 * _per_item(t_hint) + 0.05 * gathered))


class Recorder:
    """Wraps a model and records (t, x, y) of every call."""

    def __init__(self, model):
        self.model = model
        self.calls: list[dict[str, Tensor]] = []

    def __call__(self, xt: Tensor, t: Tensor, **kwargs: Tensor) -> Tensor:
        self.calls.append({"t": t.clone(), "x": xt.clone(), "y": kwargs["y"],
                           "mask_cond": kwargs["mask_cond"].clone()})
        return self.model(xt, t, **kwargs)


def ref_branches() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    d = sampler_ref()
    common = {"hint": d["hint"], "mask_cond": d["mask_cond"], "s_cond": d["s_cond"], "t_hint": d["t_hint"]}
    return {"y": d["y_c"], **common}, {"y": d["y_u"], **common}


def stored_noise_sampler():
    """noise_sampler returning noise_0, noise_1, ... and logging the (sigma, sigma_next) pairs."""
    d = sampler_ref()
    log: list[tuple[float, float]] = []
    state = {"k": 0}

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        log.append((float(sigma), float(sigma_next)))
        k = state["k"]
        state["k"] += 1
        return d[f"noise_{k}"]

    return draw, log
