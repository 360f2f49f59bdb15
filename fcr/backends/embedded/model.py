"""The embedded default: its data set on disk, its evaluation prompt sets and its sampling adapter.

``prepare_embedded_data`` writes (once; later calls check and reuse it) a folder with
``manifest.json`` (what made it), ``splits.safetensors`` (validation indices carved from the
official train set, and each training image's caption template) and ``text_states.safetensors``
(MiniLM token states of every training, held-out and the empty prompt). ``load_split`` turns it
into :class:`EmbeddedTrainData` for training or evaluation. :func:`embedded_prompt_set` draws the
class-balanced evaluation prompts, and :class:`EmbeddedModel` is how the one generation loop
(:func:`fcr.backends.generate.generate`) samples an embedded UNet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fcr.backends.embedded import data
from fcr.backends.embedded.text import TextEncoder, build_text_state_cache, load_text_state_cache
from fcr.backends.generate import sampling_scheduler

__all__ = [
    "EMPTY_PROMPT",
    "EmbeddedModel",
    "EmbeddedTrainData",
    "PromptSet",
    "all_prompts",
    "embedded_prompt_set",
    "load_split",
    "prepare_embedded_data",
    "prompt_ids",
]

EMPTY_PROMPT = ""
MANIFEST = "manifest.json"


@dataclass
class EmbeddedTrainData:
    """The embedded default: pixel images with cached text states, looked up per example.

    ``images``: (N, 1, H, W) in [-1, 1]; ``prompt_ids``: (N,) rows of ``prompt_states``
    (P, L, D); ``empty_state``: (L, D), the empty prompt's states.
    """

    images: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_states: torch.Tensor
    empty_state: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.prompt_states[self.prompt_ids[indices]].clone()
        states[drop] = self.empty_state
        return self.images[indices], states


def all_prompts() -> list[str]:
    """Training prompts (label-major), then held-out prompts, then the empty prompt."""
    train = [text for _, _, text in data.prompt_table(data.TRAIN_TEMPLATES)]
    heldout = [text for _, _, text in data.prompt_table(data.HELDOUT_TEMPLATES)]
    return train + heldout + [EMPTY_PROMPT]


def prompt_ids(labels: np.ndarray, template_indices: np.ndarray, heldout: bool = False) -> np.ndarray:
    """Row of each (label, template) caption in :func:`all_prompts`."""
    n_train = len(data.TRAIN_TEMPLATES)
    if heldout:
        offset = n_train * len(data.FASHION_MNIST_NOUNS)
        return offset + labels * len(data.HELDOUT_TEMPLATES) + template_indices
    return labels * n_train + template_indices


def prepare_embedded_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    val_size: int = 5000,
    max_text_length: int = 16,
    root: str | Path | None = None,
    encoder: TextEncoder | None = None,
) -> dict[str, Any]:
    """Build (or verify and reuse) the embedded data folder; returns its manifest."""
    out_dir = Path(out_dir)
    wanted = {"seed": seed, "val_size": val_size, "max_text_length": max_text_length, "image_size": 32,
              "padding": "28->32 px by 2 px of zero (black) padding per side; [0,255] -> [-1,1]",
              "train_templates": list(data.TRAIN_TEMPLATES), "heldout_templates": list(data.HELDOUT_TEMPLATES)}
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differing = [k for k, v in wanted.items() if manifest.get(k) != v]
        if differing:
            raise ValueError(f"{out_dir} was prepared with other settings ({differing}); use another folder or delete it")
        return manifest

    _, train_labels = data.load_fashion_mnist("train", root=root)
    _, test_labels = data.load_fashion_mnist("test", root=root)
    train_idx, val_idx = data.train_val_split(len(train_labels), val_size, seed)
    templates = data.assign_captions(train_labels, len(data.TRAIN_TEMPLATES), seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {"train": torch.from_numpy(train_idx), "val": torch.from_numpy(val_idx),
         "train_templates": torch.from_numpy(templates)},
        str(out_dir / "splits.safetensors"),
    )
    encoder = encoder or TextEncoder.from_minilm()
    build_text_state_cache(all_prompts(), encoder, out_dir / "text_states.safetensors", max_length=max_text_length)
    manifest = {**wanted, "text_encoder": encoder.name, "num_train": len(train_idx), "num_val": len(val_idx),
                "num_test": len(test_labels), "num_prompts": len(all_prompts()),
                "class_counts_train": np.bincount(train_labels[train_idx], minlength=10).tolist()}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def load_split(
    out_dir: str | Path,
    split: str = "train",
    *,
    heldout_prompts: bool = False,
    root: str | Path | None = None,
    style: str = "none",
) -> tuple[EmbeddedTrainData, np.ndarray]:
    """(examples, labels) of ``train`` / ``val`` (from the official train set) or ``test``.

    Training images keep their assigned template; ``val``/``test`` images get a seeded template
    from the training set, or from the held-out set with ``heldout_prompts``. ``style`` applies
    :func:`fcr.backends.embedded.data.apply_style` to the images (the derivative model's domain).
    """
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        raise FileNotFoundError(f"{out_dir} has no prepared data: run notebooks/01_data_prep.ipynb or fcr.backends.embedded.model.prepare_embedded_data")
    manifest = json.loads((out_dir / MANIFEST).read_text())
    splits = load_file(str(out_dir / "splits.safetensors"))
    official = "test" if split == "test" else "train"
    images, labels = data.load_fashion_mnist(official, root=root)
    if split == "test":
        idx = np.arange(len(labels))
    elif split in ("train", "val"):
        idx = splits[split].numpy()
    else:
        raise ValueError(f"unknown split {split!r}; allowed: train, val, test")
    labels = labels[idx]
    n_templates = len(data.HELDOUT_TEMPLATES if heldout_prompts else data.TRAIN_TEMPLATES)
    if split == "train" and not heldout_prompts:
        templates = splits["train_templates"].numpy()[idx]
    else:
        templates = data.assign_captions(labels, n_templates, seed=manifest["seed"] + {"train": 0, "val": 1, "test": 2}[split])
    prompts = all_prompts()
    cache = load_text_state_cache(out_dir / "text_states.safetensors", prompts, max_length=manifest["max_text_length"])
    states = torch.stack([cache[p] for p in prompts])
    examples = EmbeddedTrainData(
        images=data.to_model_range(data.apply_style(images[idx], style)),
        prompt_ids=torch.from_numpy(prompt_ids(labels, templates, heldout_prompts)),
        prompt_states=states,
        empty_state=cache[EMPTY_PROMPT],
    )
    return examples, labels


# ----------------------------------------------------------------------------- evaluation prompts


@dataclass
class PromptSet:
    """N prompts (class-balanced) with their text states; ``seed`` is the seed they were drawn with."""

    labels: np.ndarray
    texts: list[str]
    states: torch.Tensor
    empty_state: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "PromptSet":
        """The first ``n`` prompts (image ``i`` keeps its z_T, which is seeded by ``(seed, i)``)."""
        return PromptSet(self.labels[:n], self.texts[:n], self.states[:n], self.empty_state, self.seed)


def embedded_prompt_set(data_dir: str | Path, n: int, seed: int, templates: str = "train") -> PromptSet:
    """``n`` class-balanced prompts (labels cycle 0..9) with seeded templates.

    ``templates``: ``train`` (the training templates) or ``heldout`` (never seen in training).
    """
    if templates not in ("train", "heldout"):
        raise ValueError(f"templates must be 'train' or 'heldout', got {templates!r}")
    heldout = templates == "heldout"
    labels = np.arange(n, dtype=np.int64) % len(data.FASHION_MNIST_NOUNS)
    n_templates = len(data.HELDOUT_TEMPLATES if heldout else data.TRAIN_TEMPLATES)
    template_idx = np.random.default_rng([seed, 7]).integers(0, n_templates, size=n)
    ids = prompt_ids(labels, template_idx, heldout)
    prompts = all_prompts()
    texts = [prompts[i] for i in ids]
    manifest = Path(data_dir) / "text_states.safetensors"
    cache = load_text_state_cache(manifest, texts + [EMPTY_PROMPT])
    states = torch.stack([cache[t] for t in texts])
    return PromptSet(labels=labels, texts=texts, states=states, empty_state=cache[EMPTY_PROMPT], seed=seed)


# ----------------------------------------------------------------------------- sampling adapter


class EmbeddedModel:
    """An embedded UNet (pixel space, cached MiniLM states) for :func:`fcr.backends.generate.generate`:
    prompts are a :class:`PromptSet`, images come back clamped to [-1, 1] on the CPU."""

    def __init__(self, unet: torch.nn.Module, noise_scheduler: Any, device: str | torch.device = "cpu") -> None:
        self.unet = unet.to(device).eval()
        self.noise_scheduler = noise_scheduler

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was trained at (pixel space: its ``sample_size``)."""
        return self.unet.config.sample_size

    def make_scheduler(self, name: str) -> Any:
        return sampling_scheduler(name, self.noise_scheduler)

    def latent_shape(self, image_size: tuple[int, int] | None) -> tuple[int, int, int]:
        side = self.unet.config.sample_size
        return (self.unet.config.in_channels, *(image_size or (side, side)))

    def condition(
        self, prompts: PromptSet, start: int, stop: int, guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = prompts.states[start:stop].to(self.unet.device)
        return cond, prompts.empty_state.expand_as(cond).to(self.unet.device) if guidance else None

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1).cpu()
