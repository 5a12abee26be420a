"""The re-implemented synthetic-weight rule reproduces the reference fingerprints."""

import json
import math

from weight_rule import FIXTURES, fingerprint, load_manifest, synthetic_tensor


def _check(entry, tensor, expected):
    key, first, total, squares = expected
    assert key == entry
    got_first, got_total, got_squares = fingerprint(tensor)
    assert got_first == first, key  # exact float32 values
    assert math.isclose(got_total, total, rel_tol=1e-9, abs_tol=1e-9), key
    assert math.isclose(got_squares, squares, rel_tol=1e-9), key


def test_tiny_weights_match_fingerprint_seed1():
    manifest = load_manifest("tiny_manifest.json")
    expected = json.loads((FIXTURES / "tiny_weights_fingerprint_seed1.json").read_text())
    assert expected["seed"] == 1 and len(expected["entries"]) == len(manifest)
    for index, (key, shape) in enumerate(manifest):
        _check(key, synthetic_tensor(key, shape, index, seed=1), expected["entries"][index])


def test_full_weights_sample_matches_fingerprint_seed7():
    """Every 40th entry plus the largest ones of each kind (the full check of all 2180 entries
    happens while filling the model in the full parity test)."""
    manifest = load_manifest("unet_manifest.json")
    expected = json.loads((FIXTURES / "full_weights_fingerprint_seed7.json").read_text())["entries"]
    picks = set(range(0, len(manifest), 40))
    picks |= {i for i, (key, shape) in enumerate(manifest) if key.endswith(("in_layers.0.weight", "time_embed.0.bias"))}
    picks.add(max(range(len(manifest)), key=lambda i: math.prod(manifest[i][1])))
    for index in sorted(picks):
        key, shape = manifest[index]
        _check(key, synthetic_tensor(key, shape, index, seed=7), expected[index])
