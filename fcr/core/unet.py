"""Encoder/decoder split of ``diffusers.UNet2DConditionModel`` as Faster Diffusion defines it.

Encoder = time embedding + ``conv_in`` + every down block + the mid block. Its output is the whole
skip tuple (starting with the ``conv_in`` output, exactly diffusers' ``down_block_res_samples``)
and the mid-block output. Decoder = up blocks + output head, run with the time embedding of the
step it is asked for, which may differ from the step the features were computed at (that is the
point of encoder caching). With :mod:`fcr.core.video_unet` (the same split of a video UNet) this is
the only module of ``fcr`` that touches the UNet's blocks.

DeepCache (Ma et al., 2312.00858) splits the UNet elsewhere: a *skip branch* (a down block and a
layer in it, :class:`DeepBranch`) cuts it into a shallow path (``conv_in``, the down layers above
the branch, the up layers from the branch on, the head) and the deep rest. A full step
(:func:`deep_forward`) also returns the hidden state that enters the shallow part of the up path;
a cached step (:func:`shallow_forward`) runs only the shallow path on the fresh latent and feeds it
that stored deep hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from fcr.core import video_unet

__all__ = [
    "DeepBranch",
    "EncoderFeatures",
    "UnsupportedUNetError",
    "check_supported",
    "decode",
    "deep_branch",
    "deep_forward",
    "deep_hidden",
    "encode",
    "feature_group_indices",
    "probe_inputs",
    "shallow_forward",
    "FEATURE_GROUPS",
]

# Keyword arguments accepted by encode/decode and forwarded to the blocks exactly as
# UNet2DConditionModel.forward forwards them.
_PASSTHROUGH = ("attention_mask", "encoder_attention_mask", "cross_attention_kwargs", "timestep_cond")

FEATURE_GROUPS = ("all", "early", "mid", "late")


class UnsupportedUNetError(ValueError):
    """The UNet uses a feature the split does not reproduce exactly."""


@dataclass
class EncoderFeatures:
    """What the decoder needs from the encoder (besides the conditioning and time embedding).

    ``skips``: ``down_block_res_samples`` (``conv_in`` output first); ``mid``: mid-block output
    (the last down block's output when the UNet has no mid block); ``forward_upsample_size``:
    whether the input size was not a multiple of the UNet's overall down-sampling factor;
    ``num_frames``: frames folded into each sample's rows (a video UNet, :mod:`fcr.core.video_unet`).
    """

    skips: tuple[torch.Tensor, ...]
    mid: torch.Tensor
    forward_upsample_size: bool
    num_frames: int = 1

    @property
    def batch_size(self) -> int:
        return self.mid.shape[0] // self.num_frames

    def tensors(self) -> list[torch.Tensor]:
        """All feature tensors, skips first then mid (the order ``feature_group_indices`` uses)."""
        return [*self.skips, self.mid]

    def map(self, fn) -> "EncoderFeatures":
        """Apply ``fn`` to every tensor (e.g. ``repeat_interleave`` for parallel decoding)."""
        return EncoderFeatures(tuple(fn(s) for s in self.skips), fn(self.mid), self.forward_upsample_size,
                               self.num_frames)

    @staticmethod
    def cat(parts: list["EncoderFeatures"]) -> "EncoderFeatures":
        """Concatenate along the batch dimension."""
        skips = tuple(torch.cat(group, dim=0) for group in zip(*(p.skips for p in parts)))
        mid = torch.cat([p.mid for p in parts], dim=0)
        return EncoderFeatures(skips, mid, parts[0].forward_upsample_size, parts[0].num_frames)


def probe_inputs(unet: UNet2DConditionModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest latent (seeded noise) and a one-token zero context for ``unet``: for finding
    which weights a pass touches or which shapes it makes, never for results."""
    cfg, param = unet.config, next(unet.parameters())
    side = 2 ** (len(cfg.block_out_channels) - 1)
    z = torch.randn(1, cfg.in_channels, side, side, generator=torch.Generator().manual_seed(0)).to(param)
    return z, torch.zeros(1, 1, cfg.cross_attention_dim).to(param)


def check_supported(unet: UNet2DConditionModel) -> None:
    """Raise :class:`UnsupportedUNetError` for configurations the split would get wrong."""
    if video_unet.is_video_unet(unet):
        return  # its own split (fcr.core.video_unet) checks its arguments
    cfg = unet.config
    problems = []
    if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
        problems.append(f"class embeddings (class_embed_type={cfg.class_embed_type!r})")
    if cfg.addition_embed_type is not None:
        problems.append(f"additional embeddings (addition_embed_type={cfg.addition_embed_type!r})")
    if cfg.encoder_hid_dim_type not in (None, "text_proj"):
        problems.append(f"encoder_hid_dim_type={cfg.encoder_hid_dim_type!r}")
    if getattr(unet, "position_net", None) is not None:
        problems.append("GLIGEN position net")
    if problems:
        raise UnsupportedUNetError(
            "fcr.core.unet cannot split this UNet exactly: it uses " + ", ".join(problems) + ". "
            "Supported: text-conditioned UNet2DConditionModel as in Stable Diffusion 1.x/2.x."
        )


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(_PASSTHROUGH))
    if unknown:
        raise UnsupportedUNetError(
            f"unsupported UNet argument(s) {unknown}: ControlNet/adapter residuals, class labels and "
            f"added conditions are not handled by the encoder/decoder split; allowed: {list(_PASSTHROUGH)}"
        )
    cak = kwargs.get("cross_attention_kwargs")
    if cak is not None and cak.get("gligen") is not None:
        raise UnsupportedUNetError("GLIGEN cross_attention_kwargs are not supported by fcr.core.unet")


