"""Progressive distillation (Salimans & Ho, 2202.00512) of a guided teacher, optionally with the FCR term;
:func:`distill` also runs consistency distillation (:mod:`fcr.train.consistency`).

Round ``r`` trains a student, initialised from its teacher, whose one DDIM step from grid point
``t`` lands where two teacher steps land (``t -> t' -> s``; :class:`fcr.core.grid_ddim.GridDDIM`
strides ``2^(r-1)`` and ``2^r`` on the original's ``base_steps``-step grid). The student's target is
the clean image ``x~`` that makes its DDIM step exact,
``x~ = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)``, and the loss is the
truncated-SNR weighted ``max(SNR_t, 1) * ||x^ - x~||^2`` of the paper, whatever the network predicts
(epsilon or v). Guidance: round 1's teacher is the original with classifier-free guidance at a fixed
scale ``w`` and its student takes the conditional input only, so the guidance is folded into the
first student (Meng et al., 2210.03142, whose stage one does this for a range of ``w`` with a
w-embedding; we distil one ``w``, the scale the study samples at). Later rounds are unguided.

FCR + distillation: with ``lambda_fcr > 0`` the loss adds ``lambda`` times the FCR feature distance
between the student's encoder features at ``(z_t, t)`` and at the point its step reaches
``(z_s, s)``: consecutive steps of the distilled sampler, the pair encoder caching reuses features
across (a student's last step lands on the final alpha and has no pair).

The optimisation loop is :func:`fcr.train.loop.train` (checkpoints, determinism, logs), given
:class:`ProgressiveObjective`; its log's ``denoise`` column is the distillation loss.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from diffusers import DDIMScheduler

from fcr.contract import DISTILLATION_FILE
from fcr.markers import make_portable
from fcr.core import unet as fcr_unet
from fcr.core.grid_ddim import GridDDIM, check_halving, predicted_x0_eps
from fcr.core.loss import FCRConfig, per_sample_feature_distance
from fcr.train.teacher import TeacherStudent

__all__ = ["DISTILLATION_FILE", "ProgressiveObjective", "ProgressiveRound", "distill", "progressive_rounds", "round_summary",
           "student_from", "training_flops_per_example", "two_step_target"]



@dataclass(frozen=True)
class ProgressiveRound:
    """One halving round: the student samples ``steps`` steps, every ``stride``-th point of the
    original's ``base_steps``-step DDIM grid; ``teacher_guidance`` > 1 only in round 1."""

    index: int
    base_steps: int
    stride: int
    steps: int
    teacher_guidance: float
    method: str = "progressive"

    @property
    def folder_name(self) -> str:
        return f"round{self.index}_steps{self.steps}"

    def record(self, teacher: str, lambda_fcr: float) -> dict[str, Any]:
        """What ``distillation.json`` records: the sampler (method, grid) and where it came from."""
        return {**asdict(self), "sampling_guidance_scale": 1.0, "teacher": teacher, "lambda_fcr": lambda_fcr}


def progressive_rounds(base_steps: int, rounds: int, guidance_scale: float) -> list[ProgressiveRound]:
    """The rounds of a progressive distillation; a step count that does not halve raises ValueError."""
    counts = check_halving(base_steps, rounds)
    return [ProgressiveRound(r, base_steps, 2**r, counts[r], guidance_scale if r == 1 else 1.0)
            for r in range(1, rounds + 1)]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


def two_step_target(z_t: torch.Tensor, z_s: torch.Tensor, alpha_bar_t: torch.Tensor,
                    alpha_bar_s: torch.Tensor) -> torch.Tensor:
    """The clean image whose DDIM step from ``(z_t, t)`` lands exactly on ``z_s`` (per-sample alpha-bars)."""
    a_t, a_s = _per_sample(alpha_bar_t, z_t), _per_sample(alpha_bar_s, z_t)
    ratio = (1 - a_s).sqrt() / (1 - a_t).sqrt()
    return (z_s.float() - ratio * z_t.float()) / (a_s.sqrt() - ratio * a_t.sqrt())


