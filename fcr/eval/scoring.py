"""Scoring generated images, one scorer per setting behind one interface.

:class:`EmbeddedScorer`: the embedded classifier's features against real Fashion-MNIST test images
(FD / KID / precision / recall / IS, prompted-class accuracy and probability, bootstrap intervals
over images). :class:`SDScorer`: clean-fid FID against a reference folder or statistics and
CLIPScore per image (bootstrap interval), the images written as PNGs. Both return the set metrics
and the per-image tensors that paired tests read back (the side file beside each result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fcr.eval.metrics import DEFAULT_EXTRACTOR_NAME, FrechetToReference, feature_statistics, metrics_from_features
from fcr.eval.results import module_fingerprint, save_safetensors_atomic
from fcr.stats import bootstrap_ci, bootstrap_metric

__all__ = [
    "CLASSIFIER_SIZE",
    "FD_COLUMN",
    "EmbeddedScorer",
    "SDScorer",
    "per_kind_means",
    "reference_features",
    "score_images",
    "to_classifier_size",
]

FD_COLUMN = f"fd_{DEFAULT_EXTRACTOR_NAME}"
CLASSIFIER_SIZE = 32  # the embedded classifier's input side


# ----------------------------------------------------------------------------- embedded


def reference_features(
    classifier: torch.nn.Module,
    cache_path: str | Path | None = None,
    *,
    root: str | Path | None = None,
    n: int | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Classifier features ``(N, D)`` of real Fashion-MNIST official test images (the first ``n``,
    all 10k by default), cached in ``cache_path`` (computed once; a cache made by another
    classifier or ``n`` is recomputed). ``root``: where Fashion-MNIST lies (see fcr.backends.embedded.data)."""
    from fcr.backends.embedded import data
    from fcr.eval.classifier import extract_features

    fingerprint = module_fingerprint(classifier)
    wanted = {"classifier": fingerprint, "n": str(n), "split": "test"}
    if cache_path is not None and Path(cache_path).is_file():
        with safe_open(str(cache_path), framework="pt") as f:
            if (f.metadata() or {}) == wanted:
                return f.get_tensor("features")
    images, _ = data.load_fashion_mnist("test", root=root)
    if n is not None:
        images = images[:n]
    feats = extract_features(classifier, data.to_model_range(images), batch_size)
    if cache_path is not None:
        save_safetensors_atomic({"features": feats}, Path(cache_path), wanted)
    return feats