def _time_embedding(
    unet: UNet2DConditionModel,
    like: torch.Tensor,
    timestep: torch.Tensor | float | int,
    timestep_cond: torch.Tensor | None,
) -> torch.Tensor:
    """The UNet's time embedding, one row per sample of ``like`` (scalar timesteps broadcast)."""
    t_emb = unet.get_time_embed(sample=like, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def _mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Same conversion as UNet2DConditionModel.forward: keep=1/discard=0 -> additive bias.
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def _prepare(unet, like, encoder_hidden_states, kwargs):
    _check_kwargs(kwargs)
    check_supported(unet)
    attention_mask = _mask_bias(kwargs.get("attention_mask"), like.dtype)
    encoder_attention_mask = _mask_bias(kwargs.get("encoder_attention_mask"), like.dtype)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None
    )
    return dict(
        encoder_hidden_states=encoder_hidden_states,
        attention_mask=attention_mask,
        encoder_attention_mask=encoder_attention_mask,
        cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
    )


def _has_cross_attention(block) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _down_block(block, hidden: torch.Tensor, emb: torch.Tensor, cond: dict[str, Any]):
    """One whole down block, as ``UNet2DConditionModel.forward`` calls it: (output, skips)."""
    if _has_cross_attention(block):
        return block(hidden_states=hidden, temb=emb, **cond)
    return block(hidden_states=hidden, temb=emb)


def _up_block(block, hidden: torch.Tensor, res: tuple[torch.Tensor, ...], emb: torch.Tensor, cond: dict[str, Any],
              upsample_size) -> torch.Tensor:
    """One whole up block, as ``UNet2DConditionModel.forward`` calls it."""
    if _has_cross_attention(block):
        return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size, **cond)
    return block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


def encode(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    **kwargs: Any,
) -> EncoderFeatures:
    """Run time embedding, ``conv_in``, the down blocks and the mid block.

    ``kwargs`` may hold ``attention_mask``, ``encoder_attention_mask``, ``cross_attention_kwargs``
    and ``timestep_cond``, with the meaning they have in ``UNet2DConditionModel.forward``. A video
    UNet's latents (``UNet3DConditionModel``) go to :func:`fcr.core.video_unet.encode_video`.
    """
    if video_unet.is_video_unet(unet):
        return video_unet.encode_video(unet, sample, timestep, encoder_hidden_states, **kwargs)
    video_unet.check_latents(unet, sample)
    cond = _prepare(unet, sample, encoder_hidden_states, kwargs)
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])

    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _time_embedding(unet, sample, timestep, kwargs.get("timestep_cond"))

    hidden = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    for block in unet.down_blocks:
        hidden, res = _down_block(block, hidden, emb, cond)
        skips += res

    if unet.mid_block is not None:
        if _has_cross_attention(unet.mid_block):
            hidden = unet.mid_block(hidden, emb, **cond)
        else:
            hidden = unet.mid_block(hidden, emb)
    return EncoderFeatures(skips=skips, mid=hidden, forward_upsample_size=forward_upsample_size)


