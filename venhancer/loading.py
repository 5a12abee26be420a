"""Checkpoint loading and weight downloads.

Two sections live here: the denoising-network checkpoint loader, and the resolution/download of
every weight file (VEnhancer checkpoints, OpenCLIP text weights, the SVD temporal VAE).
"""

import importlib
import logging
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

from venhancer.config import EnhancerConfig
from venhancer.models import UNetConfig, VEnhancerUNet
from venhancer.options import first_line

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Network checkpoint loading
# ---------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A file that cannot be read, or that is not a VEnhancer network checkpoint."""


# Training scripts wrap the weights in one of these keys (the published files use "state_dict").
_STATE_DICT_WRAPPER_KEYS = ("state_dict", "model", "module")


def _first_line(exc: BaseException) -> str:
    text = first_line(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _torch_load(path: Path):
    try:
        # mmap keeps a multi-GB file out of RAM until each tensor is converted; it needs the
        # zip format (torch >= 1.6), so older files are read without it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a PyTorch checkpoint (`.pt`/`.pth`/`.ckpt`/...), on
    the CPU, unwrapped from a `state_dict`/`model`/`module` key when nested.

    Pickles are read with `weights_only=True`: a file that would run code is refused.
    Raises FileNotFoundError, or CheckpointError for a file that cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    else:
        try:
            obj = _torch_load(path)
        except pickle.UnpicklingError as exc:
            # weights_only refuses pickles that would import or call arbitrary objects.
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds objects other than tensors and plain "
                f"containers (it could run code when loaded) ({_first_line(exc)})"
            ) from exc
        except Exception as exc:  # truncated/corrupt zip, not a pickle at all, ...
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc

    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = next((obj[k] for k in _STATE_DICT_WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapped is None:
            break
        obj = wrapped
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path}: not a state dict: {len(not_tensors)} entries are not tensors (first: {not_tensors[:5]}); "
            f"expected the weights at the top level or under one of {list(_STATE_DICT_WRAPPER_KEYS)}"
        )
    state_dict = dict(obj)
    # Checkpoints saved from a DataParallel/DDP wrapper prefix every key with "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless `state_dict` has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: {tuple(state_dict[k].shape)} in file, {expected[k]} expected"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("keys with wrong shapes", misshaped)):
        if items:
            parts.append(f"{len(items)} {label} (first {min(5, len(items))}: {items[:5]})")
    raise CheckpointError(
        f"{source} is not a VEnhancer network checkpoint for this configuration: " + "; ".join(parts)
    )


