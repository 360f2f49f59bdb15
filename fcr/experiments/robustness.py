"""Robustness of encoder caching under stress: does FCR's quality gain survive unusual inputs?

Per model x sampling configuration (stride 1 = plain sampling, stride s > 1 = Faster-Diffusion
uniform key steps) x stress x seed, images are generated and scored as in the stride sweep
(:mod:`fcr.experiments.sweep`); each result is a JSON file written when it is finished
(:func:`fcr.eval.results.run_or_load`). Stresses (:data:`STRESSES`):

- ``none``: the unstressed reference (training prompt templates, training resolution, the
  nominal schedule, Gaussian z_T);
- ``heldout_prompts``: prompt templates never seen in training;
- ``ood_prompts``: out-of-distribution prompts with a known class (paraphrases and compositions,
  ``fcr/prompt_lists/fashion_*.tsv``); for SD: abstract and medical prompts (no labels);
- ``high_resolution``: sampling at ``stress_resolution`` (the embedded classifier works at 32x32,
  so such images are average-pooled to 32x32 before scoring);
- ``perturbed_schedule``: the solver's noise levels are perturbed, sigma_t -> sigma_t (1 + eps_t)
  (:func:`perturbed_scheduler`); the UNet still gets the nominal timesteps;
- ``adversarial_noise``: z_T is perturbed by projected signed-gradient ascent on the cache error
  (:func:`adversarial_noise`).

For a given seed every stress uses the same class sequence (labels cycle 0..9) and, except for the
high-resolution and adversarial stresses, the same per-image initial noise, so stressed and
unstressed results are paired by seed. Drops (stressed vs unstressed) and the FCR criterion are
built from the result table by :func:`per_seed_drops`, :func:`drop_table` and
:func:`criterion_table`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fcr.config import ConfigError
from fcr.core.configurations import SamplingConfig, sweep_configurations
from fcr.core.sampler import PriorNoise, SamplerStats, sample
from fcr.core.unet import decode, encode
from fcr.eval.metrics import DEFAULT_EXTRACTOR_NAME
from fcr.eval.results import module_fingerprint, run_or_load, save_safetensors_atomic, weights_fingerprint
from fcr.eval.stats import bootstrap_ci, mean_ci_over_seeds
from fcr.experiments.sweep import (
    FD_COLUMN,
    architecture_name,
    load_side_file,
    prior_noise_for,
    reference_features,
    score_images,
)
from fcr.settings import data
from fcr.settings.generate import PromptSet, embedded_prompt_set, initial_noise, sampling_scheduler
from fcr.settings.models import (
    ModelNotFoundError,
    load_unet_folder,
    model_training_params,
    noise_scheduler_for,
    resolve_device,
    resolve_unet_dir,
)

__all__ = [
    "CLASSIFIER_SIZE",
    "CRITERION_METRICS",
    "DROP_METRICS",
    "METRIC_DIRECTIONS",
    "OOD_FILES",
    "SD_OOD_FILES",
    "STRESSES",
    "Stress",
    "adversarial_noise",
    "attack_stride",
    "cache_error",
    "criterion_table",
    "drop_table",
    "generate_sd_stressed",
    "generate_stressed",
    "load_ood_prompts",
    "load_sd_prompt_list",
    "load_stress_samples",
    "model_origins",
    "ood_prompt_set",
    "ood_text_states",
    "per_seed_drops",
    "perturbed_scheduler",
    "plot_drops",
    "robustness_configurations",
    "robustness_table",
    "run_robustness",
    "sample_stressed",
    "schedule_seed",
    "stress_definitions",
    "stress_sample_grid",
    "stress_table",
    "to_classifier_size",
]

STRESSES: tuple[str, ...] = (
    "none",
    "heldout_prompts",
    "ood_prompts",
    "high_resolution",
    "perturbed_schedule",
    "adversarial_noise",
)
CLASSIFIER_SIZE = 32  # the embedded classifier's input side
OOD_FILES: dict[str, str] = {"paraphrase": "fashion_paraphrases.tsv", "compositional": "fashion_compositional.tsv"}
SD_OOD_FILES: dict[str, str] = {"abstract": "sd_abstract.txt", "medical": "sd_medical.txt"}
# +1: higher is worse (distances); -1: higher is better. A drop is positive when quality got worse.
METRIC_DIRECTIONS: dict[str, int] = {
    FD_COLUMN: 1,
    f"kid_{DEFAULT_EXTRACTOR_NAME}": 1,
    f"precision_{DEFAULT_EXTRACTOR_NAME}": -1,
    f"recall_{DEFAULT_EXTRACTOR_NAME}": -1,
    "class_accuracy": -1,
    "class_prob": -1,
    "fid": 1,
    "clip_score": -1,
}
DROP_METRICS: dict[str, tuple[str, ...]] = {
    "embedded": (FD_COLUMN, "class_accuracy", "class_prob", f"kid_{DEFAULT_EXTRACTOR_NAME}"),
    "sd": ("fid", "clip_score"),
}
CRITERION_METRICS: dict[str, tuple[str, ...]] = {"embedded": (FD_COLUMN, "class_accuracy"), "sd": ("fid", "clip_score")}
ATTACK_CHUNK = 8  # images per adversarial-attack chunk (memory of the backward pass; images are independent)
ATTACK_STEP_FACTOR = 2.5  # PGD step size = ATTACK_STEP_FACTOR * epsilon / steps


# ----------------------------------------------------------------------------- stresses


@dataclass(frozen=True)
class Stress:
    """One stress condition: which prompts, which image side (None = the model's own), the std of
    the schedule perturbation (None = nominal schedule) and whether z_T is attacked."""

    name: str
    prompts: str = "train"  # train | heldout | ood
    resolution: int | None = None
    schedule_noise_std: float | None = None
    adversarial: bool = False


def stress_definitions(params: Mapping[str, Any]) -> dict[str, Stress]:
    """The stresses named in ``params["stresses"]`` (order kept), with their parameters."""
    out: dict[str, Stress] = {}
    for name in params["stresses"]:
        if name not in STRESSES:
            raise ConfigError(f"parameter 'stresses': unknown stress {name!r}; allowed: {list(STRESSES)}")
        if name == "heldout_prompts" and params["setting"] == "sd":
            raise ConfigError(
                "parameter 'stresses': 'heldout_prompts' is defined for the embedded setting only (held-out caption "
                "templates); Stable Diffusion has no training templates: remove it (use 'ood_prompts')"
            )
        out[name] = {
            "none": Stress("none"),
            "heldout_prompts": Stress(name, prompts="heldout"),
            "ood_prompts": Stress(name, prompts="ood"),
            "high_resolution": Stress(name, resolution=int(params["stress_resolution"])),
            "perturbed_schedule": Stress(name, schedule_noise_std=float(params["schedule_noise_std"])),
            "adversarial_noise": Stress(name, adversarial=True),
        }[name]
    return out


def robustness_configurations(params: Mapping[str, Any]) -> list[SamplingConfig]:
    """``full`` (stride 1) and ``FD-s`` (uniform key steps) for each of ``robustness_strides``."""
    return sweep_configurations(
        params["robustness_strides"], params["num_inference_steps"], params["scheduler"],
        include_50ls=False, dpm_reference_steps=0,
    )


def attack_stride(config: SamplingConfig, strides: Sequence[int]) -> int:
    """Key interval the adversarial attack targets: the configuration's own stride, or for plain
    sampling (stride 1, no cache) the largest of ``strides``, so the ``full`` row measures how the
    same attacked z_T affects the uncached sampler."""
    stride = config.stride if config.stride is not None else 1
    if stride > 1:
        return int(stride)
    largest = max(int(s) for s in strides)
    if largest < 2:
        raise ConfigError(
            "parameter 'robustness_strides': the 'adversarial_noise' stress attacks the cache error of a key "
            f"interval and needs a stride > 1 in robustness_strides; got {list(strides)}"
        )
    return largest


# ----------------------------------------------------------------------------- perturbed schedule


def schedule_seed(seed: int, batch_index: int) -> int:
    """Seed of the schedule perturbation of image batch ``batch_index`` for run seed ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(batch_index), 0x5C4ED]).generate_state(1)[0])


