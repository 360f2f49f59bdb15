"""What every distillation objective shares: a trainable student, a frozen teacher guided at a fixed
scale (classifier-free guidance with the empty prompt's text states), and the optional FCR term."""

from __future__ import annotations

import torch

from fcr.core.loss import FCRConfig
from fcr.core.sampler import apply_guidance, guidance_context

__all__ = ["TeacherStudent"]


class TeacherStudent(torch.nn.Module):
    """``.unet``: the student (trained by :func:`fcr.train.loop.train`); ``teacher``: frozen; ``fcr``:
    the FCR term's settings (feature group ``deep`` is refused: distillation compares encoder features)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, uncond_states: torch.Tensor,
                 fcr: FCRConfig) -> None:
        super().__init__()
        if fcr.lambda_fcr > 0 and fcr.feature_group == "deep":
            raise ValueError("FCR + distillation compares encoder features: feature_group 'deep' is not supported")
        self.unet = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.fcr = fcr
        self.register_buffer("uncond_states", uncond_states.detach().clone(), persistent=False)

    def teacher_output(self, z: torch.Tensor, t: torch.Tensor, states: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The teacher's prediction at ``(z, t)``, guided at ``guidance_scale`` (> 1) or plain."""
        if guidance_scale <= 1:
            return self.teacher(z, t, states).sample
        out = self.teacher(torch.cat([z, z]), torch.cat([t, t]), self.guided_context(states, guidance_scale)).sample
        return apply_guidance(out, guidance_scale)

    def guided_context(self, states: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """``[uncond; states]`` under guidance (``guidance_scale`` > 1), else ``states``."""
        return guidance_context(states, self.uncond_states.to(states.dtype), len(states), guidance_scale)
