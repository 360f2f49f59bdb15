"""Tiny UNets built in code, for testing code paths only (never for results)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from fcr.models import build_embedded_unet


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


UNET_BUILDERS = {
    "sd15": (tiny_sd15_unet, 4, 32),
    "sd21": (tiny_sd21_unet, 4, 48),
    "embedded": (lambda sample_size=32: build_embedded_unet("base", sample_size), 1, 384),
    "embedded-v": (lambda sample_size=32: build_embedded_unet("base-v", sample_size), 1, 384),
}


def make_unet(name: str, seed: int = 0, sample_size: int = 16):
    """(unet, in_channels, cross_attention_dim) with deterministic random weights."""
    builder, channels, cross_dim = UNET_BUILDERS[name]
    torch.manual_seed(seed)
    unet = builder(sample_size=sample_size).eval()
    return unet, channels, cross_dim


@pytest.fixture(params=sorted(UNET_BUILDERS))
def any_unet(request):
    return (request.param, *make_unet(request.param))