def perturbed_scheduler(scheduler: Any, std: float, seed: int) -> Any:
    """A fresh copy of ``scheduler`` whose noise levels are perturbed multiplicatively.

    With ``sigma_t = sqrt((1 - abar_t) / abar_t)`` for every training timestep ``t``, the copy's
    table is ``abar'_t = 1 / (1 + (sigma_t (1 + eps_t))^2)``, ``eps_t ~ N(0, std^2)`` independent per
    ``t`` (float64 generator seeded by ``seed``), computed as ``abar / (abar + (1 - abar)(1 + eps)^2)``
    in float64 so ``std = 0`` reproduces the table bit for bit. Each sampling step visits its own
    timesteps, so each step's noise level gets its own eps. Every supported solver reads the table:
    DDIM's ``step`` looks up ``alphas_cumprod[t]`` and ``[t_prev]`` (the last step's
    ``final_alpha_cumprod``, ``abar_0`` unless ``set_alpha_to_one``, is perturbed with ``eps_0``);
    DPM-Solver++ and Euler build their ``sigmas`` from it in ``set_timesteps`` (which
    :func:`fcr.core.sampler.sample` calls after this); Euler's default ``linspace`` timesteps are
    fractional, so its step sigma interpolates linearly between two perturbed table entries. The
    timesteps, and so what the UNet is told, stay nominal (DPM-Solver++'s ``lambda_t``, used only
    to place timesteps, is left nominal too).
    """
    if std < 0:
        raise ValueError(f"schedule noise std must be >= 0; got {std}")
    fresh = type(scheduler).from_config(scheduler.config)
    table = fresh.alphas_cumprod
    abar = table.detach().cpu().double()
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(abar.shape, generator=gen, dtype=torch.float64) * float(std)
    perturbed = abar / (abar + (1 - abar) * (1 + eps) ** 2)
    fresh.alphas_cumprod = perturbed.to(dtype=table.dtype, device=table.device)
    if hasattr(fresh, "final_alpha_cumprod") and not fresh.config.get("set_alpha_to_one", False):
        fresh.final_alpha_cumprod = fresh.alphas_cumprod[0]
    if hasattr(fresh, "_get_variance"):
        # DDIM's step variance (beta_prev / beta_t)(1 - abar_t / abar_prev) is negative wherever the
        # perturbed noise level rises from one step to the next (adjacent high-noise steps differ by
        # less than the perturbation); DDIM multiplies its square root by eta, and 0 * sqrt(-v) is NaN.
        # Clamping at 0 is exact for eta = 0 and adds no noise on a rising step for eta > 0.
        nominal_variance = fresh._get_variance

        def _variance(timestep: Any, prev_timestep: Any) -> torch.Tensor:
            return torch.clamp(torch.as_tensor(nominal_variance(timestep, prev_timestep)), min=0.0)

        fresh._get_variance = _variance
    return fresh


# ----------------------------------------------------------------------------- adversarial noise


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients inside (the attack differentiates with respect to the input only)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _context(cond: torch.Tensor, uncond: torch.Tensor | None, batch: int, guidance_scale: float) -> torch.Tensor:
    cond = cond if cond.shape[0] == batch else cond.expand(batch, *cond.shape[1:])
    if uncond is None or guidance_scale <= 1:
        return cond
    uncond = uncond if uncond.shape[0] == batch else uncond.expand(batch, *uncond.shape[1:])
    return torch.cat([uncond, cond])


