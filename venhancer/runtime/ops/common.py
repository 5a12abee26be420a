"""What every Triton op here shares: the optional Triton import, whether a tensor's device can run
the kernels (a CUDA GPU, or the CPU under Triton's interpreter), and a few layout helpers."""

from __future__ import annotations

import functools
import inspect
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: every op's `*_supported` check fails and callers run eager code
    triton = None
    tl = None
try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
# tl.range(..., flatten=True) (Triton >= 3.3): one software-pipelined loop over tiles and k steps.
HAS_FLATTEN = triton is not None and "flatten" in inspect.signature(tl.range).parameters


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (TRITON_INTERPRET=1, as the tests set
    it). Read at each call, not at import: the switch lives in the environment Triton itself
    reads, and a module constant would pin the production checks to the value at import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor's device."""
    return triton is not None and (x.is_cuda or (x.device.type == "cpu" and interpreting()))


def half_or_interpreted(x: torch.Tensor) -> bool:
    """Whether x has a dtype the tensor-core kernels take: half precision, or under the
    interpreter (CPU tests) any float dtype."""
    return x.dtype in (torch.float16, torch.bfloat16) or (x.device.type == "cpu" and interpreting())


def power_of_two_head(head_dim: int, widest: int) -> bool:
    """A head width the attention kernels' tiles take: a power of two from 16 to `widest`."""
    return 16 <= head_dim <= widest and head_dim & (head_dim - 1) == 0


def dividing_block(size: int, block: int) -> int:
    """The widest power of two up to `block` (itself a power of two) that divides `size`."""
    while size % block:
        block //= 2
    return block


def rows_channels(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(items, rows, channels) when x (n, c, *spatial) stores channels innermost with the spatial
    positions of each item densely packed in memory order (channels-last 4-D, channels-last-3d,
    or the 5-D views of channels-last frames the temporal layers make); else None."""
    if x.ndim < 3 or not x.movedim(1, -1).is_contiguous():
        return None
    n, c = x.shape[0], x.shape[1]
    return n, x.numel() // max(n * c, 1), c


def has_tma(device: torch.device) -> bool:
    """Hopper or later (compute capability 9.0+): tensor-memory-accelerator loads and the
    ~180 KB of shared memory per block that the persistent matmuls' 3-stage pipeline uses (Ampere
    and Ada cards have at most 164 / 99 KB). The interpreter emulates both."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, tiles: int) -> int:
    """One persistent program per SM (fewer if there are fewer tiles)."""
    if device.type != "cuda":
        return max(1, min(tiles, 4))  # the interpreter: a few programs, each walking several tiles
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(tiles, _multiprocessors(index)))


if triton is not None:

    @triton.jit
    def to_e4m3(x, ROUND_IN_FLOAT32: tl.constexpr):
        # float32 values within +-448 -> e4m3 (tl.float8e4nv), rounded to nearest. Triton's CPU
        # interpreter (3.8) rounds this cast without carrying into the exponent (126.7 -> 64):
        # under it (ROUND_IN_FLOAT32) the values are first rounded to the e4m3 grid in float32
        # (step 2**(exponent - 3), 2**-9 below the normal range), which makes the cast exact.
        if ROUND_IN_FLOAT32:
            exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            step = tl.exp2((tl.maximum(exponent, -6) - 3).to(tl.float32))
            to_integer = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to an integer, ties to even
            x = ((x / step + to_integer) - to_integer) * step
        return x.to(tl.float8e4nv)
