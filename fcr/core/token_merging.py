"""Token Merging for Stable Diffusion (ToMe; Bolya & Hoffman, CVPR-W 2023) on diffusers UNets: a
training-free accelerator that, inside each transformer block of the highest-resolution levels,
merges the most redundant ``ratio`` of the image tokens before self-attention and copies the
result back to them after it.

Per block (the block's input tokens are the similarity metric): the token grid is cut into
``sy x sx`` cells and one token per cell (random with ``random_destinations``, else the top-left)
is a *destination*, the rest *sources*; each source's best destination is its most cosine-similar
one, and the ``r = int(ratio * N)`` sources with the highest such similarity are averaged into
their destination. Attention runs on the ``N - r`` tokens left, and every merged source takes its
destination's output ("unmerge"). Only blocks at a downsampling of at most ``max_downsample`` of
the latent are merged (1: the full-resolution level).

``enable_token_merging(unet, settings)`` patches every ``BasicTransformerBlock`` of ``unet`` (a
forward pre-hook records the latent size when the UNet is called as a whole, as a diffusers
pipeline does; :func:`token_merging` sets it for samplers that call the UNet's parts);
``disable_token_merging`` restores them. Tested equal to the ``tomesd`` package (tests/test_token_merging.py).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TokenMergeSettings", "bipartite_merge", "disable_token_merging", "enable_token_merging",
           "token_merging"]

Merge = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenMergeSettings:
    """ToMe's options (the defaults are the paper's recommended ones, self-attention only)."""

    ratio: float
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    random_destinations: bool = True
    merge_self_attention: bool = True
    merge_cross_attention: bool = False
    merge_mlp: bool = False

    def __post_init__(self) -> None:
        if self.sx < 1 or self.sy < 1:
            raise ValueError(f"token merging: sx and sy must be >= 1, got {self.sx}, {self.sy}")
        top = 1 - 1 / (self.sx * self.sy)  # at most every source token merges
        if not 0 <= self.ratio <= top:
            raise ValueError(f"token merging: ratio must lie in [0, {top:g}] for {self.sx}x{self.sy} cells, "
                             f"got {self.ratio}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"token merging: max_downsample must be 1, 2, 4 or 8, got {self.max_downsample}")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def bipartite_merge(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                    generator: torch.Generator | None = None) -> tuple[Merge, Merge]:
    """``(merge, unmerge)`` for tokens ``metric`` [B, N = h*w, C] (row-major grid): ``merge``
    maps [B, N, C'] to [B, N - r, C'] (unmerged sources, then destinations with their merged sources
    averaged in), ``unmerge`` maps it back, each source taking its destination's value.
    ``generator``: draws the destination of each cell (None: the top-left token)."""
    B, N, _ = metric.shape
    if r <= 0:
        return _identity, _identity
    device = metric.device
    with torch.no_grad():
        cells_h, cells_w = h // sy, w // sx
        if generator is None:
            offset = torch.zeros(cells_h, cells_w, 1, dtype=torch.int64)
        else:
            offset = torch.randint(sy * sx, (cells_h, cells_w, 1), generator=generator, device=generator.device)
        offset = offset.to(device)[..., 0]
        rows = torch.arange(cells_h, device=device)[:, None] * sy + offset // sx
        cols = torch.arange(cells_w, device=device)[None, :] * sx + offset % sx
        is_dst = torch.zeros(h, w, dtype=torch.bool, device=device)
        is_dst[rows, cols] = True  # grid rows/columns beyond the last whole cell stay sources
        flat = torch.arange(N, device=device)
        dst_idx, src_idx = flat[is_dst.flatten()], flat[~is_dst.flatten()]
        r = min(r, len(src_idx))

        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)  # [B, sources, destinations]
        best, best_dst = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)  # most redundant sources first
        merged, kept = order[:, :r], order[:, r:]
        target = best_dst.gather(1, merged)  # each merged source's destination (index into dst_idx)
        kept_pos, merged_pos = src_idx[kept], src_idx[merged]  # positions in the full sequence

    def expand(index: torch.Tensor, c: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        dst = x[:, dst_idx]
        dst = dst.scatter_reduce(1, expand(target, c), x.gather(1, expand(merged_pos, c)), reduce="mean")
        return torch.cat([x.gather(1, expand(kept_pos, c)), dst], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c, n_kept = y.shape[-1], kept_pos.shape[1]
        kept_out, dst_out = y[:, :n_kept], y[:, n_kept:]
        out = y.new_zeros(y.shape[0], N, c)
        out[:, dst_idx] = dst_out
        out.scatter_(1, expand(kept_pos, c), kept_out)
        out.scatter_(1, expand(merged_pos, c), dst_out.gather(1, expand(target, c)))
        return out

    return merge, unmerge


class _State:
    """What the patched blocks of one UNet share: the settings, the latent size, the generator."""

    def __init__(self, settings: TokenMergeSettings, generator: torch.Generator | None) -> None:
        self.settings, self.generator = settings, generator
        self.latent_hw: tuple[int, int] | None = None
        self.hook: Any = None


def _merges(x: torch.Tensor, state: _State) -> tuple[Merge, Merge, Merge, Merge, Merge, Merge]:
    """(merge, unmerge) for self-attention, cross-attention and the MLP of a block with input ``x``."""
    s = state.settings
    if state.latent_hw is None:
        raise RuntimeError("token merging: the latent size is unknown; call the UNet itself or sample inside "
                           "fcr.core.token_merging.token_merging(...)")
    height, width = state.latent_hw
    downsample = int(math.ceil(math.sqrt(height * width // x.shape[1])))
    m = u = _identity
    if downsample <= s.max_downsample:
        h, w = int(math.ceil(height / downsample)), int(math.ceil(width / downsample))
        # An odd batch is no CFG pair; random destinations would differ between its halves, so they stay fixed.
        generator = state.generator if s.random_destinations and x.shape[0] % 2 == 0 else None
        m, u = bipartite_merge(x, h, w, s.sx, s.sy, int(x.shape[1] * s.ratio), generator)
    off = (_identity, _identity)
    attn = (m, u) if s.merge_self_attention else off
    cross = (m, u) if s.merge_cross_attention else off
    mlp = (m, u) if s.merge_mlp else off
    return (*attn, *cross, *mlp)


def _merged_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    encoder_hidden_states: torch.Tensor | None = None,
                    encoder_attention_mask: torch.Tensor | None = None, timestep: Any = None,
                    cross_attention_kwargs: dict[str, Any] | None = None, class_labels: Any = None,
                    added_cond_kwargs: Any = None) -> torch.Tensor:
    """diffusers' ``BasicTransformerBlock.forward`` for layer-norm blocks (SD's), with ToMe around
    each of its three parts."""
    m_a, u_a, m_c, u_c, m_m, u_m = _merges(hidden_states, self._fcr_tome)
    kwargs = dict(cross_attention_kwargs or {})
    norm = self.norm1(hidden_states)
    out = self.attn1(m_a(norm), encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                     attention_mask=attention_mask, **kwargs)
    hidden_states = u_a(out) + hidden_states
    if self.attn2 is not None:
        out = self.attn2(m_c(self.norm2(hidden_states)), encoder_hidden_states=encoder_hidden_states,
                         attention_mask=encoder_attention_mask, **kwargs)
        hidden_states = u_c(out) + hidden_states
    out = self.ff(m_m(self.norm3(hidden_states)))
    return u_m(out) + hidden_states


def _blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def enable_token_merging(unet: torch.nn.Module, settings: TokenMergeSettings,
                         generator: torch.Generator | None = None) -> torch.nn.Module:
    """Patch every transformer block of ``unet`` with ToMe (``generator`` draws the random
    destinations, one draw per merged block call; None: a CPU generator seeded 0). Replaces an
    earlier patch. Returns ``unet``."""
    disable_token_merging(unet)
    blocks = _blocks(unet)
    unsupported = {b.norm_type for b in blocks} - {"layer_norm"}
    if unsupported or any(b.pos_embed is not None or b._chunk_size is not None for b in blocks):
        raise ValueError(f"token merging supports layer-norm transformer blocks without positional embeddings or "
                         f"chunked feed-forward (Stable Diffusion's); found norm types {sorted(unsupported)}")
    if settings.random_destinations and generator is None:
        generator = torch.Generator().manual_seed(0)
    state = _State(settings, generator)

    def record_size(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    state.hook = unet.register_forward_pre_hook(record_size, with_kwargs=True)
    unet._fcr_tome = state
    for block in blocks:
        block._fcr_tome = state
        block.forward = types.MethodType(_merged_forward, block)
    return unet


def disable_token_merging(unet: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`enable_token_merging` (nothing when it was not enabled). Returns ``unet``."""
    state = getattr(unet, "_fcr_tome", None)
    if state is None:
        return unet
    state.hook.remove()
    for block in _blocks(unet):
        if "forward" in vars(block):
            del block.forward
        vars(block).pop("_fcr_tome", None)
    del unet._fcr_tome
    return unet


@contextmanager
def token_merging(unet: torch.nn.Module, settings: TokenMergeSettings | None, latent_hw: tuple[int, int],
                  generator: torch.Generator | None = None) -> Iterator[torch.nn.Module]:
    """ToMe on ``unet`` for the ``with`` block, for latents of ``latent_hw`` (samplers that call the
    UNet's parts never trigger the pre-hook); ``settings`` None: nothing is patched."""
    if settings is None:
        yield unet
        return
    enable_token_merging(unet, settings, generator)
    unet._fcr_tome.latent_hw = tuple(latent_hw)
    try:
        yield unet
    finally:
        disable_token_merging(unet)
