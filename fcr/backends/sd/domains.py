"""Stable Diffusion's image-conditioned domains: in-painting and depth-to-image, as diffusers runs them.

- **In-painting** (``StableDiffusionInpaintPipeline`` with SD-inpainting's 9-channel UNet): the UNet
  reads ``[latents, mask, masked-image latents]`` (4 + 1 + 4 channels) at every step;
  :func:`inpainting_condition` makes the last five.
- **Depth-to-image** (``StableDiffusionDepth2ImgPipeline``, SD2-depth's 5-channel UNet): the UNet
  reads ``[latents, depth]``; sampling starts from the image's latents noised to ``strength``
  (:func:`depth_condition`, :func:`fcr.backends.sd.model.image_latents`).

Both go through :func:`fcr.core.sampler.sample` (``channel_condition``, ``image_latents``), so
encoder caching, DeepCache and the FCR loss (:func:`fcr.core.loss.fcr_training_loss`) apply as they
do to text-to-image; :class:`InpaintingTrainData` and :class:`DepthTrainData` feed the fine-tuning
loop (:mod:`fcr.train.loop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fcr.backends.inpainting import binary_masks, random_masks
from fcr.backends.sd.model import SDTrainData, image_latents

__all__ = [
    "DepthTrainData",
    "InpaintingTrainData",
    "check_domain_unet",
    "depth_condition",
    "image_latents",
    "inpainting_condition",
]

def check_domain_unet(unet: Any, domain: str, latent_channels: int = 4) -> None:
    """One clear line when ``unet`` cannot read ``domain``'s conditioning channels (in-painting:
    mask + masked-image latents; depth-to-image: depth) beside its ``latent_channels``."""
    extra = {"inpainting": 1 + latent_channels, "depth2img": 1}
    if domain not in extra:
        raise ValueError(f"unknown domain {domain!r}; allowed: {sorted(extra)}")
    expected = latent_channels + extra[domain]
    if unet.config.in_channels != expected:
        raise ValueError(f"{domain} needs a UNet with {expected} input channels; this one has "
                         f"{unet.config.in_channels} (use an in-painting / depth checkpoint)")


def inpainting_condition(vae: Any, images: torch.Tensor, masks: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The in-painting UNet's extra channels ``[mask, masked-image latents]`` at latent size.

    ``masks``: (B, 1, H, W), 1 where the image is repainted, binarised at 0.5 as diffusers' mask
    processor does; the masked image keeps the pixels where the mask is 0."""
    binary = binary_masks(images, masks)
    masked = image_latents(vae, images * (binary < 0.5), generator)
    small = F.interpolate(binary.to(masked.device, masked.dtype), size=masked.shape[-2:])
    return torch.cat([small, masked], dim=1)


def depth_condition(depth: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A depth map (B, H, W) at latent size, normalised to [-1, 1] per image (the depth UNet's input)."""
    if depth.ndim != 3:
        raise ValueError(f"depth must be (batch, height, width); got shape {tuple(depth.shape)}")
    small = F.interpolate(depth.unsqueeze(1), size=latent_size, mode="bicubic", align_corners=False)
    low = torch.amin(small, dim=[1, 2, 3], keepdim=True)
    high = torch.amax(small, dim=[1, 2, 3], keepdim=True)
    if bool((high <= low).any()):
        raise ValueError("a depth map is constant: it carries no depth to condition on")
    return 2.0 * (small - low) / (high - low) - 1.0


class InpaintingTrainData(SDTrainData):
    """In-painting fine-tuning examples for :func:`fcr.train.loop.train`: :class:`SDTrainData`'s
    (latents, text states) plus the in-painting UNet's extra channels, with one rectangular mask
    per example drawn from ``(mask_seed, index)`` (:func:`random_masks`)."""

    def __init__(self, *args: Any, mask_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_seed = mask_seed

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator):
        pixels = self.pixels(indices, generator)  # flips, then the posterior sample: SDTrainData's draws
        latents = image_latents(self.vae, pixels, generator)
        masks = random_masks(indices.tolist(), pixels.shape[-1], self.mask_seed)
        condition = inpainting_condition(self.vae, pixels, masks)  # masked latents: the posterior mode
        return latents.float(), self.states(indices, drop), condition.float()


class DepthTrainData(SDTrainData):
    """Depth-to-image fine-tuning examples: :class:`SDTrainData`'s (latents, text states) plus the
    depth UNet's extra channel. ``depth_of`` maps images (B, 3, H, W) in [-1, 1] to depth maps
    (B, H, W): on a user's machine diffusers' depth estimator (DPT, as SD2-depth was trained with)."""

    def __init__(self, *args: Any, depth_of: Callable[[torch.Tensor], torch.Tensor], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.depth_of = depth_of

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator):
        pixels = self.pixels(indices, generator)
        latents = image_latents(self.vae, pixels, generator)
        depth = depth_condition(self.depth_of(pixels).float(), tuple(latents.shape[-2:]))
        return latents.float(), self.states(indices, drop), depth.to(latents.device).float()
