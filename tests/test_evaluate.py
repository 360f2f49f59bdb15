"""Class agreement of generated images (the base models' quality bar), code path on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcr.eval.classifier import load_classifier
from fcr.eval.quality_bar import class_agreement
from fcr.backends.embedded.model import prepare_embedded_data
from fcr.backends.models import build_embedded_unet, build_noise_scheduler


def test_class_agreement_counts_prompted_classes(tmp_path: Path, monkeypatch) -> None:
    try:
        prepare_embedded_data(tmp_path)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    torch.manual_seed(0)
    classifier = load_classifier()
    summary, images, labels = class_agreement(build_embedded_unet("base"), build_noise_scheduler(), tmp_path, n=20,
                                              num_inference_steps=3, batch_size=10, classifier=classifier, progress=False)
    assert images.shape == (20, 1, 32, 32)
    predicted = classifier(images).argmax(1).numpy()
    assert summary["class_agreement"] == pytest.approx(float((predicted == labels).mean()))
    assert set(summary["per_class"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                         "Sneaker", "Bag", "Ankle boot"}
