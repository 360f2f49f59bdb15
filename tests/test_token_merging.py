"""Token Merging (issue #32): the native implementation equals the ``tomesd`` package on scratch
Stable Diffusion UNets, its merge/unmerge keep what they must, and it runs as a sweep
configuration inside our sampler."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_unet, tiny_embedded_model
from equivalence import assert_float32_equivalent

from fcr.core.token_merging import (
    TokenMergeSettings,
    bipartite_merge,
    disable_token_merging,
    enable_token_merging,
    token_merging,
)


def _inputs(channels: int, cross: int, size: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, channels, size, size, generator=g), torch.tensor(500),
            torch.randn(batch, 7, cross, generator=g))


@pytest.mark.parametrize(("ratio", "random", "max_downsample"), [(0.5, False, 1), (0.3, True, 1), (0.6, True, 2)])
def test_native_token_merging_equals_tomesd(ratio: float, random: bool, max_downsample: int) -> None:
    tomesd = pytest.importorskip("tomesd")
    unet, channels, cross = make_unet("sd15")
    x, t, ctx = _inputs(channels, cross)
    reference = copy.deepcopy(unet)
    tomesd.apply_patch(reference, ratio=ratio, use_rand=random, max_downsample=max_downsample)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)  # tomesd forks the global generator at its first merge
        expected = reference(x, t, ctx).sample
        plain = unet(x, t, ctx).sample
        enable_token_merging(unet, TokenMergeSettings(ratio, max_downsample=max_downsample,
                                                      random_destinations=random),
                             torch.Generator().manual_seed(3))
        ours = unet(x, t, ctx).sample
        disable_token_merging(unet)
        restored = unet(x, t, ctx).sample
    assert_float32_equivalent(ours, expected)
    assert not torch.allclose(ours, plain, atol=1e-4)  # merging changed the prediction
    assert torch.equal(restored, plain)  # disabling restores the blocks exactly


def test_merge_and_unmerge_keep_sizes_means_and_positions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 5, generator=g)  # an 8 x 8 token grid
    merge, unmerge = bipartite_merge(x, 8, 8, 2, 2, 20, torch.Generator().manual_seed(1))
    merged = merge(x)
    assert merged.shape == (2, 64 - 20, 5)
    restored = unmerge(merged)
    kept = (restored == x).all(-1)  # unmerged sources and destinations that received nothing
    assert int((~kept).sum()) >= 20 * 2  # the merged sources (and their destinations) changed
    # Tokens equal to their destination stay equal through merging: a constant sequence is unchanged.
    const = torch.ones(2, 64, 5)
    assert torch.equal(unmerge(merge(const)), const)
    # Every restored token is one of the merged sequence's tokens (a source takes its destination's value).
    for b in range(2):
        rows = {tuple(r.tolist()) for r in merged[b]}
        assert all(tuple(r.tolist()) in rows for r in restored[b])
    same, back = bipartite_merge(x, 8, 8, 2, 2, 0)
    assert same(x) is x and back(x) is x  # r = 0: nothing to do
    # Sources merge only into destinations: at most all non-destination tokens (48 of 64) can go.
    assert bipartite_merge(x, 8, 8, 2, 2, 100)[0](x).shape[1] == 16


def test_settings_are_validated() -> None:
    for bad, match in ((dict(ratio=0.8), r"\[0, 0.75\]"), (dict(ratio=0.5, max_downsample=3), "1, 2, 4 or 8"),
                       (dict(ratio=0.5, sx=0), "sx and sy")):
        with pytest.raises(ValueError, match=match):
            TokenMergeSettings(**bad)
    assert TokenMergeSettings(0.8, sx=3, sy=3).ratio == 0.8  # 3x3 cells allow up to 8/9


def test_the_split_sampler_merges_the_same_as_the_whole_unet() -> None:
    """Our sampler calls the UNet's parts; the context sets the latent size the pre-hook would."""
    from diffusers import DDIMScheduler

    from fcr.core.sampler import sample

    unet, channels, cross = make_unet("sd15")
    x, _, ctx = _inputs(channels, cross, batch=1)
    uncond = torch.randn(1, 7, cross, generator=torch.Generator().manual_seed(2))
    settings = TokenMergeSettings(0.5)
    with torch.no_grad():
        with token_merging(unet, settings, (16, 16), torch.Generator().manual_seed(5)):
            cached = sample(unet, DDIMScheduler(), x, ctx, uncond_hidden_states=uncond, guidance_scale=3.0,
                            num_inference_steps=4, key_steps=[0, 2]).latents
        with token_merging(unet, settings, (16, 16), torch.Generator().manual_seed(5)):
            again = sample(unet, DDIMScheduler(), x, ctx, uncond_hidden_states=uncond, guidance_scale=3.0,
                           num_inference_steps=4, key_steps=[0, 2]).latents
        plain = sample(unet, DDIMScheduler(), x, ctx, uncond_hidden_states=uncond, guidance_scale=3.0,
                       num_inference_steps=4, key_steps=[0, 2]).latents
    assert torch.equal(cached, again)  # seeded: deterministic
    assert not torch.allclose(cached, plain, atol=1e-4)
    assert not hasattr(unet, "_fcr_tome")  # the context removed the patch
    with pytest.raises(RuntimeError, match="latent size is unknown"):
        enable_token_merging(unet, settings)
        try:
            from fcr.core.unet import encode

            encode(unet, x, torch.tensor(10), ctx)
        finally:
            disable_token_merging(unet)


def test_tome_is_a_sweep_configuration_with_its_own_keys_and_family() -> None:
    from fcr.core.configurations import configs_for_model, sweep_configurations
    from fcr.experiments.frontier import method_family

    configs = sweep_configurations([1, 10], 50, "ddim", include_50ls=False, dpm_reference_steps=0,
                                   tome_ratios=[0.3, 0.5], tome_max_downsample=4)
    tome = [c for c in configs if c.token_merge is not None]
    assert [c.name for c in tome] == ["ToMe-30-d4", "ToMe-50-d4"] and tome[1].as_dict()["token_merge"] == 0.5
    assert tome[1].token_merge_settings() == TokenMergeSettings(0.5, max_downsample=4)
    assert "token_merge" not in configs[0].as_dict()  # other configurations keep their result keys
    assert configs[0].token_merge_settings() is None
    assert method_family("ToMe-50-d4") == "ToMe"
    assert [c.name for c in configs_for_model(configs, 1, False)] == ["full", "FD-10"]  # a peer of the original
    with pytest.raises(ValueError, match=r"\(0, 0.75\]"):
        sweep_configurations([1], 50, "ddim", dpm_reference_steps=0, tome_ratios=[0.9])


def test_generate_runs_token_merging_deterministically() -> None:
    from fcr.backends.generate import generate

    model, prompts = tiny_embedded_model()
    kw = dict(seed=3, num_inference_steps=3, guidance_scale=2.0, batch_size=2)
    settings = TokenMergeSettings(0.5, max_downsample=4)  # the embedded UNet attends at 1/4 of the latent only
    merged = generate(model, prompts, token_merge=settings, **kw).images
    assert torch.equal(merged, generate(model, prompts, token_merge=settings, **kw).images)
    assert not torch.allclose(merged, generate(model, prompts, **kw).images, atol=1e-4)
    # At full resolution only (SD's default) nothing of this UNet is merged.
    assert torch.equal(generate(model, prompts, token_merge=0.5, **kw).images, generate(model, prompts, **kw).images)
