"""Helpers shared by the network tests (imported by name: keep this file name unique)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:  # for `import weight_rule`
    sys.path.insert(0, str(TESTS_DIR))

CALL_KEYS = ("x", "t", "y", "hint", "t_hint", "s_cond", "mask_cond")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm())


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def call_args(case: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [case[k] for k in CALL_KEYS]
