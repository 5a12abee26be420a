import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import errors as hub_errors

import venhancer.loading as loading
from venhancer.config import load_config
from venhancer.loading import (
    WeightsUnavailableError,
    resolve_text_encoder_weights,
    resolve_unet_checkpoint,
    resolve_vae,
)


def _response(status):
    # Enough of an HTTP response for HfHubHTTPError, whichever HTTP library the hub version uses.
    return SimpleNamespace(status_code=status, headers={}, request=None)


OFFLINE = [
    hub_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
    hub_errors.OfflineModeIsEnabled("offline"),
    ConnectionError("connection reset"),
]
GATED = [
    hub_errors.GatedRepoError("Cannot access gated repo\nmore details", response=_response(401)),
    hub_errors.HfHubHTTPError("403 Forbidden", response=_response(403)),
]
NOT_FOUND = [
    hub_errors.RepositoryNotFoundError("Repository Not Found", response=_response(404)),
    hub_errors.RemoteEntryNotFoundError("Entry Not Found", response=_response(404)),
]


@pytest.fixture
def cfg(tmp_path):
    # Relative local_dir: resolved against the config file's folder.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"checkpoints": {"local_dir": "ckpts"}}))
    return load_config(path)


@pytest.fixture
def hub(monkeypatch):
    """Replace hf_hub_download; tests set `hub.behaviour` (a callable) and read `hub.calls`."""
    state = SimpleNamespace(calls=[], behaviour=None)

    def fake(**kwargs):
        state.calls.append(kwargs)
        if state.behaviour is None:
            raise AssertionError("the hub must not be contacted here")
        return state.behaviour(**kwargs)

    monkeypatch.setattr(loading, "hf_hub_download", fake)
    return state


def raising(exc):
    def behaviour(**kwargs):
        raise exc

    return behaviour


RESOLVERS = {
    "unet": lambda cfg: resolve_unet_checkpoint(cfg, "v2"),
    "text": resolve_text_encoder_weights,
    "vae": resolve_vae,
}
LOCAL_HINTS = {
    "unet": "--model_path",
    "text": "text_encoder.path",
    "vae": "vae.path",
}
REPOS = {
    "unet": "jwhejwhe/VEnhancer",
    "text": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "vae": "stabilityai/stable-video-diffusion-img2vid",
}


