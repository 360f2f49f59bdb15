"""The stress conditions of notebook 04 (see :mod:`fcr.experiments.robustness`), the sampling
configurations they are applied to, and the perturbed noise schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fcr.config import ConfigError
from fcr.core.configurations import SamplingConfig, sweep_configurations
from fcr.options import Options

STRESSES: tuple[str, ...] = (
    "none",
    "heldout_prompts",
    "ood_prompts",
    "high_resolution",
    "perturbed_schedule",
    "adversarial_noise",
)


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


def stress_definitions(opts: Options) -> dict[str, Stress]:
    """The stresses named in ``opts.robustness.stresses`` (order kept), with their parameters."""
    out: dict[str, Stress] = {}
    for name in opts.robustness.stresses:
        if name not in STRESSES:
            raise ConfigError(f"parameter 'stresses': unknown stress {name!r}; allowed: {list(STRESSES)}")
        if name == "heldout_prompts" and opts.run.setting == "sd":
            raise ConfigError(
                "parameter 'stresses': 'heldout_prompts' is defined for the embedded setting only (held-out caption "
                "templates); Stable Diffusion has no training templates: remove it (use 'ood_prompts')"
            )
        out[name] = {
            "none": Stress("none"),
            "heldout_prompts": Stress(name, prompts="heldout"),
            "ood_prompts": Stress(name, prompts="ood"),
            "high_resolution": Stress(name, resolution=int(opts.robustness.stress_resolution)),
            "perturbed_schedule": Stress(name, schedule_noise_std=float(opts.robustness.schedule_noise_std)),
            "adversarial_noise": Stress(name, adversarial=True),
        }[name]
    return out


def robustness_configurations(opts: Options) -> list[SamplingConfig]:
    """``full`` (stride 1) and ``FD-s`` (uniform key steps) for each of ``robustness_strides``."""
    return sweep_configurations(
        opts.robustness.robustness_strides, opts.sampling.num_inference_steps, opts.sampling.scheduler,
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


def stress_table(opts: Options) -> pd.DataFrame:
    """The stresses of ``opts`` and their parameters, for display."""
    return pd.DataFrame([asdict(s) for s in stress_definitions(opts).values()])


def result_stem(model: str, config: str, stress: str, seed: int) -> str:
    return f"{model.replace('/', '_')}__{config}__{stress}__seed{seed}"
