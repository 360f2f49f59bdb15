"""Stable Diffusion images measured one by one, and the set metrics computed once from all of them.

:class:`InceptionFeatures` gives clean-fid's Inception pool features (its own resize, so FID equals
clean-fid's on the same images) and the 1008-class softmax the Inception Score reads;
:func:`measure_images` adds open_clip's image and prompt embeddings. These per-image tensors are
what a sharded evaluation writes (:mod:`fcr.eval.sharding`); :func:`set_metrics` then computes,
once, after the gather: FID from moments merged over shards, Inception Score, CLIPScore with its
bootstrap interval, improved precision/recall on Inception features, and prompt-conditional
precision/recall on joint (image, prompt) features when the reference images have captions.

Prompt-conditional precision/recall: each image is represented by its unit Inception feature
concatenated with the unit CLIP text embedding of its prompt (reference: of its caption), so a
generated image counts as precise only where a real image *with a similar caption* looks similar.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fcr.eval.metrics import frechet_distance, inception_score, precision_recall
from fcr.eval.results import save_safetensors_atomic
from fcr.eval.sd_metrics import ClipBundle, clip_embeddings, clip_score_from_embeddings
from fcr.eval.sharding import FeatureMoments
from fcr.stats import bootstrap_ci

__all__ = ["InceptionFeatures", "ReferenceSet", "joint_features", "measure_images", "reference_set", "set_metrics"]

CLEAN_FID_DOWNLOAD_DIR = "/tmp"  # where clean-fid itself keeps the downloaded Inception file


class InceptionFeatures:
    """clean-fid's Inception network on PIL images: ``(features (N, 2048), class probabilities (N, 1008))``.

    ``inception_dir``: a folder with ``inception-2015-12-05.pt`` (machines without internet), or
    None for clean-fid's download. ``mode``: clean-fid's ``clean`` (PIL bicubic resize outside the
    network) or ``legacy_tensorflow`` (resize inside).
    """

    def __init__(self, inception_dir: str | Path | None, mode: str = "clean",
                 device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        if mode not in ("clean", "legacy_tensorflow"):
            raise ValueError(f"mode must be 'clean' or 'legacy_tensorflow', not {mode!r}")
        folder = str(inception_dir) if inception_dir else CLEAN_FID_DOWNLOAD_DIR
        if inception_dir and not (Path(folder) / "inception-2015-12-05.pt").is_file():
            raise FileNotFoundError(f"{folder}/inception-2015-12-05.pt not found: copy clean-fid's Inception file there")
        self.device = torch.device(device)
        self.model = InceptionV3W(folder, download=not inception_dir, resize_inside=mode == "legacy_tensorflow")
        self.model = self.model.to(self.device).eval()
        self.resize = build_resizer(mode)
        self.batch_size = batch_size
        path = Path(folder) / "inception-2015-12-05.pt"
        self.identity = f"{mode}:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"

    def _pixels(self, images: Sequence[Any]) -> torch.Tensor:
        # As clean-fid's ResizeDataset: uint8 arrays scaled back to [0, 255], float32 ones as they are.
        out = []
        for image in images:
            array = self.resize(np.asarray(image.convert("RGB")))
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
            out.append(tensor.float())
        return torch.stack(out)

    def __call__(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        feats, probs = [], []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = self._pixels(images[start : start + self.batch_size]).to(self.device)
                feats.append(self.model(x).float().cpu())
                # The network's own head (softmax over 1008 classes) for the Inception Score.
                probs.append(self.model.base(x, return_features=False).float().reshape(x.shape[0], -1).cpu())
        return torch.cat(feats), torch.cat(probs)


def measure_images(images: Sequence[Any], prompts: Sequence[str], inception: InceptionFeatures,
                   clip: ClipBundle, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-image tensors of generated images and their prompts: Inception features and class
    probabilities, unit CLIP image and prompt embeddings and CLIPScore."""
    features, probs = inception(images)
    image_emb, text_emb = clip_embeddings(list(images), list(prompts), device=device, clip=clip)
    return {"inception": features, "inception_probs": probs, "clip_image": image_emb, "clip_text": text_emb,
            "clip_score": torch.from_numpy(clip_score_from_embeddings(image_emb, text_emb))}


