"""The encoder/decoder split reproduces UNet2DConditionModel.forward exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import UNET_BUILDERS, make_unet, tiny_sd15_unet
from diffusers import UNet2DConditionModel
from equivalence import assert_float32_equivalent

from fcr.core.unet import (
    EncoderFeatures,
    UnsupportedUNetError,
    decode,
    encode,
    feature_group_indices,
)

# The split runs the same modules in the same order on the same shapes as forward(), so it is
# bit-identical (checked with 1 and 2 torch threads); a difference means a different computation.
EXACT = dict(atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(UNET_BUILDERS))
@pytest.mark.parametrize("hw", [(16, 16), (15, 17)])
def test_split_identity(name: str, hw: tuple[int, int], torch_threads: int) -> None:
    unet, channels, cross_dim = make_unet(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, *hw, generator=gen)
    t = torch.tensor([3, 871])
    cond = torch.randn(2, 7, cross_dim, generator=gen)
    with torch.no_grad():
        ref = unet(x, t, cond).sample
        out = decode(unet, encode(unet, x, t, cond), t, cond)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, **EXACT)


def test_odd_size_uses_forward_upsample_size() -> None:
    unet, channels, cross_dim = make_unet("sd15")
    feats = encode(unet, torch.randn(1, channels, 15, 17), 10, torch.randn(1, 5, cross_dim))
    assert feats.forward_upsample_size
    feats = encode(unet, torch.randn(1, channels, 16, 16), 10, torch.randn(1, 5, cross_dim))
    assert not feats.forward_upsample_size


def test_gradients_flow_through_encoder_and_decoder() -> None:
    unet, channels, cross_dim = make_unet("embedded")
    x = torch.randn(2, channels, 16, 16)
    cond = torch.randn(2, 4, cross_dim)
    ref_grads = torch.autograd.grad(unet(x, 5, cond).sample.square().sum(), list(unet.parameters()), allow_unused=True)
    out = decode(unet, encode(unet, x, 5, cond), 5, cond)
    grads = torch.autograd.grad(out.square().sum(), list(unet.parameters()), allow_unused=True)
    compared = 0
    for g_ref, g in zip(ref_grads, grads):
        assert (g_ref is None) == (g is None)
        if g is not None:
            assert_float32_equivalent(g, g_ref)
            compared += 1
    assert compared > 10
    down_param = unet.down_blocks[0].resnets[0].conv1.weight
    up_param = unet.up_blocks[-1].resnets[0].conv1.weight
    params = list(unet.parameters())
    assert grads[[p is down_param for p in params].index(True)].abs().sum() > 0
    assert grads[[p is up_param for p in params].index(True)].abs().sum() > 0


def test_decode_at_other_timesteps_per_sample(torch_threads: int) -> None:
    """Parallel decoding: one batched decode with per-sample timesteps equals separate decodes."""
    unet, channels, cross_dim = make_unet("sd21")
    x = torch.randn(1, channels, 16, 16)
    cond = torch.randn(1, 6, cross_dim)
    with torch.no_grad():
        feats = encode(unet, x, 900, cond)
        steps = torch.tensor([900, 880, 860])
        batched = decode(unet, feats.map(lambda f: f.repeat(3, *[1] * (f.dim() - 1))), steps, cond.repeat(3, 1, 1))
        single = torch.cat([decode(unet, feats, int(s), cond) for s in steps])
        full_at_other_t = unet(x, 880, cond).sample
    assert_float32_equivalent(batched, single)
    # Decoding cached features at another step is NOT the full UNet at that step.
    assert (single[1:2] - full_at_other_t).abs().max() > 1e-4


def test_attention_masks_and_cross_attention_kwargs_pass_through() -> None:
    unet, channels, cross_dim = make_unet("sd15")
    x = torch.randn(2, channels, 16, 16)
    cond = torch.randn(2, 6, cross_dim)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    kwargs = dict(encoder_attention_mask=mask, cross_attention_kwargs={"scale": 1.0})
    with torch.no_grad():
        ref = unet(x, 50, cond, **kwargs).sample
        out = decode(unet, encode(unet, x, 50, cond, **kwargs), 50, cond, **kwargs)
        unmasked = unet(x, 50, cond).sample
    torch.testing.assert_close(out, ref, **EXACT)
    assert (ref - unmasked).abs().max() > 1e-5  # the mask really matters


def test_feature_groups_partition_the_features() -> None:
    unet, channels, cross_dim = make_unet("sd15")
    feats = encode(unet, torch.randn(1, channels, 16, 16), 10, torch.randn(1, 3, cross_dim))
    tensors = feats.tensors()
    all_idx = feature_group_indices(unet, "all")
    assert all_idx == list(range(len(tensors)))
    early = feature_group_indices(unet, "early")
    late = feature_group_indices(unet, "late")
    mid = feature_group_indices(unet, "mid")
    assert mid == [len(tensors) - 1]
    # sd15 tiny: 2 layers per block, downsamplers on all but the last block.
    assert early == [0, 1, 2, 3]
    assert late == [len(tensors) - 3, len(tensors) - 2]
    assert all(tensors[i].shape[-1] == 16 for i in early[:-1])  # full resolution before the downsampler
    assert all(tensors[i].shape[-1] == 4 for i in late)
    with pytest.raises(ValueError, match="unknown feature group"):
        feature_group_indices(unet, "deep")


def test_features_cat_and_map() -> None:
    unet, channels, cross_dim = make_unet("embedded")
    feats = encode(unet, torch.randn(2, channels, 16, 16), 10, torch.randn(2, 3, cross_dim))
    both = EncoderFeatures.cat([feats, feats])
    assert both.batch_size == 4
    assert len(both.skips) == len(feats.skips)
    assert feats.map(lambda f: f * 0).mid.abs().sum() == 0


def test_unsupported_unets_raise() -> None:
    torch.manual_seed(0)
    with_class = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4, num_class_embeds=10,
    )
    with pytest.raises(UnsupportedUNetError, match="class embeddings"):
        encode(with_class, torch.randn(1, 1, 8, 8), 1, torch.randn(1, 2, 16))
    unet = tiny_sd15_unet()
    x, cond = torch.randn(1, 4, 16, 16), torch.randn(1, 2, 32)
    with pytest.raises(UnsupportedUNetError, match="ControlNet"):
        encode(unet, x, 1, cond, down_block_additional_residuals=[torch.zeros(1)])
    with pytest.raises(UnsupportedUNetError, match="GLIGEN"):
        encode(unet, x, 1, cond, cross_attention_kwargs={"gligen": {}})
