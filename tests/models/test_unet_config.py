import json

import pytest
from weight_rule import FIXTURES

from venhancer.models import UNetConfig


def test_defaults_are_the_published_model():
    cfg = UNetConfig()
    assert (cfg.in_dim, cfg.dim, cfg.context_dim, cfg.out_dim) == (4, 320, 1024, 4)
    assert cfg.dim_mult == (1, 2, 4, 4)
    assert (cfg.num_heads, cfg.head_dim, cfg.num_res_blocks) == (8, 64, 2)
    assert cfg.attn_scales == (1.0, 0.5, 0.25)
    assert cfg.embed_dim == 1280 and cfg.widths == (320, 640, 1280, 1280)
    assert [cfg.level_has_attention(i) for i in range(4)] == [True, True, True, False]


def test_from_dict_accepts_reference_constructor_kwargs():
    kwargs = json.loads((FIXTURES / "tiny_config.json").read_text())["constructor_kwargs"]
    cfg = UNetConfig.from_dict(kwargs)
    assert cfg == UNetConfig(dim=64, context_dim=64, num_heads=2, head_dim=32)
    assert isinstance(cfg.dim_mult, tuple) and isinstance(cfg.attn_scales, tuple)


def test_to_dict_round_trip():
    cfg = UNetConfig(dim=64, context_dim=64, num_heads=2, head_dim=32)
    d = cfg.to_dict()
    assert d["dim_mult"] == [1, 2, 4, 4]
    assert json.loads(json.dumps(d)) == d
    assert UNetConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"dim": 100}, "100"),  # 100 not divisible by 32 groups
        ({"dim": 96, "head_dim": 64}, "head_dim=64"),  # 96 channels cannot hold 64-wide heads
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": -64}, "head_dim"),
        ({"num_res_blocks": 1.5}, "num_res_blocks"),
        ({"in_dim": True}, "in_dim"),
        ({"dim_mult": ()}, "dim_mult"),
        ({"dim_mult": (1, 0, 2)}, "dim_mult"),
        ({"attn_scales": (1.0, 0.3)}, "0.3"),
        ({"attn_scales": (1.0, 0.0625)}, "0.0625"),  # level 4 does not exist with 4 levels
    ],
)
def test_invalid_values_are_rejected_with_the_value_named(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        UNetConfig(**kwargs)
    assert fragment in str(info.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="dimm"):
        UNetConfig.from_dict({"dimm": 320})
