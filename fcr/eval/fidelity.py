"""Paired caching fidelity: how far a cached image is from the full-sampling image of the same
prompt and initial noise, image by image.

Set metrics (FD, FID) compare distributions and, at the sizes a study can afford, are dominated by
estimator noise; what encoder caching changes is each image. These endpoints are per image, so any
contrast between configurations or models is a paired one: RMSE and PSNR in pixel space (images in
[-1, 1], ``data_range`` 2), SSIM (torchmetrics' Gaussian-window SSIM), the distance between the
evaluation network's features (the embedded classifier's features, the LPIPS analogue), and for SD
the seed's "RMSE of CLIP embedding drift" (normalised CLIP image embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fcr.contract import FIDELITY_DIRECTIONS

__all__ = [
    "FIDELITY_DIRECTIONS",
    "PSNR_CAP_DB",
    "embedding_drift",
    "feature_distance",
    "fidelity",
    "pixel_fidelity",
    "uint8_to_model_range",
]

# Identical images have infinite PSNR; capping keeps means finite (100 dB is far above any cached image).
PSNR_CAP_DB = 100.0


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (as stored in side files) to float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def pixel_fidelity(images: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> dict[str, torch.Tensor]:
    """Per-image ``rmse``, ``psnr`` (dB, capped at :data:`PSNR_CAP_DB`) and ``ssim`` of ``images``
    against ``reference`` (N, C, H, W), both float in a range of width ``data_range``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    x, ref = images.double(), reference.double()
    rmse = (x - ref).pow(2).flatten(1).mean(1).sqrt()
    psnr = (20 * torch.log10(data_range / rmse)).clamp(max=PSNR_CAP_DB)
    # The Gaussian window (11 px) must fit the image; smaller images use the largest odd window that does.
    kernel = min(11, (min(images.shape[-2:]) - 1) // 2 * 2 + 1)
    ssim = structural_similarity_index_measure(x, ref, data_range=data_range, reduction="none", kernel_size=kernel)
    return {"rmse": rmse, "psnr": psnr, "ssim": ssim.double()}


def feature_distance(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image Euclidean distance between feature vectors (N, D) of the evaluation network."""
    if features.shape != reference.shape:
        raise ValueError(f"features {tuple(features.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (features.double() - reference.double()).flatten(1).norm(dim=1)


def embedding_drift(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE between unit-normalised embeddings (the seed's CLIP embedding drift)."""
    a = torch.nn.functional.normalize(embeddings.double().flatten(1), dim=1)
    b = torch.nn.functional.normalize(reference.double().flatten(1), dim=1)
    return (a - b).pow(2).mean(1).sqrt()


def fidelity(per_image: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every endpoint the two side files allow (as :mod:`fcr.eval.scoring` writes them): pixel
    fidelity from ``images`` (uint8), ``feature_distance`` from ``features``, ``clip_drift`` from
    ``clip_image`` (SD). Both must come from the same prompts and initial noise."""
    out: dict[str, torch.Tensor] = {}
    if "images" in per_image and "images" in reference:
        out.update(pixel_fidelity(uint8_to_model_range(per_image["images"]), uint8_to_model_range(reference["images"])))
    if "features" in per_image and "features" in reference:
        out["feature_distance"] = feature_distance(per_image["features"], reference["features"])
    if "clip_image" in per_image and "clip_image" in reference:
        out["clip_drift"] = embedding_drift(per_image["clip_image"], reference["clip_image"])
    if not out:
        raise ValueError("the side files share no per-image tensor a fidelity endpoint is computed from")
    return out
