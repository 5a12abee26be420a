"""Run configuration: network shape, where every weight file comes from, planning constants.

`load_config()` reads the packaged `configs/venhancer.json`; `load_config(path)` reads a user file
on top of it (keys the user file leaves out keep the packaged value). Relative paths in a JSON file
are resolved against that file's folder. `checkpoints.local_dir: null` means `ckpts/` in the
current working directory, as with the reference scripts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from venhancer.models.config import UNetConfig
from venhancer.options import first_line
from venhancer.planning import MAX_INSERTED, chunk_window_params


def _packaged_config() -> Path:
    """configs/venhancer.json: installed as venhancer/configs/ (pyproject.toml), or at the top of
    a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "configs" / "venhancer.json"
    return installed if installed.is_file() else package.parent / "configs" / "venhancer.json"


DEFAULT_CONFIG_PATH = _packaged_config()
DEFAULT_CKPT_DIR = "ckpts"


@dataclass(frozen=True)
class CheckpointsConfig:
    """VEnhancer checkpoints: hub repo, file per version, download folder, local overrides."""

    repo_id: str
    files: dict[str, str]
    local_dir: Path
    paths: dict[str, Path | None]

    def filename(self, version: str) -> str:
        if version not in self.files:
            raise ValueError(f"unknown checkpoint version {version!r}; known: {sorted(self.files)}")
        return self.files[version]


@dataclass(frozen=True)
class TextEncoderConfig:
    """OpenCLIP text weights; `path` (a local checkpoint file) bypasses the hub."""

    arch: str
    pretrained: str
    repo_id: str
    filename: str
    path: Path | None
    model_cfg: dict[str, Any] | None


@dataclass(frozen=True)
class VaeConfig:
    """Temporal VAE; `path` (a local diffusers folder) bypasses the hub."""

    repo_id: str
    subfolder: str
    variant: str | None
    path: Path | None


@dataclass(frozen=True)
class PlanningConfig:
    """Sizes and windows of a run. configs/venhancer.json holds the values (no defaults here);
    venhancer.planning's constants are the reference's, which tests compare with that file."""

    area_min: float
    area_max: float
    chunk_len: int
    chunk_overlap: int
    vae_tile: tuple[int, int]
    vae_tile_overlap: tuple[int, int]
    vae_frame_window: int
    vae_frame_overlap: int
    # Smallest padded frame (height, width) handed to the network: 720x1280 in the reference;
    # tiny test configs use less. Keep height % 64 == 16 and width % 64 == 0.
    pad_min: tuple[int, int]


@dataclass(frozen=True)
class EnhancerConfig:
    unet: UNetConfig
    checkpoints: CheckpointsConfig
    text_encoder: TextEncoderConfig
    vae: VaeConfig
    planning: PlanningConfig


# -------------------------------------------------------------------------------- JSON handling

_SECTIONS = {
    "unet": None,  # keys are checked by UNetConfig itself
    "checkpoints": ("repo_id", "files", "local_dir", "paths"),
    "text_encoder": ("arch", "pretrained", "repo_id", "filename", "path", "model_cfg"),
    "vae": ("repo_id", "subfolder", "variant", "path"),
    "planning": (
        "area_min",
        "area_max",
        "chunk_len",
        "chunk_overlap",
        "vae_tile",
        "vae_tile_overlap",
        "vae_frame_window",
        "vae_frame_overlap",
        "pad_min",
    ),
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise OSError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"config file {path} is nested too deeply to be a config") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _resolve(value: Any, base: Path) -> Any:
    if not isinstance(value, str):
        return value  # null, or a wrong type that the section parser reports
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the path fields of one file absolute, relative to that file's folder."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    ckpt = out.get("checkpoints")
    if isinstance(ckpt, dict):
        if "local_dir" in ckpt:
            ckpt["local_dir"] = _resolve(ckpt["local_dir"], base)
        if isinstance(ckpt.get("paths"), dict):
            ckpt["paths"] = {v: _resolve(p, base) for v, p in ckpt["paths"].items()}
    for name in ("text_encoder", "vae"):
        section = out.get(name)
        if isinstance(section, dict) and "path" in section:
            section["path"] = _resolve(section["path"], base)
    return out


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _check_keys(name: str, section: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"config section {name!r} must be an object, got {section!r}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"config section {name!r}: unknown keys {unknown}; known: {list(keys)}")
    missing = [k for k in keys if k not in section]
    if missing:
        raise ValueError(f"config section {name!r}: missing keys {missing}")


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _optional_path(where: str, value: Any) -> Path | None:
    if value is None:
        return None
    return Path(_text(where, value))


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _pair(where: str, value: Any, minimum: int) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where} must be a list [height, width], got {value!r}")
    return (_int(f"{where}[0]", value[0], minimum), _int(f"{where}[1]", value[1], minimum))


