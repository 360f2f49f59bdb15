"""T-GATE (Zhang et al., "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion
Models", 2024): a training-free accelerator that stops computing cross-attention once the image's
semantics are planned, and caches self-attention at intervals.

Schedule over the sampling steps ``i`` (0-based), as the ``tgate`` package's scheduler:

- semantics planning, ``i < gate_step - 1``: classifier-free guidance as usual; cross-attention
  computed; self-attention computed up to ``warm_up``, cached at ``warm_up`` and at every
  ``sp_interval``-th step after it, and the cached output reused at the steps between;
- ``i = gate_step - 1``: both attentions computed and cached as the mean of their unconditional and
  conditional halves;
- fidelity improving, ``i >= gate_step``: no guidance (one UNet batch, unconditional text states);
  every cross-attention returns its cached mean; self-attention computed (and cached) at every
  ``fi_interval``-th step and reused between.

:func:`tgate_sample` samples this way with our schedulers (plain sampling only); tested equal to
the ``tgate`` package's ``TgateSDLoader`` pipeline (tests/test_tgate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fcr.core.sampler import SampleOutput, SamplerStats, _step_kwargs, apply_guidance, guidance_context

__all__ = ["TGateSettings", "install_processors", "tgate_sample"]


@dataclass(frozen=True)
class TGateSettings:
    """T-GATE's options (defaults: the package's)."""

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2

    def __post_init__(self) -> None:
        if self.gate_step < 1 or self.sp_interval < 1 or self.fi_interval < 1 or self.warm_up < 0:
            raise ValueError(f"T-GATE: gate_step, sp_interval and fi_interval must be >= 1 and warm_up >= 0; got "
                             f"{self.gate_step}, {self.sp_interval}, {self.fi_interval}, {self.warm_up}")

    def actions(self, step: int) -> tuple[str, str]:
        """(cross-attention, self-attention) action at ``step``: ``compute``, ``cache`` (compute and
        keep), ``cache_mean`` (keep the mean of the guidance halves) or ``reuse``."""
        if step < self.gate_step - 1:
            if step < self.warm_up:
                return "compute", "compute"
            if step == self.warm_up or step % self.sp_interval == 0:
                return "compute", "cache"
            return "compute", "reuse"
        if step == self.gate_step - 1:
            return "cache_mean", "cache_mean"
        return "reuse", "cache" if step % self.fi_interval == 0 else "reuse"


class _Processor:
    """An attention processor that runs the module's own processor and caches or reuses its
    output as the current step's action says (one cache per attention module)."""

    def __init__(self, inner: Any, state: dict[str, str], kind: str) -> None:
        self.inner, self.state, self.kind = inner, state, kind
        self.cache: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any
                 ) -> torch.Tensor:
        action = self.state[self.kind]
        if action == "reuse" and self.cache is not None:
            return self.cache
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if action == "cache":
            self.cache = out
        elif action == "cache_mean":
            uncond, cond = out.chunk(2)
            self.cache = (uncond + cond) / 2
        return out


def install_processors(unet: UNet2DConditionModel) -> tuple[dict[str, Any], dict[str, str]]:
    """Wrap every attention processor; returns (the original processors, the shared step state)."""
    from diffusers.models.attention import BasicTransformerBlock

    originals = dict(unet.attn_processors)
    for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        for attn in (block.attn1, block.attn2):
            if attn is not None and (attn.residual_connection or attn.rescale_output_factor != 1.0):
                raise ValueError("T-GATE caches an attention's output; a residual connection or output rescaling "
                                 "inside the attention is not supported (Stable Diffusion has neither)")
    state = {"cross": "compute", "self": "compute"}
    wrapped = {name: _Processor(proc, state, "self" if name.endswith("attn1.processor") else "cross")
               for name, proc in originals.items()}
    unet.set_attn_processor(wrapped)
    return originals, state


def tgate_sample(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    uncond_hidden_states: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    settings: TGateSettings,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Plain sampling of ``noise`` with T-GATE (guidance needs ``guidance_scale > 1``; the gate must
    fall inside the schedule). ``scheduler`` is reset and mutated; the UNet's attention processors
    are restored afterwards. ``stats.unet_passes`` counts the UNet calls (guided or not)."""
    if guidance_scale <= 1:
        raise ValueError("T-GATE stops classifier-free guidance at its gate: it needs guidance_scale > 1")
    if not 1 <= settings.gate_step <= num_inference_steps:
        raise ValueError(f"T-GATE: gate_step must lie in [1, num_inference_steps={num_inference_steps}]; "
                         f"got {settings.gate_step}")
    batch = noise.shape[0]
    guided = guidance_context(encoder_hidden_states, uncond_hidden_states, batch, guidance_scale)
    unguided = guided[:batch]  # the unconditional rows, as the package passes after the gate
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    step_kwargs = _step_kwargs(scheduler, generator)
    stats = SamplerStats()
    latents = noise * scheduler.init_noise_sigma
    originals, state = install_processors(unet)
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                state["cross"], state["self"] = settings.actions(i)
                if i < settings.gate_step:
                    x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                    pred = apply_guidance(unet(x, t, guided).sample, guidance_scale)
                else:
                    pred = unet(scheduler.scale_model_input(latents, t), t, unguided).sample
                stats.unet_passes += 1
                latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
    finally:
        unet.set_attn_processor(originals)
    return SampleOutput(latents, stats)
