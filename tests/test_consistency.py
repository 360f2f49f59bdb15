"""Consistency distillation (LCM-style), full and LoRA: the parametrisation against diffusers'
LCMScheduler, the loss of an exact student, adapters, and sampling a student (tiny random UNets and
an analytic denoiser: code paths, never results)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_embedded_model
from equivalence import FLOAT32_EQUIV_RTOL, assert_float32_equivalent
from diffusers import LCMScheduler

from fcr.backends.generate import generate, sampling_scheduler
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.config import ConfigError, validate
from fcr.core.configurations import student_configurations
from fcr.core.loss import FCRConfig
from fcr.options import SweepOptions
from fcr.train.consistency import ConsistencyObjective, add_lora, boundary_scalings, merge_lora, solver_grid


def _ddim():
    return sampling_scheduler("ddim", build_noise_scheduler())


def test_scalings_and_grid_are_lcm_schedulers() -> None:
    lcm = LCMScheduler.from_config(_ddim().config, original_inference_steps=50)
    for t in (0, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor([t]))
        theirs = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip.item() == pytest.approx(float(theirs[0]), rel=1e-6)
        assert c_out.item() == pytest.approx(float(theirs[1]), rel=1e-6)
    assert boundary_scalings(torch.tensor([0]))[0].item() == 1.0  # f(z, 0) = z
    grid = set(solver_grid(1000, 50).tolist())
    for n in (1, 2, 4, 8):
        lcm.set_timesteps(n)
        assert set(lcm.timesteps.tolist()) <= grid  # the sampler steps where the student was trained


class _IdealDenoiser(torch.nn.Module):
    """The exact epsilon-predictor of a one-point data set ``x0`` (its ODE ends at x0 from anywhere)."""

    def __init__(self, x0: torch.Tensor, alphas: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.alphas = x0, alphas
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, z, t, states):
        a = self.alphas[t.long()].view(-1, *([1] * (z.ndim - 1)))
        x0 = self.x0.repeat(len(z) // len(self.x0), *([1] * (z.ndim - 1)))
        return SimpleNamespace(sample=self.scale * (z - a.sqrt() * x0) / (1 - a).sqrt())


def test_an_exact_student_has_almost_zero_loss_and_a_wrong_one_does_not() -> None:
    ddim = _ddim()
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    states, uncond = torch.randn(4, 2, 8), torch.zeros(1, 2, 8)
    teacher, student = _IdealDenoiser(x0, ddim.alphas_cumprod), _IdealDenoiser(x0, ddim.alphas_cumprod)
    objective = ConsistencyObjective(student, teacher, ddim, 50, 3.0, uncond, FCRConfig())
    exact, _, fcr = objective(x0, states, torch.Generator().manual_seed(1))
    # f(z_t, t) and f(z_s, s) differ only by c_skip(t) z_t - c_skip(s) z_s terms (c_skip(19) ~ 7e-6,
    # c_skip(0) = 1 at the boundary step): the pseudo-Huber loss of that is tiny, not zero.
    assert exact.item() < 1e-3 and fcr.item() == 0.0
    with torch.no_grad():
        student.scale.fill_(1.2)
    wrong, _, _ = objective(x0, states, torch.Generator().manual_seed(1))
    assert wrong.item() > 10 * exact.item()


def test_lora_trains_adapters_only_and_merges_into_a_plain_unet() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_embedded_unet("base", sample_size=16).eval()
        add_lora(unet, 4)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.01)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    x, t, c = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500]), torch.ones(1, 4, 384)
    with torch.no_grad():
        before = unet(x, t, c).sample
        after = merge_lora(unet)(x, t, c).sample
    assert not any("lora" in n for n, _ in unet.named_parameters())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # float32 rounding of W + BA
    with pytest.raises(ValueError, match="rank"):
        add_lora(build_embedded_unet("base", sample_size=16), 0)


def test_bad_consistency_parameters_fail_at_validation() -> None:
    with pytest.raises(ConfigError, match="'distill_lora_rank'"):
        validate({"distill_lora_rank": 0})
    with pytest.raises(ConfigError, match="'distill_sampling_steps'"):
        validate({"distill_method": "consistency", "distill_base_steps": 8, "distill_sampling_steps": [4, 16]})
    with pytest.raises(ConfigError, match="'distill_method'"):
        validate({"distill_method": "adversarial"})
    # The halving rule is progressive distillation's only.
    assert validate({"distill_method": "consistency", "distill_base_steps": 50, "distill_rounds": 4})


def test_a_consistency_student_samples_with_lcm_independent_of_batching() -> None:
    model, prompts = tiny_embedded_model()
    record = {"method": "consistency", "base_steps": 50, "sampling_steps": [1, 4], "sampling_guidance_scale": 1.0}
    configs = student_configurations(record, SweepOptions(strides=(1, 2), deep_cache_intervals=(2,)))
    assert [c.name for c in configs] == ["CD-1", "CD-4", "CD-4-FD-2", "CD-4-DeepCache-2-b0"]
    for config in configs:
        run = dict(scheduler_name=config.scheduler, num_inference_steps=config.num_inference_steps,
                   guidance_scale=config.guidance_scale, key_steps=config.key_steps,
                   deep_cache_branch=config.deep_branch, seed=7,
                   scheduler_hook=lambda b, s, config=config: config.grid_scheduler(s))
        one = generate(model, prompts, batch_size=2, **run).images
        split = generate(model, prompts, batch_size=1, **run).images
        assert torch.isfinite(one).all()
        # The step noise is per image, so batching changes rounding only; LCM's x0 = (z - sigma eps) / alpha
        # amplifies the UNet's rounding by sigma/alpha (~15 at t = 999) beyond plain float32 equivalence.
        a_T = build_noise_scheduler().alphas_cumprod[-1]
        assert_float32_equivalent(split, one, rtol=FLOAT32_EQUIV_RTOL * float(((1 - a_T) / a_T).sqrt()))
    first = generate(model, prompts, batch_size=2, scheduler_name="lcm", num_inference_steps=4, guidance_scale=1.0,
                     seed=7, scheduler_hook=lambda b, s: configs[1].grid_scheduler(s)).images
    again = generate(model, prompts, batch_size=2, scheduler_name="lcm", num_inference_steps=4, guidance_scale=1.0,
                     seed=7, scheduler_hook=lambda b, s: configs[1].grid_scheduler(s)).images
    assert torch.equal(first, again)  # the step noise comes from (seed, image), never the global generator