def _parse_checkpoints(raw: dict[str, Any]) -> CheckpointsConfig:
    _check_keys("checkpoints", raw, _SECTIONS["checkpoints"])
    files = raw["files"]
    if not isinstance(files, dict) or not files:
        raise ValueError(f"checkpoints.files must map versions to file names, got {files!r}")
    files = {version: _text(f"checkpoints.files.{version}", name) for version, name in files.items()}
    paths = raw["paths"]
    if not isinstance(paths, dict):
        raise ValueError(f"checkpoints.paths must map versions to paths or null, got {paths!r}")
    unknown = sorted(set(paths) - set(files))
    if unknown:
        raise ValueError(f"checkpoints.paths has versions {unknown} missing from checkpoints.files")
    local_dir = raw["local_dir"]
    return CheckpointsConfig(
        repo_id=_text("checkpoints.repo_id", raw["repo_id"]),
        files=files,
        local_dir=Path.cwd() / DEFAULT_CKPT_DIR if local_dir is None else Path(_text("checkpoints.local_dir", local_dir)),
        paths={v: _optional_path(f"checkpoints.paths.{v}", paths.get(v)) for v in files},
    )


def _parse_text_encoder(raw: dict[str, Any]) -> TextEncoderConfig:
    _check_keys("text_encoder", raw, _SECTIONS["text_encoder"])
    model_cfg = raw["model_cfg"]
    if model_cfg is not None:
        if not isinstance(model_cfg, dict):
            raise ValueError(f"text_encoder.model_cfg must be an object or null, got {model_cfg!r}")
        # Imported here: open_clip takes seconds to import and most config users never need it.
        from venhancer.text_encoder import TextModelConfig

        TextModelConfig.from_dict(model_cfg)
    return TextEncoderConfig(
        arch=_text("text_encoder.arch", raw["arch"]),
        pretrained=_text("text_encoder.pretrained", raw["pretrained"]),
        repo_id=_text("text_encoder.repo_id", raw["repo_id"]),
        filename=_text("text_encoder.filename", raw["filename"]),
        path=_optional_path("text_encoder.path", raw["path"]),
        model_cfg=model_cfg,
    )


def _parse_vae(raw: dict[str, Any]) -> VaeConfig:
    _check_keys("vae", raw, _SECTIONS["vae"])
    variant = raw["variant"]
    return VaeConfig(
        repo_id=_text("vae.repo_id", raw["repo_id"]),
        subfolder=_text("vae.subfolder", raw["subfolder"]),
        variant=None if variant is None else _text("vae.variant", variant),
        path=_optional_path("vae.path", raw["path"]),
    )