def joint_features(inception: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(image, prompt) features of prompt-conditional precision/recall: unit Inception feature and
    unit text embedding side by side (each half weighs the same)."""
    return torch.cat([F.normalize(inception.float(), dim=-1), F.normalize(text.float(), dim=-1)], dim=-1)


@dataclass(frozen=True)
class ReferenceSet:
    """What generated sets are compared with: Inception moments, and (reference folders only)
    per-image Inception features and, with captions, their CLIP text embeddings."""

    mean: np.ndarray
    covariance: np.ndarray
    features: torch.Tensor | None = None
    caption_text: torch.Tensor | None = None
    count: int = 0


def _folder_fingerprint(files: Sequence[Path], captions: Sequence[str] | None, extractor: str) -> str:
    digest = hashlib.sha256(extractor.encode())
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    for caption in captions or ():
        digest.update(caption.encode() + b"\n")
    return digest.hexdigest()[:16]


def reference_set(reference: str, inception: InceptionFeatures, clip: ClipBundle, device: torch.device,
                  cache_dir: str | Path, mode: str = "clean") -> ReferenceSet:
    """The reference of ``reference``: a folder of images (``name.txt`` captions beside every image
    enable prompt-conditional precision/recall), measured once and cached in ``cache_dir`` under a
    fingerprint of its files, captions and Inception network; or a clean-fid statistics name
    (moments only)."""
    from fcr.backends.sd.data import image_files, open_image

    folder = Path(reference).expanduser()
    if not folder.is_dir():
        from cleanfid import fid

        name = reference.lower()
        if not fid.test_stats_exists(name, mode):
            raise FileNotFoundError(f"fid_reference {reference!r}: neither a folder nor clean-fid statistics ({mode})")
        mu, sigma = fid.get_reference_statistics(name, res="na", mode=mode, split="custom")
        return ReferenceSet(np.asarray(mu, np.float64), np.asarray(sigma, np.float64))
    files = image_files(folder)
    if len(files) < 2:
        raise FileNotFoundError(f"{folder}: fewer than 2 reference images")
    texts = [p.with_suffix(".txt") for p in files]
    captions = [t.read_text(encoding="utf-8").strip() for t in texts] if all(t.is_file() for t in texts) else None
    clip_id = type(clip[0]).__name__ + str(sum(p.numel() for p in clip[0].parameters())) if captions else "-"
    cache = Path(cache_dir) / f"reference_{_folder_fingerprint(files, captions, inception.identity + clip_id)}.safetensors"
    if cache.is_file():
        stored = load_file(str(cache))
    else:
        stored = {}
        feats = []
        for start in range(0, len(files), inception.batch_size):
            feats.append(inception([open_image(p) for p in files[start : start + inception.batch_size]])[0])
        stored["features"] = torch.cat(feats)
        if captions:
            tokenizer, model = clip[2], clip[0]
            parts = []
            with torch.inference_mode():
                for start in range(0, len(captions), 64):
                    tokens = tokenizer(captions[start : start + 64]).to(device)
                    parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
            stored["caption_text"] = torch.cat(parts)
        save_safetensors_atomic(stored, cache, {"reference": str(folder), "images": str(len(files))})
    moments = FeatureMoments.of(stored["features"])
    return ReferenceSet(moments.mean, moments.covariance, stored["features"], stored.get("caption_text"), len(files))


def set_metrics(per_image: dict[str, torch.Tensor], reference: ReferenceSet | None, *, shard_sizes: Sequence[int],
                n_bootstrap: int, seed: int, pr_k: int = 3, is_splits: int = 10) -> dict[str, float]:
    """Set metrics of one configuration from its gathered per-image tensors (in image order).
    FID: Inception moments merged over the shards (``shard_sizes``), never per-shard FIDs averaged.
    Without a ``reference`` (a bare prompt list) FID and precision/recall are nan."""
    features = per_image["inception"]
    n = features.shape[0]
    moments = FeatureMoments.merged(torch.split(features, list(shard_sizes)))
    out: dict[str, float] = {"n_images": float(n)}
    out["fid"] = (math.nan if reference is None
                  else frechet_distance(moments.mean, moments.covariance, reference.mean, reference.covariance))
    splits = min(is_splits, n)
    out["inception_score"], out["inception_score_std"] = inception_score(per_image["inception_probs"].double().numpy(),
                                                                         splits=splits)
    scores = per_image["clip_score"].double().numpy()
    out["clip_score"], out["clip_score_lo"], out["clip_score_hi"] = bootstrap_ci(scores, n_boot=n_bootstrap, seed=seed)
    nan = math.nan
    out["precision"], out["recall"] = nan, nan
    out["conditional_precision"], out["conditional_recall"] = nan, nan
    if reference is not None and reference.features is not None and min(n, reference.features.shape[0]) > pr_k:
        out["precision"], out["recall"] = precision_recall(reference.features, features, k=pr_k)
        if reference.caption_text is not None:
            real = joint_features(reference.features, reference.caption_text)
            fake = joint_features(features, per_image["clip_text"])
            out["conditional_precision"], out["conditional_recall"] = precision_recall(real, fake, k=pr_k)
    return out
