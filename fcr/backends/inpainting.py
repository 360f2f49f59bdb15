"""In-painting pieces shared by both settings: masks, the in-painting UNet made from a text-to-image
one, and a pixel-space in-painting data source for the embedded setting.

An in-painting UNet reads ``[x_t, mask, masked image]`` (SD: latents of the masked image, made by
:func:`fcr.backends.sd.domains.inpainting_condition`; the embedded setting: its pixels). As
SD-inpainting was made from SD, :func:`inpainting_unet` widens ``conv_in`` with zero weights for
the new channels, so before fine-tuning it predicts exactly what the original predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel

__all__ = ["PixelInpaintingData", "binary_masks", "inpainting_unet", "pixel_inpainting_condition", "random_masks"]


def random_masks(indices: Sequence[int], size: int, seed: int, min_frac: float = 0.25, max_frac: float = 0.6) -> torch.Tensor:
    """One rectangular mask per example (B, 1, size, size), 1 = repaint: sides between ``min_frac``
    and ``max_frac`` of the image, drawn from ``(seed, index)`` so an example's mask never depends
    on the batch it is in."""
    out = torch.zeros(len(indices), 1, size, size)
    for row, index in enumerate(indices):
        rng = np.random.default_rng([seed, int(index)])
        h, w = (int(round(size * rng.uniform(min_frac, max_frac))) for _ in range(2))
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        out[row, :, top : top + h, left : left + w] = 1.0
    return out


def inpainting_unet(unet: UNet2DConditionModel, condition_channels: int) -> UNet2DConditionModel:
    """A copy of ``unet`` that also reads ``condition_channels`` more input channels, their
    ``conv_in`` weights zero: its prediction equals ``unet``'s whatever those channels hold."""
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": unet.config.in_channels + condition_channels})
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], condition_channels, *weight.shape[2:])], 1)
    wide.load_state_dict(state)
    return wide.to(unet.device, unet.dtype)


def binary_masks(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``masks`` (B, 1, H, W) of ``images`` (B, C, H, W) binarised at 0.5 as diffusers' mask
    processor does (1 = repaint), in the images' dtype; one clear line when they do not fit."""
    if masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(f"mask of shape {tuple(masks.shape)} does not fit images of shape {tuple(images.shape)}: "
                         f"expected ({images.shape[0]}, 1, {images.shape[2]}, {images.shape[3]})")
    return (masks >= 0.5).to(images.dtype)


def pixel_inpainting_condition(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``[mask, masked image]`` of pixel-space images (B, C, H, W): the masked pixels set to 0 (the
    middle of the [-1, 1] range), as SD's masked image is before its VAE encoding."""
    binary = binary_masks(images, masks)
    return torch.cat([binary, images * (1 - binary)], dim=1)


class PixelInpaintingData:
    """In-painting fine-tuning examples from a pixel-space data source of the loop (the embedded
    setting's :class:`fcr.backends.embedded.model.EmbeddedTrainData`): its (images, text states)
    plus ``[mask, masked image]`` with one mask per example from ``(mask_seed, index)``."""

    def __init__(self, base: Any, mask_seed: int) -> None:
        self.base, self.mask_seed = base, mask_seed

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator):
        images, states = self.base.batch(indices, drop, generator)
        masks = random_masks(indices.tolist(), images.shape[-1], self.mask_seed)
        return images, states, pixel_inpainting_condition(images, masks)
