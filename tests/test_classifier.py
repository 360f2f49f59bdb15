"""Evaluation classifier: shapes, augmentation, file round trip and errors, determinism, sanity accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fcr.eval.classifier import (
    ClassifierFileError,
    FashionClassifier,
    evaluate_accuracy,
    extract_features,
    load_classifier,
    predict_proba,
    read_classifier_metadata,
    save_classifier,
)
from fcr.eval.classifier_training import augment_batch, train_classifier
from fcr.backends.embedded.data import load_fashion_mnist, to_model_range, train_val_split


@pytest.fixture(scope="module")
def real_data() -> dict[str, torch.Tensor]:
    """Disjoint real subsets: 2000 train, 500 val (both from the train split), 500 test."""
    try:
        images, labels = load_fashion_mnist("train", download=False)
        test_images, test_labels = load_fashion_mnist("test", download=False)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    train_idx, val_idx = train_val_split(len(images), 5000, seed=0)
    tr, va = train_idx[:2000], val_idx[:500]
    return {
        "train_x": to_model_range(images[tr]),
        "train_y": torch.from_numpy(labels[tr]),
        "val_x": to_model_range(images[va]),
        "val_y": torch.from_numpy(labels[va]),
        "test_x": to_model_range(test_images[:500]),
        "test_y": torch.from_numpy(test_labels[:500]),
    }


def _random_model(seed: int = 0, **kwargs) -> FashionClassifier:
    torch.manual_seed(seed)
    model = FashionClassifier(**kwargs)
    # Non-trivial BatchNorm statistics, so the round trip also covers the buffers.
    with torch.no_grad():
        model.train()(torch.rand(16, 1, 32, 32) * 2 - 1)
    return model.eval()


def test_shapes_and_feature_dim() -> None:
    model = _random_model(feature_dim=96)
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    assert model.feature_dim == 96
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 96)
    assert (model.features(x) >= 0).all()  # post-ReLU
    assert predict_proba(model, x, batch_size=2).shape == (5, 10)
    assert extract_features(model, x, batch_size=2).shape == (5, 96)
    with pytest.raises(ValueError, match="32, 32"):
        model(torch.zeros(2, 1, 28, 28))


def test_inference_helpers_are_batch_independent_and_restore_mode() -> None:
    model = _random_model().train()
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    probs = predict_proba(model, x, batch_size=3)
    assert model.training  # restored
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(7))
    torch.testing.assert_close(probs, predict_proba(model, x, batch_size=1000))
    torch.testing.assert_close(extract_features(model, x, 2), extract_features(model, x, 7))
    assert extract_features(model, x[:0], 4).shape == (0, model.feature_dim)


def test_augment_batch() -> None:
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), max_shift=0, flip=False), x)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # Without shifts each image is itself or its mirror.
    ramp = torch.arange(32.0).expand(1, 1, 32, 32).contiguous()
    row = augment_batch(ramp, torch.Generator().manual_seed(3), max_shift=0)[0, 0, 0]
    assert torch.equal(row, torch.arange(32.0)) or torch.equal(row, torch.arange(31.0, -1, -1))


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _random_model(widths=(8, 16, 24), feature_dim=32)
    path = tmp_path / "sub" / "clf.safetensors"
    save_classifier(model, path, {"test_accuracy": 0.9123, "seed": 3, "note": "x"})
    loaded = load_classifier(path)
    assert not loaded.training and loaded.widths == (8, 16, 24) and loaded.feature_dim == 32
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    assert torch.equal(predict_proba(model, x), predict_proba(loaded, x))
    assert torch.equal(extract_features(model, x), extract_features(loaded, x))
    meta = read_classifier_metadata(path)
    assert meta["test_accuracy"] == "0.9123" and meta["seed"] == "3" and meta["note"] == "x"
    assert meta["architecture_version"] == "fashion-cnn-v1"


def test_missing_and_mismatched_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_classifier(missing)

    good = tmp_path / "good.safetensors"
    save_classifier(_random_model(), good, {})
    meta = read_classifier_metadata(good)

    # Right metadata, wrong tensors (another model's weights under a different architecture).
    other = _random_model(widths=(8, 8, 8))
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong), metadata=meta)
    with pytest.raises(ClassifierFileError, match="wrong.safetensors"):
        load_classifier(wrong)

    old = tmp_path / "old.safetensors"
    save_file({"w": torch.zeros(1)}, str(old), metadata={**meta, "architecture_version": "fashion-cnn-v0"})
    with pytest.raises(ClassifierFileError, match="old.safetensors.*fashion-cnn-v0"):
        load_classifier(old)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(ClassifierFileError, match="foreign.safetensors"):
        load_classifier(foreign)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ClassifierFileError, match="garbage.safetensors"):
        load_classifier(garbage)


def test_training_is_deterministic(real_data: dict[str, torch.Tensor]) -> None:
    kwargs = dict(epochs=1, batch_size=64, lr=3e-3, seed=5, progress=False)
    args = (real_data["train_x"][:512], real_data["train_y"][:512], real_data["val_x"][:200], real_data["val_y"][:200])
    before = torch.random.get_rng_state()
    m1, h1 = train_classifier(*args, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    m2, h2 = train_classifier(*args, **kwargs)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [(r["train_loss"], r["val_acc"]) for r in h1] == [(r["train_loss"], r["val_acc"]) for r in h2]
    m3, _ = train_classifier(*args, **{**kwargs, "seed": 6})
    assert not torch.equal(m3.state_dict()["head.weight"], s1["head.weight"])


def test_short_training_beats_chance_and_keeps_best_epoch(real_data: dict[str, torch.Tensor]) -> None:
    model, history = train_classifier(
        real_data["train_x"], real_data["train_y"], real_data["val_x"], real_data["val_y"],
        epochs=2, batch_size=64, lr=3e-3, seed=0, progress=False,
    )  # fmt: skip
    assert [r["epoch"] for r in history] == [1, 2]
    assert set(history[0]) >= {"epoch", "train_loss", "val_acc"}
    # The returned weights are those of the best validation epoch.
    best = max(r["val_acc"] for r in history)
    assert evaluate_accuracy(model, real_data["val_x"], real_data["val_y"]) == pytest.approx(best, abs=1e-6)
    test_acc = evaluate_accuracy(model, real_data["test_x"], real_data["test_y"])
    assert test_acc > 0.5, f"held-out accuracy {test_acc:.3f} after 2 epochs on 2000 images"
    json.dumps(history)  # plain numbers, ready for the JSON log
