"""Checkpoint loading and weight downloads.

Two sections live here: the denoising-network checkpoint loader, and the resolution/download of
every weight file (VEnhancer checkpoints, OpenCLIP text weights, the SVD temporal VAE).
"""

# ---------------------------------------------------------------------------------------------
# Network checkpoint loading (load_unet and its helpers)
# ---------------------------------------------------------------------------------------------

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from venhancer.models import UNetConfig, VEnhancerUNet


class CheckpointError(ValueError):
    """A file that cannot be read, or that is not a VEnhancer network checkpoint."""


# Training scripts wrap the weights in one of these keys (the published files use "state_dict").
_STATE_DICT_WRAPPER_KEYS = ("state_dict", "model", "module")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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


# ---------------------------------------------------------------------------------------------
# Weight sources and downloads
# ---------------------------------------------------------------------------------------------
