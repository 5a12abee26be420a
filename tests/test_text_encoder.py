import json
from pathlib import Path

import open_clip
import pytest
import safetensors
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import Transformer
from safetensors.torch import save_file

from venhancer.text_encoder import (
    NEGATIVE_PROMPT,
    POSITIVE_SUFFIX,
    TextEncoder,
    TextModelConfig,
    build_caption,
    load_text_encoder,
)

FIXTURES = Path(__file__).parent / "fixtures"
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}
PROMPTS = ["a red fox running through snow", "two people talking"]


@pytest.fixture(scope="module")
def tiny_clip():
    """A full (vision + text) open_clip CLIP with random weights, real vocabulary."""
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(**TINY_TEXT),
    )
    # open_clip initialises the positional embedding near zero; make it matter.
    with torch.no_grad():
        model.positional_embedding.normal_(std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tiny_clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    state = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    assert any(k.startswith("visual.") for k in state)
    save_file(state, folder / "open_clip_model.safetensors")
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


def penultimate_reference(model, texts):
    """open_clip's own modules: embeddings, every residual block but the last, ln_final."""
    tokens = open_clip.tokenize(texts)
    x = model.token_embedding(tokens) + model.positional_embedding
    assert model.transformer.batch_first  # the installed open_clip; see the sequence-first test
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def test_caption_strings_match_fixture():
    fixture = json.loads((FIXTURES / "prompts.json").read_text())
    assert POSITIVE_SUFFIX == fixture["positive_suffix"]
    assert NEGATIVE_PROMPT == fixture["negative_prompt"]
    assert build_caption("a cat.") == "a cat." + fixture["positive_suffix"]


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_output_is_penultimate_layer(tiny_clip, checkpoints, filename):
    encoder = load_text_encoder(checkpoints / filename, model_cfg=TINY_TEXT)
    out, truncated = encoder.encode(PROMPTS)
    assert out.shape == (2, 77, 32)
    assert truncated == [False, False]
    with torch.no_grad():
        expected = penultimate_reference(tiny_clip, PROMPTS)
        full = tiny_clip.ln_final(tiny_clip.transformer(
            tiny_clip.token_embedding(open_clip.tokenize(PROMPTS)) + tiny_clip.positional_embedding,
            attn_mask=tiny_clip.attn_mask,
        ))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The last block really is skipped: the full-depth output differs.
    assert (out - full).abs().max() > 1e-2


def test_vision_tower_is_never_loaded(checkpoints, monkeypatch):
    read = []
    real_safe_open = safetensors.safe_open

    class SpyingHandle:
        def __init__(self, *args, **kwargs):
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", SpyingHandle)
    encoder = load_text_encoder(checkpoints / "open_clip_model.safetensors", model_cfg=TINY_TEXT)
    assert read and not any(k.startswith("visual.") for k in read)
    # Neither the last block nor the projection is read: they are not used.
    assert not any(k.startswith("transformer.resblocks.2.") or k == "text_projection" for k in read)
    assert not hasattr(encoder, "visual")
    assert not any(k.startswith("visual.") for k in encoder.state_dict())
    assert len(encoder.transformer.resblocks) == 2


def test_truncation_is_reported(checkpoints):
    encoder = load_text_encoder(checkpoints / "open_clip_model.safetensors", model_cfg=TINY_TEXT)
    long_prompt = "a very long description of a scene " * 20
    out, truncated = encoder.encode([build_caption("a cat"), long_prompt, "a dog"])
    assert truncated == [False, True, False]
    assert out.shape == (3, 77, 32)
    # Exactly 77 tokens (75 words + start + end) fits; 76 words does not.
    assert encoder.encode(["cat " * 75])[1] == [False]
    assert encoder.encode(["cat " * 76])[1] == [True]


def test_sequence_first_transformer(checkpoints):
    encoder = load_text_encoder(checkpoints / "open_clip_model.safetensors", model_cfg=TINY_TEXT)
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        batch_first_out = encoder(tokens)
        # Blocks whose attention takes (L, N, D), as in open_clip before 2.24 ...
        seq_first = Transformer(width=32, layers=2, heads=2, batch_first=False)
        seq_first.load_state_dict(encoder.transformer.state_dict())
        encoder.transformer = seq_first.eval()
        torch.testing.assert_close(encoder(tokens), batch_first_out, atol=1e-5, rtol=1e-5)
        # ... and those releases had no batch_first attribute at all.
        del seq_first.batch_first
        torch.testing.assert_close(encoder(tokens), batch_first_out, atol=1e-5, rtol=1e-5)


def test_default_config_is_vit_h_14_text_tower():
    cfg = TextModelConfig.for_arch()
    assert (cfg.context_length, cfg.vocab_size, cfg.width, cfg.heads, cfg.layers) == (77, 49408, 1024, 16, 24)
    with torch.device("meta"):
        encoder = TextEncoder(cfg)
    assert len(encoder.transformer.resblocks) == 23
    assert encoder.positional_embedding.shape == (77, 1024)


def test_config_and_checkpoint_errors(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="hf_model_name"):
        TextModelConfig.from_dict({**TINY_TEXT, "hf_model_name": "roberta"})
    with pytest.raises(ValueError, match="layers"):
        TextModelConfig.from_dict({**TINY_TEXT, "layers": 1})
    with pytest.raises(ValueError, match="heads 3"):
        TextModelConfig.from_dict({**TINY_TEXT, "heads": 3})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_text_encoder(tmp_path / "missing.safetensors", model_cfg=TINY_TEXT)
    save_file({"visual.proj": torch.zeros(2, 2)}, tmp_path / "vision_only.safetensors")
    with pytest.raises(ValueError, match="lacks"):
        load_text_encoder(tmp_path / "vision_only.safetensors", model_cfg=TINY_TEXT)
    with pytest.raises(ValueError, match="list of strings"):
        load_text_encoder(checkpoints / "open_clip_model.safetensors", model_cfg=TINY_TEXT).encode("a cat")
