"""Latent consistency distillation (LCM, Luo et al. 2310.04378) of a guided teacher, full or LoRA.

The student ``f(z_t, t) = c_skip(t) z_t + c_out(t) x^(z_t, t)`` (``x^``: the clean image the UNet's
epsilon or v output implies; LCM's boundary scalings with ``sigma_data`` 0.5 and timestep scaling 10,
so ``f(z, 0) = z``) is trained to give the same answer at two adjacent points of the teacher's
trajectory: ``z_t`` (noised data at a point of the solver's ``base_steps`` DDIM grid, LCM's
skipping-step schedule) and ``z_s`` (one guided DDIM step of the teacher from ``z_t`` to the grid point
below, ``s = t - T/base_steps``, clamped at 0). Loss: the pseudo-Huber distance (c = 0.001) between
``f(z_t, t)`` and the target ``f(z_s, s)``.

Choices, stated: guidance at one fixed scale ``w`` in the teacher's step, the student unguided
(LCM trains a w-embedding for a range of w; we distil one w, the scale the study samples at). The
target network is the student itself under stop-gradient, as LCM-LoRA trains; LCM's full model uses
an EMA target (decay 0.95), which this loop does not keep. LoRA: rank ``r`` adapters (peft) on
attention, feed-forward, projection, convolution and time-embedding layers, as LCM-LoRA; merged into
the weights when training ends, so the student is a plain UNet folder. Students sample with
diffusers' :class:`~diffusers.LCMScheduler` (``CD-N``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

from fcr.core import unet as fcr_unet
from fcr.core.grid_ddim import predicted_x0_eps
from fcr.core.loss import FCRConfig, per_sample_feature_distance
from fcr.train.teacher import TeacherStudent

__all__ = ["LORA_TARGETS", "ConsistencyObjective", "add_lora", "boundary_scalings", "merge_lora", "pseudo_huber",
           "solver_grid"]

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
HUBER_C = 0.001
# LCM-LoRA's adapted layers, as diffusers' UNet names them.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's consistency parametrisation at timesteps ``t`` (c_skip(0) = 1, c_out(0) = 0),
    as :meth:`diffusers.LCMScheduler.get_scalings_for_boundary_condition_discrete` with its defaults."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def solver_grid(num_train_timesteps: int, base_steps: int) -> torch.Tensor:
    """LCM's skipping-step grid, ascending: ``(j + 1) * (T // base_steps) - 1`` for j < base_steps
    (LCMScheduler's ``lcm_origin_timesteps`` with ``original_inference_steps = base_steps``)."""
    step = num_train_timesteps // base_steps
    return torch.arange(1, base_steps + 1) * step - 1


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = HUBER_C) -> torch.Tensor:
    """Per-sample pseudo-Huber distance ``mean(sqrt((a - b)^2 + c^2) - c)`` over the latent dimensions."""
    return (((a.float() - b.float()) ** 2 + c**2).sqrt() - c).flatten(1).mean(1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


class ConsistencyObjective(TeacherStudent):
    """The consistency-distillation loss inside ``forward`` (for :func:`fcr.train.loop.train`):
    ``.unet`` is the student, ``teacher`` frozen and guided at ``guidance_scale`` with the empty
    prompt's ``uncond_states``. With ``fcr.lambda_fcr > 0`` the FCR term compares the student's encoder
    features at ``(z_t, t)`` and ``(z_s, s)`` (adjacent solver points)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, ddim: DDIMScheduler, base_steps: int,
                 guidance_scale: float, uncond_states: torch.Tensor, fcr: FCRConfig) -> None:
        super().__init__(student, teacher, uncond_states, fcr)
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = str(ddim.config.prediction_type)
        self.register_buffer("alphas", ddim.alphas_cumprod.float().clone(), persistent=False)
        self.register_buffer("grid", solver_grid(int(ddim.config.num_train_timesteps), base_steps), persistent=False)
        self.skip = int(ddim.config.num_train_timesteps) // int(base_steps)

    def consistency(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``f(z, t)`` from a UNet ``output`` at ``(z, t)``."""
        x0, _ = predicted_x0_eps(output.float(), z.float(), _per_sample(self.alphas[t], z), self.prediction_type)
        c_skip, c_out = boundary_scalings(t)
        return _per_sample(c_skip, z) * z.float() + _per_sample(c_out, z) * x0

    def forward(self, x0: torch.Tensor, states: torch.Tensor, generator: torch.Generator):
        index = torch.randint(0, len(self.grid), (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = self.grid[index]
        s = (t - self.skip).clamp(min=0)
        a_t, a_s = _per_sample(self.alphas[t], x0), _per_sample(self.alphas[s], x0)
        z_t = (a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * noise.float()).to(x0.dtype)
        with torch.no_grad():
            x_hat, eps_hat = predicted_x0_eps(self.teacher_output(z_t, t, states, self.guidance_scale).float(), z_t.float(), a_t,
                                              self.prediction_type)
            z_s = (a_s.sqrt() * x_hat + (1 - a_s).sqrt() * eps_hat).to(x0.dtype)
            target = self.consistency(self.unet(z_s, s, states).sample, z_s, s)
        use_fcr = self.fcr.lambda_fcr > 0
        if use_fcr:
            feats_t = fcr_unet.encode(self.unet, z_t, t, states)
            output = fcr_unet.decode(self.unet, feats_t, t, states)
        else:
            output = self.unet(z_t, t, states).sample
        distill = pseudo_huber(self.consistency(output, z_t, t), target).mean()
        if not use_fcr:
            return distill, distill.detach(), torch.zeros((), device=distill.device)
        feats_s = fcr_unet.encode(self.unet, z_s, s, states)
        indices = fcr_unet.feature_group_indices(self.unet, self.fcr.feature_group)
        fcr_term = per_sample_feature_distance(feats_t, feats_s, indices, self.fcr.normalize).mean()
        return distill + self.fcr.lambda_fcr * fcr_term, distill.detach(), fcr_term.detach()


def add_lora(unet: Any, rank: int) -> Any:
    """Freeze ``unet`` and add rank-``rank`` LoRA adapters (peft) on :data:`LORA_TARGETS`; only they train."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    return unet


def merge_lora(unet: Any) -> Any:
    """Fold trained adapters into the weights and remove them: a plain UNet again."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet
