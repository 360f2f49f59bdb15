"""Tests of fcr.core.sampler: key-step schedules, schedulers, plain vs cached vs parallel sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet
from equivalence import assert_float32_equivalent

import fcr.core.sampler
from fcr.core.sampler import (
    FD_50LS,
    SCHEDULERS,
    PriorNoise,
    SamplerStats,
    build_scheduler,
    key_steps,
    sample,
)

STEPS = 10
BATCH = 2
# A small SD-like scheduler config (as found in a repo's scheduler_config.json).
SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)


@pytest.fixture(scope="module")
def setup():
    """A tiny pixel-space UNet, z_T and cond/uncond conditioning (fixed seeds)."""
    unet, channels, cross_dim = make_unet("embedded", sample_size=8)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(BATCH, channels, 8, 8, generator=gen)
    cond = torch.randn(BATCH, 5, cross_dim, generator=gen)
    uncond = torch.randn(1, 5, cross_dim, generator=gen)
    return unet, noise, cond, uncond


def run(setup, scheduler_name: str = "ddim", **kwargs):
    unet, noise, cond, uncond = setup
    kwargs.setdefault("uncond_hidden_states", uncond)
    kwargs.setdefault("guidance_scale", 3.0)
    kwargs.setdefault("num_inference_steps", STEPS)
    return sample(unet, build_scheduler(scheduler_name, **SD_CONFIG), noise, cond, **kwargs)


# ---------------------------------------------------------------- key steps


@pytest.mark.parametrize("stride", [1, 5, 10, 20])
def test_uniform_key_steps(stride):
    steps = key_steps(50, "uniform", stride)
    assert steps == list(range(0, 50, stride))
    assert len(steps) == -(-50 // stride)


def test_50ls_preset_and_scaled():
    assert key_steps(50, "50ls") == list(FD_50LS)
    scaled = key_steps(20, "50ls")
    assert scaled[0] == 0 and scaled == sorted(set(scaled)) and all(s < 20 for s in scaled)
    assert scaled == [0, 1, 2, 4, 6, 10, 14]
    assert key_steps(100, "50ls") == [2 * s for s in FD_50LS]
    assert key_steps(1, "50ls") == [0]


def test_explicit_key_steps():
    assert key_steps(10, [0, 3, 7]) == [0, 3, 7]
    assert key_steps(10, (0,)) == [0]


@pytest.mark.parametrize(
    "steps, match",
    [
        ([0, 5, 3], "sorted"),
        ([0, 3, 3], "unique"),
        ([0, 10], "range"),
        ([-1, 0], "range"),
        ([1, 4], "start with 0"),
        ([], "empty"),
        ([0, 2.0], "integer"),
    ],
)
def test_key_step_errors(steps, match):
    with pytest.raises(ValueError, match=match):
        key_steps(10, steps)


def test_key_step_bad_stride_and_schedule():
    with pytest.raises(ValueError, match="stride"):
        key_steps(50, "uniform", 0)
    with pytest.raises(ValueError, match="schedule"):
        key_steps(50, "nope")


def test_build_scheduler():
    assert set(SCHEDULERS) == {"ddim", "dpmsolver++", "euler", "lcm"}  # lcm: consistency students' sampler
    dpm = build_scheduler("dpmsolver++", **SD_CONFIG)
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.beta_schedule == "scaled_linear"
    ddim = build_scheduler("ddim", **SD_CONFIG, prediction_type="v_prediction")
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.steps_offset == 1
    lcm = build_scheduler("lcm", **SD_CONFIG)
    assert type(lcm).__name__ == "LCMScheduler" and lcm.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="allowed"):
        build_scheduler("pndm")


# ---------------------------------------------------------------- equivalences


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmsolver++", "euler"])
def test_stride1_cached_equals_plain(setup, scheduler_name, torch_threads):
    plain = run(setup, scheduler_name)
    cached = run(setup, scheduler_name, key_steps=key_steps(STEPS))
    seq = run(setup, scheduler_name, key_steps=key_steps(STEPS), parallel=False)
    assert torch.isfinite(plain.latents).all()
    assert_float32_equivalent(cached.latents, plain.latents)
    assert_float32_equivalent(seq.latents, plain.latents)


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmsolver++", "euler"])
@pytest.mark.parametrize("stride", [3, 5])
def test_parallel_equals_sequential(setup, scheduler_name, stride, torch_threads):
    ks = key_steps(STEPS, "uniform", stride)
    par = run(setup, scheduler_name, key_steps=ks, parallel=True)
    seq = run(setup, scheduler_name, key_steps=ks, parallel=False)
    assert_float32_equivalent(par.latents, seq.latents)
    assert par.stats.decoder_passes < seq.stats.decoder_passes


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmsolver++"])
def test_equivalence_tolerance_catches_a_timestep_off_by_one(setup, scheduler_name, monkeypatch):
    """The float32 tolerance is tight enough to see a real bug: batched (parallel) decoder calls
    that get each step's timestep one training timestep too high must fail the comparison."""
    ks = key_steps(STEPS, "uniform", 5)
    seq = run(setup, scheduler_name, key_steps=ks, parallel=False)
    decode = fcr.core.sampler.decode

    def decode_off_by_one(unet, features, timesteps, context, **kwargs):
        several_steps = timesteps.unique().numel() > 1  # a parallel (batched) decoder call
        return decode(unet, features, timesteps + 1 if several_steps else timesteps, context, **kwargs)

    monkeypatch.setattr(fcr.core.sampler, "decode", decode_off_by_one)
    par = run(setup, scheduler_name, key_steps=ks, parallel=True)
    with pytest.raises(AssertionError, match="more than float32 rounding"):
        assert_float32_equivalent(par.latents, seq.latents)


