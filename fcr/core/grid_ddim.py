"""DDIM on a teacher's grid: the sampler of a progressively distilled student.

Progressive distillation (Salimans & Ho, 2202.00512) trains a student whose one step replaces two
steps of its teacher. The student is sampled on every ``stride``-th point of the *teacher's* grid
(the original's DDIM grid of ``base_steps`` steps), never on DDIM's own grid at fewer steps:
diffusers' DDIM spaces ``n`` steps by ``num_train_timesteps // n``, and those grids do not nest
(1000 // 24 = 41 but 2 x (1000 // 48) = 40), so a student of a 48-step teacher sampled with plain
``DDIM-24`` would land between the points it was trained to reach.

:class:`GridDDIM` is a scheduler in diffusers' sense (``set_timesteps`` + ``step``, plus
``scale_model_input`` and ``init_noise_sigma``), deterministic (eta 0), on the training noise
schedule of a :class:`diffusers.DDIMScheduler`. With ``stride == 1`` it is that DDIM at
``base_steps`` steps (tests/test_distillation.py checks it equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

__all__ = ["GridDDIM", "check_halving", "ddim_grid", "landing_scales", "predicted_x0_eps"]


def ddim_grid(ddim: DDIMScheduler, base_steps: int) -> torch.Tensor:
    """The timesteps (noisiest first) of ``ddim`` at ``base_steps`` steps, without touching ``ddim``."""
    probe = DDIMScheduler.from_config(ddim.config)
    probe.set_timesteps(int(base_steps))
    return probe.timesteps.clone()


def check_halving(base_steps: int, rounds: int) -> list[int]:
    """The step counts of ``rounds`` halvings of ``base_steps`` (``[base, base/2, ...]``); a count that
    does not halve exactly raises ValueError naming it (a student step must be two teacher steps)."""
    if base_steps < 1 or rounds < 0:
        raise ValueError(f"base_steps must be >= 1 and rounds >= 0; got {base_steps}, {rounds}")
    counts = [int(base_steps)]
    for _ in range(rounds):
        if counts[-1] % 2:
            raise ValueError(f"{counts[-1]} steps do not halve: {base_steps} teacher steps allow "
                             f"{len(counts) - 1} halving round(s), not {rounds}")
        counts.append(counts[-1] // 2)
    return counts


@dataclass
class _Config:
    num_train_timesteps: int


class GridDDIM:
    """Deterministic DDIM on every ``stride``-th timestep of ``ddim``'s ``base_steps``-step grid.

    A step from grid point ``t`` goes to the next retained point, from the last one to the final
    alpha (``alphas_cumprod[0]``, or 1 with ``set_alpha_to_one``), as DDIM's last step does; so one
    step of stride ``2k`` spans exactly two steps of stride ``k``.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, ddim: DDIMScheduler, base_steps: int, stride: int = 1) -> None:
        if ddim.config.clip_sample or ddim.config.thresholding:
            raise ValueError("GridDDIM implements plain DDIM: clip_sample and thresholding must be off")
        if ddim.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"GridDDIM supports epsilon and v_prediction, got {ddim.config.prediction_type!r}")
        if stride < 1 or base_steps % stride:
            raise ValueError(f"stride must divide base_steps={base_steps}; got {stride}")
        self.base_steps, self.stride = int(base_steps), int(stride)
        self.prediction_type = str(ddim.config.prediction_type)
        self.config = _Config(int(ddim.config.num_train_timesteps))
        self.alphas_cumprod = ddim.alphas_cumprod.clone()
        self.final_alpha_cumprod = ddim.final_alpha_cumprod.clone()
        self.grid = ddim_grid(ddim, base_steps)[:: self.stride].clone()
        self.timesteps = self.grid.clone()
        self.num_inference_steps = len(self.grid)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Use the grid; ``num_inference_steps`` must be its length (``base_steps / stride``)."""
        if int(num_inference_steps) != len(self.grid):
            raise ValueError(f"this sampler has {len(self.grid)} steps (every {self.stride}th of "
                             f"{self.base_steps}); got num_inference_steps={num_inference_steps}")
        self.timesteps = self.grid.to(device) if device is not None else self.grid.clone()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def previous_alpha(self, timestep: int) -> torch.Tensor:
        """alpha-bar of the point a step from ``timestep`` lands on."""
        index = int((self.grid == int(timestep)).nonzero()[0, 0]) if (self.grid == int(timestep)).any() else None
        if index is None:
            raise ValueError(f"timestep {int(timestep)} is not on this sampler's grid")
        if index + 1 < len(self.grid):
            return self.alphas_cumprod[int(self.grid[index + 1])]
        return self.final_alpha_cumprod

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None, return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """One DDIM step (eta 0) from ``timestep`` to the next grid point."""
        if eta != 0:
            raise ValueError("GridDDIM is deterministic: eta must be 0")
        a_t = self.alphas_cumprod[int(timestep)].to(sample.device, torch.float32)
        a_prev = self.previous_alpha(int(timestep)).to(sample.device, torch.float32)
        x0, eps = predicted_x0_eps(model_output.float(), sample.float(), a_t, self.prediction_type)
        prev = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(sample.dtype)
        if not return_dict:
            return (prev, x0.to(sample.dtype))
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(sample.dtype))


def predicted_x0_eps(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) that a network ``output`` of ``prediction_type`` implies for ``sample`` at alpha-bar
    ``alpha_bar`` (a scalar or a per-sample tensor broadcast over the latent dimensions)."""
    while alpha_bar.ndim and alpha_bar.ndim < sample.ndim:
        alpha_bar = alpha_bar[..., None]
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * sample - s * output, a * output + s * sample
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def landing_scales(scheduler: Any, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per DDIM step ``j``: alpha-bar at its timestep, alpha-bar where its step lands (diffusers' DDIM:
    ``t - T/N``, the final alpha after the last step), and the weight ``(s_next - s_j)^2`` of
    ``step_weighted`` normalised to mean 1 (``s = sqrt((1 - alpha_bar) / alpha_bar)``)."""
    scheduler.set_timesteps(num_inference_steps)
    t = scheduler.timesteps.long()
    alphas = scheduler.alphas_cumprod.float()
    prev = t - scheduler.config.num_train_timesteps // num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    a_t = alphas[t]
    a_next = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    scale = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    weight = (scale(a_next) - scale(a_t)) ** 2
    return a_t, a_next, weight / weight.mean()
