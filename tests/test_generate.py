"""Paired prompt/noise sets and generation for the embedded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from equivalence import assert_float32_equivalent

from fcr.core.sampler import key_steps
from fcr.backends.embedded.model import EmbeddedModel, embedded_prompt_set, prepare_embedded_data
from fcr.backends.generate import generate, initial_noise
from fcr.backends.models import build_embedded_unet, build_noise_scheduler


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embedded_data")
    try:
        prepare_embedded_data(folder)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    return folder


def test_initial_noise_does_not_depend_on_batching() -> None:
    whole = initial_noise(range(6), (1, 4, 4), seed=3)
    parts = torch.cat([initial_noise(range(0, 2), (1, 4, 4), 3), initial_noise(range(2, 6), (1, 4, 4), 3)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, initial_noise(range(6), (1, 4, 4), seed=4))


def test_prompt_sets_are_balanced_and_heldout_differs(data_dir: Path) -> None:
    train = embedded_prompt_set(data_dir, 20, seed=0)
    heldout = embedded_prompt_set(data_dir, 20, seed=0, templates="heldout")
    assert np.bincount(train.labels).tolist() == [2] * 10
    assert train.states.shape == (20, 16, 384)
    assert not set(train.texts) & set(heldout.texts)
    assert embedded_prompt_set(data_dir, 20, seed=0).texts == train.texts


def test_generation_is_deterministic_and_batch_independent(data_dir: Path) -> None:
    torch.manual_seed(0)
    unet = build_embedded_unet("base")
    prompts = embedded_prompt_set(data_dir, 4, seed=1)
    model = EmbeddedModel(unet, build_noise_scheduler())
    kw = dict(seed=prompts.seed, num_inference_steps=6, guidance_scale=3.0, progress=False)
    a = generate(model, prompts, batch_size=4, **kw)
    b = generate(model, prompts, batch_size=2, **kw)
    assert_float32_equivalent(a.images, b.images)  # batch 4 vs 2: other summation order
    assert a.images.shape == (4, 1, 32, 32) and a.images.abs().max() <= 1
    assert a.stats["unet_passes"] == 6
    cached = generate(model, prompts, batch_size=2, key_steps=key_steps(6, "uniform", 3), **kw)
    assert cached.stats["encoder_passes"] == 2 * 2 and cached.stats["decoder_steps"] == 6 * 2
    assert not torch.allclose(cached.images, a.images)
