"""Cache-aware fine-tuning: rollouts are the evaluation's sampler, the losses measure what they say,
trainable parts, training and resumption (tiny random UNets and real images: code paths, never results)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from test_train import _real_examples

from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.config import ConfigError, validate
from fcr.core.grid_ddim import landing_scales
from fcr.core.loss import FCRConfig
from fcr.core.sampler import PriorNoise, sample
from fcr.train.cache_aware import (
    CacheAwareObjective,
    CacheTarget,
    _cached_prediction,
    trainable_parameters,
    uncached_parameter_names,
)
from fcr.train.loop import TrainConfig, train

DEEPCACHE = CacheTarget(8, 4, 0, 3.0)
ENCODER = CacheTarget(8, 4, None, 3.0, PriorNoise(True, 0.05, 0.5))


def _ddim():
    return sampling_scheduler("ddim", build_noise_scheduler())


def _unet(seed: int = 0, size: int = 16):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_embedded_unet("base", sample_size=size).eval()


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 4, 384, generator=g), torch.zeros(1, 4, 384)


def _objective(target: CacheTarget, loss: str = "step", horizon: int = 1, rollouts: int = 3, student=None):
    teacher = _unet(0)
    student = copy.deepcopy(teacher).requires_grad_(True) if student is None else student
    return CacheAwareObjective(student, teacher, _ddim(), target, torch.zeros(1, 4, 384), loss=loss, horizon=horizon,
                               rollouts=rollouts)


@pytest.mark.parametrize("target", [DEEPCACHE, ENCODER], ids=["deepcache", "encoder"])
def test_a_rollout_is_the_evaluations_cached_sampler(target: CacheTarget) -> None:
    noise, cond, uncond = _inputs()
    objective = _objective(target)
    with torch.no_grad():
        path = objective.rollout(noise, cond)
    out = sample(objective.unet, _ddim(), noise, cond, uncond_hidden_states=uncond, guidance_scale=target.guidance_scale,
                 num_inference_steps=8, key_steps=target.key_steps, prior_noise=target.prior_noise,
                 deep_cache_branch=target.deep_branch).latents
    assert path.shape == (9, *noise.shape)
    assert torch.equal(path[0], noise)
    # parallel decoding batches the decoders: rounding-level differences only
    torch.testing.assert_close(path[-1], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [DEEPCACHE, ENCODER], ids=["deepcache", "encoder"])
def test_the_cached_prediction_at_its_key_step_is_the_full_pass(target: CacheTarget) -> None:
    unet = _unet()
    z, cond, _ = _inputs()
    t = torch.tensor([700, 500, 300])
    branch = None if target.deep_branch is None else __import__("fcr.core.unet", fromlist=["x"]).deep_branch(unet, 0)
    with torch.no_grad():
        full = unet(z, t, cond).sample
        cached = _cached_prediction(unet, target, z, t, z, t, cond, branch)
        later = _cached_prediction(unet, target, z, t, z, t - 100, cond, branch)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert (later - full).abs().max() > 1e-3


def test_landing_weights_are_diffusers_ddim_steps_in_the_final_images_scale() -> None:
    ddim = _ddim()
    a_t, a_next, weight = landing_scales(ddim, 8)
    g = torch.Generator().manual_seed(2)
    z, eps, d = (torch.randn(1, 1, 4, 4, generator=g) for _ in range(3))
    raw = []
    for j, t in enumerate(ddim.timesteps):
        one = ddim.step(eps, t, z, eta=0.0).prev_sample
        two = ddim.step(eps + d, t, z, eta=0.0).prev_sample
        moved = (two - one) / a_next[j].sqrt()
        s = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
        torch.testing.assert_close(moved, (s(a_next[j]) - s(a_t[j])) * d, rtol=1e-4, atol=1e-5)
        raw.append(float((s(a_next[j]) - s(a_t[j])) ** 2))
    torch.testing.assert_close(weight, torch.tensor(raw) / torch.tensor(raw).mean(), rtol=1e-5, atol=0)
    assert torch.isclose(weight.mean(), torch.tensor(1.0))


@pytest.mark.parametrize("target", [DEEPCACHE, ENCODER], ids=["deepcache", "encoder"])
def test_the_trajectory_loss_from_the_first_window_is_the_final_images_error(target: CacheTarget) -> None:
    """Horizon 0 from window 0: the student's whole cached sampling against the original's whole full
    sampling from the same noise, as :func:`sample` runs them."""
    noise, cond, uncond = _inputs()
    objective = _objective(target, loss="trajectory", horizon=0, student=_unet(3))
    with torch.no_grad():
        path = objective.rollout(noise, cond)
        loss = objective.trajectory_loss(path, cond, 0)
    kw = dict(uncond_hidden_states=uncond, guidance_scale=target.guidance_scale, num_inference_steps=8,
              prior_noise=target.prior_noise)
    cached = sample(objective.unet, _ddim(), noise, cond, key_steps=target.key_steps, deep_cache_branch=target.deep_branch,
                    **kw).latents
    full = sample(objective.teacher, _ddim(), noise, cond, **kw).latents
    expected = ((cached - full) / _ddim().final_alpha_cumprod.sqrt()).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["step", "step_weighted", "trajectory"])
def test_every_loss_trains_the_student_only(loss: str) -> None:
    objective = _objective(DEEPCACHE, loss=loss, student=_unet(3).requires_grad_(True))
    x0 = torch.zeros(4, 1, 16, 16)
    _, cond, _ = _inputs(4)
    total, main, fcr = objective(x0, cond, torch.Generator().manual_seed(0))
    total.backward()
    assert total.item() > 0 and torch.isfinite(total) and fcr.item() == 0 and main.item() == total.item()
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.unet.parameters())


def test_a_student_that_is_the_original_still_pays_for_caching() -> None:
    """Before training the student is the original: its cached predictions differ from the full ones
    at non-key steps, so the loss is positive; with every step a key step it would be zero."""
    objective = _objective(DEEPCACHE)
    x0, (_, cond, _) = torch.zeros(6, 1, 16, 16), _inputs(6)
    with torch.no_grad():
        assert objective(x0, cond, torch.Generator().manual_seed(0))[0].item() > 0
        path = objective.rollout(x0[:3], cond[:3])
        j = torch.tensor([0, 4])  # key steps: cached == full, zero error
        t = objective.timesteps[j]
        pred = objective.student_cached(path[j, [0, 1]], t, path[j, [0, 1]], t, cond[:2], j, j < 0)
        teacher = objective.teacher_output(path[j, [0, 1]], t, cond[:2], DEEPCACHE.guidance_scale)
    torch.testing.assert_close(pred, teacher, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [DEEPCACHE, ENCODER], ids=["deepcache", "encoder"])
def test_uncached_parameters_are_what_a_cached_step_recomputes(target: CacheTarget) -> None:
    unet = _unet()
    names = uncached_parameter_names(unet, target)
    assert names and not any(n.startswith("mid_block") for n in names)
    assert any(n.startswith("conv_out") for n in names)
    if target.deep_branch is None:  # FD: the decoder (and the time embedding it reads)
        assert not any(n.startswith(("down_blocks", "conv_in")) for n in names)
        assert any(n.startswith("up_blocks.0") for n in names)
    else:  # DeepCache branch 0: conv_in, the first block's shallow layers, the last up block's last layer
        assert any(n.startswith("conv_in") for n in names)
        assert not any(n.startswith(("down_blocks.1", "down_blocks.2", "up_blocks.0")) for n in names)
    assert all(p.requires_grad for p in unet.parameters())  # left as it was
    count = trainable_parameters(unet, target, "uncached")
    assert count == sum(p.numel() for n, p in unet.named_parameters() if n in names)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == names
    with pytest.raises(ValueError, match="trainable"):
        trainable_parameters(unet, target, "encoder")


def _run(folder: Path, stop_after: int | None = None, trainable: str = "uncached"):
    teacher = _unet(0, size=32)
    student = copy.deepcopy(teacher)
    trainable_parameters(student, DEEPCACHE, trainable, lora_rank=2)
    examples = _real_examples(16)
    objective = CacheAwareObjective(student, teacher, _ddim(), DEEPCACHE, examples.empty_state[None], rollouts=2)
    cfg = TrainConfig(learning_rate=1e-3, train_batch_size=4, max_train_steps=3, checkpoint_every=1, log_every=1,
                      caption_dropout=0.0, seed=5)
    fcr = FCRConfig(lambda_fcr=0.0)
    result = train(student, build_noise_scheduler(), examples, cfg, fcr, folder, progress=False, stop_after=stop_after,
                   objective=objective)
    return result, student, teacher


def test_training_changes_only_the_trainable_part_and_resumes_exactly(tmp_path: Path) -> None:
    result, student, teacher = _run(tmp_path / "a")
    fresh = _unet(0, size=32)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), fresh.parameters()))
    names = uncached_parameter_names(fresh, DEEPCACHE)
    changed = {n for (n, p), q in zip(student.named_parameters(), fresh.parameters()) if not torch.equal(p, q)}
    assert changed and changed <= names
    rows = list(csv.DictReader((result.run_dir / "train_log.csv").open()))
    assert len(rows) == 3 and all(float(r["denoise"]) > 0 for r in rows)
    _run(tmp_path / "b", stop_after=2)
    resumed, student_b, _ = _run(tmp_path / "b")
    assert resumed.resumed_from == 2
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), student_b.parameters()))


def test_lora_trains_adapters_only() -> None:
    unet = _unet()
    before = {n: p.clone() for n, p in unet.named_parameters()}
    count = trainable_parameters(unet, DEEPCACHE, "lora", lora_rank=2)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert count > 0 and trainable and all("lora" in n for n in trainable)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters() if n in before)


def test_bad_cache_training_parameters_fail_with_one_line() -> None:
    ok = {"train_objective": "cache_aware", "lambda_fcr": 0.0}
    assert validate(ok)["cache_loss"] == "step"
    for bad, key in [({"cache_interval": 50}, "cache_interval"), ({"cache_steps": 8, "cache_interval": 8}, "cache_interval"), ({"cache_interval": 1}, "cache_interval"),
                     ({"cache_lora_rank": 0}, "cache_lora_rank"), ({"lambda_fcr": 0.1}, "lambda_fcr"),
({"cache_rollouts": 200}, "cache_rollouts"),
                     ({"cache_trainable": "scale_shift", "ema_decay": 0.99}, "ema_decay"),
                     ({"cache_loss": "fcr"}, "cache_loss"), ({"validate_every": 10}, "validate_every")]:
        with pytest.raises(ConfigError, match=f"'{key}'") as err:
            validate({**ok, **bad})
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="interval"):
        CacheAwareObjective(_unet(), _unet(), _ddim(), CacheTarget(8, 8, 0, 1.0), torch.zeros(1, 4, 384))
