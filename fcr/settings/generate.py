"""Generating the embedded model's images for evaluation: fixed, paired prompt/noise sets.

Every configuration of a sweep samples the SAME prompts from the SAME initial noise (image ``i``
gets noise from a generator seeded by ``(seed, i)``, independent of the batch size), so quality
differences between configurations are paired comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fcr.core.sampler import PriorNoise, SamplerStats, build_scheduler, sample
from fcr.settings import data
from fcr.settings.embedded import EMPTY_PROMPT, all_prompts, prompt_ids
from fcr.settings.text import load_text_state_cache

__all__ = ["GenerationResult", "PromptSet", "embedded_prompt_set", "generate", "initial_noise", "sampling_scheduler"]


@dataclass
class PromptSet:
    """N prompts (class-balanced) with their text states and per-image noise seeds."""

    labels: np.ndarray
    texts: list[str]
    states: torch.Tensor
    empty_state: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.labels)


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


def initial_noise(indices: range | list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """z_T for images ``indices``: one CPU generator per image, so image i never depends on batching."""
    out = []
    for i in indices:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


def sampling_scheduler(name: str, noise_scheduler: Any):
    """A sampling scheduler on the training noise schedule, configured as SD's pipelines are."""
    return build_scheduler(name, **{**dict(noise_scheduler.config), "set_alpha_to_one": False})


@dataclass
class GenerationResult:
    """Images in [-1, 1] and the sampler's pass counters summed over batches."""

    images: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def _add_stats(total: dict[str, Any], stats: SamplerStats) -> None:
    for key, value in stats.as_dict().items():
        if isinstance(value, list):
            total.setdefault(key, []).extend(value)
        else:
            total[key] = total.get(key, 0) + value


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    prompts: PromptSet,
    *,
    scheduler_name: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    key_steps: list[int] | None = None,
    parallel: bool = True,
    prior_noise: PriorNoise | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GenerationResult:
    """Sample one image per prompt of ``prompts`` (plain when ``key_steps`` is None, else cached)."""
    unet = unet.to(device).eval()
    channels, size = unet.config.in_channels, unet.config.sample_size
    images, stats = [], {}
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="generate"):
        idx = range(start, min(start + batch_size, len(prompts)))
        noise = initial_noise(idx, (channels, size, size), prompts.seed).to(device)
        cond = prompts.states[start : idx.stop].to(device)
        uncond = prompts.empty_state.expand_as(cond).to(device)
        out = sample(
            unet,
            sampling_scheduler(scheduler_name, noise_scheduler),
            noise,
            cond,
            uncond_hidden_states=uncond if guidance_scale > 1 else None,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            key_steps=key_steps,
            parallel=parallel,
            prior_noise=prior_noise,
        )
        images.append(out.latents.clamp(-1, 1).cpu())
        _add_stats(stats, out.stats)
    return GenerationResult(torch.cat(images), stats)
