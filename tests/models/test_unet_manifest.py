"""State-dict contract: keys, shapes and order equal the reference manifests."""

import json

import torch
from weight_rule import FIXTURES, load_manifest

from venhancer.models import VEnhancerUNet


def _meta_model(config=None):
    with torch.device("meta"):  # the full model would be 8 GB in float32
        return VEnhancerUNet(config)


def _check(model, manifest_name):
    manifest = load_manifest(manifest_name)
    info = json.loads((FIXTURES / manifest_name).read_text())
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == info["num_entries"] == len(manifest)
    missing = [k for k, _ in manifest if k not in dict(got)]
    unexpected = [k for k, _ in got if k not in dict(manifest)]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    assert dict(got) == dict(manifest)
    assert got == manifest  # same order too, so state_dict() order is manifest order
    assert not list(model.buffers())
    unet = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("VideoControlNet."))
    control = sum(p.numel() for p in model.VideoControlNet.parameters())
    assert (unet, control, unet + control) == (info["unet_params"], info["controlnet_params"], info["total_params"])


def test_full_model_matches_unet_manifest():
    _check(_meta_model(), "unet_manifest.json")


def test_tiny_model_matches_tiny_manifest(tiny_config):
    _check(_meta_model(tiny_config), "tiny_manifest.json")


def test_no_dropout_modules():
    model = _meta_model()
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
