"""Encoder/decoder split of diffusers' latent video UNet (``UNet3DConditionModel``, ModelScope-style).

The split is Faster Diffusion's, as :mod:`fcr.core.unet` makes it for images: encoder = time
embedding + ``conv_in`` + the temporal transformer + every down block + the mid block; decoder = up
blocks + head. Latents are ``(batch, channels, frames, height, width)``; inside the UNet the frames
are folded into the batch (``batch * frames`` rows, frames of a sample adjacent), and the cached
features keep that layout with ``num_frames`` beside them, so caching, parallel decoding and the FCR
loss work on a video UNet unchanged. :func:`fcr.core.unet.encode` and ``decode`` dispatch here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet3DConditionModel

if TYPE_CHECKING:  # fcr.core.unet imports this module lazily; the type is only named here
    from fcr.core.unet import EncoderFeatures

__all__ = ["check_latents", "decode_video", "encode_video", "is_video_unet"]

_PASSTHROUGH = ("attention_mask", "cross_attention_kwargs", "timestep_cond")


def is_video_unet(unet: Any) -> bool:
    """Whether ``unet`` is a latent video UNet (frames on dim 2 of its input)."""
    return isinstance(unet, UNet3DConditionModel)


def check_latents(unet: Any, latents: torch.Tensor) -> None:
    """One clear line when latents do not fit the UNet: a video UNet takes 5-D latents
    ``(batch, channels, frames, height, width)``, an image UNet 4-D ones."""
    if is_video_unet(unet) and latents.ndim != 5:
        raise ValueError(f"a video UNet takes latents (batch, channels, frames, height, width); got image-shaped "
                         f"latents {tuple(latents.shape)}: add a frames dimension")
    if not is_video_unet(unet) and latents.ndim != 4:
        raise ValueError(f"an image UNet takes latents (batch, channels, height, width); got shape "
                         f"{tuple(latents.shape)}")


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    from fcr.core.unet import UnsupportedUNetError

    unknown = sorted(set(kwargs) - set(_PASSTHROUGH))
    if unknown:
        raise UnsupportedUNetError(f"unsupported video UNet argument(s) {unknown}; allowed: {list(_PASSTHROUGH)}")


def _time_embedding(unet: UNet3DConditionModel, samples: int, frames: int, timestep: torch.Tensor | float | int,
                    timestep_cond: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """One embedding row per frame, as ``UNet3DConditionModel.forward`` makes it (a scalar timestep
    broadcast to every sample; one per sample for parallel decoding)."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=device)
    t = t.reshape(-1).to(device).expand(samples) if t.numel() == 1 else t.reshape(-1).to(device)
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype), timestep_cond)
    return emb.repeat_interleave(frames, dim=0)


def _conditioning(unet, encoder_hidden_states: torch.Tensor, frames: int, kwargs: dict[str, Any], dtype) -> dict:
    mask = kwargs.get("attention_mask")
    return dict(
        encoder_hidden_states=encoder_hidden_states.repeat_interleave(frames, dim=0),
        attention_mask=None if mask is None else ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1),
        num_frames=frames,
        cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
    )


def _call(block, hidden: torch.Tensor, emb: torch.Tensor, cond: dict[str, Any], **extra: Any):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, **extra, **cond)
    return block(hidden_states=hidden, temb=emb, num_frames=cond["num_frames"], **extra)


def encode_video(unet: UNet3DConditionModel, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                 encoder_hidden_states: torch.Tensor, **kwargs: Any) -> "EncoderFeatures":
    """Time embedding, ``conv_in``, temporal transformer, down blocks and mid block of a video UNet."""
    from fcr.core.unet import EncoderFeatures

    _check_kwargs(kwargs)
    check_latents(unet, sample)
    samples, _, frames = sample.shape[:3]
    forward_upsample_size = any(dim % 2**unet.num_upsamplers != 0 for dim in sample.shape[-2:])
    emb = _time_embedding(unet, samples, frames, timestep, kwargs.get("timestep_cond"), sample.device)
    cond = _conditioning(unet, encoder_hidden_states, frames, kwargs, sample.dtype)

    hidden = sample.permute(0, 2, 1, 3, 4).reshape(samples * frames, -1, *sample.shape[3:])
    hidden = unet.conv_in(hidden)
    hidden = unet.transformer_in(hidden, num_frames=frames, cross_attention_kwargs=cond["cross_attention_kwargs"],
                                 return_dict=False)[0]
    skips: tuple[torch.Tensor, ...] = (hidden,)
    for block in unet.down_blocks:
        hidden, res = _call(block, hidden, emb, cond)
        skips += res
    if unet.mid_block is not None:
        hidden = unet.mid_block(hidden, emb, **cond)
    return EncoderFeatures(skips=skips, mid=hidden, forward_upsample_size=forward_upsample_size, num_frames=frames)


def decode_video(unet: UNet3DConditionModel, features: "EncoderFeatures", timestep: torch.Tensor | float | int,
                 encoder_hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Up blocks and head on cached video features; returns ``(batch, channels, frames, h, w)``."""
    _check_kwargs(kwargs)
    frames = features.num_frames
    samples = features.mid.shape[0] // frames
    emb = _time_embedding(unet, samples, frames, timestep, kwargs.get("timestep_cond"), features.mid.device)
    cond = _conditioning(unet, encoder_hidden_states, frames, kwargs, features.mid.dtype)

    hidden, skips, upsample_size = features.mid, features.skips, None
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        if i < len(unet.up_blocks) - 1 and features.forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        hidden = _call(block, hidden, emb, cond, res_hidden_states_tuple=res, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    out = unet.conv_out(hidden)
    return out.reshape(samples, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
