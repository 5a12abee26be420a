"""Stable Video Diffusion's temporal VAE: per-frame encoding and streaming tiled decoding (SPEC 1.7, 6).

The model itself is diffusers' `AutoencoderKLTemporalDecoder`; this module decides what is fed
to it and how the pieces are put back together, and (`optimize_vae`) runs its blocks with fewer
passes over the activations without changing what they compute (`venhancer.runtime.vae`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder
from diffusers.utils.torch_utils import randn_tensor

from venhancer.diffusion.chunking import blend_time
from venhancer.planning import (
    VAE_FRAME_OVERLAP,
    VAE_FRAME_WINDOW,
    VAE_TILE,
    VAE_TILE_OVERLAP,
    gaussian_weights,
    vae_frame_windows,
    vae_tile_windows,
)
from venhancer.runtime.vae import (  # noqa: F401  (the VAE's loader and its runtime, one import)
    optimize_vae,
    set_decoder_frame_chunk,
)

logger = logging.getLogger(__name__)

LATENT_SCALE = 0.18215
DOWNSAMPLE = 8


def load_vae(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLTemporalDecoder:
    """Load the temporal VAE from a local diffusers folder (config.json + weights).

    Hub downloads are resolved beforehand by `venhancer.loading.resolve_vae`, which returns such a
    folder. The fp16 variant file is used when the folder has it (that is what the hub repo ships).
    """
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no diffusers VAE folder (config.json + weights) at {folder}")
    variant = "fp16" if any(folder.glob("diffusion_pytorch_model.fp16.*")) else None
    # Without `accelerate` diffusers falls back to plain loading anyway, but warns on every
    # run; ask for plain loading directly then.
    low_mem = importlib.util.find_spec("accelerate") is not None
    vae = AutoencoderKLTemporalDecoder.from_pretrained(
        folder, variant=variant, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=low_mem
    )
    logger.info("loaded temporal VAE from %s (variant %s, %s)", folder, variant, dtype)
    return vae.to(device).eval().requires_grad_(False)


def _vae_device(vae: AutoencoderKLTemporalDecoder) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def encode_frames(
    vae: AutoencoderKLTemporalDecoder,
    frames: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """Encode frames (n, 3, H, W) in [-1, 1] one by one: posterior sample * 0.18215 -> (1, 4, n, h, w).

    The posterior noise is drawn for all frames up front (or taken from `noise`, shape (n, 4, h, w)),
    so the result does not depend on `batch_size`, which only trades memory for speed.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (n, 3, H, W), got shape {tuple(frames.shape)}")
    n, _, height, width = frames.shape
    if height % DOWNSAMPLE or width % DOWNSAMPLE:
        raise ValueError(f"frame size {height}x{width} is not a multiple of {DOWNSAMPLE}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _vae_device(vae)
    latent_shape = (n, vae.config.latent_channels, height // DOWNSAMPLE, width // DOWNSAMPLE)
    if noise is None:
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != latent_shape:
        raise ValueError(f"noise must have shape {latent_shape}, got {tuple(noise.shape)}")
    latents = []
    for start in range(0, n, batch_size):
        x = frames[start : start + batch_size].to(device=device, dtype=vae.dtype)
        posterior = vae.encode(x).latent_dist
        eps = noise[start : start + batch_size].to(device=device, dtype=torch.float32)
        latents.append((posterior.mean.float() + posterior.std.float() * eps) * LATENT_SCALE)
    return torch.cat(latents).permute(1, 0, 2, 3).unsqueeze(0)


def expand_latents(z_key: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c, n, h, w) key-frame latents -> (b, c, (n-1)(k+1)+1, h, w): each repeated k+1 times, the last once."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"inserted frame count k must be an int >= 0, got {k!r}")
    if z_key.ndim != 5:
        raise ValueError(f"z_key must be (b, c, n, h, w), got shape {tuple(z_key.shape)}")
    repeated = z_key.repeat_interleave(k + 1, dim=2)
    return repeated[:, :, : repeated.shape[2] - k]


def decode_tiled(
    vae: AutoencoderKLTemporalDecoder,
    z: torch.Tensor,
    tile: tuple[int, int] = VAE_TILE,
    tile_overlap: tuple[int, int] = VAE_TILE_OVERLAP,
    frame_window: int = VAE_FRAME_WINDOW,
    frame_overlap: int = VAE_FRAME_OVERLAP,
    progress: Callable[[int, int], None] | None = None,
    to_cpu: bool = True,
) -> Iterator[torch.Tensor]:
    """Decode latents (1, c, F, h, w) tile by tile; yield float32 frames (f, 3, 8h, 8w) in [-1, 1],
    on the CPU, or with `to_cpu=False` on the VAE's device (to post-process them there).

    The reference blends the frame windows of each spatial tile and then blends the tiles. Both
    blends are linear with weights that depend only on positions, and every tile uses the same frame
    windows, so blending the tiles first and the frame windows second gives the same result. That
    order lets frames be handed out as soon as the next window has been blended into them: only one
    frame window of the full-size video is ever held on the device.

    The chunks together hold all F frames in order. Settings are checked at the call, before the
    first chunk is asked for. progress(done, total) is called after each VAE decoder call.
    """
    if z.ndim != 5 or z.shape[0] != 1:
        raise ValueError(f"z must be (1, c, F, h, w), got shape {tuple(z.shape)}")
    _, _, num_frames, height, width = z.shape
    h_windows, w_windows = vae_tile_windows(height, width, tile, tile_overlap)
    t_windows = vae_frame_windows(num_frames, frame_window, frame_overlap)
    tiles = [(h0, h1, w0, w1) for h0, h1 in h_windows for w0, w1 in w_windows]
    chunks = _decode_tiles(vae, z, tiles, t_windows, frame_overlap, progress)
    return (chunk.cpu() for chunk in chunks) if to_cpu else chunks


@torch.no_grad()
def _decode_tiles(
    vae: AutoencoderKLTemporalDecoder,
    z: torch.Tensor,
    tiles: list[tuple[int, int, int, int]],
    t_windows: list[tuple[int, int]],
    frame_overlap: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[torch.Tensor]:
    device = _vae_device(vae)
    out_h, out_w = z.shape[3] * DOWNSAMPLE, z.shape[4] * DOWNSAMPLE
    weights: dict[tuple[int, int], torch.Tensor] = {}
    weight_sum = torch.zeros(out_h, out_w, device=device)
    for h0, h1, w0, w1 in tiles:
        shape = ((h1 - h0) * DOWNSAMPLE, (w1 - w0) * DOWNSAMPLE)
        if shape not in weights:
            weights[shape] = torch.as_tensor(gaussian_weights(*shape), dtype=torch.float32, device=device)
        weight_sum[h0 * DOWNSAMPLE : h1 * DOWNSAMPLE, w0 * DOWNSAMPLE : w1 * DOWNSAMPLE] += weights[shape]

    total = len(t_windows) * len(tiles)
    done = 0
    previous: torch.Tensor | None = None
    for index, (t0, t1) in enumerate(t_windows):
        frames = torch.zeros(t1 - t0, 3, out_h, out_w, device=device)
        for h0, h1, w0, w1 in tiles:
            latent = z[0, :, t0:t1, h0:h1, w0:w1].permute(1, 0, 2, 3) / LATENT_SCALE
            latent = latent.to(device=device, dtype=vae.dtype)
            decoded = vae.decode(latent, num_frames=t1 - t0).sample.float()
            rows = slice(h0 * DOWNSAMPLE, h1 * DOWNSAMPLE)
            cols = slice(w0 * DOWNSAMPLE, w1 * DOWNSAMPLE)
            frames[:, :, rows, cols] += decoded * weights[tuple(decoded.shape[-2:])]
            done += 1
            if progress is not None:
                progress(done, total)
        frames /= weight_sum
        if previous is not None:
            # blend_time works on (b, c, f, h, w); `previous` is the already blended window, as in
            # the reference, which cross-faded its windows in place.
            frames = blend_time(previous.transpose(0, 1)[None], frames.transpose(0, 1)[None], frame_overlap)
            frames = frames[0].transpose(0, 1)
        if index == len(t_windows) - 1:
            yield frames
        else:
            keep = frames.shape[0] - frame_overlap
            yield frames[:keep]
            previous = frames