def load_unet(
    path: str | os.PathLike,
    config: UNetConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VEnhancerUNet:
    """Load a VEnhancer checkpoint into a `VEnhancerUNet` in eval mode, parameters in `dtype` on
    `device`, gradients off.

    The model is built on the meta device and takes the checkpoint's tensors directly
    (`assign=True`), so no random initialisation is ever materialised.
    """
    path = Path(path)
    state_dict = read_state_dict(path)
    with torch.device("meta"):
        model = VEnhancerUNet(config)
    check_state_dict(model, state_dict, source=str(path))
    for key in list(state_dict):
        # One tensor at a time, so the peak is about one converted model plus one tensor.
        state_dict[key] = state_dict[key].to(device=device, dtype=dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def save_unet_safetensors(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the network's weights as `.safetensors` (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(model_or_state_dict, torch.nn.Module):
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def checkpoint_cache_path(path: str | os.PathLike, dtype: torch.dtype) -> Path | None:
    """Where the safetensors copy of a pickle checkpoint in `dtype` lives (next to it), or None
    for checkpoints that need no copy (already safetensors, or float32).

    Unpickling the 2B-parameter checkpoint reads and converts every tensor on each run; the
    half-precision safetensors copy is memory-mapped and needs no conversion.
    """
    path = Path(path)
    if path.suffix.lower() not in _PICKLE_SUFFIXES or dtype not in (torch.float16, torch.bfloat16):
        return None
    return path.with_name(f"{path.stem}.{str(dtype).replace('torch.', '')}.safetensors")


def load_unet_cached(
    path: str | os.PathLike,
    config: UNetConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VEnhancerUNet:
    """`load_unet`, reading (or, the first time, writing) the half-precision safetensors copy of a
    pickle checkpoint. A copy older than its source is ignored; a folder that cannot be written
    only costs the speed-up."""
    path = Path(path)
    cache = checkpoint_cache_path(path, dtype)
    if cache is not None and cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        logger.info("using the converted checkpoint %s", cache)
        return load_unet(cache, config=config, device=device, dtype=dtype)
    model = load_unet(path, config=config, device=device, dtype=dtype)
    if cache is not None:
        try:
            save_unet_safetensors(model, cache)
            logger.info("wrote %s: later runs start faster", cache)
        except OSError as exc:
            logger.warning("could not write the converted checkpoint %s (%s); later runs will convert again", cache, exc)
    return model

# ---------------------------------------------------------------------------------------------
# Weight sources and downloads
# ---------------------------------------------------------------------------------------------

_HUB = "https://huggingface.co"


class WeightsUnavailableError(RuntimeError):
    """A weight file is neither on disk nor obtainable from the Hugging Face Hub (one-line message)."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    # Network failures in the middle of a transfer surface as the HTTP library's own exceptions,
    # and huggingface_hub has used different libraries over its versions.
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _explain(exc: BaseException, repo_id: str) -> str | None:
    """Cause and remedy for a hub failure in a few words, or None when `exc` is not a hub/network failure."""
    login = "`hf auth login` or HF_TOKEN"
    if isinstance(exc, hub_errors.GatedRepoError) or (
        isinstance(exc, hub_errors.HfHubHTTPError) and _status(exc) == 403
    ):
        return f"the repository is gated: accept its terms on that page, then {login}"
    if isinstance(exc, hub_errors.RepositoryNotFoundError) or (
        isinstance(exc, hub_errors.HfHubHTTPError) and _status(exc) == 401
    ):
        # The hub answers 401 both for a missing repository and for a private/gated one without login.
        return f"repository not found, or it needs a login ({login})"
    if isinstance(exc, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, *_transport_errors())):
        return "no connection to the Hugging Face Hub (or HF_HUB_OFFLINE=1)"
    if isinstance(exc, (hub_errors.EntryNotFoundError, hub_errors.RevisionNotFoundError)):
        return "the file is not in the repository; check the file name in the config"
    if isinstance(exc, hub_errors.HfHubHTTPError):
        return f"the Hugging Face Hub answered with an error ({_status(exc)}); retry later"
    return None


def _unavailable(what: str, repo_id: str, filename: str, where: str, local_hint: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(f"{what}: cannot download {filename} from {_HUB}/{repo_id} into {where}: {reason}; "
                                   f"or {local_hint}")


_CACHE_WHERE = "the Hugging Face cache"


def _download(
    what: str,
    repo_id: str,
    filename: str,
    local_hint: str,
    local_dir: Path | None = None,
) -> Path:
    """hf_hub_download with every hub/network failure turned into one WeightsUnavailableError.

    With `local_dir` the file lands at local_dir/filename; otherwise in the Hugging Face cache.
    huggingface_hub writes to a temporary name and renames when complete; should a failed call
    still leave the final name behind (other hub versions, a killed transfer), it is removed here,
    so a file at the final name is always complete. So are the lock and metadata files it keeps
    in local_dir/.cache, when that folder was not there before.
    """
    final = None if local_dir is None else local_dir / filename
    existed = final is not None and final.exists()
    hub_cache = None if local_dir is None else local_dir / ".cache"
    cache_existed = hub_cache is not None and hub_cache.exists()
    where = str(final) if final is not None else _CACHE_WHERE
    logger.info("fetching %s: %s/%s -> %s", what, repo_id, filename, where)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=local_dir))
    except BaseException as exc:
        if final is not None and not existed and final.exists():
            final.unlink()
        if hub_cache is not None and not cache_existed:
            shutil.rmtree(hub_cache, ignore_errors=True)
        reason = _explain(exc, repo_id)
        if reason is None:
            raise
        raise _unavailable(what, repo_id, filename, where, local_hint, reason) from exc


def _local(what: str, path: Path, source: str, folder: bool = False) -> Path:
    ok = (path / "config.json").is_file() if folder else path.is_file()
    if not ok:
        kind = "a diffusers folder with config.json" if folder else "a file"
        raise WeightsUnavailableError(f"{what}: {source} points to {path}, which is not {kind}")
    return path


def resolve_unet_checkpoint(cfg: EnhancerConfig, version: str, model_path: str | os.PathLike | None = None) -> Path:
    """Local path of the VEnhancer checkpoint for `version`, downloading it into `ckpts/` if needed.

    Order: `model_path` (the --model_path flag; "" counts as unset), then config
    `checkpoints.paths[version]`, then `checkpoints.local_dir/<file>` if present, else download there.
    """
    ckpt = cfg.checkpoints
    filename = ckpt.filename(version)
    what = f"VEnhancer checkpoint {version}"
    if model_path:
        return _local(what, Path(model_path).expanduser(), "--model_path")
    if ckpt.paths.get(version) is not None:
        return _local(what, ckpt.paths[version], f"config checkpoints.paths.{version}")
    target = ckpt.local_dir / filename
    if target.is_file():
        # Present already (downloaded before or copied by hand): no network, as in the reference.
        return target
    created = not ckpt.local_dir.exists()
    ckpt.local_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _download(what, ckpt.repo_id, filename, _unet_hint(version), local_dir=ckpt.local_dir)
    except BaseException:
        if created and not any(ckpt.local_dir.iterdir()):
            ckpt.local_dir.rmdir()
        raise


def _unet_hint(version: str) -> str:
    return f"use --model_path FILE, or checkpoints.paths.{version} in the config"


_TEXT_HINT = "set text_encoder.path in the config to a local open_clip file"
_VAE_HINT = "set vae.path in the config to a local diffusers folder"
# Seconds to wait for the hub's answer about one file before calling it unreachable.
PREFLIGHT_TIMEOUT_S = 5.0


def resolve_text_encoder_weights(cfg: EnhancerConfig) -> Path:
    """Local path of the OpenCLIP checkpoint: config `text_encoder.path`, else the hub (HF cache)."""
    te = cfg.text_encoder
    what = f"OpenCLIP {te.arch} weights"
    if te.path is not None:
        return _local(what, te.path, "config text_encoder.path")
    return _download(what, te.repo_id, te.filename, _TEXT_HINT)


def resolve_vae(cfg: EnhancerConfig) -> Path:
    """Local diffusers folder of the temporal VAE: config `vae.path`, else the hub (HF cache).

    Only the config and the one weight file of the configured variant are fetched, not the repo.
    """
    vae = cfg.vae
    what = "SVD temporal VAE"
    if vae.path is not None:
        return _local(what, vae.path, "config vae.path", folder=True)
    config_file, weights = _vae_files(cfg)
    config_path = _download(what, vae.repo_id, config_file, _VAE_HINT)
    _download(what, vae.repo_id, weights, _VAE_HINT)
    return config_path.parent


def _vae_files(cfg: EnhancerConfig) -> tuple[str, str]:
    vae = cfg.vae
    weights = "diffusion_pytorch_model.safetensors" if vae.variant is None else f"diffusion_pytorch_model.{vae.variant}.safetensors"
    return f"{vae.subfolder}/config.json", f"{vae.subfolder}/{weights}"


def _missing_hub_files(cfg: EnhancerConfig, version: str, model_path: str | os.PathLike | None) -> list[tuple[str, ...]]:
    """(what, repo_id, filename, where, local hint) of each file that will have to be downloaded."""
    missing = []
    ckpt = cfg.checkpoints
    filename = ckpt.filename(version)
    if not model_path and ckpt.paths.get(version) is None and not (ckpt.local_dir / filename).is_file():
        missing.append((f"VEnhancer checkpoint {version}", ckpt.repo_id, filename, str(ckpt.local_dir / filename),
                        _unet_hint(version)))
    te = cfg.text_encoder
    hub_files = []
    if te.path is None:
        hub_files.append((f"OpenCLIP {te.arch} weights", te.repo_id, te.filename, _TEXT_HINT))
    if cfg.vae.path is None:
        hub_files += [("SVD temporal VAE", cfg.vae.repo_id, name, _VAE_HINT) for name in _vae_files(cfg)]
    for what, repo_id, name, hint in hub_files:
        if not isinstance(try_to_load_from_cache(repo_id, name), str):
            missing.append((what, repo_id, name, _CACHE_WHERE, hint))
    return missing


def check_weights_available(cfg: EnhancerConfig, version: str, model_path: str | os.PathLike | None = None) -> None:
    """Before any download: ask the hub about every file still missing, so that no access problem
    (no network, a gated repository) shows up only after gigabytes of other files. Raises
    WeightsUnavailableError at the first problem; waits at most PREFLIGHT_TIMEOUT_S per file."""
    for what, repo_id, filename, where, hint in _missing_hub_files(cfg, version, model_path):
        try:
            if hub_constants.HF_HUB_OFFLINE:
                raise hub_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
            get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=PREFLIGHT_TIMEOUT_S)
        except Exception as exc:
            reason = _explain(exc, repo_id)
            if reason is None:
                raise
            raise _unavailable(what, repo_id, filename, where, hint, reason) from exc
