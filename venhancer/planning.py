"""Planning helpers: frame-rate rule, target size, padding, key-frame masks and window layouts.

Pure Python (plus numpy for the tile weights); no torch. Every function reproduces the reference
behaviour recorded in ``reference/tables.json`` exactly, including the documented quirks
(SPEC sections 1, 5 and 6).

Window convention: a window is a half-open ``(start, end)`` pair of Python ints.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "AREA_MIN",
    "AREA_MAX",
    "NET_MIN_HEIGHT",
    "NET_MIN_WIDTH",
    "CHUNK_MAX_LEN",
    "CHUNK_OVERLAP",
    "WINDOW_FACTOR",
    "VAE_TILE",
    "VAE_TILE_OVERLAP",
    "VAE_FRAME_WINDOW",
    "VAE_FRAME_OVERLAP",
    "GAUSSIAN_VARIANCE",
    "interp_frames",
    "output_fps",
    "output_frame_count",
    "valid_frame_count",
    "target_resolution",
    "pad_to_fit",
    "padded_size",
    "latent_size_ok",
    "mask_cond",
    "sliding_windows",
    "chunk_window_params",
    "chunk_windows",
    "vae_tile_windows",
    "vae_frame_windows",
    "gaussian_weights",
]

#: Lower / upper bound of the output area (pixels) used by :func:`target_resolution`.
AREA_MIN: float = 720 * 1280 * 1.5
AREA_MAX: float = 1152 * 2048

#: Smallest padded frame the network is fed (SPEC 1.6).
NET_MIN_HEIGHT: int = 720
NET_MIN_WIDTH: int = 1280

#: Temporal chunking of the denoiser (SPEC 5): nominal window length and overlap in frames.
CHUNK_MAX_LEN: int = 32
CHUNK_OVERLAP: int = 16

#: The last window of any sliding layout may be up to this factor longer than the nominal one.
WINDOW_FACTOR: float = 1.33

#: Tiled VAE decode (SPEC 6), in latent units: tile (h, w), tile overlap (h, w), frame windows.
VAE_TILE: tuple[int, int] = (72, 128)
VAE_TILE_OVERLAP: tuple[int, int] = (12, 25)
VAE_FRAME_WINDOW: int = 5
VAE_FRAME_OVERLAP: int = 2

#: Variance of the separable Gaussian tile weights, relative to the tile size (quirk: 0.02).
GAUSSIAN_VARIANCE: float = 0.02

#: Most frames inserted between two input frames (SPEC 1.2).
MAX_INSERTED: int = 8


def _check_positive(name: str, value: float) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    # numbers.Integral also admits numpy integers, which callers may pass from array shapes.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Frame rate and frame count (SPEC 1.2, 1.5)
# ---------------------------------------------------------------------------------------------


def interp_frames(in_fps: float, target_fps: float) -> int:
    """Number ``k`` of frames inserted between consecutive input frames.

    ``k = min(max(round(target_fps / in_fps) - 1, 0), 8)`` with Python's ``round`` (half to even:
    12 -> 30 fps gives ``round(2.5) = 2``, so k = 1).
    """
    _check_positive("in_fps", in_fps)
    _check_positive("target_fps", target_fps)
    return min(max(round(target_fps / in_fps) - 1, 0), MAX_INSERTED)


def output_fps(in_fps: float, k: int) -> float:
    """Frame rate of the output video: ``in_fps * (k + 1)``."""
    _check_positive("in_fps", in_fps)
    _check_int("k", k, 0)
    return in_fps * (k + 1)


def output_frame_count(n: int, k: int) -> int:
    """Output frame count ``F = (n - 1) * (k + 1) + 1`` for ``n`` input frames."""
    _check_int("n", n, 1)
    _check_int("k", k, 0)
    return (n - 1) * (k + 1) + 1


def valid_frame_count(num_frames: int, k: int) -> bool:
    """True when ``num_frames`` can arise from :func:`output_frame_count` with this ``k``."""
    _check_int("num_frames", num_frames, 1)
    _check_int("k", k, 0)
    return (num_frames - 1) % (k + 1) == 0


def mask_cond(n_frames: int, k: int) -> list[int]:
    """Key-frame index per output frame, ``-1`` for inserted frames.

    ``n_frames`` is the number of *input* (key) frames; the list has
    ``output_frame_count(n_frames, k)`` entries, e.g. ``mask_cond(3, 1) == [0, -1, 1, -1, 2]``.
    """
    total = output_frame_count(n_frames, k)
    return [i // (k + 1) if i % (k + 1) == 0 else -1 for i in range(total)]


# ---------------------------------------------------------------------------------------------
# Spatial size (SPEC 1.3, 1.6)
# ---------------------------------------------------------------------------------------------


def target_resolution(
    h: int,
    w: int,
    up_scale: float,
    area_min: float = AREA_MIN,
    area_max: float = AREA_MAX,
) -> tuple[int, int]:
    """Output size ``(H, W)`` for an ``h x w`` input and the requested ``up_scale``.

    The scale is raised or lowered so that the output area lies in ``[area_min, area_max]``; the
    sizes are then made even with the reference's float arithmetic ``int((s * h) // 2 * 2)``.
    """
    _check_int("h", h, 1)
    _check_int("w", w, 1)
    _check_positive("up_scale", up_scale)
    _check_positive("area_min", area_min)
    _check_positive("area_max", area_max)
    if area_min > area_max:
        raise ValueError(f"area_min ({area_min!r}) must not exceed area_max ({area_max!r})")
    # Plain Python numbers, so numpy scalars cannot change the float arithmetic.
    h, w, up_scale = int(h), int(w), float(up_scale)
    area = h * w * up_scale**2
    if area < area_min:
        scale = math.sqrt(area_min / (h * w))
    elif area > area_max:
        scale = math.sqrt(area_max / (h * w))
    else:
        scale = up_scale
    return int((scale * h) // 2 * 2), int((scale * w) // 2 * 2)


def _pad_axis(size: int, minimum: int, extra_offset: int) -> tuple[int, int]:
    """(before, after) padding of one axis; see :func:`pad_to_fit`."""
    if size < minimum:
        before = (minimum - size) // 2
        return before, minimum - size - before
    if size == minimum:
        return 0, 0
    # Above the minimum the reference pads only at the end, always adding a full extra 64 block
    # (quirk: even when the size is already aligned).
    return 0, ((size + extra_offset) // 64) * 64 + 64 - extra_offset - size


def pad_to_fit(
    h: int, w: int, min_height: int = NET_MIN_HEIGHT, min_width: int = NET_MIN_WIDTH
) -> tuple[int, int, int, int]:
    """Padding ``(left, right, top, bottom)`` that makes an ``h x w`` frame network-sized.

    Height: below 720 centred to 720; exactly 720 unchanged; above, bottom-only padding
    ``((h + 48) // 64) * 64 + 64 - 48 - h``. Width: below 1280 centred to 1280; exactly 1280
    unchanged; above, right-only padding ``(w // 64) * 64 + 64 - w`` (**quirk**: 1920 -> 1984).
    The padded latent size ``(H'/8, W'/8)`` always satisfies :func:`latent_size_ok` with the
    default minimums (smaller ``min_height``/``min_width`` are for tests; keep ``min_height % 64 ==
    16`` and ``min_width % 64 == 0`` for network-compatible sizes).
    """
    _check_int("h", h, 1)
    _check_int("w", w, 1)
    _check_int("min_height", min_height, 1)
    _check_int("min_width", min_width, 1)
    top, bottom = _pad_axis(int(h), int(min_height), 48)
    left, right = _pad_axis(int(w), int(min_width), 0)
    return left, right, top, bottom


def padded_size(
    h: int, w: int, min_height: int = NET_MIN_HEIGHT, min_width: int = NET_MIN_WIDTH
) -> tuple[int, int]:
    """Frame size ``(H', W')`` after :func:`pad_to_fit`."""
    left, right, top, bottom = pad_to_fit(h, w, min_height, min_width)
    return h + top + bottom, w + left + right


def latent_size_ok(lat_h: int, lat_w: int) -> bool:
    """Whether the denoising network accepts a latent of this size (``h % 8 == 2``, ``w % 8 == 0``)."""
    return lat_h % 8 == 2 and lat_w % 8 == 0


# ---------------------------------------------------------------------------------------------
# Sliding windows (SPEC 5, 6)
# ---------------------------------------------------------------------------------------------


def sliding_windows(
    size: int, window: int, overlap: int, factor: float = WINDOW_FACTOR
) -> list[tuple[int, int]]:
    """Overlapping windows covering ``[0, size)`` with stride ``window - overlap``.

    From ``start = 0``: when ``start + round(window * factor) >= size`` or
    ``start + window >= size`` the last window is ``(start, size)`` (so it can be up to ``factor``
    times longer than ``window``); otherwise ``(start, start + window)`` and the next window starts
    ``window - overlap`` later. ``round`` is Python's (half to even). A ``size <= window`` gives the
    single window ``[(0, size)]``.
    """
    _check_int("size", size, 1)
    _check_int("window", window, 1)
    _check_int("overlap", overlap, 0)
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than window ({window})")
    _check_positive("factor", factor)
    size, window, overlap = int(size), int(window), int(overlap)
    stretched = round(window * float(factor))
    stride = window - overlap
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        if start + stretched >= size or start + window >= size:
            windows.append((start, size))
            return windows
        windows.append((start, start + window))
        start += stride


def chunk_window_params(k: int, max_len: int = CHUNK_MAX_LEN, overlap: int = CHUNK_OVERLAP) -> tuple[int, int]:
    """Window length ``L`` and overlap ``O`` of the denoiser's temporal chunks for ``k``.

    Both are snapped to whole key-frame periods plus one: ``L = ((max_len - 1) // (k + 1)) * (k + 1) + 1``
    and ``O = ((overlap - 1) // (k + 1)) * (k + 1) + 1``, so every window starts on a key frame.
    """
    _check_int("k", k, 0)
    _check_int("max_len", max_len, 1)
    _check_int("overlap", overlap, 1)
    period = k + 1
    length = ((max_len - 1) // period) * period + 1
    ovl = ((overlap - 1) // period) * period + 1
    if ovl >= length:
        raise ValueError(f"chunk overlap {ovl} must be smaller than chunk length {length} (k={k})")
    return length, ovl


def chunk_windows(
    num_frames: int, k: int, max_len: int = CHUNK_MAX_LEN, overlap: int = CHUNK_OVERLAP
) -> list[tuple[int, int]]:
    """Temporal windows in which the denoiser processes a clip of ``num_frames`` latent frames.

    ``num_frames <= max_len`` gives ``[(0, num_frames)]`` (no chunking, as upstream). Otherwise
    :func:`sliding_windows` with the snapped :func:`chunk_window_params` and factor 1.33, e.g.
    ``chunk_windows(61, 2) == [(0, 31), (15, 46), (30, 61)]``. Consecutive windows overlap by
    exactly ``O`` frames; the sampler cross-fades them (``venhancer.diffusion.chunking``).
    """
    _check_int("num_frames", num_frames, 1)
    length, ovl = chunk_window_params(k, max_len, overlap)
    if num_frames <= max_len:
        return [(0, num_frames)]
    return sliding_windows(num_frames, length, ovl)


def vae_tile_windows(
    lat_h: int,
    lat_w: int,
    tile: tuple[int, int] = VAE_TILE,
    overlap: tuple[int, int] = VAE_TILE_OVERLAP,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Spatial tiles of the tiled VAE decode, in latent units.

    Returns ``(height_windows, width_windows)``; the tiles are their Cartesian product. Both axes use
    :func:`sliding_windows` (factor 1.33) with tile ``(72, 128)`` and overlap ``(12, 25)`` latents,
    e.g. a 162 x 288 latent gives heights ``[(0,72), (60,132), (120,162)]`` and widths
    ``[(0,128), (103,231), (206,288)]``. Decoded tiles are 8x larger in pixels; accumulate them with
    :func:`gaussian_weights` of the decoded tile size and divide by the summed weights.
    """
    return (
        sliding_windows(lat_h, tile[0], overlap[0]),
        sliding_windows(lat_w, tile[1], overlap[1]),
    )


def vae_frame_windows(
    num_frames: int, window: int = VAE_FRAME_WINDOW, overlap: int = VAE_FRAME_OVERLAP
) -> list[tuple[int, int]]:
    """Frame windows of the tiled VAE decode: 5 frames, overlap 2, last window up to 1.33x longer.

    Each window is decoded with ``num_frames`` equal to its length; consecutive decoded windows are
    cross-faded over their overlap (``venhancer.diffusion.chunking.blend_time``), and each window
    except the last contributes its frames before the overlap.
    """
    return sliding_windows(num_frames, window, overlap)


def _gaussian_1d(size: int, midpoint: float, variance: float) -> list[float]:
    # Positions are measured relative to the tile size, hence the division by size**2.
    norm = math.sqrt(2 * math.pi * variance)
    return [
        math.exp(-(x - midpoint) * (x - midpoint) / (size * size) / (2 * variance)) / norm
        for x in range(size)
    ]


def gaussian_weights(tile_h: int, tile_w: int, variance: float = GAUSSIAN_VARIANCE) -> np.ndarray:
    """Separable Gaussian blending weights of one decoded tile, float64 array ``(tile_h, tile_w)``.

    ``weights[y, x] = g_h(y) * g_w(x)`` with ``g_n(p) = exp(-(p - c)^2 / n^2 / (2 v)) / sqrt(2 pi v)``,
    ``v = 0.02``, centre ``c = (tile_w - 1) / 2`` across but ``c = tile_h / 2`` down (**quirk**: the
    vertical centre is half a pixel low). The reference applies it to the decoded tile in pixels
    (e.g. 576 x 1024). Weights are not normalised; the tiled decoder divides by their sum.
    """
    _check_int("tile_h", tile_h, 1)
    _check_int("tile_w", tile_w, 1)
    _check_positive("variance", variance)
    xs = _gaussian_1d(tile_w, (tile_w - 1) / 2, variance)
    ys = _gaussian_1d(tile_h, tile_h / 2, variance)
    return np.outer(np.asarray(ys, dtype=np.float64), np.asarray(xs, dtype=np.float64))
