"""Block Caching's learned scale-shift for cached sampling (Wimbauer et al., CVPR 2024).

A cached step reuses tensors computed at the last key step: DeepCache's deep hidden state at its
branch, or Faster Diffusion's encoder features (every skip and the mid-block output). The
correction rescales and shifts each reused tensor channel-wise with parameters of its own per
sampling step, ``x * (1 + scale[step]) + shift[step]``, so the decoder sees features closer to what a
full pass at that step would have computed. Zero-initialised: the untrained correction is the
identity. Key steps compute their tensors afresh and are never corrected.

Trained by cache-aware fine-tuning with the UNet frozen (``cache_trainable: scale_shift``,
:mod:`fcr.train.cache_aware`); saved as ``cache_scale_shift.safetensors`` inside the UNet folder
and applied by :func:`fcr.core.sampler.sample` (``cache_correction``). It adds elementwise work
only: the sampler's network passes and counted FLOPs (matmuls, convolutions) are unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fcr.core import unet as fcr_unet
from fcr.core.unet import EncoderFeatures

__all__ = ["SCALE_SHIFT_FILE", "CacheScaleShift", "cached_channels", "load_scale_shift"]

SCALE_SHIFT_FILE = "cache_scale_shift.safetensors"
_FORMAT = "fcr-cache-scale-shift-1"


def cached_channels(unet: Any, deep_branch: int | None) -> list[int]:
    """Channels of every tensor a cached step reuses: the deep hidden state at ``deep_branch``
    (DeepCache), or the encoder features in :meth:`EncoderFeatures.tensors` order (``None``: encoder
    caching). Found from one forward pass on a tiny input."""
    z, ctx = fcr_unet.probe_inputs(unet)
    t = torch.tensor([500], device=z.device)
    with torch.no_grad():
        if deep_branch is None:
            return [int(x.shape[1]) for x in fcr_unet.encode(unet, z, t, ctx).tensors()]
        hidden = fcr_unet.deep_hidden(unet, z, t, ctx, fcr_unet.deep_branch(unet, deep_branch))
    return [int(hidden.shape[1])]


class CacheScaleShift(nn.Module):
    """Per-step, per-channel scale and shift of the tensors a cached sampler reuses.

    ``configuration``: the cached sampler it belongs to (``DeepCache-10-b0``, ``FD-10``);
    ``num_inference_steps``: its steps (the parameters are indexed by step); ``deep_branch``: the
    DeepCache branch (None: encoder caching); ``channels``: :func:`cached_channels`."""

    def __init__(self, configuration: str, num_inference_steps: int, deep_branch: int | None,
                 channels: Sequence[int]) -> None:
        super().__init__()
        if num_inference_steps < 2 or not channels or min(channels) < 1:
            raise ValueError(f"need >= 2 steps and positive channels; got {num_inference_steps}, {list(channels)}")
        self.configuration, self.num_inference_steps, self.deep_branch = configuration, int(num_inference_steps), deep_branch
        self.scale = nn.ParameterList([nn.Parameter(torch.zeros(num_inference_steps, c)) for c in channels])
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(num_inference_steps, c)) for c in channels])

    @classmethod
    def for_unet(cls, unet: Any, configuration: str, num_inference_steps: int,
                 deep_branch: int | None) -> "CacheScaleShift":
        """An identity correction shaped for ``unet``'s cached tensors, on its device."""
        channels = cached_channels(unet, deep_branch)
        return cls(configuration, num_inference_steps, deep_branch, channels).to(next(unet.parameters()).device)

    def applies_to(self, configuration: str, num_inference_steps: int) -> bool:
        """Whether a sampling configuration is the one this correction was trained for."""
        return configuration == self.configuration and int(num_inference_steps) == self.num_inference_steps

    def modulate(self, x: torch.Tensor, index: int, steps: torch.Tensor | int,
                 cached: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``index`` corrected for ``steps`` (an int, or one step per sample of ``x``'s batch);
        ``cached`` (bool per sample): only those rows are corrected (the rest are key steps)."""
        scale, shift = self.scale[index], self.shift[index]
        if isinstance(steps, int):
            s, b = scale[steps], shift[steps]
            view = (1, -1, *([1] * (x.ndim - 2)))
        else:
            s, b = scale[steps.to(scale.device)], shift[steps.to(scale.device)]
            if cached is not None:
                keep = cached.to(s.device, s.dtype)[:, None]
                s, b = s * keep, b * keep
            view = (x.shape[0], -1, *([1] * (x.ndim - 2)))
        return x * (1 + s.to(x.dtype).view(view)) + b.to(x.dtype).view(view)

    def correct_deep(self, deep: torch.Tensor, steps: torch.Tensor | int,
                     cached: torch.Tensor | None = None) -> torch.Tensor:
        """DeepCache's reused deep hidden state, corrected."""
        return self.modulate(deep, 0, steps, cached)

    def correct_features(self, features: EncoderFeatures, steps: torch.Tensor | int,
                         cached: torch.Tensor | None = None) -> EncoderFeatures:
        """Encoder caching's reused features, every tensor corrected."""
        fixed = [self.modulate(x, i, steps, cached) for i, x in enumerate(features.tensors())]
        return EncoderFeatures(tuple(fixed[:-1]), fixed[-1], features.forward_upsample_size, features.num_frames)

    def metadata(self) -> dict[str, str]:
        return {"format": _FORMAT, "configuration": self.configuration,
                "num_inference_steps": str(self.num_inference_steps),
                "deep_branch": json.dumps(self.deep_branch),
                "channels": json.dumps([int(p.shape[1]) for p in self.scale])}

    def save(self, path: str | Path) -> Path:
        """Write the parameters and what they belong to as one safetensors file."""
        path = Path(path)
        tensors = {f"{kind}.{i}": p.detach().float().cpu().contiguous()
                   for kind in ("scale", "shift") for i, p in enumerate(getattr(self, kind))}
        save_file(tensors, str(path), metadata=self.metadata())
        return path


def load_scale_shift(path: str | Path) -> CacheScaleShift:
    """A correction written by :meth:`CacheScaleShift.save` (safetensors; never pickle)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a cache scale-shift file (format {meta.get('format')!r})")
    module = CacheScaleShift(meta["configuration"], int(meta["num_inference_steps"]), json.loads(meta["deep_branch"]),
                             json.loads(meta["channels"]))
    tensors = load_file(str(path))
    module.load_state_dict(tensors)
    return module.eval().requires_grad_(False)
