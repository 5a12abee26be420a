import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder

from venhancer.vae import LATENT_SCALE, decode_tiled, encode_frames, expand_latents, load_vae

FIXTURES = Path(__file__).parent / "fixtures"


def make_tiny_vae(channels: tuple[int, ...], seed: int) -> AutoencoderKLTemporalDecoder:
    # Four blocks -> three 2x downsamplings, the real factor 8; 32 channels is the GroupNorm minimum.
    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=1,
    )
    return vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_vae():
    return make_tiny_vae((32, 32, 32, 32), seed=0)


def plain_decode(vae, z):
    latents = z[0].permute(1, 0, 2, 3) / LATENT_SCALE
    return vae.decode(latents, num_frames=latents.shape[0]).sample


# ---- independent re-statement of SPEC 5/6, used as the expected value -------------------------


def spec_windows(size, window, overlap, factor=1.33):
    out, start = [], 0
    while not (start + round(window * factor) >= size or start + window >= size):
        out.append((start, start + window))
        start += window - overlap
    return out + [(start, size)]


def spec_gaussian(height, width, var=0.02):
    ys = [math.exp(-((y - height / 2) ** 2) / height**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for y in range(height)]
    xs = [math.exp(-((x - (width - 1) / 2) ** 2) / width**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for x in range(width)]
    return np.outer(ys, xs)


def spec_tiled_decode(vae, z, tile, tile_overlap, frame_window, frame_overlap):
    """Reference order: per tile, decode frame windows and cross-fade them, then Gaussian-blend tiles."""
    _, _, f, h, w = z.shape
    image = np.zeros((3, f, 8 * h, 8 * w))
    count = np.zeros_like(image)
    for h0, h1 in spec_windows(h, tile[0], tile_overlap[0]):
        for w0, w1 in spec_windows(w, tile[1], tile_overlap[1]):
            chunks = []
            for t0, t1 in spec_windows(f, frame_window, frame_overlap):
                part = z[0, :, t0:t1, h0:h1, w0:w1].permute(1, 0, 2, 3) / LATENT_SCALE
                chunks.append(vae.decode(part, num_frames=t1 - t0).sample.double().numpy().transpose(1, 0, 2, 3))
            kept = []
            for i, chunk in enumerate(chunks):
                if i > 0:
                    prev = chunks[i - 1]
                    for j in range(frame_overlap):
                        chunk[:, j] = prev[:, -frame_overlap + j] * (1 - j / frame_overlap) + chunk[:, j] * (j / frame_overlap)
                kept.append(chunk if i == len(chunks) - 1 else chunk[:, : chunk.shape[1] - frame_overlap])
            tile_video = np.concatenate(kept, axis=1)
            weight = spec_gaussian(tile_video.shape[2], tile_video.shape[3])
            image[:, :, 8 * h0 : 8 * h1, 8 * w0 : 8 * w1] += tile_video * weight
            count[:, :, 8 * h0 : 8 * h1, 8 * w0 : 8 * w1] += weight
    return (image / count).transpose(1, 0, 2, 3)


def test_spec_helpers_match_reference_tables():
    tables = json.loads((FIXTURES / "tables.json").read_text())
    const = tables["tiled_decode"]["constants"]
    for row in tables["tiled_decode"]["spatial"]:
        assert spec_windows(row["latent_h"], const["tile_latent_h"], const["overlap_latent_h"]) == [tuple(x) for x in row["height_windows"]]
        assert spec_windows(row["latent_w"], const["tile_latent_w"], const["overlap_latent_w"]) == [tuple(x) for x in row["width_windows"]]
    for row in tables["tiled_decode"]["temporal"]:
        assert spec_windows(row["num_frames"], const["frame_window"], const["frame_overlap"]) == [tuple(x) for x in row["time_windows"]]
    for row in tables["gaussian_weights"]["rows"][:2]:
        np.testing.assert_allclose(spec_gaussian(row["tile_height"], row["tile_width"]), row["weights"], rtol=1e-12)


# ---- encoding ------------------------------------------------------------------------------------


def test_encode_frames_is_scaled_posterior_sample(tiny_vae):
    frames = torch.rand(3, 3, 32, 48) * 2 - 1
    noise = torch.randn(3, 4, 4, 6)
    z = encode_frames(tiny_vae, frames, noise=noise)
    assert z.shape == (1, 4, 3, 4, 6)
    posterior = tiny_vae.encode(frames).latent_dist
    expected = (posterior.mean + posterior.std * noise) * LATENT_SCALE
    torch.testing.assert_close(z[0].permute(1, 0, 2, 3), expected, atol=1e-5, rtol=1e-5)


def test_encode_frames_batch_size_and_generator(tiny_vae):
    frames = torch.rand(5, 3, 16, 24) * 2 - 1
    a = encode_frames(tiny_vae, frames, generator=torch.Generator().manual_seed(3), batch_size=1)
    b = encode_frames(tiny_vae, frames, generator=torch.Generator().manual_seed(3), batch_size=4)
    c = encode_frames(tiny_vae, frames, generator=torch.Generator().manual_seed(4), batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the sample really is random


def test_encode_frames_rejects_bad_input(tiny_vae):
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_frames(tiny_vae, torch.zeros(1, 3, 20, 24))
    with pytest.raises(ValueError, match="noise must have shape"):
        encode_frames(tiny_vae, torch.zeros(2, 3, 16, 16), noise=torch.zeros(1, 4, 2, 2))


def test_expand_latents_repeats_key_frames():
    z_key = torch.arange(3.0).view(1, 1, 3, 1, 1)
    assert expand_latents(z_key, 2).flatten().tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert expand_latents(z_key, 0).flatten().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="-1"):
        expand_latents(z_key, -1)


def test_repeated_latents_equal_encoding_repeated_frames(tiny_vae):
    k = 2
    frames = torch.rand(3, 3, 16, 24) * 2 - 1
    noise = torch.randn(3, 4, 2, 3)
    repeated_frames = frames.repeat_interleave(k + 1, dim=0)[: -k]
    repeated_noise = noise.repeat_interleave(k + 1, dim=0)[: -k]
    expanded = expand_latents(encode_frames(tiny_vae, frames, noise=noise), k)
    direct = encode_frames(tiny_vae, repeated_frames, noise=repeated_noise)
    assert expanded.shape == (1, 4, 7, 2, 3)
    torch.testing.assert_close(expanded, direct, atol=1e-6, rtol=1e-6)


# ---- decoding ------------------------------------------------------------------------------------


def test_tiled_decode_single_tile_equals_plain_decode(tiny_vae):
    z = torch.randn(1, 4, 4, 6, 10) * LATENT_SCALE
    chunks = list(decode_tiled(tiny_vae, z, tile=(8, 16), tile_overlap=(2, 4), frame_window=5, frame_overlap=2))
    assert len(chunks) == 1 and chunks[0].device.type == "cpu" and chunks[0].dtype == torch.float32
    torch.testing.assert_close(chunks[0], plain_decode(tiny_vae, z), atol=1e-5, rtol=1e-5)


def test_tiled_decode_multi_tile_multi_window_matches_spec(tiny_vae):
    torch.manual_seed(1)
    z = torch.randn(1, 4, 9, 14, 16) * LATENT_SCALE
    settings = dict(tile=(8, 10), tile_overlap=(3, 4), frame_window=4, frame_overlap=2)
    # 2 x 2 tiles, frame windows (0,4) (2,6) (4,9): several tiles, several windows, uneven last ones.
    assert spec_windows(14, 8, 3) == [(0, 8), (5, 14)]
    assert spec_windows(16, 10, 4) == [(0, 10), (6, 16)]
    assert spec_windows(9, 4, 2) == [(0, 4), (2, 6), (4, 9)]
    calls = []
    chunks = list(decode_tiled(tiny_vae, z, progress=lambda done, total: calls.append((done, total)), **settings))
    assert [c.shape[0] for c in chunks] == [2, 2, 5]
    got = torch.cat(chunks).double().numpy()
    expected = spec_tiled_decode(tiny_vae, z, **settings)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    assert calls == [(i, 12) for i in range(1, 13)]
    # The blend matters here: a plain decode is far from it, so the comparison above can fail.
    assert np.abs(plain_decode(tiny_vae, z).double().numpy() - expected).max() > 1e-3


class _RecordingVAE(torch.nn.Module):
    """Stands in for the decoder: records what it is asked and returns cheap, position-coded pixels."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(latent_channels=4)
        self.calls = []

    @property
    def dtype(self):
        return torch.float32

    def decode(self, z, num_frames):
        self.calls.append((tuple(z.shape), num_frames))
        pixels = z[:, :3].repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return SimpleNamespace(sample=pixels)


def test_tiled_decode_default_plan_follows_reference_tables():
    tables = json.loads((FIXTURES / "tables.json").read_text())["tiled_decode"]
    row = next(r for r in tables["spatial"] if (r["latent_h"], r["latent_w"]) == (144, 240))
    time_row = next(r for r in tables["temporal"] if r["num_frames"] == 9)
    fake = _RecordingVAE()
    z = torch.randn(1, 4, 9, 144, 240)
    out = torch.cat(list(decode_tiled(fake, z)))
    expected_calls = [
        ((t1 - t0, 4, h1 - h0, w1 - w0), t1 - t0)
        for t0, t1 in time_row["time_windows"]
        for h0, h1 in row["height_windows"]
        for w0, w1 in row["width_windows"]
    ]
    assert fake.calls == expected_calls
    # A decoder that is pointwise in space and time makes every blend an identity.
    expected = (z[0, :3] / LATENT_SCALE).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).permute(1, 0, 2, 3)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)


def test_decode_tiled_rejects_bad_settings_at_call(tiny_vae):
    z = torch.zeros(1, 4, 3, 4, 4)
    # Raised by the call itself, not deferred to the first chunk.
    with pytest.raises(ValueError, match="overlap.*5"):
        decode_tiled(tiny_vae, z, frame_window=5, frame_overlap=5)
    with pytest.raises(ValueError, match="overlap.*128"):
        decode_tiled(tiny_vae, z, tile_overlap=(12, 128))
    with pytest.raises(ValueError, match="shape"):
        decode_tiled(tiny_vae, z[0])


# ---- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp16", None])
def test_load_vae_from_local_folder(tiny_vae, tmp_path, variant):
    tiny_vae.save_pretrained(tmp_path, variant=variant)
    loaded = load_vae(tmp_path, device="cpu", dtype=torch.float32)
    assert isinstance(loaded, AutoencoderKLTemporalDecoder)
    for (name, a), (_, b) in zip(tiny_vae.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_vae_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def tiny_vae_widening():
    """Channel counts change between blocks, so the resnets have 1x1 shortcut convolutions."""
    vae = make_tiny_vae((32, 64, 64, 64), seed=1)
    # Non-zero mixing so both the spatial and the temporal path matter.
    for name, p in vae.named_parameters():
        if name.endswith("mix_factor"):
            p.data.fill_(0.3)
    return vae


@pytest.mark.parametrize("which", ["tiny_vae", "tiny_vae_widening"])
def test_optimize_vae_keeps_weights_and_outputs(which, request, monkeypatch):
    """Channels-last weights, the kernel GroupNorm (eager on the CPU) and the folded resnet
    blocks: same parameters, same encode and decode results."""
    import copy

    from diffusers.models.resnet import ResnetBlock2D, SpatioTemporalResBlock, TemporalResnetBlock
    from diffusers.models.upsampling import Upsample2D

    from venhancer.runtime.layers import FastGroupNorm
    from venhancer.vae import optimize_vae

    vae = request.getfixturevalue(which)
    fast = optimize_vae(copy.deepcopy(vae))
    before, after = vae.state_dict(), fast.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m) is torch.nn.GroupNorm for m in fast.modules())
    assert any(isinstance(m, FastGroupNorm) and m.settings.fused_kernels for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    # Every resnet block of the encoder and decoder runs the folded forward.
    blocks = [m for m in fast.modules() if isinstance(m, (ResnetBlock2D, TemporalResnetBlock, SpatioTemporalResBlock))]
    assert blocks and all(type(m).__name__.startswith("_Fused") for m in blocks)
    assert any(m.conv_shortcut is not None for m in blocks if isinstance(m, ResnetBlock2D)) == (which == "tiny_vae_widening")
    upsamplers = [m for m in fast.decoder.modules() if isinstance(m, Upsample2D)]
    assert upsamplers and all(type(m).__name__ == "_TransposedUpsample2D" for m in upsamplers)
    processors = [m.processor for m in fast.modules() if hasattr(m, "set_processor")]
    assert len(processors) == 2 and all(type(p).__name__ == "_WideHeadAttnProcessor" for p in processors)
    import venhancer.runtime.vae as vae_module

    scaled_adds = []
    plain_add = vae_module.add_with_channel_bias

    def spy(a, b, bias, scale=None):
        scaled_adds.append(scale is not None)
        return plain_add(a, b, bias, scale)

    monkeypatch.setattr(vae_module, "add_with_channel_bias", spy)
    z = torch.randn(5, 4, 6, 10)
    frames = torch.rand(2, 3, 48, 80) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(z, num_frames=5).sample, vae.decode(z, num_frames=5).sample,
                                   atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fast.encode(frames).latent_dist.mean, vae.encode(frames).latent_dist.mean,
                                   atol=2e-5, rtol=1e-5)
    assert any(scaled_adds)  # the decoder's spatio-temporal mixes ran in the temporal residual sum


def test_optimize_vae_leaves_blocks_it_cannot_fold():
    """A resnet block with a time embedding keeps diffusers' own forward."""
    from diffusers.models.resnet import ResnetBlock2D

    from venhancer.vae import optimize_vae

    block = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16).eval()
    holder = torch.nn.Sequential(block)
    optimize_vae(holder)
    assert type(holder[0]) is ResnetBlock2D and isinstance(holder[0].nonlinearity, torch.nn.SiLU)




def test_wide_head_attention_processor_matches_diffusers_sdpa(monkeypatch):
    """The mid-blocks' attention (one 320-wide head here, 512 in the real VAE) through
    `wide_head_attention` computes what diffusers' SDPA processor does; narrow heads, other calls
    and half precision on a PyTorch without float32-output products keep the stock path."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    import venhancer.runtime.vae as vae_module
    from venhancer.vae import optimize_vae

    def mid_block_attention(width):
        return Attention(width, heads=1, dim_head=width, rescale_output_factor=2.0, eps=1e-6, norm_num_groups=32,
                         residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)

    torch.manual_seed(0)
    holder = torch.nn.Sequential(mid_block_attention(320), mid_block_attention(64)).double().eval()
    for p in holder.parameters():
        p.data.normal_(0, 0.2)  # scores of a few units: the softmax is not flat
    x = torch.randn(2, 320, 5, 7, dtype=torch.float64)
    narrow = torch.randn(2, 64, 3, 4, dtype=torch.float64)
    calls = []
    real = vae_module.wide_head_attention
    monkeypatch.setattr(vae_module, "wide_head_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    with torch.no_grad():
        ref, ref_narrow = holder[0](x), holder[1](narrow)
        optimize_vae(holder)
        assert [type(m.processor).__name__ for m in holder] == ["_WideHeadAttnProcessor"] * 2
        out, out_narrow = holder[0](x), holder[1](narrow)
        assert calls == [(2, 35, 320)]  # the narrow head went to the stock processor
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out_narrow, ref_narrow, atol=1e-12, rtol=1e-12)
        tokens = torch.randn(2, 6, 320, dtype=torch.float64)
        context = torch.randn(2, 4, 320, dtype=torch.float64)
        stock = AttnProcessor2_0()(holder[0], tokens, context)
        torch.testing.assert_close(holder[0](tokens, context), stock, atol=1e-12, rtol=1e-12)
        assert len(calls) == 1
        # The PyTorch these tests run on has float32-output products; one without them takes
        # diffusers' path in half precision.
        assert vae_module.half_products_in_float32()
        monkeypatch.setattr(vae_module, "half_products_in_float32", lambda: False)
        holder[0].half()(x.half())
        assert len(calls) == 1


def test_transposed_upsampler_matches_diffusers_upsample2d():
    """The decoder's upsampler as one transposed convolution computes diffusers' nearest x2 +
    3x3 conv (float64, changed channel count included); other kinds keep diffusers' forward."""
    from diffusers.models.upsampling import Upsample2D

    from venhancer.vae import optimize_vae

    torch.manual_seed(0)
    holder = torch.nn.Sequential(Upsample2D(6, use_conv=True, out_channels=5),
                                 Upsample2D(6, use_conv=False), Upsample2D(6, use_conv_transpose=True)).double()
    plain = [m.forward for m in holder]
    optimize_vae(holder)
    assert [type(m).__name__ for m in holder] == ["_TransposedUpsample2D", "Upsample2D", "Upsample2D"]
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        out, ref = holder[0](x), plain[0](x)
        assert out.shape == ref.shape == (2, 5, 10, 14)
        assert float((out - ref).abs().max()) <= 1e-12
        # an explicit output size still goes through diffusers' path
        assert holder[0](x, output_size=(11, 15)).shape == (2, 5, 11, 15)


@pytest.mark.parametrize("optimized", [False, True])
@pytest.mark.parametrize("frame_chunk", [1, 2])
def test_decoder_frame_chunks_give_the_same_frames(tiny_vae_widening, optimized, frame_chunk):
    """The smallest memory plan's decode: the decoder's spatial resnet blocks a few frames at a
    time (stock or optimized blocks) give the whole-window decode, and None restores the blocks."""
    import copy
    import weakref

    from diffusers.models.resnet import SpatioTemporalResBlock

    from venhancer.vae import optimize_vae, set_decoder_frame_chunk

    vae = copy.deepcopy(tiny_vae_widening)
    if optimized:
        optimize_vae(vae)
    spatial = [m.spatial_res_block for m in vae.decoder.modules() if isinstance(m, SpatioTemporalResBlock)]
    classes = [type(b) for b in spatial]
    z = torch.randn(5, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    calls = []
    with torch.no_grad():
        whole = vae.decode(z, num_frames=5).sample
        set_decoder_frame_chunk(vae, frame_chunk)
        assert all(type(b).__name__ == "_FrameChunkedResnetBlock2D" for b in spatial)
        assert type(vae.decoder).__name__ == "_LeanTemporalDecoder"
        hook = spatial[-1].norm1.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        # each spatio-temporal block's input is gone by the time its temporal part starts
        inputs, alive = [], []
        blocks = [m for m in vae.decoder.up_blocks.modules() if isinstance(m, SpatioTemporalResBlock)]
        hooks = [hook] + [b.spatial_res_block.register_forward_pre_hook(
            lambda module, args: inputs.append(weakref.ref(args[0]))) for b in blocks]
        hooks += [b.temporal_res_block.norm1.register_forward_pre_hook(
            lambda module, args: alive.append(inputs[-1]() is not None)) for b in blocks]
        chunked = vae.decode(z, num_frames=5).sample
        for h in hooks:
            h.remove()
        assert len(alive) == len(blocks) and not any(alive)
        set_decoder_frame_chunk(vae, None)
        again = vae.decode(z, num_frames=5).sample
    assert calls == [frame_chunk] * (5 // frame_chunk) + ([5 % frame_chunk] if 5 % frame_chunk else [])
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert [type(b) for b in spatial] == classes and torch.equal(again, whole)
    assert type(vae.decoder).__name__ == "TemporalDecoder"
    assert list(vae.state_dict()) == list(tiny_vae_widening.state_dict())
    with pytest.raises(ValueError, match="frame_chunk must be a positive integer or None, got 0"):
        set_decoder_frame_chunk(vae, 0)
