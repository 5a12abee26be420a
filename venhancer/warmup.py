"""Start the GPU's libraries while Python is still importing the models' code.

A process's first convolution, matrix product, attention call and Triton kernel each load and
initialise a library (cuDNN's engines, cuBLAS, the attention kernels, Triton's launcher and
cached kernels): seconds of one-time work that would otherwise land in the first video's
encoding. Done on a background thread right after torch is imported, it overlaps with the
imports of diffusers and open_clip (the C++ work runs without the GIL).

`VENHANCER_CUDA_WARMUP=0` turns it off (the start-up benchmark compares both).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_SWITCH = "VENHANCER_CUDA_WARMUP"


def _warm(device: torch.device, kernels) -> None:
    start = time.perf_counter()
    with torch.inference_mode(), torch.cuda.device(device):
        half = dict(device=device, dtype=torch.float16)
        x = torch.randn(2, 128, 16, 16, **half).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(128, 128, 3, 3, **half).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, weight, padding=1)
        tokens = y.permute(0, 2, 3, 1).reshape(2, 256, 128)
        q = (tokens @ tokens.transpose(1, 2) @ tokens).view(2, 256, 2, 64).transpose(1, 2)
        F.scaled_dot_product_attention(q, q, q)
        if kernels.runs_on(y) and kernels.group_norm_supported(y, kernels.GROUPS):
            ones = torch.ones(128, **half)
            kernels.add_with_bias(kernels.group_norm(y, ones, ones, 1e-6, True), y, ones)
        torch.cuda.synchronize(device)
    logger.debug("GPU libraries warmed up in %.1f s", time.perf_counter() - start)


def start_cuda_warmup(device_name: str | None) -> threading.Thread | None:
    """Warm up `device_name` ("auto", "cuda", "cuda:N"; anything else: nothing) on a daemon
    thread. Failures are only logged at debug level: the real run reports real problems."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    name = "cuda" if device_name in (None, "", "auto") else device_name
    if not name.startswith("cuda"):
        return None
    try:
        if not torch.cuda.is_available():
            return None
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            return None
    except RuntimeError:
        return None

    # Imported here, on the calling thread: two threads importing the same modules at once can
    # deadlock on the import locks.
    from venhancer.runtime import ops as kernels

    def run() -> None:
        try:
            _warm(device, kernels)
        except Exception as exc:  # noqa: BLE001 - a warm-up must never fail a run
            logger.debug("GPU warm-up skipped: %s", exc)

    thread = threading.Thread(target=run, name="venhancer-cuda-warmup", daemon=True)
    thread.start()
    return thread
