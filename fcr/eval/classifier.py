"""Evaluation classifier of the embedded (Fashion-MNIST) domain.

It plays the role Inception / CLIP play for Stable Diffusion: its penultimate features feed the
Fréchet distance, KID and precision/recall; its class probabilities feed the Inception Score and
prompt alignment. It is trained once on real images (official train split minus a seeded
validation split, model selection on validation) and frozen; the official test accuracy is
reported once, in the log written next to the weights.

CLI::

    python -m fcr.eval.classifier --out models/classifier/fashion_classifier.safetensors --epochs E
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fcr.paths import REPO_ROOT
from fcr.core.state_dicts import state_dict_mismatch

__all__ = [
    "ARCHITECTURE_VERSION",
    "DEFAULT_CLASSIFIER_PATH",
    "ClassifierFileError",
    "FashionClassifier",
    "evaluate_accuracy",
    "extract_features",
    "load_classifier",
    "main",
    "predict_proba",
    "read_classifier_metadata",
    "save_classifier",
]

# Bump when the module layout changes, so old weight files are refused with a clear message.
ARCHITECTURE_VERSION = "fashion-cnn-v1"
FILE_FORMAT = "fcr-fashion-classifier"
DEFAULT_CLASSIFIER_PATH = (
    REPO_ROOT / "models" / "classifier" / "fashion_classifier.safetensors"
)
NUM_CLASSES = 10


class ClassifierFileError(ValueError):
    """A classifier weight file is corrupt, of another format/version, or does not match the model."""


# ----------------------------------------------------------------------------- model


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
    """Small CNN on (N, 1, 32, 32) inputs in [-1, 1].

    ``conv(w0)-pool-conv(w1)-conv(w1)-pool-conv(w2)-pool`` (3x3 convs + BatchNorm + ReLU), then a
    ``feature_dim`` fully connected layer (BatchNorm + ReLU; these are the evaluation features)
    and, after dropout, a linear layer to 10 logits. One conv at full resolution only: on a
    shared CPU the 32x32 layers dominate the cost (the default 16-32-64 widths train an epoch
    of 55k images in about 3 minutes on two busy cores).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), feature_dim: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) <= 0:
            raise ValueError(f"widths must be three positive ints, got {tuple(widths)}")
        if feature_dim <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad feature_dim {feature_dim} or dropout {dropout}")
        w0, w1, w2 = (int(w) for w in widths)
        self.widths: tuple[int, int, int] = (w0, w1, w2)
        self.dropout_p = float(dropout)
        self.body = nn.Sequential(
            *_conv_block(1, w0),
            nn.MaxPool2d(2),  # 16x16
            *_conv_block(w0, w1),
            *_conv_block(w1, w1),
            nn.MaxPool2d(2),  # 8x8
            *_conv_block(w1, w2),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(w2 * 16, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self._feature_dim = int(feature_dim)

    @property
    def feature_dim(self) -> int:
        """Dimension D of :meth:`features`."""
        return self._feature_dim

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1:] != (1, 32, 32):
            raise ValueError(f"expected (N, 1, 32, 32) images in [-1, 1], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) penultimate features (post-ReLU, pre-dropout)."""
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 10) class logits."""
        return self.head(self.dropout(self.features(x)))

    def architecture(self) -> dict[str, str]:
        """Constructor arguments as safetensors metadata strings."""
        return {
            "architecture_version": ARCHITECTURE_VERSION,
            "widths": ",".join(str(w) for w in self.widths),
            "feature_dim": str(self.feature_dim),
            "dropout": repr(self.dropout_p),
        }


# ----------------------------------------------------------------------------- inference


def _batched(model: nn.Module, x: torch.Tensor, batch_size: int, fn_name: str) -> torch.Tensor:
    """Concatenate ``model.<fn_name>`` over batches, in eval mode and without autograd."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fn = getattr(model, fn_name)
    try:
        with torch.inference_mode():
            outs = [fn(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        width = model.feature_dim if fn_name == "features" else NUM_CLASSES
        return torch.empty(0, width)
    return torch.cat(outs)


def predict_proba(model: FashionClassifier, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N, 10) softmax class probabilities (float32, CPU)."""
    return _batched(model, x, batch_size, "forward").softmax(dim=1)


def extract_features(model: FashionClassifier, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """(N, D) penultimate features (float32, CPU)."""
    return _batched(model, x, batch_size, "features")


def evaluate_accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1]."""
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate accuracy on zero images")
    logits = _batched(model, x, batch_size, "forward")
    return float((logits.argmax(dim=1) == torch.as_tensor(y).long().cpu()).float().mean())


# ----------------------------------------------------------------------------- files


def save_classifier(model: FashionClassifier, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write the weights as safetensors; ``metadata`` values are stored as strings next to the
    architecture (which :func:`load_classifier` needs to rebuild the model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(model.architecture())  # architecture keys win: they must describe these weights
    meta["format"] = FILE_FORMAT
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)


def read_classifier_metadata(path: str | Path) -> dict[str, str]:
    """String metadata of a classifier file; raises FileNotFoundError / ClassifierFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights {str(path)!r} not found; train them with "
            f"`python -m fcr.eval.classifier --out {path}`"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises several types for a bad header
        raise ClassifierFileError(f"classifier file {str(path)!r} is corrupt or not safetensors: {err}") from err


def load_classifier(
    path: str | Path = DEFAULT_CLASSIFIER_PATH, map_location: str | torch.device = "cpu"
) -> FashionClassifier:
    """Rebuild a :class:`FashionClassifier` from :func:`save_classifier`'s file, in eval mode."""
    path = Path(path)
    meta = read_classifier_metadata(path)
    if meta.get("format") != FILE_FORMAT:
        raise ClassifierFileError(f"{str(path)!r} is not a {FILE_FORMAT} file (format={meta.get('format')!r})")
    if meta.get("architecture_version") != ARCHITECTURE_VERSION:
        raise ClassifierFileError(
            f"{str(path)!r} has architecture {meta.get('architecture_version')!r}, this code builds "
            f"{ARCHITECTURE_VERSION!r}; retrain with `python -m fcr.eval.classifier --out {path}`"
        )
    try:
        widths = tuple(int(w) for w in meta["widths"].split(","))
        model = FashionClassifier(widths, int(meta["feature_dim"]), float(meta["dropout"]))
    except (KeyError, ValueError) as err:
        raise ClassifierFileError(f"{str(path)!r}: bad architecture metadata ({err})") from err
    state = load_file(str(path))
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ClassifierFileError(f"{str(path)!r} does not match FashionClassifier{widths}: {mismatch}")
    model.load_state_dict(state)
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train on train-minus-val, select on val, report test accuracy once, write weights + log."""
    parser = argparse.ArgumentParser(prog="python -m fcr.eval.classifier", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_PATH, help="output .safetensors path")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="OneCycle peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, shuffling, augmentation)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (timing)")
    parser.add_argument("--widths", type=str, default="16,32,64")
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--max-shift", type=int, default=1, help="random translation range in px (augmentation)")
    # One thread by default: on the shared 2-core machine two threads ran a training step 4.5x
    # slower (OpenMP workers spin-waiting for a core), and the default reproduces the shipped file.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true", help="no batch progress bar (epoch lines stay)")
    args = parser.parse_args(argv)

    from fcr.backends.embedded.data import load_fashion_mnist, to_model_range, train_val_split
    from fcr.eval.classifier_training import train_classifier

    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist("train")
    train_idx, val_idx = train_val_split(len(images), args.val_size, seed=args.split_seed)
    if args.train_limit is not None:
        train_idx = train_idx[: args.train_limit]
    train_x, train_y = to_model_range(images[train_idx]), torch.from_numpy(labels[train_idx])
    val_x, val_y = to_model_range(images[val_idx]), torch.from_numpy(labels[val_idx])
    widths = tuple(int(w) for w in args.widths.split(","))

    train_start = time.perf_counter()
    model, history = train_classifier(
        train_x, train_y, val_x, val_y,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        progress=not args.no_progress, log_epochs=True, weight_decay=args.weight_decay,
        augment=not args.no_augment, max_shift=args.max_shift,
        widths=widths, feature_dim=args.feature_dim, dropout=args.dropout,
    )  # fmt: skip
    train_seconds = time.perf_counter() - train_start
    best = max(history, key=lambda r: (r["val_acc"], -r["epoch"]))

    # The test split is touched exactly once, after model selection.
    test_images, test_labels = load_fashion_mnist("test")
    test_x, test_y = to_model_range(test_images), torch.from_numpy(test_labels)
    test_acc = evaluate_accuracy(model, test_x, test_y)

    metadata = {
        "test_accuracy": f"{test_acc:.4f}",
        "val_accuracy": f"{best['val_acc']:.4f}",
        "best_epoch": str(best["epoch"]),
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "split_seed": str(args.split_seed),
        "val_size": str(args.val_size),
        "num_train": str(len(train_idx)),
        "torch_version": torch.__version__,
    }
    save_classifier(model, args.out, metadata)
    log = {
        "weights": str(args.out),
        "weights_bytes": args.out.stat().st_size,
        "architecture": model.architecture(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        "num_test": len(test_y),
        "history": history,
        "best_epoch": best["epoch"],
        "val_accuracy": best["val_acc"],
        "test_accuracy": test_acc,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    log_path = args.out.with_name(args.out.stem + "_log.json")
    log_path.write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    print(
        f"best epoch {best['epoch']}/{args.epochs}: val_acc {best['val_acc']:.4f}, TEST accuracy {test_acc:.4f}; "
        f"train {train_seconds:.0f} s; wrote {args.out} ({log['weights_bytes'] / 1e6:.2f} MB) and {log_path}",
        flush=True,
    )
    if not math.isfinite(history[-1]["train_loss"]):
        raise RuntimeError("training diverged (non-finite loss)")
    return log


if __name__ == "__main__":
    main()
