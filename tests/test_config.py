import json
from pathlib import Path

import pytest

from venhancer import planning
from venhancer.config import DEFAULT_CONFIG_PATH, EnhancerConfig, load_config
from venhancer.models import UNetConfig


def write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_packaged_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert isinstance(cfg, EnhancerConfig)
    assert DEFAULT_CONFIG_PATH.name == "venhancer.json" and DEFAULT_CONFIG_PATH.parent.name == "configs"
    assert cfg.unet == UNetConfig()  # the published full-size network
    ck = cfg.checkpoints
    assert ck.repo_id == "jwhejwhe/VEnhancer"
    assert ck.files == {"v1": "venhancer_paper.pt", "v2": "venhancer_v2.pt"}
    assert ck.local_dir == tmp_path / "ckpts"  # null: ckpts/ in the working directory
    assert ck.paths == {"v1": None, "v2": None}
    te = cfg.text_encoder
    assert (te.arch, te.pretrained, te.repo_id, te.filename, te.path, te.model_cfg) == (
        "ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors", None, None
    )
    vae = cfg.vae
    assert (vae.repo_id, vae.subfolder, vae.variant, vae.path) == (
        "stabilityai/stable-video-diffusion-img2vid", "vae", "fp16", None
    )


def test_planning_defaults_match_planning_module():
    p = load_config().planning
    assert (p.area_min, p.area_max) == (planning.AREA_MIN, planning.AREA_MAX) == (1382400, 2359296)
    assert (p.chunk_len, p.chunk_overlap) == (planning.CHUNK_MAX_LEN, planning.CHUNK_OVERLAP) == (32, 16)
    assert (p.vae_tile, p.vae_tile_overlap) == (planning.VAE_TILE, planning.VAE_TILE_OVERLAP) == ((72, 128), (12, 25))
    assert (p.vae_frame_window, p.vae_frame_overlap) == (planning.VAE_FRAME_WINDOW, planning.VAE_FRAME_OVERLAP) == (5, 2)
    assert p.pad_min == (planning.NET_MIN_HEIGHT, planning.NET_MIN_WIDTH) == (720, 1280)


def test_user_file_overrides_and_relative_paths(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, {
        "unet": {"dim": 64, "context_dim": 64, "num_heads": 2, "head_dim": 32},
        "checkpoints": {"local_dir": "../weights", "paths": {"v2": "mine.pt"}},
        "text_encoder": {"path": "~/clip.safetensors", "model_cfg": {"width": 32, "heads": 2, "layers": 3}},
        "vae": {"path": "/abs/vae", "variant": None},
        "planning": {"chunk_len": 24, "chunk_overlap": 8},
    })
    cfg = load_config(path)
    assert cfg.unet == UNetConfig(dim=64, context_dim=64, num_heads=2, head_dim=32)
    assert cfg.checkpoints.local_dir == tmp_path / "weights"
    assert cfg.checkpoints.paths == {"v1": None, "v2": sub / "mine.pt"}
    assert cfg.checkpoints.files["v2"] == "venhancer_v2.pt"  # untouched keys keep the packaged value
    assert cfg.text_encoder.path == Path("~/clip.safetensors").expanduser()
    assert cfg.text_encoder.model_cfg == {"width": 32, "heads": 2, "layers": 3}
    assert cfg.vae.path == Path("/abs/vae") and cfg.vae.variant is None
    assert (cfg.planning.chunk_len, cfg.planning.chunk_overlap, cfg.planning.vae_tile) == (24, 8, (72, 128))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"chekpoints": {}}, r"unknown sections \['chekpoints'\]"),
        ({"vae": {"revison": "main"}}, r"'vae': unknown keys \['revison'\]"),
        ({"vae": None}, r"'vae' must be an object, got None"),
        ({"unet": {"dimm": 3}}, r"dimm"),
        ({"unet": {"dim": -1}}, r"-1"),
        ({"checkpoints": {"repo_id": ""}}, r"checkpoints.repo_id .*''"),
        ({"checkpoints": {"files": {"v1": 3}}}, r"checkpoints.files.v1 .*3"),
        ({"checkpoints": {"paths": {"v3": "x.pt"}}}, r"\['v3'\]"),
        ({"text_encoder": {"path": 5}}, r"text_encoder.path .*5"),
        ({"text_encoder": {"model_cfg": {"layers": 1}}}, r"layers .*1"),
        ({"text_encoder": {"model_cfg": {"hf_model_name": "x"}}}, r"hf_model_name"),
        ({"planning": {"area_min": 0}}, r"planning.area_min .*0"),
        ({"planning": {"area_min": 3e6}}, r"area_min 3000000.0 exceeds"),
        ({"planning": {"chunk_len": 16, "chunk_overlap": 16}}, r"chunk_overlap 16 .*chunk_len 16"),
        ({"planning": {"chunk_len": True}}, r"planning.chunk_len .*True"),
        ({"planning": {"vae_tile": [72]}}, r"planning.vae_tile .*\[72\]"),
        ({"planning": {"vae_tile_overlap": [12, 128]}}, r"width 128 .*tile width 128"),
        ({"planning": {"vae_frame_overlap": 5}}, r"vae_frame_overlap 5 .*vae_frame_window 5"),
        ({"planning": {"pad_min": [720, 1000]}}, r"planning.pad_min \[720, 1000\]"),
    ],
)
def test_validation_names_the_bad_value(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(write(tmp_path, override))


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_config(bad)
    with pytest.raises(ValueError, match="JSON object"):
        load_config(write(tmp_path, [1, 2]))


def test_checkpoint_filename_lookup():
    ck = load_config().checkpoints
    assert ck.filename("v1") == "venhancer_paper.pt"
    with pytest.raises(ValueError, match=r"'v9'.*\['v1', 'v2'\]"):
        ck.filename("v9")


def test_chunk_sizes_must_work_for_every_interpolation(tmp_path):
    """Windows snapped to key-frame periods: chunk_len 8 leaves windows of 1 frame when 7 or 8
    frames are inserted per pair, which would fail only once such a video is planned."""
    path = tmp_path / "chunks.json"
    path.write_text(json.dumps({"planning": {"chunk_len": 8, "chunk_overlap": 4}}))
    with pytest.raises(ValueError, match="chunk_len 8 and chunk_overlap 4 give no valid window when 7 frames"):
        load_config(path)


@pytest.mark.parametrize("content, message", [
    (b'{"unet": {"dim_mult": 3}}', "config section 'unet'"),
    (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply"),
    ('{"note": "caf\u00e9"}'.encode("latin-1"), "is not UTF-8 text"),
])
def test_unreadable_configs_name_the_file(tmp_path, content, message):
    path = tmp_path / "user.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    if "unet" not in message:
        assert str(path) in str(info.value)