class ProgressiveObjective(TeacherStudent):
    """The loss of one round inside ``forward`` (for :func:`fcr.train.loop.train`): ``.unet`` is the
    student (trained), ``teacher`` is frozen. ``uncond_states``: the empty prompt's text states
    (one row), used when the teacher is guided."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, ddim: DDIMScheduler,
                 round_: ProgressiveRound, uncond_states: torch.Tensor, fcr: FCRConfig) -> None:
        super().__init__(student, teacher, uncond_states, fcr)
        self.round = round_
        self.student_sampler = GridDDIM(ddim, round_.base_steps, round_.stride)
        self.teacher_sampler = GridDDIM(ddim, round_.base_steps, round_.stride // 2)
        self.prediction_type = self.student_sampler.prediction_type
        alphas = ddim.alphas_cumprod.float()
        # alpha-bar of every teacher grid point, then the final alpha (where the last step lands).
        points = torch.cat([alphas[self.teacher_sampler.grid], ddim.final_alpha_cumprod.float().reshape(1)])
        self.register_buffer("teacher_alphas", points, persistent=False)

    def _ddim(self, z: torch.Tensor, out: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
        x0, eps = predicted_x0_eps(out.float(), z.float(), _per_sample(a_from, z), self.prediction_type)
        return _per_sample(a_to, z).sqrt() * x0 + (1 - _per_sample(a_to, z)).sqrt() * eps

    def forward(self, x0: torch.Tensor, states: torch.Tensor, generator: torch.Generator):
        n_student = len(self.student_sampler.grid)
        i = torch.randint(0, n_student, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        j = 2 * i  # the student's i-th point is the teacher's (2i)-th
        grid = self.teacher_sampler.grid.to(x0.device)
        j_dev = j.to(x0.device)
        a_t, a_mid, a_s = (self.teacher_alphas[j_dev + k] for k in (0, 1, 2))
        t, t_mid = grid[j_dev], grid[j_dev + 1]
        z_t = _per_sample(a_t, x0).sqrt() * x0.float() + (1 - _per_sample(a_t, x0)).sqrt() * noise.float()
        z_t = z_t.to(x0.dtype)
        with torch.no_grad():
            z_mid = self._ddim(z_t, self.teacher_output(z_t, t, states, self.round.teacher_guidance), a_t, a_mid).to(x0.dtype)
            z_s = self._ddim(z_mid, self.teacher_output(z_mid, t_mid, states, self.round.teacher_guidance), a_mid, a_s)
            target = two_step_target(z_t, z_s, a_t, a_s)

        use_fcr = self.fcr.lambda_fcr > 0 and n_student > 1
        if use_fcr:
            feats_t = fcr_unet.encode(self.unet, z_t, t, states)
            pred = fcr_unet.decode(self.unet, feats_t, t, states)
        else:
            pred = self.unet(z_t, t, states).sample
        x_hat, _ = predicted_x0_eps(pred.float(), z_t.float(), _per_sample(a_t, z_t), self.prediction_type)
        snr = a_t / (1 - a_t)
        per_sample = (x_hat - target).pow(2).flatten(1).mean(1)
        distill = (torch.clamp(snr, min=1.0) * per_sample).mean()
        if not use_fcr:
            zero = torch.zeros((), device=distill.device)
            return distill, distill.detach(), zero
        has_pair = (j_dev + 2) < len(grid)  # the last student step lands on the final alpha
        s = grid[torch.clamp(j_dev + 2, max=len(grid) - 1)]
        feats_s = fcr_unet.encode(self.unet, z_s.to(x0.dtype), s, states)
        indices = fcr_unet.feature_group_indices(self.unet, self.fcr.feature_group)
        dist = per_sample_feature_distance(feats_t, feats_s, indices, self.fcr.normalize)
        fcr_term = (dist * has_pair).sum() / has_pair.sum().clamp(min=1)
        return distill + self.fcr.lambda_fcr * fcr_term, distill.detach(), fcr_term.detach()


def student_from(teacher: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of ``teacher`` (the student's initialisation)."""
    return copy.deepcopy(teacher).requires_grad_(True).train()


def training_flops_per_example(objective: ProgressiveObjective, data: Any) -> int:
    """FLOPs of one training example of a round: the teacher's two (guided: four) passes, the
    student's forward and backward (and the FCR term's), counted once at batch 1. The student's
    gradients are cleared afterwards, so training starts as it would have."""
    from fcr.eval.profiling import count_training_flops

    gen = torch.Generator().manual_seed(0)
    x0, states = data.batch(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool), gen)
    device = next(objective.unet.parameters()).device
    flops = count_training_flops(lambda: objective(x0.to(device), states.to(device), gen)[0].backward())
    objective.unet.zero_grad(set_to_none=True)
    return flops


def round_summary(folders: list[Path]) -> pd.DataFrame:
    """One row per finished round: the student's steps and stride, the teacher's guidance, the
    optimizer steps, the final distillation loss (mean of the last 10 log rows), wall time and the
    training FLOPs (FLOPs per example x examples seen), what a distilled sampler costs before it is cheap."""
    from fcr.eval.training_cost import round_cost

    rows = []
    for folder in folders:
        record = json.loads((Path(folder) / DISTILLATION_FILE).read_text())
        log = pd.read_csv(Path(folder) / "train_log.csv")
        flops, wall = round_cost(folder)
        rows.append({"method": record["method"], "round": record["index"], "steps": record["steps"],
                     "stride": record.get("stride"), "lora_rank": record.get("lora_rank"),
                     "teacher_guidance": record["teacher_guidance"], "lambda_fcr": record["lambda_fcr"],
                     "train_steps": int(log["step"].iloc[-1]),
                     "final_distillation_loss": float(log["denoise"].tail(10).mean()),
                     "final_fcr_term": float(log["fcr"].tail(10).mean()), "wall_time_s": wall, "train_flops": flops,
                     "folder": str(folder)})
    return pd.DataFrame(rows)


