"""Tiny UNets built in code, for testing code paths only (never for results)."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from fcr.backends.models import build_embedded_unet


def tiny_sd15_unet(sample_size: int = 16) -> UNet2DConditionModel:
    """SD1.5-like: cross-attention in the first levels, conv projections, a shared head dim."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=16,
    )


def tiny_sd21_unet(sample_size: int = 16) -> UNet2DConditionModel:
    """SD2.1-like: linear projections, per-block head dims, upcast attention."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=48,
        norm_num_groups=16,
    )


# A tiny open_clip model config (random weights when built): CLIPScore code paths only.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


UNET_BUILDERS = {
    "sd15": (tiny_sd15_unet, 4, 32),
    "sd21": (tiny_sd21_unet, 4, 48),
    "embedded": (lambda sample_size=32: build_embedded_unet("base", sample_size), 1, 384),
    "embedded-v": (lambda sample_size=32: build_embedded_unet("base-v", sample_size), 1, 384),
}


def tiny_embedded_model(sample_size: int = 16):
    """(an embedded sampling model with random ``base`` weights of seed 0, two prompts with random
    text states) for generate() code paths; the global generator is left as it was."""
    import numpy as np

    from fcr.backends.embedded.model import EmbeddedModel, PromptSet
    from fcr.backends.models import build_noise_scheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EmbeddedModel(build_embedded_unet("base", sample_size=sample_size).eval(), build_noise_scheduler())
    g = torch.Generator().manual_seed(1)
    prompts = PromptSet(np.arange(2), ["a", "b"], torch.randn(2, 16, 384, generator=g), torch.randn(16, 384, generator=g), 0)
    return model, prompts


def make_unet(name: str, seed: int = 0, sample_size: int = 16):
    """(unet, in_channels, cross_attention_dim) with deterministic random weights."""
    builder, channels, cross_dim = UNET_BUILDERS[name]
    torch.manual_seed(seed)
    unet = builder(sample_size=sample_size).eval()
    return unet, channels, cross_dim


@pytest.fixture(params=sorted(UNET_BUILDERS))
def any_unet(request):
    return (request.param, *make_unet(request.param))


# ---------------------------------------------------------------- process-global state

# Set by pytest while a test runs, or by libraries when first imported (scikit-learn: KMP_*;
# diffusers/open_clip: TORCHINDUCTOR_CACHE_DIR, TOKENIZERS_PARALLELISM): not a test's doing.
_ENV_SET_BY_TOOLS = frozenset(
    {"PYTEST_CURRENT_TEST", "KMP_INIT_AT_FORK", "KMP_DUPLICATE_LIB_OK", "TORCHINDUCTOR_CACHE_DIR", "TOKENIZERS_PARALLELISM"}
)


def _global_state() -> dict[str, object]:
    """What a test must not leave changed: torch threads, default dtype, determinism flags, env."""
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "os.environ": {k: v for k, v in os.environ.items() if k not in _ENV_SET_BY_TOOLS},
    }


_SESSION_STATE = _global_state()  # conftest is imported before any test module


def _changes(now: dict[str, object]) -> list[str]:
    out = []
    for key, before in _SESSION_STATE.items():
        after = now[key]
        if key == "os.environ":
            keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            if keys:
                out.append(f"os.environ keys {keys}")
        elif after != before:
            out.append(f"{key}: {before} -> {after}")
    return out


def _restore_session_state() -> None:
    torch.set_num_threads(_SESSION_STATE["torch.get_num_threads()"])
    torch.set_default_dtype(_SESSION_STATE["torch.get_default_dtype()"])
    torch.use_deterministic_algorithms(_SESSION_STATE["torch.are_deterministic_algorithms_enabled()"])
    for key in set(os.environ) - set(_SESSION_STATE["os.environ"]) - _ENV_SET_BY_TOOLS:
        del os.environ[key]
    os.environ.update(_SESSION_STATE["os.environ"])


@pytest.fixture(autouse=True)
def _no_global_state_change(request):
    """Fail a test that finds or leaves process-global state changed (e.g. torch.set_num_threads at
    a test module's import), so no result depends on test order; the state is restored either way."""
    found = _changes(_global_state())
    if found:
        _restore_session_state()
        pytest.fail(f"global state changed before {request.node.nodeid} (at import or by an earlier test): {found}")
    yield
    left = _changes(_global_state())
    _restore_session_state()
    assert not left, f"{request.node.nodeid} changed global state without restoring it: {left}"


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def torch_threads(request):
    """Run a test with 1 and with 2 torch threads (kernels, and so summation order, differ), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# ---------------------------------------------------------------- test tiers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the nbval items (build/notebooks/*.ipynb) ``notebook``, so ``-m "not notebook"`` and
    ``make test-fast`` leave them out without naming files."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebook)
