"""Block Caching's scale-shift (fcr.core.scale_shift): the identity when untrained, applied at cached
steps only, saved and loaded as safetensors, trained beside a frozen UNet and picked up by the
evaluation for its own configuration (tiny random UNets and real images: code paths, never results)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_cache_aware import DEEPCACHE, ENCODER, _ddim, _inputs, _unet
from test_train import _real_examples

from fcr.backends.models import build_noise_scheduler
from fcr.core.configurations import SamplingConfig
from fcr.core.loss import FCRConfig
from fcr.core.sampler import sample
from fcr.core.scale_shift import SCALE_SHIFT_FILE, CacheScaleShift, cached_channels, load_scale_shift
from fcr.train.cache_aware import (CacheAwareObjective, CacheTarget, finish_cache_training, scale_shift_of,
                                   trainable_parameters)
from fcr.train.loop import TrainConfig, train


def _sample(unet, target: CacheTarget, correction=None, parallel: bool = True) -> torch.Tensor:
    noise, cond, uncond = _inputs()
    return sample(unet, _ddim(), noise, cond, uncond_hidden_states=uncond, guidance_scale=target.guidance_scale,
                  num_inference_steps=target.num_inference_steps, key_steps=target.key_steps, parallel=parallel,
                  prior_noise=target.prior_noise, deep_cache_branch=target.deep_branch,
                  cache_correction=correction).latents


def _correction(unet, target: CacheTarget) -> CacheScaleShift:
    return CacheScaleShift.for_unet(unet, target.name, target.num_inference_steps, target.deep_branch)


@pytest.mark.parametrize("target", [DEEPCACHE, ENCODER], ids=["deepcache", "encoder"])
def test_the_untrained_correction_is_the_identity_and_key_steps_are_never_corrected(target: CacheTarget) -> None:
    unet = _unet()
    correction = _correction(unet, target)
    plain = _sample(unet, target)
    with torch.no_grad():
        assert torch.equal(_sample(unet, target, correction), plain)  # x * (1 + 0) + 0 is x exactly
        for p in [*correction.scale, *correction.shift]:  # only the key steps' rows set: never read
            p[target.key_steps] = 0.5
        assert torch.equal(_sample(unet, target, correction), plain)
        correction.shift[-1][1] = 0.5  # step 1 reads the cache
        changed = _sample(unet, target, correction)
    assert not torch.allclose(changed, plain)
    if target.deep_branch is None:  # batched decoders apply each step's own correction
        torch.testing.assert_close(_sample(unet, target, correction, parallel=False), changed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [DEEPCACHE, ENCODER], ids=["deepcache", "encoder"])
def test_the_correction_costs_no_pass_and_no_counted_flop(target: CacheTarget) -> None:
    """The sampling cost of a scale-shift fine-tune is its cached sampler's: the same network passes
    and the same FLOPs (torch's counter: matmuls, convolutions, attention; the correction is elementwise)."""
    from fcr.eval.profiling import count_flops

    unet = _unet()
    correction = _correction(unet, target)
    noise, cond, uncond = _inputs()

    def run(corr):
        return sample(unet, _ddim(), noise, cond, uncond_hidden_states=uncond, guidance_scale=target.guidance_scale,
                      num_inference_steps=target.num_inference_steps, key_steps=target.key_steps,
                      deep_cache_branch=target.deep_branch, cache_correction=corr)

    with torch.no_grad():
        assert count_flops(run, correction) == count_flops(run, None) > 0
        assert run(correction).stats == run(None).stats


def test_a_correction_is_refused_by_another_sampler() -> None:
    unet = _unet()
    correction = _correction(unet, DEEPCACHE)
    assert correction.applies_to("DeepCache-4-b0", 8) and not correction.applies_to("DeepCache-4-b0", 50)
    with pytest.raises(ValueError, match="DeepCache-4-b0"):
        _sample(unet, ENCODER, correction)
    with pytest.raises(ValueError, match="8 steps"):
        _sample(unet, CacheTarget(10, 5, 0, 3.0), correction)


def test_channels_save_and_load(tmp_path: Path) -> None:
    unet = _unet()
    encoder = cached_channels(unet, None)
    assert len(encoder) == len(unet.config.block_out_channels) * (unet.config.layers_per_block + 1) + 1
    assert cached_channels(unet, 0) == [unet.config.block_out_channels[0]]
    correction = _correction(unet, ENCODER)
    with torch.no_grad():
        for i, p in enumerate([*correction.scale, *correction.shift]):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    loaded = load_scale_shift(correction.save(tmp_path / SCALE_SHIFT_FILE))
    assert (loaded.configuration, loaded.num_inference_steps, loaded.deep_branch) == ("FD-4", 8, None)
    assert all(torch.equal(a, b) for a, b in zip(correction.state_dict().values(), loaded.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters())
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a cache scale-shift file"):
        load_scale_shift(tmp_path / "other.safetensors")


def test_scale_shift_training_moves_only_the_correction_and_the_evaluation_uses_it(tmp_path: Path) -> None:
    teacher = _unet(0, size=32)
    student = copy.deepcopy(teacher)
    count = trainable_parameters(student, DEEPCACHE, "scale_shift")
    correction = scale_shift_of(student)
    assert count == 2 * 8 * sum(cached_channels(teacher, 0)) == sum(p.numel() for p in correction.parameters())
    examples = _real_examples(16)
    objective = CacheAwareObjective(student, teacher, _ddim(), DEEPCACHE, examples.empty_state[None], rollouts=2)
    cfg = TrainConfig(learning_rate=1e-2, train_batch_size=4, max_train_steps=2, checkpoint_every=1, log_every=1,
                      caption_dropout=0.0, seed=5)
    result = train(student, build_noise_scheduler(), examples, cfg, FCRConfig(lambda_fcr=0.0), tmp_path / "run",
                   progress=False, objective=objective)
    unet_weights = {n: p for n, p in student.named_parameters() if not n.startswith("cache_scale_shift")}
    assert all(torch.equal(p, q) for p, q in zip(unet_weights.values(), teacher.parameters()))
    rows = [p[list(set(range(8)) - set(DEEPCACHE.key_steps))] for p in correction.parameters()]
    assert any(r.abs().sum() > 0 for r in rows)  # the cached steps' rows trained
    assert all(p[DEEPCACHE.key_steps].abs().sum() == 0 for p in correction.parameters())  # key steps never read
    finish_cache_training(student, result.run_dir, {"trainable": "scale_shift"})
    assert scale_shift_of(student) is None
    from safetensors.torch import load_file

    saved = load_file(str(result.run_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("cache_scale_shift") for k in saved)
    # The evaluation loads it with the model and applies it to its own configuration only.
    from fcr.config import validate
    from fcr.eval.context import load_models
    from fcr.options import Options

    opts = Options.from_flat(validate({}))
    loaded = load_models(opts, {"trained": str(result.run_dir)}, torch.device("cpu"))["trained"]
    own = SamplingConfig("DeepCache-4-b0", "ddim", 8, tuple(DEEPCACHE.key_steps), deep_branch=0)
    other = SamplingConfig("DeepCache-4-b0", "ddim", 50, tuple(range(0, 50, 4)), deep_branch=0)
    assert loaded.correction_for(own) is not None and loaded.correction_for(other) is None
    got = loaded.correction_for(own)
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), correction.parameters()))
