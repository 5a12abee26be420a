"""Write the sample input clip inputs/000000.mp4 (720x480, 49 frames, 8 fps) from procedural content.

Everything is drawn here (gradients, moving shapes, a striped flag), so the clip carries no
third-party footage. Deterministic: running it again gives the same frames.

    python scripts/make_sample_clip.py [--out inputs/000000.mp4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from venhancer.video_io import VideoWriter  # noqa: E402

WIDTH, HEIGHT, NUM_FRAMES, FPS = 720, 480, 49, 8


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    # Soft edge (1.5 px) so the shape is anti-aliased, like real footage.
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return np.clip((r - d) / 1.5 + 0.5, 0.0, 1.0)


def render_frame(i: int) -> np.ndarray:
    t = i / NUM_FRAMES
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    # Sky-to-ground gradient whose hue drifts over time.
    sky = np.array([0.35 + 0.2 * np.sin(2 * np.pi * t), 0.55 + 0.1 * np.cos(2 * np.pi * t), 0.9])
    ground = np.array([0.25, 0.45, 0.2])
    v = (yy / HEIGHT)[..., None]
    img = (1 - v) * sky.reshape(1, 1, 3) + v * ground.reshape(1, 1, 3)
    horizon = HEIGHT * 0.62
    img[yy > horizon] = img[yy > horizon] * 0.8 + np.array([0.1, 0.15, 0.05])
    # Rolling hills with a slowly moving texture.
    hills = horizon + 25 * np.sin(xx / 60 + 2 * np.pi * t) + 10 * np.sin(xx / 17 - 4 * np.pi * t)
    img[yy > hills] = img[yy > hills] * 0.75 + np.array([0.05, 0.12, 0.02])
    # Sun crossing the sky.
    sun = _disc(yy, xx, 90 + 30 * np.cos(np.pi * t), 80 + 560 * t, 38)[..., None]
    img = img * (1 - sun) + sun * np.array([1.0, 0.85, 0.3])
    # Red ball bouncing along the ground.
    bx = 60 + 600 * t
    by = horizon + 40 - 120 * abs(np.sin(3 * np.pi * t))
    ball = _disc(yy, xx, by, bx, 28)[..., None]
    shade = np.clip(1.1 - ((yy - by + 10) ** 2 + (xx - bx + 10) ** 2) / 2500, 0.55, 1.0)[..., None]
    img = img * (1 - ball) + ball * shade * np.array([0.85, 0.12, 0.1])
    # Striped flag waving on a pole.
    px, top = 520, 150
    wave = 6 * np.sin((xx - px) / 18 - 6 * np.pi * t)
    inside = (xx > px) & (xx < px + 140) & (yy > top + wave) & (yy < top + 90 + wave)
    stripe = (((yy - top - wave) // 15) % 2 == 0)[..., None]
    flag_colour = np.where(stripe, np.array([0.95, 0.95, 0.95]), np.array([0.1, 0.25, 0.7]))
    img = np.where(inside[..., None], flag_colour, img)
    img[(xx >= px - 4) & (xx < px) & (yy > top - 10) & (yy < horizon + 30)] = np.array([0.3, 0.25, 0.2])
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "inputs" / "000000.mp4")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(args.out, FPS, WIDTH, HEIGHT) as writer:
        for i in range(NUM_FRAMES):
            writer.append(render_frame(i))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
