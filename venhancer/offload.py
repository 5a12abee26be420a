"""Weights that wait in CPU memory and visit the GPU only when needed.

`HostCopy` keeps one CPU copy of a module's parameters and buffers. Sending the module back from
the GPU then costs nothing: the weights never change, so the module simply points at its CPU copy
again and the GPU memory is released. Measured on an H100 host for 1.4 GB of weights (the text
encoder): copy in 0.2 s, copy back to the CPU 0.9-1.1 s (now skipped). Pinning the CPU copy would
make the copy in 0.03 s but costs 0.65 s once, more than it saves for one video per process.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


class HostCopy:
    """A CPU copy of `module`'s weights (page-locked if `pin`, which needs CUDA). The module
    keeps its current placement until `leave` (point at the CPU copy) or `visit` (copy to a device)."""

    def __init__(self, module: nn.Module, pin: bool = False):
        self.module = module
        self.tensors = list(itertools.chain(module.parameters(), module.buffers()))
        self.home = [t.detach().to("cpu") for t in self.tensors]
        if pin:
            self.home = [h.pin_memory() for h in self.home]
        if all(t.device.type == "cpu" for t in self.tensors):
            self.leave()  # the module's own CPU tensors are not needed twice

    def visit(self, device: torch.device | str) -> nn.Module:
        """Copy the weights to `device` (asynchronously if pinned; later work on the same
        stream sees them). Returns the module."""
        for t, home in zip(self.tensors, self.home):
            t.data = home.to(device, non_blocking=True, copy=True)
        return self.module

    def leave(self) -> nn.Module:
        """Point the module at its CPU copy again; its device memory is released. Returns the module."""
        for t, home in zip(self.tensors, self.home):
            t.data = home
        return self.module
