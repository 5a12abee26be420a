"""Write a tiny random-weight model set with which the whole tool runs offline on CPU in seconds.

    python tests/make_tiny_models.py OUTDIR --clip OUTDIR/clip.mp4
    python enhance_a_video.py --config OUTDIR/config.json --input_path OUTDIR/clip.mp4 \
        --solver_mode normal --steps 2 --up_scale 2 --target_fps 16

OUTDIR receives config.json (small network, small size bounds and windows, every weight path
local), unet.safetensors (the network checkpoint, used for v1 and v2), text_encoder.safetensors
(an OpenCLIP-style text tower with the real tokenizer vocabulary) and vae/ (a diffusers
AutoencoderKLTemporalDecoder folder). The outputs are noise, but every code path of a real run is
exercised: the tiny planning bounds give small frames (72x112 for a 36x56 input at up_scale 2,
padded to 80x128), and the small denoiser windows make a 17-frame output use temporal chunks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from venhancer.models import UNetConfig, VEnhancerUNet  # noqa: E402
from venhancer.text_encoder import TextEncoder, TextModelConfig  # noqa: E402

TEXT_WIDTH = 32
# Width 32 on all four levels satisfies the 32 GroupNorm groups and head_dim; context = text width.
UNET = UNetConfig(dim=32, context_dim=TEXT_WIDTH, dim_mult=(1, 1, 1, 1), num_heads=1, head_dim=32,
                  num_res_blocks=1, attn_scales=(1.0, 0.5, 0.25))
TEXT = TextModelConfig(context_length=77, vocab_size=49408, width=TEXT_WIDTH, heads=2, layers=3)
PLANNING = {
    "area_min": 2048,
    "area_max": 12288,  # 96x128 pixels
    # The smallest padded frame the network sees. 80x128 keeps the accepted latent shape
    # (80/8 % 8 == 2, 128/8 % 8 == 0) where the reference pads everything to at least 720x1280.
    "pad_min": [80, 128],
    # The smallest window length that is valid for every number of inserted frames (0-8) once
    # snapped to key-frame periods; a 17-frame output still takes three windows.
    "chunk_len": 10,
    "chunk_overlap": 5,
    "vae_tile": [10, 16],
    "vae_tile_overlap": [2, 4],
    "vae_frame_window": 9,
    "vae_frame_overlap": 2,
}


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))


def make_tiny_models(outdir: Path | str, seed: int = 0) -> Path:
    """Write the tiny model set into `outdir`; returns the path of its config.json."""
    from diffusers import AutoencoderKLTemporalDecoder

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _save(VEnhancerUNet(UNET).state_dict(), outdir / "unet.safetensors")
    _save(TextEncoder(TEXT).state_dict(), outdir / "text_encoder.safetensors")
    # Four blocks give the real 8x downsampling; 32 channels is the GroupNorm minimum.
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32, 32),
                                       down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=1)
    vae.save_pretrained(outdir / "vae")
    config = {
        "unet": UNET.to_dict(),
        "checkpoints": {"local_dir": ".", "paths": {"v1": "unet.safetensors", "v2": "unet.safetensors"}},
        "text_encoder": {"path": "text_encoder.safetensors",
                         "model_cfg": {"context_length": TEXT.context_length, "vocab_size": TEXT.vocab_size,
                                       "width": TEXT.width, "heads": TEXT.heads, "layers": TEXT.layers}},
        "vae": {"path": "vae", "variant": None},
        "planning": PLANNING,
    }
    config_path = outdir / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config_path


def make_clip(path: Path | str, width: int = 56, height: int = 36, frames: int = 9, fps: float = 8,
              audio: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """A synthetic test clip (ffmpeg's testsrc pattern) via imageio-ffmpeg's ffmpeg; optional sine audio.

    Encoded as H.264 yuv444p for .mp4/.mov/.mkv, so any width and height (odd ones too) work.
    """
    import imageio_ffmpeg

    path = Path(path)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
           "-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={fps}"]
    if audio:
        codec = "libopus" if path.suffix.lower() == ".webm" else "aac"
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / fps}", "-c:a", codec]
    if path.suffix.lower() in (".mp4", ".mov", ".mkv"):
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv444p"]
    cmd += ["-frames:v", str(frames), *extra, str(path)]
    subprocess.run(cmd, check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight VEnhancer model set.")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--clip", type=Path, help="also write a 9-frame 56x36 8 fps test clip with audio here")
    args = parser.parse_args(argv)
    print(make_tiny_models(args.outdir))
    if args.clip is not None:
        print(make_clip(args.clip, audio=True))
    return 0


def tiny_network_inputs(config: UNetConfig) -> tuple:
    """One 5-frame window at latent 10x16 (key frames 0 and 4) for a network of `config`: the
    arguments of `VEnhancerUNet.forward` after x, as (x, t, y, hint, t_hint, s_cond, mask_cond)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, config.in_dim, 5, 10, 16, generator=g)
    y = torch.randn(1, 77, config.context_dim, generator=g)
    hint = torch.randn(1, config.in_dim, 2, 10, 16, generator=g)
    mask = torch.tensor([[0, -1, -1, -1, 1]])
    return x, torch.tensor([500]), y, hint, torch.tensor([250]), torch.tensor([8.0]), mask


if __name__ == "__main__":
    raise SystemExit(main())