def decode(
    unet: UNet2DConditionModel,
    features: EncoderFeatures,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """Run the up blocks and the output head on ``features`` with the time embedding of ``timestep``.

    ``timestep`` may be a scalar or one value per sample (parallel decoding of several steps in
    one batch). Returns what ``unet(...).sample`` returns: the noise (or v) prediction.
    """
    if video_unet.is_video_unet(unet):
        return video_unet.decode_video(unet, features, timestep, encoder_hidden_states, **kwargs)
    like = features.mid
    cond = _prepare(unet, like, encoder_hidden_states, kwargs)
    emb = _time_embedding(unet, like, timestep, kwargs.get("timestep_cond"))

    hidden = features.mid
    skips = features.skips
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        is_final_block = i == len(unet.up_blocks) - 1
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        if not is_final_block and features.forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        hidden = _up_block(block, hidden, res, emb, cond, upsample_size)

    if unet.conv_norm_out is not None:
        hidden = unet.conv_norm_out(hidden)
        hidden = unet.conv_act(hidden)
    return unet.conv_out(hidden)


def feature_group_indices(unet: UNet2DConditionModel, group: str) -> list[int]:
    """Indices into ``EncoderFeatures.tensors()`` that make up a feature group.

    - ``all``: every skip (``conv_in`` output and each down-block output) and the mid output;
    - ``early``: the ``conv_in`` output and the skips produced by the first down block
      (highest resolution);
    - ``mid``: the mid-block output only;
    - ``late``: the skips produced by the last down block (lowest resolution).
    """
    if group not in FEATURE_GROUPS:
        raise ValueError(f"unknown feature group {group!r}; allowed: {list(FEATURE_GROUPS)}")
    counts = [_outputs_per_down_block(block) for block in unet.down_blocks]
    num_skips = 1 + sum(counts)
    mid_index = num_skips
    if group == "all":
        return list(range(num_skips + 1))
    if group == "early":
        return list(range(0, 1 + counts[0]))
    if group == "mid":
        return [mid_index]
    return list(range(num_skips - counts[-1], num_skips))


# ----------------------------------------------------------------------------- DeepCache split


@dataclass(frozen=True)
class DeepBranch:
    """DeepCache's skip branch: down block ``block`` (mirrored by up block ``len(up_blocks) - 1 -
    block``) and ``layer`` in it. At a cached step the down layers ``< layer`` of that block (and
    every block above it) run, and the up layers from ``layer`` on (counted from the block's last
    resnet, which reads the shallowest skip)."""

    block: int
    layer: int


def deep_branch(unet: UNet2DConditionModel, branch_id: int) -> DeepBranch:
    """The branch of DeepCacheSDHelper's ``cache_branch_id`` (block ``id // 3``, layer ``id % 3``),
    checked against ``unet``: the skips the shallow path makes must be exactly those it reads."""
    if video_unet.is_video_unet(unet):
        raise UnsupportedUNetError("DeepCache's split is implemented for image UNets (UNet2DConditionModel); "
                                   "a video UNet supports encoder caching (key_steps) only")
    check_supported(unet)
    if branch_id < 0:
        raise ValueError(f"cache branch id must be >= 0; got {branch_id}")
    branch = DeepBranch(branch_id // 3, branch_id % 3)
    if branch.block >= len(unet.down_blocks):
        raise ValueError(f"cache branch id {branch_id}: block {branch.block} but the UNet has "
                         f"{len(unet.down_blocks)} down blocks")
    up = unet.up_blocks[len(unet.up_blocks) - 1 - branch.block]
    down = unet.down_blocks[branch.block]
    if branch.layer >= len(up.resnets) or branch.layer > len(down.resnets):
        raise ValueError(f"cache branch id {branch_id}: layer {branch.layer} but block {branch.block} has "
                         f"{len(up.resnets)} up resnets")
    made = 1 + sum(_outputs_per_down_block(b) for b in unet.down_blocks[: branch.block]) + branch.layer
    read = sum(len(b.resnets) for b in unet.up_blocks[len(unet.up_blocks) - branch.block :]) + branch.layer + 1
    if made != read:
        raise UnsupportedUNetError(f"cache branch id {branch_id}: the shallow path would make {made} skips and read "
                                   f"{read}; this UNet's blocks are not mirrored as in Stable Diffusion")
    for block in (down, up):
        if getattr(block, "s1", None) is not None:
            raise UnsupportedUNetError("FreeU is enabled on this UNet: the DeepCache split does not reproduce it")
    return branch


def _outputs_per_down_block(block) -> int:
    return len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) is not None else 0)


