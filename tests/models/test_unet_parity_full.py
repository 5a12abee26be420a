"""Full-size network (weights seed 7) against the reference vectors of full case A.

Needs ~10 GB of RAM (one float32 model, 2.04e9 parameters) and about a minute on 2 cores.
"""

import gc
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from unet_helpers import call_args, max_abs, rel_l2
from weight_rule import FIXTURES, fill_model, fingerprint, load_manifest

from venhancer.models import VEnhancerUNet
from venhancer.runtime import InferenceOptions, optimize_for_inference

REL_L2 = 1e-3


@pytest.mark.slow
def test_full_case_a():
    manifest = load_manifest("unet_manifest.json")
    expected = json.loads((FIXTURES / "full_weights_fingerprint_seed7.json").read_text())["entries"]
    case = load_file(str(FIXTURES / "full_case_a.safetensors"))

    def check_fingerprint(index, key, tensor):
        # Every one of the 2180 generated entries is checked against the reference fingerprint.
        exp_key, first, total, squares = expected[index]
        got_first, got_total, got_squares = fingerprint(tensor)
        assert key == exp_key and got_first == first, key
        assert math.isclose(got_total, total, rel_tol=1e-9, abs_tol=1e-9), key
        assert math.isclose(got_squares, squares, rel_tol=1e-9), key

    with torch.device("meta"):
        model = VEnhancerUNet()
    try:
        fill_model(model, manifest, seed=7, on_entry=check_fingerprint)
        model.eval()
        with torch.no_grad():
            out, control = model(*call_args(case), return_control=True)
            # The optimized layout (channels-last, folded SiLU, chunked feed-forward) on the
            # same instance: one 8 GB model is all CI can afford.
            optimize_for_inference(model, InferenceOptions(ff_chunk_tokens=97))
            out_fast = model(*call_args(case))
    finally:
        del model
        gc.collect()

    errors = {"out": (rel_l2(out, case["out"]), max_abs(out, case["out"]))}
    for i, c in enumerate(control):
        errors[f"control_{i}"] = (rel_l2(c, case[f"control_{i}"]), max_abs(c, case[f"control_{i}"]))
    print("full case A errors (rel L2, max abs):", {k: f"{r:.2e}, {m:.2e}" for k, (r, m) in errors.items()})

    assert out.shape == case["out"].shape
    assert errors["out"][0] <= REL_L2 and errors["out"][1] <= 2e-5
    fast_rel, fast_abs = rel_l2(out_fast, case["out"]), max_abs(out_fast, case["out"])
    print(f"optimized path: rel L2 {fast_rel:.2e}, max abs {fast_abs:.2e}")
    assert fast_rel <= REL_L2 and fast_abs <= 2e-5
    assert len(control) == 13
    for i in range(13):
        ref = case[f"control_{i}"]
        rel, worst = errors[f"control_{i}"]
        assert control[i].shape == ref.shape, i
        assert rel <= REL_L2, i
        assert worst <= 2e-5 * float(ref.abs().max()), i