def score_images(
    images: torch.Tensor,
    labels: np.ndarray,
    classifier: torch.nn.Module,
    ref_feats: torch.Tensor,
    *,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Score images in [-1, 1] at the classifier's size against ``ref_feats``: the set metrics of
    :func:`fcr.eval.metrics.metrics_from_features` plus percentile bootstrap 95 % intervals over images
    (``*_lo`` / ``*_hi``; the reference set held fixed) for the FD, class accuracy and prompted-class
    probability. Returns the metrics and per-image tensors (``prompted_prob``, ``correct``,
    ``probs``, ``features``) for paired tests."""
    from fcr.eval.classifier import extract_features, predict_proba

    # Features and probabilities once, shared by the set metrics and the per-image tensors.
    feats = extract_features(classifier, images)
    probs = predict_proba(classifier, images)
    label_t = torch.as_tensor(labels, dtype=torch.long)
    metrics = metrics_from_features(feats, ref_feats, probs, labels, is_splits=min(10, len(labels)), seed=seed)
    prompted = probs[torch.arange(len(label_t)), label_t].double().numpy()
    correct = (probs.argmax(dim=1) == label_t).double().numpy()
    # The reference is fixed, so the replicates use FrechetToReference (exact, no sqrtm per replicate).
    _, fd_lo, fd_hi = bootstrap_metric(FrechetToReference(*feature_statistics(ref_feats)), feats.double().numpy(),
                                       n_boot=n_boot, seed=seed)
    _, acc_lo, acc_hi = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
    _, prob_lo, prob_hi = bootstrap_ci(prompted, n_boot=n_boot, seed=seed)
    metrics.update({
        f"{FD_COLUMN}_lo": fd_lo, f"{FD_COLUMN}_hi": fd_hi,
        "class_accuracy_lo": acc_lo, "class_accuracy_hi": acc_hi,
        "class_prob_lo": prob_lo, "class_prob_hi": prob_hi,
    })
    per_image = {"prompted_prob": torch.from_numpy(prompted), "correct": torch.from_numpy(correct),
                 "probs": probs, "features": feats}
    return metrics, per_image


def to_classifier_size(images: torch.Tensor, size: int = CLASSIFIER_SIZE) -> torch.Tensor:
    """Images at the classifier's side: unchanged at ``size``, else average-pooled to it
    (``adaptive_avg_pool2d``: exact block means when the side is a multiple of ``size``)."""
    if images.shape[-2:] == (size, size):
        return images
    if min(images.shape[-2:]) < size:
        raise ValueError(f"images of side {tuple(images.shape[-2:])} are smaller than the classifier's {size}")
    return F.adaptive_avg_pool2d(images, size)


class EmbeddedScorer:
    """The embedded classifier against ``ref_feats``; images are tensors in [-1, 1] of any side
    (pooled to the classifier's), prompts a :class:`fcr.backends.embedded.model.PromptSet`."""

    alignment = "class_accuracy"  # the prompt-alignment metric (plays CLIPScore)
    alignment_per_image = "correct"

    def __init__(self, classifier: torch.nn.Module, ref_feats: torch.Tensor, n_bootstrap: int) -> None:
        self.classifier = classifier
        self.ref_feats = ref_feats
        self.n_bootstrap = n_bootstrap
        self.key = {"classifier": module_fingerprint(classifier), "n_reference": int(ref_feats.shape[0]),
                    "n_bootstrap": n_bootstrap}

    def score(
        self, images: torch.Tensor, prompts: Any, *, seed: int, image_dir: Path | None = None, with_fid: bool = True
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Set metrics and per-image tensors (the uint8 images, labels and classifier outputs)."""
        metrics, per_image = score_images(to_classifier_size(images), prompts.labels, self.classifier,
                                          self.ref_feats, n_boot=self.n_bootstrap, seed=seed)
        images_u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return metrics, {"images": images_u8, "labels": torch.as_tensor(prompts.labels, dtype=torch.long), **per_image}


# ----------------------------------------------------------------------------- Stable Diffusion


class SDScorer:
    """clean-fid FID (``fid_kw`` of :func:`fcr.eval.sd_metrics.sd_fid`) and CLIPScore of ``clip`` (a
    :func:`fcr.eval.sd_metrics.load_clip` bundle, loaded once); images are PIL images, prompts strings."""

    alignment = "clip_score"
    alignment_per_image = "clip_score"

    def __init__(self, clip: Any, fid_kw: dict[str, Any], device: torch.device, n_bootstrap: int,
                 fid_reference: str) -> None:
        self.clip = clip
        self.fid_kw = fid_kw
        self.device = device
        self.n_bootstrap = n_bootstrap
        self.key = {"fid_reference": fid_reference, "n_bootstrap": n_bootstrap}

    def score(
        self, images: Sequence[Any], prompts: Sequence[str], *, seed: int, image_dir: Path | None = None,
        with_fid: bool = True,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """FID of the PNGs written to ``image_dir`` (nan without ``with_fid``: e.g. prompts without
        reference images) and the CLIPScore mean with its bootstrap interval; per image: CLIPScore
        and the CLIP image embedding."""
        from fcr.eval.sd_metrics import clip_embeddings, clip_score_from_embeddings, sd_fid

        if image_dir is None:
            raise ValueError("SD scoring writes the images for clean-fid: give image_dir")
        image_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(image_dir / f"{i:06d}.png")
        image_emb, text_emb = clip_embeddings(list(images), list(prompts), device=self.device, clip=self.clip)
        scores = clip_score_from_embeddings(image_emb, text_emb)
        est, lo, hi = bootstrap_ci(scores, n_boot=self.n_bootstrap, seed=seed)
        fid = sd_fid(image_dir, device=self.device, **self.fid_kw) if with_fid else math.nan
        metrics = {"fid": fid, "clip_score": est, "clip_score_lo": lo, "clip_score_hi": hi, "images": str(image_dir)}
        # The image embeddings serve the paired CLIP-drift endpoint (fcr.eval.fidelity).
        return metrics, {"clip_score": torch.from_numpy(scores), "clip_image": image_emb}


def per_kind_means(values: torch.Tensor, kinds: Sequence[str], order: Sequence[str]) -> dict[str, float]:
    """Mean of per-image ``values`` over the images of each kind in ``order`` (nan: none of that kind)."""
    values_np = values.double().numpy()
    out = {}
    for kind in order:
        mask = np.array([k == kind for k in kinds])
        out[kind] = float(values_np[mask].mean()) if mask.any() else math.nan
    return out