def _parse_planning(raw: dict[str, Any]) -> PlanningConfig:
    _check_keys("planning", raw, _SECTIONS["planning"])
    areas = {}
    for key in ("area_min", "area_max"):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"planning.{key} must be a positive number, got {value!r}")
        areas[key] = float(value)
    if areas["area_min"] > areas["area_max"]:
        raise ValueError(f"planning.area_min {raw['area_min']!r} exceeds planning.area_max {raw['area_max']!r}")
    chunk_len = _int("planning.chunk_len", raw["chunk_len"], 2)
    chunk_overlap = _int("planning.chunk_overlap", raw["chunk_overlap"], 1)
    if chunk_overlap >= chunk_len:
        raise ValueError(f"planning.chunk_overlap {chunk_overlap} must be smaller than chunk_len {chunk_len}")
    # The windows are snapped to whole key-frame periods (k + 1 frames, k up to MAX_INSERTED):
    # every k must leave a window longer than its overlap, or such runs would fail when planned.
    for k in range(MAX_INSERTED + 1):
        try:
            chunk_window_params(k, chunk_len, chunk_overlap)
        except ValueError as err:
            raise ValueError(f"planning.chunk_len {chunk_len} and chunk_overlap {chunk_overlap} give no valid "
                             f"window when {k} frames are inserted per pair ({err})") from None
    tile = _pair("planning.vae_tile", raw["vae_tile"], 1)
    tile_overlap = _pair("planning.vae_tile_overlap", raw["vae_tile_overlap"], 0)
    for axis, size, overlap in zip(("height", "width"), tile, tile_overlap):
        if overlap >= size:
            raise ValueError(f"planning.vae_tile_overlap {axis} {overlap} must be smaller than the tile {axis} {size}")
    frame_window = _int("planning.vae_frame_window", raw["vae_frame_window"], 1)
    frame_overlap = _int("planning.vae_frame_overlap", raw["vae_frame_overlap"], 0)
    if frame_overlap >= frame_window:
        raise ValueError(
            f"planning.vae_frame_overlap {frame_overlap} must be smaller than vae_frame_window {frame_window}"
        )
    pad_min = _pair("planning.pad_min", raw["pad_min"], 1)
    if pad_min[0] % 64 != 16 or pad_min[1] % 64 != 0:
        raise ValueError(f"planning.pad_min {list(pad_min)} must have height % 64 == 16 and width % 64 == 0 (network-compatible latents)")
    return PlanningConfig(
        area_min=areas["area_min"],
        area_max=areas["area_max"],
        chunk_len=chunk_len,
        chunk_overlap=chunk_overlap,
        vae_tile=tile,
        vae_tile_overlap=tile_overlap,
        vae_frame_window=frame_window,
        vae_frame_overlap=frame_overlap,
        pad_min=pad_min,
    )


def _parse_unet(raw: dict[str, Any]) -> UNetConfig:
    try:
        return UNetConfig.from_dict(raw)
    except (TypeError, ValueError) as err:  # a value of the wrong type (a number for a list) is a TypeError there
        raise ValueError(f"config section 'unet': {first_line(err)}") from None


def _parse(raw: dict[str, Any]) -> EnhancerConfig:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"config: unknown sections {unknown}; known: {list(_SECTIONS)}")
    if not isinstance(raw.get("unet"), dict):
        raise ValueError(f"config section 'unet' must be an object, got {raw.get('unet')!r}")
    return EnhancerConfig(
        unet=_parse_unet(raw["unet"]),
        checkpoints=_parse_checkpoints(raw.get("checkpoints")),
        text_encoder=_parse_text_encoder(raw.get("text_encoder")),
        vae=_parse_vae(raw.get("vae")),
        planning=_parse_planning(raw.get("planning")),
    )


def load_config(path: str | os.PathLike | None = None) -> EnhancerConfig:
    """The packaged configuration, with the JSON file at `path` (if given) laid over it."""
    raw = _resolve_paths(_read_json(DEFAULT_CONFIG_PATH), DEFAULT_CONFIG_PATH.parent)
    if path is not None:
        user_path = Path(path).expanduser().resolve()
        raw = _merge(raw, _resolve_paths(_read_json(user_path), user_path.parent))
    return _parse(raw)
