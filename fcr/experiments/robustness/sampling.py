"""Sampling under a stress: the one stressed generation loop of the embedded setting and of SD,
and resizing stressed images for the classifier."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fcr.core.configurations import SamplingConfig
from fcr.core.sampler import PriorNoise, SamplerStats, sample
from fcr.experiments.robustness.attack import ATTACK_CHUNK, adversarial_noise
from fcr.experiments.robustness.stresses import Stress, perturbed_scheduler, schedule_seed
from fcr.settings.generate import PromptSet, initial_noise, sampling_scheduler

CLASSIFIER_SIZE = 32  # the embedded classifier's input side


# ----------------------------------------------------------------------------- stressed sampling


def _stats_total(total: dict[str, Any], stats: SamplerStats) -> None:
    for key, value in stats.as_dict().items():
        if not isinstance(value, list):
            total[key] = total.get(key, 0) + value


def _attack(
    unet: torch.nn.Module,
    make_scheduler: Callable[[], Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    config: SamplingConfig,
    guidance_scale: float,
    attack: Mapping[str, Any] | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    if attack is None:
        raise ValueError("the adversarial stress needs attack = {'stride', 'epsilon', 'steps'}")
    return adversarial_noise(
        unet, make_scheduler, noise, cond, uncond, guidance_scale=guidance_scale,
        num_inference_steps=config.num_inference_steps, stride=int(attack["stride"]),
        epsilon=float(attack["epsilon"]), steps=int(attack["steps"]),
        chunk_size=int(attack.get("chunk_size", ATTACK_CHUNK)),
    )


def sample_stressed(
    unet: torch.nn.Module,
    make_scheduler: Callable[[], Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    config: SamplingConfig,
    stress: Stress,
    *,
    guidance_scale: float,
    parallel: bool,
    prior_noise: PriorNoise | None,
    schedule_seed_value: int = 0,
    attack: Mapping[str, Any] | None = None,
    attacked_noise: tuple[torch.Tensor, dict[str, float]] | None = None,
) -> tuple[torch.Tensor, SamplerStats, dict[str, float]]:
    """One batch of any latent shape (pixels or VAE latents) under ``stress``: the adversarial
    perturbation of ``noise`` (``attack`` = ``stride``, ``epsilon``, ``steps``), then sampling with
    ``config`` on the (perturbed, for ``schedule_noise_std``) scheduler. ``attacked_noise``: an
    attack already computed for this batch (same noise, prompts and attack), reused as is. Returns
    the final latents, the sampler counters and the attack's cache errors (empty without attack)."""
    info: dict[str, float] = {}
    if stress.adversarial:
        if attacked_noise is None:
            attacked_noise = _attack(unet, make_scheduler, noise, cond, uncond, config, guidance_scale, attack)
        noise, info = attacked_noise
    scheduler = make_scheduler()
    if stress.schedule_noise_std is not None:
        scheduler = perturbed_scheduler(scheduler, stress.schedule_noise_std, schedule_seed_value)
    out = sample(
        unet, scheduler, noise, cond,
        uncond_hidden_states=uncond if guidance_scale > 1 else None,
        guidance_scale=guidance_scale,
        num_inference_steps=config.num_inference_steps,
        key_steps=None if config.key_steps is None else list(config.key_steps),
        parallel=parallel,
        prior_noise=prior_noise,
    )
    return out.latents, out.stats, info


