"""The native DeepCache mode (fcr.core.unet deep/shallow split, fcr.core.sampler's deep_cache_branch)
against the DeepCache package's own DeepCacheSDHelper, on scratch UNets and the shipped embedded
`base` (code-path equivalence, never a result)."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import make_unet, tiny_embedded_model
from diffusers import DDIMScheduler
from equivalence import assert_float32_equivalent

from fcr.core.sampler import key_steps, sample
from fcr.core.unet import DeepBranch, deep_branch, deep_forward, shallow_forward

STEPS = 10


def _valid_branches(unet) -> list[int]:
    out = []
    for branch_id in range(3 * len(unet.down_blocks)):
        try:
            deep_branch(unet, branch_id)
        except ValueError:
            continue
        out.append(branch_id)
    return out


def test_deep_split_recomposes_the_unet(any_unet) -> None:
    name, unet, channels, cross = any_unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, cross, generator=g)
    branches = _valid_branches(unet)
    assert 0 in branches and len(branches) >= len(unet.down_blocks)
    with torch.no_grad():
        full = unet(x, 10, ctx).sample
        for branch_id in branches:
            branch = deep_branch(unet, branch_id)
            out, deep = deep_forward(unet, x, 10, ctx, branch)
            assert_float32_equivalent(out, full)
            # The deep state of the same step and latent: the shallow path gives the full prediction.
            assert_float32_equivalent(shallow_forward(unet, x, 10, ctx, deep, branch), full)
            # A stale deep state changes it (the deep branch is not bypassed).
            stale = shallow_forward(unet, x, 500, ctx, deep_forward(unet, x, 900, ctx, branch)[1], branch)
            assert not torch.allclose(stale, unet(x, 500, ctx).sample)


def test_deep_branch_ids_follow_deepcache_and_are_checked() -> None:
    unet = make_unet("sd15")[0]
    assert deep_branch(unet, 0) == DeepBranch(0, 0) and deep_branch(unet, 5) == DeepBranch(1, 2)
    with pytest.raises(ValueError, match="down blocks"):
        deep_branch(unet, 3 * len(unet.down_blocks))
    with pytest.raises(ValueError, match=">= 0"):
        deep_branch(unet, -1)
    with pytest.raises(ValueError, match="needs key_steps"):
        sample(unet, DDIMScheduler(), torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32), deep_cache_branch=0)


def _with_helper(unet, interval: int, branch_id: int, noise, ctx, uncond) -> torch.Tensor:
    """Plain sampling with DeepCacheSDHelper wrapped around the UNet, as a diffusers pipeline uses it."""
    DeepCache = pytest.importorskip("DeepCache")
    scheduler = DDIMScheduler()
    pipe = types.SimpleNamespace(unet=unet, scheduler=scheduler)  # all the helper reads of a pipeline
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch_id)
    helper.enable()
    try:
        return sample(unet, scheduler, noise, ctx, uncond_hidden_states=uncond, guidance_scale=3.0,
                      num_inference_steps=STEPS).latents
    finally:
        helper.disable()


@pytest.mark.parametrize(("model", "settings"), [("sd15", ((1, 2), (3, 3))), ("embedded-base", ((0, 3),))])
def test_native_deep_cache_equals_deepcache_helper(model: str, settings: tuple[tuple[int, int], ...]) -> None:
    if model == "embedded-base":
        from fcr.backends.models import load_embedded_unet

        unet, channels, cross = load_embedded_unet("base").eval(), 1, 384  # the shipped pretrained model
        size = unet.config.sample_size
    else:
        (unet, channels, cross), size = make_unet(model), 16
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, channels, size, size, generator=g)
    ctx, uncond = torch.randn(2, 7, cross, generator=g), torch.randn(1, 7, cross, generator=g)
    plain = sample(unet, DDIMScheduler(), noise, ctx, uncond_hidden_states=uncond, guidance_scale=3.0,
                   num_inference_steps=STEPS).latents
    for branch_id, interval in settings:
        ours = sample(unet, DDIMScheduler(), noise, ctx, uncond_hidden_states=uncond, guidance_scale=3.0,
                      num_inference_steps=STEPS, key_steps=key_steps(STEPS, "uniform", interval),
                      deep_cache_branch=branch_id)
        assert_float32_equivalent(ours.latents, _with_helper(unet, interval, branch_id, noise, ctx, uncond))
        assert not torch.allclose(ours.latents, plain)  # caching changed something
        full_steps = len(range(0, STEPS, interval))
        assert (ours.stats.unet_passes, ours.stats.shallow_passes) == (full_steps, STEPS - full_steps)


def test_deep_cache_flops_grow_with_the_branch_depth() -> None:
    from fcr.eval.profiling import SD15_UNET_CONFIG, deep_cache_flops, deep_cache_flops_ratio, sd_unet_on_meta

    unet = sd_unet_on_meta(SD15_UNET_CONFIG)  # the public SD1.5 architecture, no weights
    shares = [deep_cache_flops(unet, (64, 64), 77, b)["shallow_share"] for b in (0, 1, 2, 3)]
    assert all(0 < s < 1 for s in shares) and shares == sorted(shares)
    assert deep_cache_flops_ratio(shares[0], 50, list(range(50))) == 1.0  # every step full
    # 10 full steps of 50: (10 + 40 x share) / 50
    assert deep_cache_flops_ratio(shares[0], 50, 10) == pytest.approx((10 + 40 * shares[0]) / 50)


def test_deep_cache_configurations_keep_encoder_caching_keys() -> None:
    from fcr.core.configurations import sweep_configurations

    configs = sweep_configurations([1, 10], 50, "ddim", include_50ls=False, dpm_reference_steps=0,
                                   deep_cache_intervals=[5, 10], deep_cache_branches=[0, 3])
    names = [c.name for c in configs]
    assert names == ["full", "FD-10", "DeepCache-5-b0", "DeepCache-5-b3", "DeepCache-10-b0", "DeepCache-10-b3"]
    dc = configs[2]
    assert dc.key_steps == tuple(range(0, 50, 5)) and dc.deep_branch == 0 and dc.stride is None
    assert dc.as_dict()["deep_branch"] == 0
    # Encoder caching's result-file keys are the ones written before DeepCache existed.
    assert "deep_branch" not in configs[1].as_dict()
    with pytest.raises(ValueError, match="deep_cache_intervals"):
        sweep_configurations([1], 50, "ddim", dpm_reference_steps=0, deep_cache_intervals=[50])


def test_generate_runs_deepcache_configurations() -> None:
    from fcr.backends.generate import generate

    model, prompts = tiny_embedded_model()
    kw = dict(seed=0, num_inference_steps=6, guidance_scale=2.0, key_steps=[0, 3], batch_size=2)
    deep = generate(model, prompts, deep_cache_branch=0, **kw)
    assert deep.stats["unet_passes"] == 2 and deep.stats["shallow_passes"] == 4 and deep.stats["encoder_passes"] == 0
    assert not torch.allclose(deep.images, generate(model, prompts, **kw).images)  # not encoder caching
