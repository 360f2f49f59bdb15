"""Progressive distillation: the teacher-grid sampler, the two-step target, the objective and its
training loop (tiny random UNets and an analytic denoiser: code paths, never results)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import _real_examples

from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.config import ConfigError, validate
from fcr.core.grid_ddim import GridDDIM, check_halving, ddim_grid
from fcr.core.loss import FCRConfig
from fcr.core.sampler import sample
from fcr.train.distillation import ProgressiveObjective, progressive_rounds, student_from, two_step_target
from fcr.train.loop import TrainConfig, train


def _ddim(prediction_type: str = "epsilon"):
    return sampling_scheduler("ddim", build_noise_scheduler(prediction_type=prediction_type))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_grid_ddim_at_stride_one_is_diffusers_ddim(prediction_type: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_embedded_unet("base", sample_size=16).eval()
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(2, 4, 384, generator=torch.Generator().manual_seed(2))
    uncond = torch.zeros(1, 4, 384)
    kw = dict(uncond_hidden_states=uncond, guidance_scale=3.0, num_inference_steps=8)
    ddim = _ddim(prediction_type)
    ours = sample(unet, GridDDIM(ddim, 8, 1), noise, cond, **kw).latents
    theirs = sample(unet, ddim, noise, cond, **kw).latents
    # Same arithmetic in float32, in another order: rounding-level differences only.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_student_step_spans_two_teacher_steps() -> None:
    ddim = _ddim()
    teacher, student = GridDDIM(ddim, 16, 2), GridDDIM(ddim, 16, 4)
    assert torch.equal(student.grid, teacher.grid[::2])
    assert torch.equal(teacher.grid, ddim_grid(ddim, 16)[::2])
    assert len(student.grid) == 4
    # The last step lands on the final alpha, as diffusers' DDIM's does.
    assert torch.equal(student.previous_alpha(int(student.grid[-1])), ddim.final_alpha_cumprod)
    assert torch.equal(student.previous_alpha(int(student.grid[0])), ddim.alphas_cumprod[int(teacher.grid[2])])
    with pytest.raises(ValueError, match="4 steps"):
        student.set_timesteps(8)
    with pytest.raises(ValueError, match="stride must divide"):
        GridDDIM(ddim, 16, 3)


def test_halving_is_checked() -> None:
    assert check_halving(48, 4) == [48, 24, 12, 6, 3]
    with pytest.raises(ValueError, match="3 steps do not halve"):
        check_halving(48, 5)
    rounds = progressive_rounds(16, 2, 4.0)
    assert [(r.stride, r.steps, r.teacher_guidance) for r in rounds] == [(2, 8, 4.0), (4, 4, 1.0)]
    with pytest.raises(ConfigError, match="'distill_rounds'"):
        validate({"distill_base_steps": 50, "distill_rounds": 2})
    with pytest.raises(ConfigError, match="'distill_guidance_scale'"):
        validate({"distill_guidance_scale": 0.5})


def test_the_target_makes_one_ddim_step_land_on_the_teachers_point() -> None:
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    a_t, a_s = torch.tensor([0.1, 0.3, 0.5]), torch.tensor([0.2, 0.6, 0.9])
    x = two_step_target(z_t, z_s, a_t, a_s)
    view = (-1, 1, 1, 1)
    eps = (z_t - a_t.sqrt().view(view) * x) / (1 - a_t).sqrt().view(view)
    landed = a_s.sqrt().view(view) * x + (1 - a_s).sqrt().view(view) * eps
    torch.testing.assert_close(landed, z_s, rtol=1e-5, atol=1e-5)


class _IdealDenoiser(torch.nn.Module):
    """The exact epsilon-predictor of a one-point data distribution ``x0``: DDIM with it is exact at
    any step count, so a student equal to it has nothing to learn."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.alphas = x0, alphas_cumprod
        self.scale = torch.nn.Parameter(torch.ones(()))  # something to train

    def forward(self, z, t, states):
        a = self.alphas[t.long()].view(-1, *([1] * (z.ndim - 1)))
        x0 = self.x0.repeat(len(z) // len(self.x0), *([1] * (z.ndim - 1)))  # [x0; x0] under guidance
        return SimpleNamespace(sample=self.scale * (z - a.sqrt() * x0) / (1 - a).sqrt())


def test_an_exact_student_has_zero_loss_and_a_wrong_one_does_not() -> None:
    ddim = _ddim()
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    states, uncond = torch.randn(4, 2, 8), torch.zeros(1, 2, 8)
    rnd = progressive_rounds(8, 1, 3.0)[0]  # guided teacher: cond and uncond agree for this denoiser
    teacher, student = _IdealDenoiser(x0, ddim.alphas_cumprod), _IdealDenoiser(x0, ddim.alphas_cumprod)
    objective = ProgressiveObjective(student, teacher, ddim, rnd, uncond, FCRConfig())
    total, distill, fcr = objective(x0, states, torch.Generator().manual_seed(1))
    # Loss of float32 rounding (x0 ~ 1, SNR weights <= ~1e3 at the least noisy step).
    assert total.item() < 1e-6 and fcr.item() == 0.0
    with torch.no_grad():
        student.scale.fill_(1.1)
    wrong, _, _ = objective(x0, states, torch.Generator().manual_seed(1))
    assert wrong.item() > 1e-3


def _round_run(folder: Path, lambda_fcr: float, stop_after: int | None = None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = build_embedded_unet("base").eval()
    student = student_from(teacher)
    examples = _real_examples(16)
    fcr = FCRConfig(lambda_fcr=lambda_fcr)
    objective = ProgressiveObjective(student, teacher, _ddim(), progressive_rounds(8, 1, 2.0)[0],
                                     examples.empty_state[None], fcr)
    cfg = TrainConfig(learning_rate=1e-4, train_batch_size=4, max_train_steps=3, checkpoint_every=1, log_every=1,
                      caption_dropout=0.0, seed=5)
    result = train(student, build_noise_scheduler(), examples, cfg, fcr, folder, progress=False, stop_after=stop_after,
                   objective=objective)
    return result, student, teacher


def test_a_round_trains_the_student_only_and_resumes_exactly(tmp_path: Path) -> None:
    full, student, teacher = _round_run(tmp_path / "a", lambda_fcr=0.1)
    assert full.unet_dir is not None and (full.unet_dir / "diffusion_pytorch_model.safetensors").is_file()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = build_embedded_unet("base")
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), fresh.parameters()))  # frozen
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), fresh.parameters()))
    rows = list(csv.DictReader((full.run_dir / "train_log.csv").open()))
    assert len(rows) == 3 and all(float(r["fcr"]) > 0 and float(r["denoise"]) > 0 for r in rows)
    _round_run(tmp_path / "b", lambda_fcr=0.1, stop_after=2)
    resumed, student_b, _ = _round_run(tmp_path / "b", lambda_fcr=0.1)
    assert resumed.resumed_from == 2
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), student_b.parameters()))


