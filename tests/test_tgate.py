"""T-GATE (issue #32): the native sampler equals the ``tgate`` package's pipeline on a tiny Stable
Diffusion pipeline built in code, follows the package's schedule, restores the UNet, and runs as a
sweep configuration."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_embedded_model
from test_diffusers_api import CONFIGS, _build_pipe

from fcr.core.sampler import build_scheduler, sample
from fcr.core.tgate import TGateSettings, tgate_sample

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    with torch.random.fork_rng(devices=[]):  # the builders seed the global generator
        built = _build_pipe("sd15")
    built.set_progress_bar_config(disable=True)
    return built


def _inputs(pipe):
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = pipe.encode_prompt(["a red coat", "a blue bag"], "cpu", 1, True)
    return latents, cond, uncond


@pytest.mark.parametrize("settings", [TGateSettings(3, 2, 1, 1), TGateSettings(5, 2, 2, 0), TGateSettings(6, 5, 1, 2)])
def test_native_tgate_equals_the_package(pipe, settings: TGateSettings) -> None:
    tgate = pytest.importorskip("tgate")
    latents, cond, uncond = _inputs(pipe)
    ours = tgate_sample(pipe.unet, build_scheduler("ddim", **CONFIGS["sd15"]), latents, cond,
                        uncond_hidden_states=uncond, guidance_scale=3.0, num_inference_steps=STEPS,
                        settings=settings).latents
    # The package patches the attention modules for good and keeps caches on them: a copy per call.
    reference = tgate.TgateSDLoader(copy.deepcopy(pipe))
    expected = reference.tgate(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                               guidance_scale=3.0, latents=latents.clone(), output_type="latent",
                               gate_step=settings.gate_step, sp_interval=settings.sp_interval,
                               fi_interval=settings.fi_interval, warm_up=settings.warm_up).images
    assert torch.equal(ours, expected)  # the same calls in the same order


def test_tgate_changes_sampling_and_restores_the_unet(pipe) -> None:
    latents, cond, uncond = _inputs(pipe)
    processors = dict(pipe.unet.attn_processors)

    def plain():
        return sample(pipe.unet, build_scheduler("ddim", **CONFIGS["sd15"]), latents, cond, uncond_hidden_states=uncond,
                      guidance_scale=3.0, num_inference_steps=STEPS).latents

    before = plain()
    out = tgate_sample(pipe.unet, build_scheduler("ddim", **CONFIGS["sd15"]), latents, cond, uncond_hidden_states=uncond,
                       guidance_scale=3.0, num_inference_steps=STEPS, settings=TGateSettings(4, 2, 1, 1))
    assert out.stats.unet_passes == STEPS and not torch.allclose(out.latents, before, atol=1e-4)
    assert dict(pipe.unet.attn_processors) == processors and torch.equal(plain(), before)
    with pytest.raises(ValueError, match="gate_step must lie in"):
        tgate_sample(pipe.unet, build_scheduler("ddim"), latents, cond, uncond_hidden_states=uncond, guidance_scale=3.0,
                     num_inference_steps=STEPS, settings=TGateSettings(STEPS + 1))
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        tgate_sample(pipe.unet, build_scheduler("ddim"), latents, cond, uncond_hidden_states=uncond, guidance_scale=1.0,
                     num_inference_steps=STEPS, settings=TGateSettings(2))


def test_schedule_follows_the_package() -> None:
    s = TGateSettings(gate_step=6, sp_interval=2, fi_interval=2, warm_up=1)
    assert [s.actions(i) for i in range(9)] == [
        ("compute", "compute"), ("compute", "cache"), ("compute", "cache"), ("compute", "reuse"), ("compute", "cache"),
        ("cache_mean", "cache_mean"), ("reuse", "cache"), ("reuse", "reuse"), ("reuse", "cache")]
    tgate = pytest.importorskip("tgate.tgate_utils")
    for i in range(12):
        ca, sa, _ = tgate.tgate_scheduler(cur_step=i, gate_step=6, sp_interval=2, fi_interval=2, warm_up=1)
        cross, self_ = s.actions(i)
        for flags, ours in ((ca, cross), (sa, self_)):
            assert flags["reuse"] == (ours == "reuse") and flags["cache"] == (ours in ("cache", "cache_mean"))
    with pytest.raises(ValueError, match="T-GATE"):
        TGateSettings(gate_step=0)


def test_tgate_is_a_sweep_configuration() -> None:
    from fcr.core.configurations import configs_for_model, sweep_configurations
    from fcr.experiments.frontier import method_family

    configs = sweep_configurations([1], 50, "ddim", include_50ls=False, dpm_reference_steps=0, tgate_gate_steps=[10, 20])
    assert [c.name for c in configs] == ["full", "TGATE-g10", "TGATE-g20"]
    assert configs[1].tgate_settings() == TGateSettings(10) and configs[1].as_dict()["tgate_gate"] == 10
    assert "tgate_gate" not in configs[0].as_dict() and configs[0].tgate_settings() is None
    assert method_family("TGATE-g10") == "T-GATE" and [c.name for c in configs_for_model(configs, 1, False)] == ["full"]
    with pytest.raises(ValueError, match="tgate_gate_steps"):
        sweep_configurations([1], 50, "ddim", dpm_reference_steps=0, tgate_gate_steps=[51])


def test_bad_tgate_parameters_fail_at_validation_with_one_line() -> None:
    from fcr.config import ConfigError, validate

    for bad, match in (({"tgate_gate_steps": [60], "num_inference_steps": 50}, "must be <= num_inference_steps=50"),
                       ({"tgate_gate_steps": [0]}, "tgate_gate_steps"),
                       ({"tgate_gate_steps": [10], "guidance_scale": 1.0}, "needs guidance_scale > 1"),
                       ({"tome_ratios": [0.9]}, r"tome_ratios.*\(0, 0.75\]"),
                       ({"tome_max_downsample": 3}, "tome_max_downsample")):
        with pytest.raises(ConfigError, match=match) as err:
            validate(bad)
        assert "\n" not in str(err.value)
    assert validate({"tgate_gate_steps": [10], "tome_ratios": [0.5]})["tgate_gate_steps"] == [10]


def test_generate_runs_tgate_on_the_embedded_unet() -> None:
    from fcr.backends.generate import generate

    model, prompts = tiny_embedded_model()
    kw = dict(seed=3, num_inference_steps=4, guidance_scale=2.0, batch_size=2)
    gated = generate(model, prompts, tgate=TGateSettings(2, 1, 1, 0), **kw)
    assert gated.stats["unet_passes"] == 4
    assert not torch.allclose(gated.images, generate(model, prompts, **kw).images, atol=1e-4)
    with pytest.raises(ValueError, match="plain sampling"):
        generate(model, prompts, tgate=TGateSettings(2), key_steps=[0, 2], **kw)


def test_tgate_on_a_users_pipeline_equals_the_native_sampler(pipe) -> None:
    """Three lines on a stock StableDiffusionPipeline give exactly what tgate_sample gives (which
    equals the package); disabling restores the pipeline."""
    from fcr.diffusers_cache.tgate import disable_tgate, enable_tgate, tgate_settings

    latents, cond, uncond = _inputs(pipe)
    settings = TGateSettings(4, 2, 1, 1)
    expected = tgate_sample(pipe.unet, build_scheduler("ddim", **CONFIGS["sd15"]), latents, cond,
                            uncond_hidden_states=uncond, guidance_scale=3.0, num_inference_steps=STEPS,
                            settings=settings).latents
    processors = dict(pipe.unet.attn_processors)
    run = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, guidance_scale=3.0,
               output_type="latent")
    stock = pipe(latents=latents.clone(), **run).images
    enable_tgate(pipe, gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)
    try:
        assert tgate_settings(pipe) == settings
        first = pipe(latents=latents.clone(), **run).images
        again = pipe(latents=latents.clone(), **run).images  # a second call starts from a clean state
        with pytest.raises(ValueError, match="guidance_scale > 1"):
            pipe(latents=latents.clone(), **{**run, "guidance_scale": 1.0})
    finally:
        disable_tgate(pipe)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert dict(pipe.unet.attn_processors) == processors and "forward" not in vars(pipe.unet)
    assert tgate_settings(pipe) is None and torch.equal(pipe(latents=latents.clone(), **run).images, stock)
