"""Model construction: the embedded default UNet (built in code) and the Stable Diffusion loaders.

The embedded UNet is a miniature of Stable Diffusion's: a ``UNet2DConditionModel`` with
cross-attention on the token hidden states of a frozen text encoder (MiniLM, width 384),
on 1-channel 32x32 Fashion-MNIST images in pixel space.
"""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

__all__ = ["EMBEDDED_ARCHITECTURES", "build_embedded_unet", "embedded_unet_config"]

MINILM_HIDDEN_SIZE = 384

# Two sizes: ``base`` plays SD1.5 (epsilon prediction), ``base-v`` plays SD2.1 (v prediction,
# another width/depth, linear attention projections as SD2.x).
EMBEDDED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "base": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=False,
    ),
    "base-v": dict(
        block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(4, 8, 8),
        norm_num_groups=8,
        use_linear_projection=True,
    ),
}


def embedded_unet_config(architecture: str = "base", sample_size: int = 32) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of an embedded architecture."""
    if architecture not in EMBEDDED_ARCHITECTURES:
        raise ValueError(f"unknown embedded architecture {architecture!r}; allowed: {sorted(EMBEDDED_ARCHITECTURES)}")
    return dict(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        cross_attention_dim=MINILM_HIDDEN_SIZE,
        mid_block_type="UNetMidBlock2DCrossAttn",
        **EMBEDDED_ARCHITECTURES[architecture],
    )


def build_embedded_unet(architecture: str = "base", sample_size: int = 32) -> UNet2DConditionModel:
    """A randomly initialised embedded UNet (weights come from training or a checkpoint)."""
    return UNet2DConditionModel(**embedded_unet_config(architecture, sample_size))
