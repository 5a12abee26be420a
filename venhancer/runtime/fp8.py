"""Where the optimized runtime's FP8 kernels can run."""

from __future__ import annotations

import torch


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or newer; never on the CPU."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)
