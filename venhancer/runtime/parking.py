"""Activations that wait in host memory between the layer that makes them and the layer that
uses them: the UNet's skips and the ControlNet's residuals (`RuntimeSettings.park_activations`).

Between their production in the encoders and their use in the decoder, the skips and residuals
of a 40-frame window at latent 162x240 hold ~5 GB, the floor of the GPU memory an evaluation
needs once everything else runs in small passes. Parked, each is copied to page-locked host
memory on a side stream as soon as it exists and copied back one use ahead (the decoder takes the
skips last-in first-out, so while one decoder block runs, the next block's skip is on its way).
The values are the same bits: only where they wait changes.

On the CPU, parking is a copy into another CPU tensor: the tests run the same code paths.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Parked:
    """A tensor waiting in host memory (`host`), with the copy back to the device if started."""

    __slots__ = ("host", "parking", "copy_back", "arrived")

    def __init__(self, host: torch.Tensor, parking: "HostParking"):
        self.host = host
        self.parking = parking
        self.copy_back: Optional[torch.Tensor] = None
        self.arrived: Any = None  # CUDA event: the copy back is done


class HostParking:
    """Parks tensors of one network evaluation on the host and brings them back.

    CUDA: copies in both directions run on one side stream. Going out, the side stream waits for
    the producer's kernels and the device tensor is kept from reuse until the copy has read it
    (`record_stream`); coming back, the device buffer is allocated on the compute stream (the
    same memory pool as the activations it replaces) and the compute stream waits for the copy's
    event before the tensor is used."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.bytes_out = 0  # bytes copied to the host so far

    def park(self, tensor: torch.Tensor) -> Parked:
        """Start copying `tensor` to host memory; the caller drops its own reference."""
        self.bytes_out += tensor.numel() * tensor.element_size()
        if not self.cuda:
            return Parked(tensor.clone(memory_format=torch.preserve_format), self)
        compute = torch.cuda.current_stream(self.device)
        # Pinned host memory from torch's caching host allocator: reused across evaluations.
        host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        self.side.wait_stream(compute)
        with torch.cuda.stream(self.side):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.side)
        return Parked(host, self)

    def prefetch(self, parked: Parked) -> None:
        """Start the copy of `parked` back to its device (no-op if started)."""
        if parked.copy_back is not None:
            return
        if not self.cuda:
            parked.copy_back = parked.host.clone(memory_format=torch.preserve_format)
            return
        compute = torch.cuda.current_stream(self.device)
        target = torch.empty_like(parked.host, device=self.device)
        # The target's memory may have been in use by kernels queued on the compute stream.
        self.side.wait_stream(compute)
        with torch.cuda.stream(self.side):
            target.copy_(parked.host, non_blocking=True)
            parked.arrived = torch.cuda.Event()
            parked.arrived.record(self.side)
        parked.copy_back = target

    def fetch(self, parked: Parked, keep: bool = False) -> torch.Tensor:
        """`parked` back on its device, ready for the compute stream. `keep`: it will be fetched
        again (a state shared by guidance branches); else its host memory is let go."""
        self.prefetch(parked)
        if parked.arrived is not None:
            torch.cuda.current_stream(self.device).wait_event(parked.arrived)
        tensor = parked.copy_back
        parked.copy_back = parked.arrived = None
        if not keep:
            parked.host = None  # the page-locked block returns to the allocator's cache
        return tensor


def prefetch(value) -> None:
    """Start bringing `value` back if it is parked."""
    if isinstance(value, Parked):
        value.parking.prefetch(value)


def unpark(value, then=None, keep: bool = False):
    """`value` itself, or the tensor it parked (see `HostParking.fetch`); `then`: what will be
    needed next, brought back meanwhile if parked."""
    if isinstance(value, Parked):
        value = value.parking.fetch(value, keep)
    prefetch(then)
    return value