@pytest.mark.parametrize("which", list(RESOLVERS))
@pytest.mark.parametrize(
    "exc, expected",
    [(e, ["HF_HUB_OFFLINE=1", "no connection"]) for e in OFFLINE]
    + [(e, ["gated", "hf auth login", "HF_TOKEN"]) for e in GATED]
    + [(e, ["not found" if isinstance(e, hub_errors.RepositoryNotFoundError) else "not in the repository"]) for e in NOT_FOUND],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_hub_failures_become_one_line_message(cfg, hub, which, exc, expected):
    hub.behaviour = raising(exc)
    with pytest.raises(WeightsUnavailableError) as info:
        RESOLVERS[which](cfg)
    message = str(info.value)
    assert "\n" not in message and len(message.replace(str(cfg.checkpoints.local_dir), "")) < 330, message
    for fragment in expected + [LOCAL_HINTS[which], REPOS[which]]:
        assert fragment in message, (fragment, message)
    assert info.value.__cause__ is exc
    if which == "unet":
        assert str(cfg.checkpoints.local_dir / "venhancer_v2.pt") in message
    else:
        assert "Hugging Face cache" in message


def test_unrelated_errors_are_not_disguised(cfg, hub):
    hub.behaviour = raising(ValueError("bad argument"))
    with pytest.raises(ValueError, match="bad argument"):
        resolve_text_encoder_weights(cfg)


def test_local_paths_bypass_the_hub(tmp_path, hub):
    weights = tmp_path / "weights"
    (weights / "vae").mkdir(parents=True)
    (weights / "vae" / "config.json").write_text("{}")
    for name in ("v1.pt", "v2.pt", "clip.safetensors", "override.pt"):
        (weights / name).write_bytes(b"x")
    path = tmp_path / "local.json"
    path.write_text(json.dumps({
        "checkpoints": {"paths": {"v1": "weights/v1.pt", "v2": str(weights / "v2.pt")}},
        "text_encoder": {"path": "weights/clip.safetensors"},
        "vae": {"path": "weights/vae"},
    }))
    cfg = load_config(path)
    assert resolve_unet_checkpoint(cfg, "v1") == weights / "v1.pt"
    assert resolve_unet_checkpoint(cfg, "v2") == weights / "v2.pt"
    assert resolve_unet_checkpoint(cfg, "v2", model_path=weights / "override.pt") == weights / "override.pt"
    assert resolve_text_encoder_weights(cfg) == weights / "clip.safetensors"
    assert resolve_vae(cfg) == weights / "vae"
    assert hub.calls == []


def test_checkpoint_already_in_local_dir_needs_no_hub(cfg, hub):
    cfg.checkpoints.local_dir.mkdir(parents=True)
    (cfg.checkpoints.local_dir / "venhancer_paper.pt").write_bytes(b"x")
    assert resolve_unet_checkpoint(cfg, "v1", model_path="") == cfg.checkpoints.local_dir / "venhancer_paper.pt"
    assert hub.calls == []


def test_missing_local_paths_are_clear(tmp_path, cfg, hub):
    with pytest.raises(WeightsUnavailableError, match="--model_path points to .*nope.pt, which is not a file"):
        resolve_unet_checkpoint(cfg, "v2", model_path=tmp_path / "nope.pt")
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({
        "checkpoints": {"paths": {"v2": "missing.pt"}},
        "text_encoder": {"path": "missing.safetensors"},
        "vae": {"path": "missing_vae"},
    }))
    broken = load_config(path)
    with pytest.raises(WeightsUnavailableError, match=r"checkpoints\.paths\.v2 points to .*missing\.pt"):
        resolve_unet_checkpoint(broken, "v2")
    with pytest.raises(WeightsUnavailableError, match=r"text_encoder\.path points to .*missing\.safetensors"):
        resolve_text_encoder_weights(broken)
    with pytest.raises(WeightsUnavailableError, match="vae.path points to .*missing_vae, which is not a diffusers folder"):
        resolve_vae(broken)
    assert hub.calls == []


def test_unknown_version(cfg, hub):
    with pytest.raises(ValueError, match="'v3'"):
        resolve_unet_checkpoint(cfg, "v3")


def test_download_into_local_dir(cfg, hub):
    def behaviour(repo_id, filename, local_dir, **kwargs):
        target = Path(local_dir) / filename
        target.write_bytes(b"complete")
        return str(target)

    hub.behaviour = behaviour
    path = resolve_unet_checkpoint(cfg, "v2")
    assert path == cfg.checkpoints.local_dir / "venhancer_v2.pt" and path.read_bytes() == b"complete"
    assert hub.calls == [{"repo_id": "jwhejwhe/VEnhancer", "filename": "venhancer_v2.pt", "local_dir": cfg.checkpoints.local_dir}]


@pytest.mark.parametrize("interruption", [ConnectionError("connection reset"), KeyboardInterrupt()])
@pytest.mark.parametrize("partial_name", ["venhancer_v2.pt", "venhancer_v2.pt.1234.incomplete"])
def test_interrupted_download_leaves_no_final_file(cfg, hub, interruption, partial_name):
    def behaviour(repo_id, filename, local_dir, **kwargs):
        (Path(local_dir) / partial_name).write_bytes(b"half of it")
        raise interruption

    hub.behaviour = behaviour
    with pytest.raises((WeightsUnavailableError, KeyboardInterrupt)):
        resolve_unet_checkpoint(cfg, "v2")
    assert not (cfg.checkpoints.local_dir / "venhancer_v2.pt").exists()


