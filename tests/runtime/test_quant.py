"""The FP8 (e4m3) helpers of `venhancer.runtime.quant` against float64 references on the CPU."""

import pytest
import torch

from venhancer.runtime import fp8_supported, quant


def _roundtrip_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per element: half a unit in the last place of e4m3 (2**-4 relative) in the normal range,
    half the subnormal step (2**-10 in units of the scale) below it."""
    return quant.E4M3_HALF_ULP * x.double().abs() + quant.E4M3_SUBNORMAL_HALF_STEP * scale.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_roundtrip_within_half_an_ulp(dtype):
    gen = torch.Generator().manual_seed(0)
    # rows of very different magnitudes: each row's scale follows its own absmax
    x = (torch.randn(64, 320, generator=gen) * torch.logspace(-4, 3, 64)[:, None]).to(dtype)
    fp8, scale = quant.quantize_rows(x)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)
    want_scale = x.double().abs().amax(dim=-1, keepdim=True) / 448
    assert torch.allclose(scale.double(), want_scale, rtol=1e-6, atol=0)
    back = quant.dequantize(fp8, scale, torch.float64)
    assert ((back - x.double()).abs() <= _roundtrip_bound(x, scale) * (1 + 1e-6)).all()
    # each row's largest element lands on 448 (the whole range is used)
    assert torch.equal(fp8.float().abs().amax(dim=-1), torch.full((64,), 448.0))


def test_rounding_is_to_nearest():
    scale = torch.ones(1, 1)
    # 126.7 rounds up across a power of two (to 128); 2**-10 lies halfway between 0 and the
    # smallest subnormal (ties to even: 0); 3 * 2**-11 rounds up to 2**-9
    x = torch.tensor([[126.7, 2.0**-10, 3 * 2.0**-11, 17.0, -17.1, 9.5]])
    got = quant.dequantize(quant.quantize(x, scale), scale)
    assert got.tolist() == [[128.0, 0.0, 2.0**-9, 16.0, -18.0, 10.0]]


def test_zero_rows_get_unit_scales_and_zero_values():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-2, 2, 16)
    fp8, scale = quant.quantize_rows(x)
    assert scale[0].item() == scale[2].item() == 1.0 and scale[1].item() == pytest.approx(2 / 448)
    back = quant.dequantize(fp8, scale)
    assert torch.isfinite(back).all() and not back[0].any() and not back[2].any()


def test_values_beyond_the_scale_are_clamped():
    x = torch.tensor([[1000.0, -1000.0, 448.0, 500.0, 1.0]])
    got = quant.quantize(x, torch.ones(1, 1)).float()
    assert got.tolist() == [[448.0, -448.0, 448.0, 448.0, 1.0]]


@pytest.mark.parametrize("rows, block", [(300, 128), (256, 128), (5, 64)])
def test_block_scales_cover_each_block_of_rows(rows, block):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, 3, rows, 64, generator=gen) * 5
    fp8, scales = quant.quantize_blocks(x, block)
    blocks = -(-rows // block)
    assert scales.shape == (2, 3, blocks) and scales.dtype == torch.float32 and fp8.shape == x.shape
    for b in range(blocks):
        part = x[..., b * block : (b + 1) * block, :].double()
        assert torch.allclose(scales[..., b].double(), part.abs().amax(dim=(-2, -1)) / 448, rtol=1e-6, atol=0)
    per_row = quant.expand_blocks(scales, block, rows)
    assert per_row.shape == (2, 3, rows, 1)
    back = quant.dequantize(fp8, per_row, torch.float64)
    assert ((back - x.double()).abs() <= _roundtrip_bound(x, per_row) * (1 + 1e-6)).all()


@pytest.mark.parametrize("rows, block", [(300, 128), (5, 64)])
def test_int8_blocks_round_to_nearest_within_half_a_step(rows, block):
    gen = torch.Generator().manual_seed(rows + 1)
    x = torch.randn(2, 3, rows, 64, generator=gen) * 5
    x[0, 0] = 0  # an all-zero matrix: scale 1, zeros
    q8, scales = quant.quantize_blocks(x, block, "int8")
    assert q8.dtype == torch.int8 and q8.shape == x.shape and scales.dtype == torch.float32
    assert q8.abs().max() == 127 and int(q8[0, 0].abs().max()) == 0 and torch.all(scales[0, 0] == 1)
    for b in range(-(-rows // block)):
        part = x[..., b * block : (b + 1) * block, :].double()
        want = part.abs().amax(dim=(-2, -1)) / 127
        assert torch.allclose(scales[..., b].double()[want > 0], want[want > 0], rtol=1e-6, atol=0)
    per_row = quant.expand_blocks(scales, block, rows)
    back = quant.dequantize(q8, per_row, torch.float64)
    assert ((back - x.double()).abs() <= per_row.double() * (0.5 + 1e-5)).all()


def test_int8_rounds_ties_away_from_zero_and_clamps():
    x = torch.tensor([[0.5, -0.5, 1.5, -2.5, 126.6, 300.0, -300.0]])
    assert quant.quantize_int8(x, torch.ones(1, 1)).tolist() == [[1, -1, 2, -3, 127, 127, -127]]
    with pytest.raises(ValueError, match="'int4'"):
        quant.quantize_blocks(x, 1, "int4")


def test_weight_scales_per_output_channel():
    gen = torch.Generator().manual_seed(1)
    # a strided weight (a view of a joined [W | b] matrix, as the feed-forward's down-projection)
    joined = torch.randn(40, 80 + 16, generator=gen).half()
    weight = joined[:, :80]
    fp8, scale = quant.quantize_weight(weight)
    assert fp8.is_contiguous() and fp8.shape == (40, 80) and scale.shape == (1, 40) and scale.dtype == torch.float32
    back = quant.dequantize(fp8, scale.T, torch.float64)
    assert ((back - weight.double()).abs() <= _roundtrip_bound(weight, scale.T) * (1 + 1e-6)).all()


def test_fp8_is_not_supported_on_the_cpu():
    assert not fp8_supported("cpu") and not fp8_supported(torch.device("cpu"))