def distill(opts: Any, *, progress: bool = True, stop_after: int | None = None) -> list[Path]:
    """Every round of the progressive distillation that validated ``opts`` describe (teacher
    ``model``, ``distill_base_steps``, ``distill_rounds``, ``distill_guidance_scale``; the training
    options per round; ``lambda_fcr`` > 0: FCR + distillation) into
    ``output_dir/run_name/round<r>_steps<N>/`` (``unet/``, ``params.yaml``, ``distillation.json``,
    the round's log and checkpoints). A finished round is loaded, not retrained; an interrupted one
    resumes from its last checkpoint. ``stop_after``: optimizer steps per round before stopping, as
    an interruption would. Returns the finished rounds' folders."""
    from fcr.backends.generate import sampling_scheduler
    from fcr.backends.models import load_unet_folder
    from fcr.train.finetune import run_dir, training_setup, write_params
    from fcr.train.loop import TrainConfig, fcr_config, train

    d = opts.distillation
    fcr = fcr_config(opts)
    if fcr.lambda_fcr > 0 and fcr.feature_group == "deep":
        raise ValueError("FCR + distillation compares encoder features: feature_group 'deep' is not supported")
    setup = training_setup(opts)
    ddim = sampling_scheduler("ddim", setup.noise_scheduler)
    uncond = setup.empty_prompt_states()
    main = setup.accelerator is None or setup.accelerator.is_main_process
    train_args = dict(accelerator=setup.accelerator, progress=progress, stop_after=stop_after)
    if d.distill_method == "consistency":
        return _consistency(opts, setup, ddim, uncond, fcr, main, train_args)
    rounds = progressive_rounds(d.distill_base_steps, d.distill_rounds, d.distill_guidance_scale)
    teacher, finished = setup.unet.eval(), []
    for rnd in rounds:
        folder = run_dir(opts) / rnd.folder_name
        if (folder / DISTILLATION_FILE).is_file() and (folder / "unet" / "config.json").is_file():
            teacher = load_unet_folder(folder / "unet").to(setup.unet.device).eval()
            finished.append(folder)
            continue
        student = student_from(teacher)
        objective = ProgressiveObjective(student, teacher, ddim, rnd, uncond, fcr)
        if main:
            write_params(folder, opts)
        record = {**rnd.record(opts.backbone.model, fcr.lambda_fcr),
                  "train_flops_per_example": training_flops_per_example(objective, setup.data),
                  "train_batch_size": opts.training.train_batch_size * opts.training.gradient_accumulation_steps}
        result = train(student, setup.noise_scheduler, setup.data, TrainConfig.from_options(opts), fcr, folder,
                       run_info={**setup.run_info, "distillation": record}, objective=objective, **train_args)
        if result.unet_dir is None and result.last_step < opts.training.max_train_steps:
            return finished  # interrupted: the next call resumes this round
        if main:  # a finished round is committed as it is (the next session resumes from it): no machine paths
            make_portable(folder)
            (folder / DISTILLATION_FILE).write_text(json.dumps(record, indent=2))
        teacher, finished = student.eval(), [*finished, folder]
    return finished


def _consistency(opts: Any, setup: Any, ddim: Any, uncond: torch.Tensor, fcr: FCRConfig, main: bool,
                 train_args: dict[str, Any]) -> list[Path]:
    """One consistency distillation (:mod:`fcr.train.consistency`) into ``output_dir/run_name/``."""
    from fcr.train.consistency import ConsistencyObjective, add_lora, merge_lora
    from fcr.train.finetune import run_dir, write_params
    from fcr.train.loop import TrainConfig, train

    d = opts.distillation
    folder = run_dir(opts)
    if (folder / DISTILLATION_FILE).is_file() and (folder / "unet" / "config.json").is_file():
        return [folder]
    teacher = setup.unet.eval()
    student = student_from(teacher)
    if d.distill_lora:
        add_lora(student, d.distill_lora_rank)
    objective = ConsistencyObjective(student, teacher, ddim, d.distill_base_steps, d.distill_guidance_scale, uncond, fcr)
    record = {"method": "consistency", "index": 1, "base_steps": d.distill_base_steps,
              "steps": max(d.distill_sampling_steps), "sampling_steps": list(d.distill_sampling_steps),
              "teacher_guidance": d.distill_guidance_scale, "sampling_guidance_scale": 1.0,
              "lora_rank": d.distill_lora_rank if d.distill_lora else None, "teacher": opts.backbone.model,
              "lambda_fcr": fcr.lambda_fcr, "train_flops_per_example": training_flops_per_example(objective, setup.data),
              "train_batch_size": opts.training.train_batch_size * opts.training.gradient_accumulation_steps}
    if main:
        write_params(folder, opts)
    result = train(student, setup.noise_scheduler, setup.data, TrainConfig.from_options(opts), fcr, folder,
                   run_info={**setup.run_info, "distillation": record}, objective=objective, **train_args)
    if result.unet_dir is None and result.last_step < opts.training.max_train_steps:
        return []
    if main:
        if d.distill_lora:  # the adapters folded in: the student is a plain UNet folder
            merge_lora(student).save_pretrained(folder / "unet", safe_serialization=True)
        (folder / DISTILLATION_FILE).write_text(json.dumps(record, indent=2))
    return [folder]