def test_text_and_vae_downloads(cfg, hub, tmp_path):
    snapshot = tmp_path / "hf_cache" / "snapshot"

    def behaviour(repo_id, filename, local_dir, **kwargs):
        assert local_dir is None  # the shared Hugging Face cache
        target = snapshot / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
        return str(target)

    hub.behaviour = behaviour
    assert resolve_text_encoder_weights(cfg) == snapshot / REPOS["text"] / "open_clip_model.safetensors"
    assert resolve_vae(cfg) == snapshot / REPOS["vae"] / "vae"
    assert [(c["repo_id"], c["filename"]) for c in hub.calls] == [
        (REPOS["text"], "open_clip_model.safetensors"),
        (REPOS["vae"], "vae/config.json"),
        (REPOS["vae"], "vae/diffusion_pytorch_model.fp16.safetensors"),
    ]


@pytest.fixture
def metadata(monkeypatch):
    """Replace the hub's per-file metadata request; `metadata.answers` maps a file name to an
    exception to raise (others answer fine); `metadata.asked` lists the files asked about."""
    state = SimpleNamespace(asked=[], answers={}, timeouts=[])

    def fake(url, timeout=None, **kwargs):
        name = url.split("/resolve/main/")[-1]
        state.asked.append(name)
        state.timeouts.append(timeout)
        if name in state.answers:
            raise state.answers[name]
        return SimpleNamespace(size=1)

    monkeypatch.setattr(loading, "get_hf_file_metadata", fake)
    monkeypatch.setattr(loading, "try_to_load_from_cache", lambda repo_id, filename: None)
    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", False)
    return state


def test_gated_file_is_found_before_any_download(cfg, hub, metadata):
    """A user without access to the gated VAE learns it before gigabytes of other weights come down."""
    metadata.answers["vae/diffusion_pytorch_model.fp16.safetensors"] = GATED[0]
    with pytest.raises(WeightsUnavailableError, match="SVD temporal VAE: .*gated"):
        loading.check_weights_available(cfg, "v1")
    assert metadata.asked == ["venhancer_paper.pt", "open_clip_model.safetensors", "vae/config.json",
                              "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert set(metadata.timeouts) == {loading.PREFLIGHT_TIMEOUT_S}
    assert hub.calls == []


def test_offline_fails_at_once_without_asking(cfg, hub, metadata, monkeypatch):
    monkeypatch.setattr(loading.hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE") as info:
        loading.check_weights_available(cfg, "v1")
    assert "\n" not in str(info.value)
    assert metadata.asked == [] and hub.calls == []


def test_no_network_is_one_line(cfg, hub, metadata):
    metadata.answers["venhancer_paper.pt"] = ConnectionError("Name or service not known")
    with pytest.raises(WeightsUnavailableError, match="no connection"):
        loading.check_weights_available(cfg, "v1")
    assert metadata.asked == ["venhancer_paper.pt"]  # the first unreachable file ends it


def test_files_present_need_no_question(tmp_path, metadata):
    path = tmp_path / "local.json"
    (tmp_path / "clip.safetensors").write_bytes(b"x")
    (tmp_path / "vae").mkdir()
    path.write_text(json.dumps({"checkpoints": {"paths": {"v1": "clip.safetensors"}},
                                "text_encoder": {"path": "clip.safetensors"}, "vae": {"path": "vae"}}))
    loading.check_weights_available(load_config(path), "v1")
    assert metadata.asked == []


def test_failed_download_leaves_no_lock_files(cfg, hub):
    """huggingface_hub keeps locks and metadata in local_dir/.cache; a failed first download must
    not leave them (nor an empty ckpts/ folder) behind."""
    def behaviour(repo_id, filename, local_dir, **kwargs):
        lock = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.lock"
        lock.parent.mkdir(parents=True)
        lock.write_bytes(b"")
        raise ConnectionError("connection reset")

    hub.behaviour = behaviour
    with pytest.raises(WeightsUnavailableError):
        resolve_unet_checkpoint(cfg, "v2")
    assert not cfg.checkpoints.local_dir.exists()