def cache_error(
    unet: torch.nn.Module,
    make_scheduler: Callable[[], Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    stride: int,
) -> torch.Tensor:
    """Per-image cache error ``(B,)`` of the first key interval, differentiable in ``noise``.

    Along the plain-sampling trajectory from ``noise`` (z_T), steps ``i = 1 .. stride-1``: the mean
    over elements of ``(cached_i - full_i)^2``, averaged over those steps, where ``full_i`` is the
    whole UNet's (guided) prediction on the trajectory's latent at step ``i`` and ``cached_i`` the
    decoder's prediction at step ``i`` from the encoder features of step 0 (what encoder caching
    with key steps ``0, stride, ...`` uses). Step 0 is a key step (error zero); the full-UNet
    prediction there is ``decode(encode(.))``, the same function.
    """
    if stride < 2:
        raise ValueError(f"the cache error needs a key interval of at least 2 steps; got stride {stride}")
    batch = noise.shape[0]
    do_cfg = uncond is not None and guidance_scale > 1
    context = _context(cond, uncond, batch, guidance_scale)

    def guide(pred: torch.Tensor) -> torch.Tensor:
        if not do_cfg:
            return pred
        u, c = pred.chunk(2)
        return u + guidance_scale * (c - u)

    scheduler = make_scheduler()
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    timesteps = scheduler.timesteps
    latents = noise * scheduler.init_noise_sigma
    last = min(stride, num_inference_steps)
    error = noise.new_zeros(batch)
    features = None
    for i in range(last):
        t = timesteps[i]
        x = torch.cat([latents, latents]) if do_cfg else latents
        x = scheduler.scale_model_input(x, t)
        if i == 0:
            features = encode(unet, x, t, context)
            full = guide(decode(unet, features, t, context))
        else:
            full = guide(unet(x, t, context).sample)
            cached = guide(decode(unet, features, t, context))
            error = error + (cached - full).pow(2).flatten(1).mean(dim=1)
        if i < last - 1:
            latents = scheduler.step(full, t, latents, return_dict=False)[0]
    return error / max(last - 1, 1)


def adversarial_noise(
    unet: torch.nn.Module,
    make_scheduler: Callable[[], Any],
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    stride: int,
    epsilon: float,
    steps: int,
    chunk_size: int = ATTACK_CHUNK,
) -> tuple[torch.Tensor, dict[str, float]]:
    """z_T + delta with ``|delta|_inf <= epsilon`` maximising :func:`cache_error` (projected signed
    gradient ascent, PGD): ``delta_0 = 0``; ``steps`` times ``delta <- clip(delta + a sign(grad),
    -epsilon, epsilon)`` with step size ``a = 2.5 epsilon / steps`` (one step: ``a`` is clipped to
    ``epsilon``, i.e. FGSM). ``epsilon`` is in units of the noise std (z_T has unit variance).
    The last iterate is returned. Images are attacked in chunks of ``chunk_size`` (each image's
    objective depends on its own z_T only). Returns the perturbed noise and the mean cache error
    before and after the attack (``attack_error_clean``, ``attack_error_attacked``).
    """
    if epsilon < 0 or steps < 1:
        raise ValueError(f"need epsilon >= 0 and steps >= 1; got {epsilon}, {steps}")
    step_size = ATTACK_STEP_FACTOR * float(epsilon) / steps
    kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, stride=stride)
    out, clean, attacked = [], [], []
    with _frozen(unet):
        for start in range(0, noise.shape[0], chunk_size):
            z = noise[start : start + chunk_size]
            c = cond[start : start + chunk_size] if cond.shape[0] == noise.shape[0] else cond
            u = None
            if uncond is not None:
                u = uncond[start : start + chunk_size] if uncond.shape[0] == noise.shape[0] else uncond
            delta = torch.zeros_like(z)
            for k in range(steps):
                x = (z + delta).detach().requires_grad_(True)
                with torch.enable_grad():
                    err = cache_error(unet, make_scheduler, x, c, u, **kwargs)
                    (grad,) = torch.autograd.grad(err.sum(), x)
                if k == 0:
                    clean.append(err.detach())
                delta = (delta + step_size * grad.sign()).clamp(-epsilon, epsilon)
            with torch.no_grad():
                attacked.append(cache_error(unet, make_scheduler, z + delta, c, u, **kwargs))
            out.append((z + delta).detach())
    info = {
        "attack_error_clean": float(torch.cat(clean).mean()),
        "attack_error_attacked": float(torch.cat(attacked).mean()),
    }
    return torch.cat(out), info


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


# ----------------------------------------------------------------------------- OOD prompts


def _prompt_list_text(name: str) -> str:
    return resources.files("fcr").joinpath("prompt_lists", name).read_text(encoding="utf-8")


def _parse_label(field: str, where: str) -> int:
    field = field.strip()
    if field.isdigit():
        label = int(field)
        if not 0 <= label < len(data.FASHION_MNIST_CLASSES):
            raise ValueError(f"{where}: label index {label} outside 0..{len(data.FASHION_MNIST_CLASSES) - 1}")
        return label
    names = {c.lower(): i for i, c in enumerate(data.FASHION_MNIST_CLASSES)}
    if field.lower() not in names:
        raise ValueError(f"{where}: unknown class {field!r}; allowed: {list(data.FASHION_MNIST_CLASSES)}")
    return names[field.lower()]