def test_fcr_with_distillation_rejects_the_deep_group() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_embedded_unet("base", sample_size=16)
    with pytest.raises(ValueError, match="deep"):
        ProgressiveObjective(unet, unet, _ddim(), progressive_rounds(8, 1, 1.0)[0], torch.zeros(1, 4, 384),
                             FCRConfig(lambda_fcr=0.1, feature_group="deep"))


def test_a_students_training_cost_sums_its_rounds_and_a_cache_aware_fine_tune_has_its_own(tmp_path: Path) -> None:
    import json

    from fcr.eval.training_cost import sampler_training_cost

    for r, (steps, flops, wall) in enumerate([(10, 100.0, 5.0), (20, 50.0, 7.0)], start=1):
        folder = tmp_path / "pd" / f"round{r}_steps{48 // 2**r}"
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text("{}")
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        (folder / "distillation.json").write_text(json.dumps(
            {"method": "progressive", "index": r, "train_flops_per_example": flops, "train_batch_size": 4}))
        (folder / "train_log.csv").write_text(f"step,elapsed_s\n{steps // 2},1.0\n{steps},{wall}\n")
    cache = tmp_path / "cache_aware"
    (cache / "unet").mkdir(parents=True)
    (cache / "unet" / "config.json").write_text("{}")
    (cache / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (cache / "cache_training.json").write_text(json.dumps(
        {"configuration": "DeepCache-10-b0", "train_flops_per_example": 30.0, "train_batch_size": 8}))
    (cache / "train_log.csv").write_text("step,elapsed_s\n150,9.0\n")
    cost = sampler_training_cost({"pd@round1": str(tmp_path / "pd" / "round1_steps24"),
                                  "pd@round2": str(tmp_path / "pd" / "round2_steps12"), "other": str(tmp_path / "none"),
                                  "cache": str(cache)})
    cost = cost.set_index("model")
    assert list(cost.index) == ["pd@round1", "pd@round2", "cache"]  # not trained for a sampler: no row
    assert cost.loc["cache", "train_flops"] == 30.0 * 8 * 150 and cost.loc["cache", "cache_training"] == "DeepCache-10-b0"
    assert cost.loc["pd@round1", "train_flops"] == 100.0 * 4 * 10
    assert cost.loc["pd@round2", "train_flops"] == 100.0 * 4 * 10 + 50.0 * 4 * 20  # round 2 needs round 1
    assert cost.loc["pd@round2", "train_wall_s"] == 12.0 and cost.loc["pd@round2", "rounds"] == 2
