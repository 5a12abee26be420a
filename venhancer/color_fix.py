"""Colour correction of decoded frames towards the input they came from (`--color_fix`).

Diffusion upscalers drift in colour: the output's overall tint and brightness move away from the
input's while its detail is new. Both corrections keep the output's detail and take the colours
from the input frame resized to the output size (SeedVR2 and STAR ship the same two):

- AdaIN: each output frame's per-channel mean and standard deviation become the reference's.
- wavelet: the output's high frequencies plus the reference's low frequencies, split by a pyramid
  of dilated 3x3 binomial blurs (an a-trous wavelet); the low-pass is what is left after
  `WAVELET_LEVELS` blurs. The blur pyramid is not an exact projection (the low-pass of the
  output's own high band is not zero), so the split is refined `WAVELET_REFINE` times, each
  adding what the result's low-pass still lacks (a Landweber iteration). One split alone leaves
  the low-pass up to ~5 8-bit levels off on natural frames and ~8 on noise; 2 refinements bring
  natural frames under 1, 8 bring noise (the worst case, e.g. the tiny test models' output) under
  1. Each refinement is 5 depthwise 3x3 convolutions of one frame: small beside decoding it.

Frames are corrected one at a time on the device they were decoded on, inside the decode loop,
so the correction adds no pass over the video and holds one extra full-size frame at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from venhancer.output_formats import COLOR_FIXES  # noqa: F401  (this module's API; defined torch-free there)

WAVELET_LEVELS = 5
WAVELET_REFINE = 8
# Keeps flat frames (a standard deviation of 0) finite; far below one 16-bit level.
_EPS = 1e-6


def adain(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x, ref: (f, c, h, w). Per frame and channel, x rescaled to ref's mean and std."""
    dims = (-2, -1)
    x_mean, x_std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True, unbiased=False)
    r_mean, r_std = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True, unbiased=False)
    return (x - x_mean) / (x_std + _EPS) * r_std + r_mean


def _binomial_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype) / 4
    kernel = (kernel[:, None] * kernel[None, :]).expand(x.shape[1], 1, 3, 3)
    # Replicate padding: a frame's border is not darkened by blurring in zeros. Replicate padding
    # wider than the frame is still defined, so tiny frames work at every level.
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_lowpass(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """x: (f, c, h, w); what remains after `levels` blurs of dilation 1, 2, 4, ..."""
    for level in range(levels):
        x = _binomial_blur(x, 2 ** level)
    return x


def wavelet(x: torch.Tensor, ref: torch.Tensor, levels: int = WAVELET_LEVELS,
            refine: int = WAVELET_REFINE) -> torch.Tensor:
    """x's high frequencies plus ref's low frequencies (x, ref: (f, c, h, w), same size)."""
    target = wavelet_lowpass(ref, levels)
    out = x - wavelet_lowpass(x, levels) + target
    for _ in range(refine):
        out = out + target - wavelet_lowpass(out, levels)
    return out


def source_position(index: int, k: int) -> tuple[int, float]:
    """Where output frame `index` lies between input frames, with `k` inserted per pair: the earlier
    input frame and the weight (0 <= w < 1) of the next one."""
    step = k + 1
    return index // step, (index % step) / step


class ColorMatcher:
    """Corrects decoded frames towards the input frames they came from.

    The reference of output frame j is input frame j / (k + 1) resized (bilinear) to the output
    size; an inserted frame's reference is the linear blend of its two neighbouring input frames,
    weighted by its position between them (the inserted frame halfway between two key frames takes
    half of each), so that colours change smoothly across the inserted frames.

    `source`: the input frames, each (h, w, 3) RGB uint8 (an array (n, h, w, 3) or a list), kept on
    the host; each is moved to the device and resized when a decoded frame first needs it.
    """

    def __init__(self, method: str, source: Sequence[np.ndarray], k: int, size: tuple[int, int],
                 device: torch.device):
        if method not in COLOR_FIXES or method == "none":
            raise ValueError(f"color fix must be one of {COLOR_FIXES[1:]}, got {method!r}")
        if not len(source) or source[0].shape[-1:] != (3,) or source[0].dtype != np.uint8:
            raise ValueError("source frames must be uint8 (h, w, 3)")
        self.method, self.source, self.k, self.size, self.device = method, source, k, size, device
        self._resized: dict[int, torch.Tensor] = {}

    def _input(self, i: int) -> torch.Tensor:
        frame = self._resized.get(i)
        if frame is None:
            # Frames are asked for in order: the two most recent are all an inserted frame needs.
            for old in [j for j in self._resized if j < i - 1]:
                del self._resized[old]
            x = torch.from_numpy(self.source[i]).to(self.device).permute(2, 0, 1)[None].float() / 255
            h, w = x.shape[-2:]
            # Antialiasing when shrinking: the reference's colours, not its aliasing, are matched.
            frame = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                                  antialias=self.size[0] < h or self.size[1] < w)
            self._resized[i] = frame
        return frame

    def reference(self, index: int) -> torch.Tensor:
        """(1, 3, H, W) float in [0, 1]: the colours output frame `index` is matched to."""
        i, weight = source_position(index, self.k)
        if i >= len(self.source):
            raise IndexError(f"output frame {index} lies past the last of {len(self.source)} input frames")
        if weight == 0:
            return self._input(i)
        return self._input(i) * (1 - weight) + self._input(i + 1) * weight

    def __call__(self, frames: torch.Tensor, start: int) -> torch.Tensor:
        """frames: (f, 3, H, W) float in [0, 1] (unclamped), output frames start, start + 1, ...;
        corrected in place, one frame at a time (bounded extra memory)."""
        fix = adain if self.method == "adain" else wavelet
        for offset in range(frames.shape[0]):
            frame = frames[offset:offset + 1]
            frame.copy_(fix(frame, self.reference(start + offset).to(frame.dtype)))
        return frames