def test_caching_changes_result(setup):
    plain = run(setup)
    cached = run(setup, key_steps=key_steps(STEPS, "uniform", 5))
    assert (cached.latents - plain.latents).abs().max() > 1e-3


def test_guidance_matters_and_validation(setup):
    guided = run(setup)
    unguided = run(setup, guidance_scale=1.0)
    assert (guided.latents - unguided.latents).abs().max() > 1e-3
    # guidance 1 with an uncond given is plain conditional sampling (no doubled batch)
    no_uncond = run(setup, guidance_scale=1.0, uncond_hidden_states=None)
    torch.testing.assert_close(unguided.latents, no_uncond.latents, atol=0, rtol=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        run(setup, guidance_scale=0.5)
    with pytest.raises(ValueError, match="uncond"):
        run(setup, guidance_scale=2.0, uncond_hidden_states=None)
    with pytest.raises(ValueError, match="start with 0"):
        run(setup, key_steps=[2, 5])


# ---------------------------------------------------------------- counters


def test_counters(setup):
    ks = key_steps(STEPS, "uniform", 5)
    par = run(setup, key_steps=ks).stats
    assert (par.unet_passes, par.encoder_passes, par.decoder_passes, par.decoder_steps) == (0, 2, 2, STEPS)
    assert par.decoder_batch_sizes == [5 * BATCH * 2, 5 * BATCH * 2]
    seq = run(setup, key_steps=ks, parallel=False).stats
    assert (seq.encoder_passes, seq.decoder_passes, seq.decoder_steps) == (2, STEPS, STEPS)
    assert seq.decoder_batch_sizes == [BATCH * 2] * STEPS
    plain = run(setup).stats
    assert plain.as_dict() == SamplerStats(unet_passes=STEPS).as_dict()
    no_cfg = run(setup, key_steps=ks, guidance_scale=1.0).stats
    assert no_cfg.decoder_batch_sizes == [5 * BATCH, 5 * BATCH]
    # uneven groups: key steps 0 and 7 -> decoder batches of 7 and 3 steps
    uneven = run(setup, key_steps=[0, 7]).stats
    assert uneven.decoder_batch_sizes == [7 * BATCH * 2, 3 * BATCH * 2]


# ---------------------------------------------------------------- prior noise, determinism, scale


def test_prior_noise(setup):
    ks = key_steps(STEPS, "uniform", 5)
    base = run(setup, key_steps=ks).latents
    disabled = run(setup, key_steps=ks, prior_noise=PriorNoise(enabled=False, alpha=0.5)).latents
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    # threshold 0: no timestep satisfies t/T < 0 -> no change even when enabled
    never = run(setup, key_steps=ks, prior_noise=PriorNoise(enabled=True, threshold=0.0)).latents
    torch.testing.assert_close(never, base, atol=0, rtol=0)
    injected = run(setup, key_steps=ks, prior_noise=PriorNoise(enabled=True)).latents
    assert (injected - base).abs().max() > 1e-4


def test_prior_noise_only_late_steps(setup):
    """Injection is a pure function of t: with 4 steps (t=751,501,251,1) and threshold 0.2 only
    the last step injects, so the result equals the uninjected run plus the DDIM-stepped shift."""
    noise = setup[1]
    kw = dict(num_inference_steps=4, key_steps=[0, 2])
    base = run(setup, **kw).latents
    injected = run(setup, prior_noise=PriorNoise(enabled=True, alpha=0.01, threshold=0.2), **kw).latents
    # The final DDIM step (t=1 -> alpha_prev = alphas_cumprod[0]) is linear in the latent with
    # coefficient sqrt(a_prev / a_t) for a fixed prediction, and decoders never see the latent at non-key steps.
    sched = build_scheduler("ddim", **SD_CONFIG)
    sched.set_timesteps(4)
    t = int(sched.timesteps[-1])
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[0]  # set_alpha_to_one=False
    coeff = (a_prev / a_t).sqrt()
    assert_float32_equivalent(injected, base + coeff * 0.01 * noise)


@pytest.mark.parametrize("key", [None, "stride3"])
def test_deterministic(setup, key):
    ks = None if key is None else key_steps(STEPS, "uniform", 3)
    a = run(setup, "dpmsolver++", key_steps=ks, prior_noise=PriorNoise(enabled=True))
    b = run(setup, "dpmsolver++", key_steps=ks, prior_noise=PriorNoise(enabled=True))
    assert torch.equal(a.latents, b.latents)


@pytest.mark.parametrize("key", [None, "stride1", "stride4-parallel", "stride4-sequential"])
def test_scale_model_input_once_per_step(setup, key):
    unet, noise, cond, uncond = setup
    scheduler = build_scheduler("euler", **SD_CONFIG)
    calls: list[float] = []
    original = scheduler.scale_model_input

    def counting(sample_, timestep):
        calls.append(float(timestep))
        return original(sample_, timestep)

    scheduler.scale_model_input = counting
    ks = {None: None, "stride1": key_steps(STEPS)}.get(key, key_steps(STEPS, "uniform", 4))
    out = sample(
        unet, scheduler, noise, cond, uncond_hidden_states=uncond, guidance_scale=3.0,
        num_inference_steps=STEPS, key_steps=ks, parallel=key != "stride4-sequential",
    )
    assert calls == [float(t) for t in scheduler.timesteps]
    assert torch.isfinite(out.latents).all()


def test_euler_needs_scaling(setup):
    """Skipping scale_model_input (the reference code's omission) changes Euler results."""
    unet, noise, cond, uncond = setup
    scheduler = build_scheduler("euler", **SD_CONFIG)
    scaled = sample(unet, scheduler, noise, cond, num_inference_steps=STEPS, key_steps=[0, 5]).latents
    scheduler.scale_model_input = lambda s, t: s
    unscaled = sample(unet, scheduler, noise, cond, num_inference_steps=STEPS, key_steps=[0, 5]).latents
    assert (scaled - unscaled).abs().max() > 1e-3


def test_vae_latent_shape():
    """Works on a 4-channel SD-like latent (nothing pixel-specific)."""
    unet, channels, cross_dim = make_unet("sd15", sample_size=8)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, channels, 8, 8, generator=gen)
    cond = torch.randn(1, 4, cross_dim, generator=gen)
    uncond = torch.zeros(1, 4, cross_dim)
    kw = dict(uncond_hidden_states=uncond, guidance_scale=2.0, num_inference_steps=4)
    plain = sample(unet, build_scheduler("dpmsolver++", **SD_CONFIG), noise, cond, **kw)
    cached = sample(unet, build_scheduler("dpmsolver++", **SD_CONFIG), noise, cond, **kw, key_steps=[0, 1, 2, 3])
    assert plain.latents.shape == noise.shape
    assert_float32_equivalent(cached.latents, plain.latents)


def test_unet_kwargs_forwarded_and_repeated(setup):
    """A per-sample encoder attention mask (CFG batch 2B) reaches the UNet and is repeated
    correctly for batched decoder calls."""
    mask = torch.ones(2 * BATCH, 5)
    mask[:, 3:] = 0  # hide the last tokens
    mask[0, 1:] = 0  # and more for one sample, so a wrong repetition order would show
    ks = key_steps(STEPS, "uniform", 5)
    masked = run(setup, key_steps=ks, unet_kwargs={"encoder_attention_mask": mask})
    masked_seq = run(setup, key_steps=ks, parallel=False, unet_kwargs={"encoder_attention_mask": mask})
    unmasked = run(setup, key_steps=ks)
    assert_float32_equivalent(masked.latents, masked_seq.latents)
    assert (masked.latents - unmasked.latents).abs().max() > 1e-3
    masked_plain = run(setup, unet_kwargs={"encoder_attention_mask": mask})
    masked_stride1 = run(setup, key_steps=key_steps(STEPS), unet_kwargs={"encoder_attention_mask": mask})
    assert_float32_equivalent(masked_stride1.latents, masked_plain.latents)
