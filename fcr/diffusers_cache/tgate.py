"""T-GATE inside a stock diffusers Stable Diffusion pipeline (pipeline-level API)::

    from fcr.diffusers_cache.tgate import enable_tgate, disable_tgate
    enable_tgate(pipe, gate_step=10)                            # the tgate package's other defaults
    images = pipe("a red coat", num_inference_steps=25, guidance_scale=7.5).images
    disable_tgate(pipe)                                         # the stock pipeline again

The UNet's attention processors cache and reuse as :class:`fcr.core.tgate.TGateSettings` says, and
``pipe.unet.forward`` (an instance attribute) follows the pipeline's step loop: before the gate the
guided batch runs as usual; from the gate on only its unconditional half runs and its prediction is
returned for both halves, so the pipeline's guidance ``u + w (c - u)`` gives ``u``: T-GATE's
unguided fidelity phase, with the pipeline's own scheduler, generators and callbacks. A new call is
recognised by the new ``scheduler.timesteps`` tensor the pipeline's ``set_timesteps`` creates.
Sampling equals :func:`fcr.core.tgate.tgate_sample`, which equals the ``tgate`` package
(tests/test_tgate.py). Encoder caching (:mod:`fcr.diffusers_cache`) and T-GATE are exclusive.
"""

from __future__ import annotations

from typing import Any

import torch

from fcr.core.tgate import TGateSettings, install_processors
from fcr.diffusers_cache.controller import _ATTR as _CACHE_ATTR

__all__ = ["disable_tgate", "enable_tgate", "tgate_settings"]

_ATTR = "_fcr_tgate"


class _TGateForward:
    """``pipe.unet.forward`` while T-GATE is on: sets each step's actions, halves the batch after the gate."""

    def __init__(self, pipe: Any, settings: TGateSettings, state: dict[str, str], originals: dict[str, Any]) -> None:
        self.pipe, self.settings, self.state, self.originals = pipe, settings, state, originals
        self.forward = pipe.unet.forward  # the UNet's own (bound) forward
        self.timesteps: torch.Tensor | None = None
        self.step = 0

    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                 **kwargs: Any) -> Any:
        timesteps = self.pipe.scheduler.timesteps
        if timesteps is not self.timesteps:  # a new pipeline call
            self.timesteps, self.step = timesteps, 0
            if not getattr(self.pipe, "do_classifier_free_guidance", False):
                raise ValueError("T-GATE stops classifier-free guidance at its gate: call the pipeline with "
                                 "guidance_scale > 1")
            if not 1 <= self.settings.gate_step <= len(timesteps):
                raise ValueError(f"T-GATE: gate_step must lie in [1, num_inference_steps={len(timesteps)}]; got "
                                 f"{self.settings.gate_step}")
        i, self.step = self.step, self.step + 1
        self.state["cross"], self.state["self"] = self.settings.actions(i)
        if i < self.settings.gate_step:
            return self.forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        half = sample.shape[0] // 2  # [uncond; cond] rows of the same latents
        out = self.forward(sample[:half], timestep, encoder_hidden_states[:half], *args, **kwargs)
        if isinstance(out, tuple):
            return (torch.cat([out[0], out[0]]), *out[1:])
        out.sample = torch.cat([out.sample, out.sample])
        return out


def enable_tgate(pipe: Any, gate_step: int = 10, sp_interval: int = 5, fi_interval: int = 1, warm_up: int = 2) -> None:
    """Turn T-GATE on for ``pipe`` (a diffusers Stable Diffusion pipeline); calling it again replaces the settings."""
    if getattr(pipe, _CACHE_ATTR, None) is not None:
        raise RuntimeError("encoder caching is on for this pipeline: disable it before enabling T-GATE")
    disable_tgate(pipe)
    settings = TGateSettings(gate_step, sp_interval, fi_interval, warm_up)
    originals, state = install_processors(pipe.unet)
    wrapper = _TGateForward(pipe, settings, state, originals)
    pipe.unet.forward = wrapper
    setattr(pipe, _ATTR, wrapper)


def disable_tgate(pipe: Any) -> None:
    """Restore the pipeline's UNet (processors and forward); nothing happens when T-GATE is off."""
    wrapper = getattr(pipe, _ATTR, None)
    if wrapper is None:
        return
    pipe.unet.set_attn_processor(wrapper.originals)
    del pipe.unet.forward  # the instance attribute: the class's forward again
    setattr(pipe, _ATTR, None)


def tgate_settings(pipe: Any) -> TGateSettings | None:
    """The settings T-GATE runs with on ``pipe`` (None when off)."""
    wrapper = getattr(pipe, _ATTR, None)
    return None if wrapper is None else wrapper.settings
