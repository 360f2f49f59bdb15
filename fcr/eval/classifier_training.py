"""Training the embedded classifier (:mod:`fcr.eval.classifier`) on Fashion-MNIST: seeded
augmentation, early stopping on a held-out split, deterministic for a seed."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fcr.eval.classifier import FashionClassifier, evaluate_accuracy

__all__ = ["augment_batch", "train_classifier"]



def augment_batch(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (p=0.5) and integer translation by up to ``max_shift`` px per image.

    Shifted-in pixels are background (-1). All randomness comes from ``generator``.
    """
    n, _, h, w = x.shape
    if flip:
        flip_mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip_mask[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        padded = F.pad(x, (max_shift,) * 4, value=-1.0)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    return x


def _check_data(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1:] != (1, 32, 32) or not x.is_floating_point():
        raise ValueError(f"{name}: expected float (N, 1, 32, 32) images, got {x.dtype} {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name}: {tuple(y.shape)} labels for {x.shape[0]} images")


def train_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    log_epochs: bool | None = None,
    weight_decay: float = 0.05,
    augment: bool = True,
    max_shift: int = 2,
    widths: Sequence[int] = (16, 32, 64),
    feature_dim: int = 128,
    dropout: float = 0.3,
) -> tuple[FashionClassifier, list[dict[str, float]]]:
    """Train with AdamW + OneCycle; return the weights of the epoch with the best val accuracy.

    Deterministic for a seed on CPU (same thread count): initialisation and dropout draw from a
    forked global RNG seeded with ``seed`` (the caller's RNG state is left untouched), shuffling and
    augmentation from a separate seeded generator. History rows: epoch, train_loss, val_acc, lr,
    seconds. ``progress`` shows a batch bar; ``log_epochs`` (default: ``progress``) prints one line
    per epoch to stderr.
    """
    log_epochs = progress if log_epochs is None else log_epochs
    _check_data(train_x, train_y, "train")
    _check_data(val_x, val_y, "val")
    if epochs <= 0 or batch_size <= 1:
        raise ValueError(f"epochs must be positive and batch_size > 1 (got {epochs}, {batch_size})")
    train_y, val_y = train_y.long(), val_y.long()
    n = train_x.shape[0]
    # Skip a last batch of one image: BatchNorm cannot normalise a single sample.
    batches = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size) if min(i + batch_size, n) - i > 1]
    history: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionClassifier(widths, feature_dim, dropout)
        data_gen = torch.Generator().manual_seed(seed + 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * len(batches), pct_start=0.25
        )
        best_acc, best_state = -1.0, copy.deepcopy(model.state_dict())
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=data_gen)
            total_loss, seen = 0.0, 0
            bar = _progress(batches, progress, f"epoch {epoch}/{epochs}")
            for lo, hi in bar:
                idx = perm[lo:hi]
                xb, yb = train_x[idx], train_y[idx]
                if augment:
                    xb = augment_batch(xb, data_gen, max_shift=max_shift)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * (hi - lo)
                seen += hi - lo
                if progress and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            val_acc = evaluate_accuracy(model, val_x, val_y)
            row = {
                "epoch": epoch,
                "train_loss": total_loss / max(seen, 1),
                "val_acc": val_acc,
                "lr": float(scheduler.get_last_lr()[0]),
                "seconds": time.perf_counter() - start,
            }
            history.append(row)
            if log_epochs:
                print(
                    f"epoch {epoch}/{epochs}: train_loss {row['train_loss']:.4f} val_acc {val_acc:.4f} "
                    f"({row['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if val_acc > best_acc:  # strict: ties keep the earlier epoch
                best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
    return model.eval(), history


def _progress(items: list, enabled: bool, desc: str):
    """tqdm over ``items`` when enabled and installed, else the list itself."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, file=sys.stderr)
