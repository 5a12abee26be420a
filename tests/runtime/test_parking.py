"""Skips and ControlNet residuals parked in host memory: the same bits, nothing left behind."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from venhancer.models.config import UNetConfig
from venhancer.models.unet import VEnhancerUNet
from venhancer.runtime import RuntimeSettings, optimize_for_inference
from venhancer.runtime import parking as parking_module
from venhancer.runtime.parking import HostParking, Parked, unpark

TESTS = Path(__file__).resolve().parents[1]
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(TESTS))  # for make_tiny_models
from make_tiny_models import tiny_network_inputs  # noqa: E402


def _tiny_network(settings: RuntimeSettings) -> VEnhancerUNet:
    torch.manual_seed(0)
    config = UNetConfig.from_dict(json.loads((FIXTURES / "tiny_config.json").read_text())["constructor_kwargs"])
    unet = VEnhancerUNet(config).eval()
    for p in unet.parameters():  # zero-initialised convolutions would hide a lost residual
        p.data.normal_(0, 0.05)
    return optimize_for_inference(unet, settings)


def test_parked_activations_give_the_same_bits(monkeypatch):
    """Every skip and residual goes through host memory (counted), comes back once, and the
    outputs of both evaluation orders are bit-identical to the resident run's."""
    for settings in (RuntimeSettings(), RuntimeSettings(fused_kernels=False)):
        unet = _tiny_network(settings)
        x, t, y, hint, t_hint, s_cond, mask = tiny_network_inputs(unet.config)
        with torch.inference_mode():
            single = unet(x, t, y, hint, t_hint, s_cond, mask)
            branches = unet.forward_branches(x, t, [y, -y], hint, t_hint, s_cond, mask)
        optimize_for_inference(unet, replace(settings, park_activations=True))
        parked, fetched = [], []
        park, fetch = HostParking.park, HostParking.fetch

        def counting_park(self, tensor):
            parked.append(park(self, tensor))
            return parked[-1]

        def counting_fetch(self, item, keep=False):
            fetched.append((item, keep))
            return fetch(self, item, keep)

        monkeypatch.setattr(HostParking, "park", counting_park)
        monkeypatch.setattr(HostParking, "fetch", counting_fetch)
        with torch.inference_mode():
            assert torch.equal(unet(x, t, y, hint, t_hint, s_cond, mask), single)
            skips_and_residuals = 2 * len(unet.input_blocks) + 1
            assert len(parked) == skips_and_residuals and len(fetched) == skips_and_residuals
            assert all(p.host is None for p in parked)  # host memory let go after the last use
            parked.clear()
            fetched.clear()
            got = unet.forward_branches(x, t, [y, -y], hint, t_hint, s_cond, mask)
        assert all(torch.equal(a, b) for a, b in zip(got, branches))
        # The skips made before the first text layer serve both branches: kept for the second.
        assert any(keep for _, keep in fetched) and all(p.host is None for p in parked)
        monkeypatch.undo()


def test_prefetch_brings_back_the_next_value_once():
    parking = HostParking(torch.device("cpu"))
    a, b = torch.randn(3, 4), torch.randn(2, 2).contiguous(memory_format=torch.contiguous_format)
    pa, pb = parking.park(a), parking.park(b)
    assert isinstance(pa, Parked) and parking.bytes_out == (a.numel() + b.numel()) * 4
    got_a = unpark(pa, then=pb)
    assert torch.equal(got_a, a) and pb.copy_back is not None  # on its way back already
    assert torch.equal(unpark(pb, keep=True), b) and pb.host is not None
    assert torch.equal(unpark(pb), b) and pb.host is None
    assert unpark(a) is a  # a plain tensor is its own value
    assert parking_module.prefetch(None) is None
