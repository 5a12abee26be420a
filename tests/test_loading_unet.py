"""Loading the network checkpoint: formats, nesting, dtype, and clear errors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from venhancer.loading import CheckpointError, load_unet, read_state_dict, save_unet_safetensors
from venhancer.models import UNetConfig, VEnhancerUNet

# A small configuration (2.6 M parameters) keeps the files written here at ~10 MB.
SMALL = UNetConfig(dim=32, context_dim=32, num_heads=1, head_dim=32, dim_mult=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def small_model() -> VEnhancerUNet:
    torch.manual_seed(0)
    model = VEnhancerUNet(SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial values everywhere (some layers start at zero)
            p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def small_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 3, 10, 8, generator=g), torch.tensor([600]), torch.randn(1, 77, 32, generator=g),
            torch.randn(1, 4, 2, 10, 8, generator=g), torch.tensor([199]), torch.tensor([8]), torch.tensor([[0, -1, 1]]))


def _assert_same_weights(model, reference):
    ref = reference.state_dict()
    got = model.state_dict()
    assert list(got) == list(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def _assert_loaded_ok(model, reference, inputs):
    assert not model.training
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    _assert_same_weights(model, reference)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), reference(*inputs), atol=1e-6, rtol=1e-5)


def test_torch_checkpoint_round_trip(tmp_path, small_model, small_inputs):
    path = tmp_path / "ckpt.pt"
    torch.save(small_model.state_dict(), path)
    _assert_loaded_ok(load_unet(path, SMALL), small_model, small_inputs)


@pytest.mark.parametrize(
    "wrap, suffix",
    [("state_dict", ".pth"), ("model", ".ckpt"), ("module_prefix", ".pt"), ("state_dict_of_module", ".pt")],
)
def test_nested_checkpoints_and_suffixes(tmp_path, small_model, wrap, suffix):
    sd = small_model.state_dict()
    obj = {
        "state_dict": {"state_dict": sd, "epoch": 3, "note": "training extras are ignored"},
        "model": {"model": sd, "optimizer": {"lr": 1e-4}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "state_dict_of_module": {"state_dict": {"module": sd}, "step": 10},
    }[wrap]
    path = tmp_path / f"ckpt{suffix}"
    torch.save(obj, path)
    model = load_unet(path, SMALL)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _assert_same_weights(model, small_model)


def test_safetensors_round_trip(tmp_path, small_model):
    path = save_unet_safetensors(small_model, tmp_path / "sub" / "unet.safetensors")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["unet.safetensors"]  # no temp left
    _assert_same_weights(load_unet(path, SMALL), small_model)
    # a state dict works as well as a module
    path2 = save_unet_safetensors(small_model.state_dict(), tmp_path / "unet2.safetensors")
    _assert_same_weights(load_unet(path2, SMALL), small_model)


def test_dtype_option(tmp_path, small_model, small_inputs):
    path = save_unet_safetensors(small_model, tmp_path / "unet.safetensors")
    model = load_unet(path, SMALL, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x = small_inputs[0]
    with torch.no_grad():
        out = model(*small_inputs)
        ref = small_model(*small_inputs)
    assert out.dtype == x.dtype  # float32 inputs are cast in and the result cast back
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_wrong_keys_give_a_clear_error(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(3)
    sd["time_embed.0.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, SMALL)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing keys" in message and "out.2.bias" in message
    assert "1 unexpected keys" in message and "extra.weight" in message
    assert "1 keys with wrong shapes" in message and "time_embed.0.bias: (7,) in file, (128,) expected" in message


def test_checkpoint_of_another_config_is_rejected(tmp_path, small_model):
    path = save_unet_safetensors(small_model, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_unet(path)  # full-size config expected


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(path)
    path = tmp_path / "mixed.pt"
    torch.save({"a.weight": torch.zeros(2), "b": 3}, path)
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict(path)


class _RunsCodeWhenUnpickled:
    marker = None

    def __reduce__(self):
        # Unpickling would call open(marker, "w"), creating the file.
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCodeWhenUnpickled()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": payload}}, fh)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, SMALL)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()


def test_pickle_inside_a_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCodeWhenUnpickled()
    payload.marker = marker
    path = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {"x": payload}}, path)
    marker.unlink(missing_ok=True)  # torch.save does not unpickle, but be sure
    with pytest.raises(CheckpointError, match="refused"):
        load_unet(path, SMALL)
    assert not marker.exists()


@pytest.mark.parametrize("name, content", [("junk.pt", b"not a checkpoint at all"), ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json")])
def test_corrupt_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, SMALL)
    assert str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_truncated_torch_file(tmp_path, small_model):
    path = tmp_path / "cut.pt"
    torch.save(small_model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_unet(path, SMALL)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_unet(tmp_path / "nothing.pt", SMALL)


def test_pickle_checkpoint_gets_a_half_precision_cache(tmp_path, small_model, caplog):
    from venhancer.loading import checkpoint_cache_path, load_unet_cached

    path = tmp_path / "venhancer_v2.pt"
    torch.save(small_model.state_dict(), path)
    cache = checkpoint_cache_path(path, torch.float16)
    assert cache == tmp_path / "venhancer_v2.float16.safetensors"
    assert checkpoint_cache_path(path, torch.float32) is None
    assert checkpoint_cache_path(cache, torch.float16) is None

    first = load_unet_cached(path, SMALL, dtype=torch.float16)
    assert cache.is_file()
    with caplog.at_level("INFO", logger="venhancer.loading"):
        second = load_unet_cached(path, SMALL, dtype=torch.float16)
    assert "using the converted checkpoint" in caplog.text
    _assert_same_weights(second, first)

    # A source newer than its copy (a re-downloaded checkpoint) is read again.
    os.utime(cache, (1, 1))
    caplog.clear()
    with caplog.at_level("INFO", logger="venhancer.loading"):
        load_unet_cached(path, SMALL, dtype=torch.float16)
    assert "using the converted checkpoint" not in caplog.text