def _layer(block, j: int, hidden: torch.Tensor, emb: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
    """Resnet ``j`` of a block and, in a cross-attention block, its transformer, as the block's
    own forward runs them."""
    hidden = block.resnets[j](hidden, emb)
    if _has_cross_attention(block):
        hidden = block.attentions[j](hidden, return_dict=False, **cond)[0]
    return hidden


def _down_to_branch(unet, sample, emb, cond, branch: DeepBranch) -> tuple[torch.Tensor, ...]:
    """The skips of the shallow down path: ``conv_in``, every block above the branch, and the
    branch block's layers above ``branch.layer``."""
    hidden = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    for block in unet.down_blocks[: branch.block]:
        hidden, res = _down_block(block, hidden, emb, cond)
        skips += res
    block = unet.down_blocks[branch.block]
    for j in range(branch.layer):
        hidden = _layer(block, j, hidden, emb, cond)
        skips += (hidden,)
    return skips


def _up_from_branch(unet, hidden, skips, emb, cond, branch: DeepBranch, forward_upsample_size: bool) -> torch.Tensor:
    """The shallow up path: the branch block's up layers from ``branch.layer`` on (fed ``hidden``),
    its upsampler, every later up block and the output head."""
    start = len(unet.up_blocks) - 1 - branch.block
    block = unet.up_blocks[start]
    for j in range(len(block.resnets) - 1 - branch.layer, len(block.resnets)):
        hidden = torch.cat([hidden, skips[-1]], dim=1)
        skips = skips[:-1]
        hidden = _layer(block, j, hidden, emb, cond)
    upsample_size = skips[-1].shape[2:] if forward_upsample_size and skips else None
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, upsample_size)
    for i in range(start + 1, len(unet.up_blocks)):
        block = unet.up_blocks[i]
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        upsample_size = skips[-1].shape[2:] if i != len(unet.up_blocks) - 1 and forward_upsample_size else None
        hidden = _up_block(block, hidden, res, emb, cond, upsample_size)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_norm_out(hidden)
        hidden = unet.conv_act(hidden)
    return unet.conv_out(hidden)


def _deep_state(unet, sample, timestep, encoder_hidden_states, branch: DeepBranch, kwargs):
    """Everything below ``branch``: the deep hidden state and what the shallow up path still needs."""
    features = encode(unet, sample, timestep, encoder_hidden_states, **kwargs)
    cond = _prepare(unet, features.mid, encoder_hidden_states, kwargs)
    emb = _time_embedding(unet, features.mid, timestep, kwargs.get("timestep_cond"))
    forward_upsample_size = features.forward_upsample_size
    hidden, skips = features.mid, features.skips
    start = len(unet.up_blocks) - 1 - branch.block
    for block in unet.up_blocks[:start]:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        upsample_size = skips[-1].shape[2:] if forward_upsample_size else None
        hidden = _up_block(block, hidden, res, emb, cond, upsample_size)
    block = unet.up_blocks[start]
    for j in range(len(block.resnets) - 1 - branch.layer):
        hidden = torch.cat([hidden, skips[-1]], dim=1)
        skips = skips[:-1]
        hidden = _layer(block, j, hidden, emb, cond)
    return hidden, skips, emb, cond, forward_upsample_size


def deep_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    branch: DeepBranch,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A full UNet pass (what ``unet(...).sample`` returns) and the deep hidden state that enters
    the shallow up path at ``branch`` (what DeepCache reuses)."""
    hidden, skips, emb, cond, forward_upsample_size = _deep_state(unet, sample, timestep, encoder_hidden_states,
                                                                  branch, kwargs)
    return _up_from_branch(unet, hidden, skips, emb, cond, branch, forward_upsample_size), hidden


def deep_hidden(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    branch: DeepBranch,
    **kwargs: Any,
) -> torch.Tensor:
    """Only the deep hidden state of :func:`deep_forward` (the shallow up path is not run)."""
    return _deep_state(unet, sample, timestep, encoder_hidden_states, branch, kwargs)[0]


def shallow_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    deep: torch.Tensor,
    branch: DeepBranch,
    **kwargs: Any,
) -> torch.Tensor:
    """A DeepCache step: the shallow path on ``sample`` with the deep hidden state ``deep`` of the
    last :func:`deep_forward` in place of everything below ``branch``."""
    cond = _prepare(unet, sample, encoder_hidden_states, kwargs)
    forward_upsample_size = any(dim % 2**unet.num_upsamplers != 0 for dim in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _time_embedding(unet, sample, timestep, kwargs.get("timestep_cond"))
    skips = _down_to_branch(unet, sample, emb, cond, branch)
    return _up_from_branch(unet, deep, skips, emb, cond, branch, forward_upsample_size)