def generate_stressed(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    prompts: PromptSet,
    config: SamplingConfig,
    stress: Stress,
    *,
    guidance_scale: float,
    parallel: bool,
    prior_noise: PriorNoise | None,
    batch_size: int,
    attack: Mapping[str, Any] | None = None,
    attack_cache: dict[Any, tuple[torch.Tensor, dict[str, float]]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Embedded images in [-1, 1] (side ``stress.resolution`` or the UNet's) for ``prompts``.

    Image ``i`` starts from :func:`fcr.settings.generate.initial_noise` of ``(prompts.seed, i)`` at the
    stress's size, so the unstressed case is exactly :func:`fcr.settings.generate.generate`. The schedule
    perturbation of batch ``b`` is seeded by :func:`schedule_seed` ``(prompts.seed, b)`` (one
    scheduler per batch: the perturbed images depend on ``batch_size``). The attack does not
    depend on the key steps, so configurations attacked with the same stride share it through
    ``attack_cache`` (a dict owned by the caller for one model, prompt set and seed). Returns the
    images and the summed sampler counters (plus the attack's mean cache errors over images).
    """
    unet = unet.to(device).eval()
    channels = unet.config.in_channels
    size = stress.resolution or unet.config.sample_size
    images, stats, infos = [], {}, []
    batches = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(batches, disable=not progress, desc=f"{config.name}/{stress.name}")):
        idx = range(start, min(start + batch_size, len(prompts)))
        noise = initial_noise(idx, (channels, size, size), prompts.seed).to(device)
        cond = prompts.states[start : idx.stop].to(device)
        uncond = prompts.empty_state.expand_as(cond).to(device)

        def make(name=config.scheduler):
            return sampling_scheduler(name, noise_scheduler)

        attacked = None
        if stress.adversarial:
            cache_key = (b, batch_size, config.scheduler, config.num_inference_steps, size,
                         *sorted((k, str(v)) for k, v in (attack or {}).items()))
            attacked = attack_cache.get(cache_key) if attack_cache is not None else None
            stats["attack_batches_reused"] = stats.get("attack_batches_reused", 0) + int(attacked is not None)
            if attacked is None:
                attacked = _attack(unet, make, noise, cond, uncond, config, guidance_scale, attack)
                if attack_cache is not None:
                    attack_cache[cache_key] = attacked
        latents, batch_stats, info = sample_stressed(
            unet, make, noise, cond, uncond, config, stress, guidance_scale=guidance_scale, parallel=parallel,
            prior_noise=prior_noise, schedule_seed_value=schedule_seed(prompts.seed, b), attacked_noise=attacked,
        )
        images.append(latents.clamp(-1, 1).cpu())
        _stats_total(stats, batch_stats)
        if info:
            infos.append((len(idx), info))
    if infos:
        total = sum(n for n, _ in infos)
        for key in infos[0][1]:
            stats[key] = sum(n * i[key] for n, i in infos) / total
    stats["sampling_runs"] = len(batches)
    return torch.cat(images), stats


# ----------------------------------------------------------------------------- scoring


def to_classifier_size(images: torch.Tensor, size: int = CLASSIFIER_SIZE) -> torch.Tensor:
    """Images at the classifier's side: unchanged at ``size``, else average-pooled to it
    (``adaptive_avg_pool2d``: exact block means when the side is a multiple of ``size``)."""
    if images.shape[-2:] == (size, size):
        return images
    if min(images.shape[-2:]) < size:
        raise ValueError(f"images of side {tuple(images.shape[-2:])} are smaller than the classifier's {size}")
    return F.adaptive_avg_pool2d(images, size)


def generate_sd_stressed(
    components: Any,
    prompts: Sequence[str],
    config: SamplingConfig,
    stress: Stress,
    *,
    guidance_scale: float,
    parallel: bool,
    prior_noise: PriorNoise | None,
    batch_size: int,
    seed: int,
    attack: Mapping[str, Any] | None = None,
    native_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """SD latents ``(N, 4, side/8, side/8)`` under ``stress``: the same :func:`sample_stressed` as
    the embedded model, in VAE latent space (side = ``stress.resolution`` or the UNet's native
    ``sample_size * 8``), noise of image ``i`` from ``(seed, i)``; decode with
    :func:`fcr.settings.sd.decode_latents`. Adversarial chunks hold one image (memory)."""
    from fcr.core.sampler import build_scheduler
    from fcr.settings.sd import encode_prompts

    unet, factor = components.unet, components.vae_scale_factor
    side = stress.resolution or native_size or unet.config.sample_size * factor
    if side % factor:
        raise ValueError(f"image side {side} must be a multiple of the VAE factor {factor}")
    device, dtype = unet.device, unet.dtype
    uncond = None
    if guidance_scale > 1:
        uncond = encode_prompts(components.tokenizer, components.text_encoder, [""], device).to(dtype)
    if attack is not None:
        attack = {**attack, "chunk_size": 1}
    chunks, stats, infos = [], {}, []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        idx = range(start, min(start + batch_size, len(prompts)))
        noise = initial_noise(idx, (unet.config.in_channels, side // factor, side // factor), seed)
        cond = encode_prompts(components.tokenizer, components.text_encoder, list(prompts[start : idx.stop]), device)
        latents, batch_stats, info = sample_stressed(
            unet, lambda: build_scheduler(config.scheduler, **components.scheduler_config),
            noise.to(device=device, dtype=dtype), cond.to(dtype), uncond, config, stress,
            guidance_scale=guidance_scale, parallel=parallel, prior_noise=prior_noise,
            schedule_seed_value=schedule_seed(seed, b), attack=attack,
        )
        chunks.append(latents)
        _stats_total(stats, batch_stats)
        if info:
            infos.append(info)
    for key in infos[0] if infos else []:
        stats[key] = float(np.mean([i[key] for i in infos]))
    return torch.cat(chunks), stats