def load_ood_prompts() -> pd.DataFrame:
    """The embedded model's out-of-distribution prompts: columns ``label`` (class index),
    ``class_name``, ``kind`` (``paraphrase`` / ``compositional``) and ``prompt``, from the TSV
    files of :data:`OOD_FILES` (``class name or index <TAB> prompt``; ``#`` starts a comment)."""
    rows = []
    for kind, name in OOD_FILES.items():
        for n, line in enumerate(_prompt_list_text(name).splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip():
                raise ValueError(f"{name}:{n}: expected 'class<TAB>prompt', got {line!r}")
            label = _parse_label(parts[0], f"{name}:{n}")
            rows.append({"label": label, "class_name": data.FASHION_MNIST_CLASSES[label], "kind": kind,
                         "prompt": " ".join(parts[1].split())})
    table = pd.DataFrame(rows)
    dupes = table["prompt"][table["prompt"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"duplicated OOD prompts: {dupes}")
    return table


def load_sd_prompt_list(kind: str) -> list[str]:
    """Unlabelled SD out-of-distribution prompts of ``kind`` (``abstract`` / ``medical``), one a line."""
    if kind not in SD_OOD_FILES:
        raise ValueError(f"unknown SD prompt list {kind!r}; allowed: {sorted(SD_OOD_FILES)}")
    lines = _prompt_list_text(SD_OOD_FILES[kind]).splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _prompt_files_digest(files: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files.values()):
        h.update(_prompt_list_text(name).encode())
    return h.hexdigest()[:16]


def ood_text_states(
    prompts: Sequence[str], cache_path: str | Path, max_length: int, encoder: Any = None
) -> dict[str, torch.Tensor]:
    """MiniLM token states of ``prompts`` and of the empty prompt, cached in ``cache_path``
    (:func:`fcr.settings.text.build_text_state_cache`; a cache lacking a prompt is rebuilt)."""
    from fcr.settings.text import MINILM_NAME, TextEncoder, build_text_state_cache, load_text_state_cache

    wanted = list(dict.fromkeys([*prompts, ""]))
    path = Path(cache_path)
    if path.is_file():
        try:
            return load_text_state_cache(path, wanted, max_length=max_length, encoder_name=MINILM_NAME)
        except ValueError:
            pass  # other prompts, length or encoder: rebuilt below
    encoder = encoder or TextEncoder.from_minilm()
    return build_text_state_cache(wanted, encoder, path, max_length=max_length, overwrite=True)


def ood_prompt_set(
    table: pd.DataFrame, states: Mapping[str, torch.Tensor], n: int, seed: int
) -> tuple[PromptSet, list[str]]:
    """``n`` class-balanced OOD prompts (labels cycle 0..9 as in
    :func:`fcr.settings.generate.embedded_prompt_set`), image ``i`` taking a seeded choice among its
    class's prompts; returns the prompt set (noise seed ``seed``) and each image's prompt kind."""
    labels = np.arange(n, dtype=np.int64) % len(data.FASHION_MNIST_CLASSES)
    rng = np.random.default_rng([int(seed), 11])
    by_class = {label: group.reset_index(drop=True) for label, group in table.groupby("label")}
    missing = sorted(set(labels.tolist()) - set(by_class))
    if missing:
        raise ValueError(f"no OOD prompts for classes {missing}")
    picks = [by_class[int(label)].iloc[int(rng.integers(len(by_class[int(label)])))] for label in labels]
    texts = [row["prompt"] for row in picks]
    prompt_set = PromptSet(
        labels=labels, texts=texts, states=torch.stack([states[t] for t in texts]), empty_state=states[""], seed=seed
    )
    return prompt_set, [row["kind"] for row in picks]


# ----------------------------------------------------------------------------- scoring


def to_classifier_size(images: torch.Tensor, size: int = CLASSIFIER_SIZE) -> torch.Tensor:
    """Images at the classifier's side: unchanged at ``size``, else average-pooled to it
    (``adaptive_avg_pool2d``: exact block means when the side is a multiple of ``size``)."""
    if images.shape[-2:] == (size, size):
        return images
    if min(images.shape[-2:]) < size:
        raise ValueError(f"images of side {tuple(images.shape[-2:])} are smaller than the classifier's {size}")
    return F.adaptive_avg_pool2d(images, size)


# ----------------------------------------------------------------------------- the run


def _stem(model: str, config: str, stress: str, seed: int) -> str:
    return f"{model.replace('/', '_')}__{config}__{stress}__seed{seed}"


def _stress_key(stress: Stress, params: Mapping[str, Any], attack: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parameters that shape a stress's result (only its own, so changing e.g. the attack
    budget leaves the other stresses' results valid)."""
    key: dict[str, Any] = {"stress": stress.name, "prompt_templates": stress.prompts}
    if stress.resolution is not None:
        key["stress_resolution"] = stress.resolution
    if stress.schedule_noise_std is not None:
        # One perturbation per image batch: the batch size shapes the result.
        key.update(schedule_noise_std=stress.schedule_noise_std, eval_batch_size=params["eval_batch_size"])
    if stress.adversarial and attack is not None:
        key.update(adversarial_epsilon=attack["epsilon"], adversarial_steps=attack["steps"],
                   attack_stride=attack["stride"], attack_step_factor=ATTACK_STEP_FACTOR)
    if stress.prompts == "ood":
        files = SD_OOD_FILES if params["setting"] == "sd" else OOD_FILES
        key["ood_prompt_files"] = _prompt_files_digest(files)
    return key


def _model_meta(source: str) -> dict[str, Any]:
    """``original_model`` (the model it was fine-tuned from) and ``lambda_fcr`` of a run folder's
    params.yaml (None for models without one)."""
    try:
        trained = model_training_params(resolve_unet_dir(source)) or {}
    except ModelNotFoundError:
        trained = {}
    return {"original_model": trained.get("model"), "lambda_fcr": trained.get("lambda_fcr")}


def model_origins(models: Mapping[str, str]) -> dict[str, str]:
    """{label: label of the model it was fine-tuned from} for models whose origin
    (``model_training_params(...)["model"]``) is itself one of ``models``: the same source string
    (e.g. an SD hub id) or the same resolved UNet folder (so ``base`` and ``models/base`` match)."""
    resolved: dict[str, Path] = {}
    for label, source in models.items():
        with contextlib.suppress(ModelNotFoundError):
            resolved[label] = resolve_unet_dir(source)
    out: dict[str, str] = {}
    for label, folder in resolved.items():
        origin = (model_training_params(folder) or {}).get("model")
        if not origin or origin == "scratch":
            continue
        origin_dir = None
        with contextlib.suppress(ModelNotFoundError):
            origin_dir = resolve_unet_dir(str(origin))
        for other, source in models.items():
            same_dir = origin_dir is not None and resolved.get(other) == origin_dir
            if other != label and (str(source) == str(origin) or same_dir):
                out[label] = other
                break
    return out


def run_robustness(
    params: Mapping[str, Any],
    models: Mapping[str, str],
    out_dir: str | Path,
    progress: bool = True,
    *,
    reference_n: int | None = None,
) -> pd.DataFrame:
    """Every model x configuration x stress x seed of validated ``params``; ``models`` maps labels
    to model names or run folders. One row per result (key columns, metrics, ``model_source``,
    ``original_model``, ``lambda_fcr``); results live in ``out_dir/results`` (JSON, plus a
    safetensors side file of images and per-image scores). ``reference_n`` limits the real
    reference images (tests only)."""
    if params["setting"] == "sd":
        return _run_robustness_sd(params, models, out_dir, progress)

    from fcr.eval.classifier import load_classifier
    from fcr.eval.profiling import environment_info

    out_dir = Path(out_dir)
    stresses = stress_definitions(params)
    configs = robustness_configurations(params)
    attacks = {c.name: attack_stride(c, params["robustness_strides"]) for c in configs} if any(
        s.adversarial for s in stresses.values()) else {}
    unet_dirs = {label: resolve_unet_dir(source) for label, source in models.items()}
    text_states = Path(params["data_dir"]) / "text_states.safetensors"
    if not text_states.is_file():
        raise FileNotFoundError(f"{text_states} not found: prepare the data with notebooks/01_data_prep.ipynb")
    manifest = Path(params["data_dir"]) / "manifest.json"
    if manifest.is_file() and "ood_prompts" in stresses:
        # OOD states must have the token length the training states (and the models) have.
        prepared = json.loads(manifest.read_text()).get("max_text_length", params["max_text_length"])
        if prepared != params["max_text_length"]:
            raise ConfigError(f"parameter 'max_text_length': {params['max_text_length']} but {params['data_dir']} "
                              f"was prepared with {prepared}")
    device = resolve_device(params.get("device"))
    classifier = load_classifier(map_location=device)
    loaded = {}
    for label, folder in unet_dirs.items():
        unet = load_unet_folder(folder, label).eval()
        res = stresses.get("high_resolution")
        if res is not None and res.resolution <= unet.config.sample_size:
            raise ConfigError(
                f"parameter 'stress_resolution': {res.resolution} is not above {label!r}'s training size "
                f"{unet.config.sample_size}"
            )
        loaded[label] = (unet, *noise_scheduler_for(folder, params), weights_fingerprint(folder))
    arches = {label: architecture_name(item[0]) for label, item in loaded.items()}
    ref_feats = reference_features(
        classifier, out_dir / "reference" / f"fashion_mnist_test_features_n{reference_n or 'all'}.safetensors",
        n=reference_n,
    )
    ood_table = ood_states = None
    if "ood_prompts" in stresses:
        ood_table = load_ood_prompts()
        ood_states = ood_text_states(ood_table["prompt"].tolist(), out_dir / "text_states_ood.safetensors",
                                     max_length=params["max_text_length"])
    classifier_id = module_fingerprint(classifier)
    meta = {label: _model_meta(source) for label, source in models.items()}
    common = {
        "setting": "embedded", "guidance_scale": params["guidance_scale"],
        "parallel_decoding": params["parallel_decoding"], "prior_noise_alpha": params["prior_noise_alpha"],
        "prior_noise_threshold": params["prior_noise_threshold"], "classifier": classifier_id,
        "n_reference": int(ref_feats.shape[0]), "n_bootstrap": params["n_bootstrap"],
        "num_robustness_images": params["num_robustness_images"],
    }
    rows = []
    n = params["num_robustness_images"]
    # The attack on z_T ignores the key steps: `full` reuses the largest stride's attack (same
    # model, prompts, noise and seed) instead of recomputing it.
    attack_caches: dict[tuple[int, str], dict] = {}
    for seed in params["seeds"]:
        attack_caches.clear()  # one seed's attacks at a time (memory)
        prompt_sets: dict[str, tuple[PromptSet, list[str] | None]] = {}
        for kind in {s.prompts for s in stresses.values()}:
            if kind == "ood":
                prompt_sets[kind] = ood_prompt_set(ood_table, ood_states, n, seed)
            else:
                prompt_sets[kind] = (embedded_prompt_set(params["data_dir"], n, seed, templates=kind), None)
        for label, (unet, noise_scheduler, schedule, weights_id) in loaded.items():
            for config in configs:
                prior = prior_noise_for(params, config)
                for stress in stresses.values():
                    prompts, kinds = prompt_sets[stress.prompts]
                    attack = None
                    if stress.adversarial:
                        attack = {"stride": attacks[config.name], "epsilon": params["adversarial_epsilon"],
                                  "steps": params["adversarial_steps"]}
                    stem = _stem(label, config.name, stress.name, seed)
                    key = {
                        **common, **config.as_dict(), **schedule, **_stress_key(stress, params, attack),
                        "model": label, "model_source": str(models[label]), "weights": weights_id,
                        "config": config.name, "seed": seed, "prior_noise": prior.enabled,
                    }

                    def compute(unet=unet, noise_scheduler=noise_scheduler, config=config, prior=prior,
                                stress=stress, prompts=prompts, kinds=kinds, attack=attack, stem=stem, seed=seed,
                                label=label):
                        start = time.perf_counter()
                        images, stats = generate_stressed(
                            unet, noise_scheduler, prompts, config, stress,
                            guidance_scale=params["guidance_scale"], parallel=params["parallel_decoding"],
                            prior_noise=prior, batch_size=params["eval_batch_size"], attack=attack,
                            attack_cache=attack_caches.setdefault((seed, label), {}), device=device,
                            progress=progress,
                        )
                        sampling_s = time.perf_counter() - start
                        # Images larger than the classifier's input are pooled to 32x32 first.
                        metrics, per_image = score_images(to_classifier_size(images), prompts.labels, classifier,
                                                          ref_feats, n_boot=params["n_bootstrap"], seed=seed)
                        result = {**metrics, "sampling_s": sampling_s, "image_size": int(images.shape[-1]),
                                  **{k: v for k, v in stats.items() if not isinstance(v, list)}}
                        if kinds is not None:  # accuracy per OOD prompt kind (nan: no image of that kind)
                            correct = per_image["correct"].numpy()
                            for kind in OOD_FILES:
                                mask = np.array([k == kind for k in kinds])
                                acc = float(correct[mask].mean()) if mask.any() else math.nan
                                result[f"class_accuracy_{kind}"] = acc
                        images_u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                        save_safetensors_atomic(
                            {"images": images_u8, "labels": torch.as_tensor(prompts.labels), **per_image},
                            out_dir / "results" / f"{stem}.safetensors",
                            {"model": label, "config": config.name, "stress": stress.name, "seed": str(seed),
                             "prompts": json.dumps(prompts.texts)},
                        )
                        return result

                    result, computed = run_or_load(
                        out_dir / "results" / f"{stem}.json", key, compute, environment_info(device)
                    )
                    if progress:
                        print(f"robustness {stem}: {'computed' if computed else 'loaded'}", flush=True)
                    rows.append({**key, **result, **meta[label], "architecture": arches[label]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- Stable Diffusion


def _sd_prompts(params: Mapping[str, Any], kind: str, n: int, seed: int) -> tuple[list[str], list[str] | None]:
    """The evaluation prompts (``eval_prompts``, e.g. COCO captions) for every stress but ``ood_prompts``, which alternates the
    abstract and medical lists (seeded choice within each)."""
    if kind == "ood":
        lists = {name: load_sd_prompt_list(name) for name in SD_OOD_FILES}
        kinds = [list(lists)[i % len(lists)] for i in range(n)]
        rng = np.random.default_rng([int(seed), 13])
        return [lists[k][int(rng.integers(len(lists[k])))] for k in kinds], kinds
    from fcr.settings.sd_params import sd_eval_prompts

    return sd_eval_prompts(params, n, seed), None


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


def _run_robustness_sd(
    params: Mapping[str, Any], models: Mapping[str, str], out_dir: str | Path, progress: bool
) -> pd.DataFrame:
    """The SD robustness run (GPU machine): FID (clean-fid, against ``fid_reference``; COCO-prompt
    stresses only, as the OOD lists have no reference images) and CLIPScore per result. Not
    exercised with real weights here."""
    from fcr.eval.metrics import clip_score, load_clip, sd_fid
    from fcr.eval.profiling import environment_info
    from fcr.settings.sd import decode_latents, load_sd_components
    from fcr.settings.sd_params import sd_fid_reference

    out_dir = Path(out_dir)
    stresses = stress_definitions(params)
    configs = robustness_configurations(params)
    if not params["fid_reference"]:
        raise ConfigError("parameter 'fid_reference': give a clean-fid statistics name or a folder of reference images")
    attacks = {c.name: attack_stride(c, params["robustness_strides"]) for c in configs} if any(
        s.adversarial for s in stresses.values()) else {}
    device = resolve_device(params.get("device"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    components = {label: load_sd_components(source, device=device, dtype=dtype, revision=params["revision"] or None,
                                            variant=params["variant"] or None) for label, source in models.items()}
    ref_kw = sd_fid_reference(params)
    clip_model = load_clip(params["clip_model"], params["clip_pretrained"] or None, device)
    n = params["num_robustness_images"]
    rows = []
    for seed in params["seeds"]:
        prompt_sets = {kind: _sd_prompts(params, kind, n, seed) for kind in {s.prompts for s in stresses.values()}}
        for label, parts in components.items():
            native = parts.unet.config.sample_size * parts.vae_scale_factor
            res = stresses.get("high_resolution")
            if res is not None and res.resolution <= native:
                raise ConfigError(f"parameter 'stress_resolution': {res.resolution} is not above {label!r}'s {native}")
            for config in configs:
                prior = prior_noise_for(params, config)
                for stress in stresses.values():
                    prompts, kinds = prompt_sets[stress.prompts]
                    attack = None
                    if stress.adversarial:
                        attack = {"stride": attacks[config.name], "epsilon": params["adversarial_epsilon"],
                                  "steps": params["adversarial_steps"]}
                    stem = _stem(label, config.name, stress.name, seed)
                    key = {
                        "setting": "sd", **config.as_dict(), **_stress_key(stress, params, attack),
                        "model": label, "model_source": str(models[label]), "config": config.name, "seed": seed,
                        "num_robustness_images": n, "guidance_scale": params["guidance_scale"],
                        "parallel_decoding": params["parallel_decoding"], "prior_noise": prior.enabled,
                        "prior_noise_alpha": prior.alpha, "prior_noise_threshold": prior.threshold,
                        "fid_reference": params["fid_reference"], "n_bootstrap": params["n_bootstrap"],
                    }

                    def compute(parts=parts, config=config, prior=prior, stress=stress, prompts=prompts,
                                kinds=kinds, attack=attack, stem=stem, seed=seed):
                        start = time.perf_counter()
                        latents, stats = generate_sd_stressed(
                            parts, prompts, config, stress, guidance_scale=params["guidance_scale"],
                            parallel=params["parallel_decoding"], prior_noise=prior,
                            batch_size=params["eval_batch_size"], seed=seed, attack=attack,
                        )
                        images = []
                        for i in range(0, latents.shape[0], params["eval_batch_size"]):
                            images += decode_latents(parts.vae, latents[i : i + params["eval_batch_size"]])
                        sampling_s = time.perf_counter() - start
                        folder = out_dir / "images" / stem
                        folder.mkdir(parents=True, exist_ok=True)
                        for i, image in enumerate(images):
                            image.save(folder / f"{i:06d}.png")
                        clip = clip_score(images, prompts, device=device, clip=clip_model)
                        est, lo, hi = bootstrap_ci(clip, n_boot=params["n_bootstrap"], seed=seed)
                        result = {"clip_score": est, "clip_score_lo": lo, "clip_score_hi": hi,
                                  "fid": sd_fid(folder, device=device, **ref_kw) if kinds is None else math.nan,
                                  "sampling_s": sampling_s, "images": str(folder),
                                  **{k: v for k, v in stats.items() if not isinstance(v, list)}}
                        if kinds is not None:  # per prompt list (the lists alternate, so both are present)
                            for kind in SD_OOD_FILES:
                                mine = [c for c, k in zip(clip, kinds) if k == kind]
                                result[f"clip_score_{kind}"] = float(np.mean(mine))
                        save_safetensors_atomic({"clip_score": torch.from_numpy(clip)},
                                                 out_dir / "results" / f"{stem}.safetensors",
                                                 {"model": label, "config": config.name, "stress": stress.name,
                                                  "seed": str(seed), "prompts": json.dumps(list(prompts))})
                        return result

                    result, computed = run_or_load(
                        out_dir / "results" / f"{stem}.json", key, compute, environment_info(device)
                    )
                    if progress:
                        print(f"robustness {stem}: {'computed' if computed else 'loaded'}", flush=True)
                    rows.append({**key, **result, **_model_meta(str(models[label]))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- tables

ID_COLUMNS: tuple[str, ...] = (
    "model", "model_source", "original_model", "lambda_fcr", "config", "stride", "stress", "seed",
)


def robustness_table(results: pd.DataFrame) -> pd.DataFrame:
    """The result rows with the identifying columns first (``model, model_source, original_model,
    lambda_fcr, config, stride, stress, seed``), then quality metrics and their ``_lo``/``_hi``
    bootstrap bounds, then everything else."""
    front = [c for c in ID_COLUMNS if c in results.columns]
    metrics = []
    for m in METRIC_DIRECTIONS:
        metrics += [c for c in (m, f"{m}_lo", f"{m}_hi") if c in results.columns]
    rest = [c for c in results.columns if c not in front and c not in metrics]
    return results[front + metrics + rest]


def per_seed_drops(results: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per model x config x stress (other than ``none``) x seed x metric: the stressed and
    unstressed (``none``, same model, config and seed) values and ``drop``: ``stressed -
    unstressed`` for metrics where higher is worse (FD), ``unstressed - stressed`` where higher is
    better (accuracy), so a positive drop always means worse under stress. Metrics missing from
    ``results`` or nan in a row are skipped."""
    if "none" not in set(results["stress"]):
        raise ValueError("drops need the unstressed reference: add 'none' to stresses")
    keys = ["model", "config", "seed"]
    base = results[results["stress"] == "none"].set_index(keys)
    if base.index.duplicated().any():
        raise ValueError("more than one 'none' row per model x config x seed")
    rows = []
    for _, row in results[results["stress"] != "none"].iterrows():
        ref_key = tuple(row[k] for k in keys)
        if ref_key not in base.index:
            raise ValueError(f"no 'none' row for model {row['model']!r}, config {row['config']!r}, seed {row['seed']}")
        ref = base.loc[ref_key]
        for metric in metrics:
            if metric not in results.columns:
                continue
            if metric not in METRIC_DIRECTIONS:
                raise ValueError(f"no direction known for metric {metric!r}; known: {sorted(METRIC_DIRECTIONS)}")
            stressed, unstressed = float(row[metric]), float(ref[metric])
            if math.isnan(stressed) or math.isnan(unstressed):
                continue
            rows.append({
                "model": row["model"], "lambda_fcr": row.get("lambda_fcr"), "config": row["config"],
                "stride": row.get("stride"), "stress": row["stress"], "seed": row["seed"], "metric": metric,
                "value_stressed": stressed, "value_unstressed": unstressed,
                "drop": METRIC_DIRECTIONS[metric] * (stressed - unstressed),
            })
    return pd.DataFrame(rows, columns=["model", "lambda_fcr", "config", "stride", "stress", "seed", "metric",
                                       "value_stressed", "value_unstressed", "drop"])


def drop_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per model x config x stress x metric: means over seeds of the stressed and unstressed
    values, the mean paired drop with its Student-t 95 % interval over seeds
    (:func:`fcr.eval.stats.mean_ci_over_seeds`; nan bounds with one seed) and the relative drop
    ``100 * drop / |mean unstressed|`` (nan when that is 0)."""
    rows = []
    for (model, config, stress, metric), g in per_seed.groupby(["model", "config", "stress", "metric"], sort=False):
        drop, lo, hi = mean_ci_over_seeds(g["drop"].to_numpy(dtype=float))
        unstressed = float(g["value_unstressed"].mean())
        rows.append({
            "model": model, "lambda_fcr": g["lambda_fcr"].iloc[0], "config": config, "stride": g["stride"].iloc[0],
            "stress": stress, "metric": metric,
            "n_seeds": len(g), "value_stressed": float(g["value_stressed"].mean()), "value_unstressed": unstressed,
            "drop": drop, "drop_lo": lo, "drop_hi": hi,
            "relative_drop_pct": 100.0 * drop / abs(unstressed) if unstressed != 0 else math.nan,
        })
    return pd.DataFrame(rows)


def criterion_table(
    per_seed: pd.DataFrame, origins: Mapping[str, str], metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """The seed's criterion, per fine-tuned model (``origins``: label -> label of its original
    model) x config x stress x metric: ``drop_fcr`` and ``drop_original`` (mean drops over seeds,
    t-intervals), ``diff = drop_fcr - drop_original`` over the seeds both have (paired by seed,
    t-interval) and ``passed = drop_fcr <= drop_original`` (point estimates: the quality drop
    under stress with FCR is no larger than the original model's)."""
    if metrics is not None:
        per_seed = per_seed[per_seed["metric"].isin(metrics)]
    cols = ["model", "lambda_fcr", "original_model", "config", "stride", "stress", "metric", "n_seeds", "drop_fcr",
            "drop_fcr_lo",
            "drop_fcr_hi", "drop_original", "drop_original_lo", "drop_original_hi", "diff", "diff_lo", "diff_hi",
            "passed"]
    rows = []
    for model, original in origins.items():
        mine = per_seed[per_seed["model"] == model]
        theirs = per_seed[per_seed["model"] == original]
        for (config, stress, metric), g in mine.groupby(["config", "stress", "metric"], sort=False):
            o = theirs[(theirs["config"] == config) & (theirs["stress"] == stress) & (theirs["metric"] == metric)]
            if o.empty:
                continue
            paired = g.merge(o, on="seed", suffixes=("_fcr", "_orig"))
            fcr = mean_ci_over_seeds(g["drop"].to_numpy(dtype=float))
            orig = mean_ci_over_seeds(o["drop"].to_numpy(dtype=float))
            diff = (mean_ci_over_seeds((paired["drop_fcr"] - paired["drop_orig"]).to_numpy(dtype=float))
                    if len(paired) else (math.nan,) * 3)
            rows.append({
                "model": model, "lambda_fcr": g["lambda_fcr"].iloc[0], "original_model": original, "config": config,
                "stride": g["stride"].iloc[0],
                "stress": stress, "metric": metric, "n_seeds": len(paired),
                "drop_fcr": fcr[0], "drop_fcr_lo": fcr[1], "drop_fcr_hi": fcr[2],
                "drop_original": orig[0], "drop_original_lo": orig[1], "drop_original_hi": orig[2],
                "diff": diff[0], "diff_lo": diff[1], "diff_hi": diff[2], "passed": bool(fcr[0] <= orig[0]),
            })
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- figures and samples


def plot_drops(drops: pd.DataFrame, metric: str, ylabel: str | None = None):
    """Mean drop per stress (bars, one colour per model) with the t-interval over seeds (lines;
    none with one seed), one panel per configuration. Positive = worse under stress."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from fcr.plots import interval_bars

    sub = drops[drops["metric"] == metric]
    configs = list(dict.fromkeys(sub["config"]))
    stresses = list(dict.fromkeys(sub["stress"]))
    models = list(dict.fromkeys(sub["model"]))
    panel_width = max(3.5, 0.5 * len(stresses) * max(len(models), 1) + 1.0)
    fig, axes = plt.subplots(1, max(len(configs), 1), figsize=(panel_width * max(len(configs), 1), 3.8),
                             squeeze=False, sharey=True)
    palette = dict(zip(models, sns.color_palette(n_colors=max(len(models), 1))))
    for ax, config in zip(axes.flat, configs):
        part = sub[sub["config"] == config]
        sns.barplot(data=part, x="stress", y="drop", hue="model", order=stresses, hue_order=models,
                    palette=palette, errorbar=None, ax=ax)
        for model, container in zip(models, ax.containers):
            rows = part[part["model"] == model].set_index("stress")
            xs, lo, hi = [], [], []
            for bar in container:  # a bar's centre lies within 0.5 of its category's position
                x = bar.get_x() + bar.get_width() / 2
                stress = stresses[int(round(x))]
                if stress in rows.index:
                    xs.append(x)
                    lo.append(rows.loc[stress, "drop_lo"])
                    hi.append(rows.loc[stress, "drop_hi"])
            if xs:
                interval_bars(ax, xs, lo, hi, "black")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_title(config)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[m]) for m in models]
    axes.flat[len(configs) - 1 if configs else 0].legend(handles, models, title="model", fontsize=8,
                                                          bbox_to_anchor=(1.02, 1), loc="upper left")
    axes.flat[0].set_ylabel(ylabel or f"drop in {metric} (positive = worse)")
    fig.tight_layout()
    return fig


def load_stress_samples(
    out_dir: str | Path, model: str, config: str, stresses: Sequence[str], seed: int, n: int = 10
) -> dict[str, torch.Tensor]:
    """The first ``n`` images (uint8, native side) of ``model`` x ``config`` under each stress."""
    folder = Path(out_dir) / "results"
    return {s: load_side_file(folder / f"{_stem(model, config, s, seed)}.safetensors")["images"][:n] for s in stresses}


def stress_sample_grid(samples: Mapping[str, torch.Tensor], titles: Sequence[str] | None = None):
    """Rows = stresses, columns = images; rows of another side (high resolution) are shown resized
    (nearest neighbour) to the largest side so every row has the same cell size."""
    from fcr.plots import config_sample_grid

    side = max(int(v.shape[-1]) for v in samples.values())
    resized = {k: v if v.shape[-1] == side else F.interpolate(v.float(), size=(side, side), mode="nearest").to(v.dtype)
               for k, v in samples.items()}
    return config_sample_grid(resized, titles=titles)


def stress_table(params: Mapping[str, Any]) -> pd.DataFrame:
    """The stresses of ``params`` and their parameters, for display."""
    return pd.DataFrame([asdict(s) for s in stress_definitions(params).values()])
