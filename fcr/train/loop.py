"""One fine-tuning loop for the embedded model and Stable Diffusion: denoising loss + λ·FCR.

Written with accelerate (mixed precision, gradient accumulation, clipping, several processes via
``torchrun`` or ``accelerate launch --multi_gpu``; without GPUs they form a gloo group on CPU, see
:func:`init_distributed`). Every random draw of optimizer step ``k`` (batch indices, caption dropout,
timesteps, noise) comes from generators seeded with ``(seed, k, micro-batch, process)``, so a run
is deterministic for a seed and resuming from a checkpoint reproduces the uninterrupted run.
Checkpoints are safetensors + JSON (:mod:`fcr.train.checkpoint`); the log is a CSV.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from fcr import contract
from fcr.core.loss import FCRConfig, fcr_training_loss
from fcr.options import Options, TrainingOptions
from fcr.train.validation import VALIDATION_COLUMNS, EarlyStopping, Validator, write_selection
from fcr.train.checkpoint import (
    read_step_log,
    write_step_log,
    latest_checkpoint,
    load_training_checkpoint,
    prune_checkpoints,
    save_training_checkpoint,
)

__all__ = [
    "ConditioningData",
    "DistributedSetupError",
    "FCRObjective",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "batch_indices",
    "build_accelerator",
    "check_process_group",
    "init_distributed",
    "launched_world_size",
    "fcr_config",
    "lr_factor",
    "train",
]

LOG_COLUMNS = ("step", "total", "denoise", "fcr", "lr", "grad_norm", "images_per_s", "elapsed_s")


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DistributedSetupError(RuntimeError):
    """A launcher started several processes but they did not form one process group."""


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``, mpirun) started; 1 when none."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def _use_cpu() -> bool:
    return launched_world_size() > 1 and not torch.cuda.is_available()


def init_distributed() -> PartialState:
    """Join the process group of all processes a launcher started (nothing to join for one).

    accelerate only forms a CPU (gloo) group when asked for the CPU (``cpu=True`` or
    ``ACCELERATE_USE_CPU``); under ``torchrun`` on a machine without a GPU it would otherwise give
    every process a separate single-process run. So several launched processes and no GPU mean
    CPU. Raises :class:`DistributedSetupError` when the processes still did not join one group.
    Call it before writing anything; later Accelerators share this state.
    """
    state = PartialState(cpu=_use_cpu())
    check_process_group(state)
    return state


def build_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "no") -> Accelerator:
    """The Accelerator for this process, data-parallel over all processes a launcher started
    (see :func:`init_distributed`); the one :func:`train` makes when it is given none."""
    init_distributed()
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision, cpu=_use_cpu()
    )
    check_process_group(accelerator)
    return accelerator


def check_process_group(accelerator: Accelerator | PartialState) -> None:
    """Refuse to train when the launcher started more processes than ``accelerator`` spans
    (they would be independent runs writing the same folder)."""
    world = launched_world_size()
    if world > 1 and accelerator.num_processes != world:
        raise DistributedSetupError(
            f"the launcher started {world} processes but accelerate sees {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); they would train independently and write the "
            "same run folder. Launch with `torchrun --nproc_per_node N -m fcr train ...` or "
            "`accelerate launch --multi_gpu --num_processes N -m fcr train ...`, or run one process."
        )


@dataclass(frozen=True)
class TrainConfig(TrainingOptions):
    """The loop's settings: the training options (declared in :mod:`fcr.options`) and the run's seed."""

    seed: int = 0

    @classmethod
    def from_options(cls, opts: Options) -> TrainConfig:
        return cls(seed=opts.run.seed, **{f.name: getattr(opts.training, f.name) for f in fields(TrainingOptions)})

    def record(self) -> dict[str, Any]:
        """What train_config.json records: the seed, then the training options in declaration order."""
        return {"seed": self.seed, **{f.name: getattr(self, f.name) for f in fields(TrainingOptions)}}


def fcr_config(opts: Options) -> FCRConfig:
    """The FCR loss settings of a run."""
    return FCRConfig(
        lambda_fcr=opts.fcr.lambda_fcr,
        delta_max=opts.fcr.delta_max,
        delta_units=opts.fcr.delta_units,
        sampling_steps=opts.fcr.fcr_sampling_steps,
        feature_group=opts.fcr.feature_group,
        normalize=opts.fcr.fcr_normalize,
        shared_noise=opts.fcr.shared_noise,
        prediction_type=opts.backbone.prediction_type,
        deep_branch=opts.fcr.fcr_deep_branch,
    )


class ConditioningData(Protocol):
    """Training examples as (clean latents x0, encoder hidden states) for given indices.

    ``drop`` marks examples whose caption is replaced by the empty prompt (classifier-free
    guidance training); ``generator`` serves any other randomness (e.g. VAE posterior sampling).
    A conditioned UNet's data (in-painting, :class:`fcr.backends.sd.domains.InpaintingTrainData`)
    returns a third tensor: the channels the UNet reads beside the noisy latent.
    """

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class FCRObjective(torch.nn.Module):
    """Wraps the UNet so the loss runs inside ``forward``: DDP and autocast then see the whole
    computation (calling the UNet's blocks directly would bypass DDP's gradient hooks set-up)."""

    def __init__(self, unet: torch.nn.Module, noise_scheduler: Any, fcr: FCRConfig) -> None:
        super().__init__()
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.fcr = fcr

    def forward(self, x0: torch.Tensor, encoder_hidden_states: torch.Tensor, generator: torch.Generator,
                channel_condition: torch.Tensor | None = None):
        parts = fcr_training_loss(self.unet, self.noise_scheduler, x0, encoder_hidden_states, self.fcr, generator,
                                  channel_condition=channel_condition)
        return parts.total, parts.denoise.detach(), parts.fcr.detach()


def _generator(seed: int, *keys: int) -> torch.Generator:
    # SeedSequence mixes the keys into a well-spread 64-bit seed.
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def batch_indices(num_items: int, global_batch: int, micro_step: int, seed: int, rank: int, local_batch: int) -> torch.Tensor:
    """Indices of one process's share of global micro-batch ``micro_step``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; the incomplete last batch is dropped.
    """
    per_epoch = num_items // global_batch
    if per_epoch == 0:
        raise ValueError(f"global batch {global_batch} is larger than the data set ({num_items} examples)")
    epoch, j = divmod(micro_step, per_epoch)
    perm = torch.randperm(num_items, generator=_generator(seed, 0xE90C, epoch))
    start = j * global_batch + rank * local_batch
    return perm[start : start + local_batch]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    # Warm-up of the decay so early EMA weights are not dominated by the initialisation.
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - d)


@dataclass
class TrainResult:
    """Where a finished (or stopped) run left its results."""

    run_dir: Path
    last_step: int
    log_path: Path
    unet_dir: Path | None
    ema_dir: Path | None
    resumed_from: int | None


def train(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    data: ConditioningData,
    cfg: TrainConfig,
    fcr: FCRConfig,
    run_dir: str | Path,
    *,
    accelerator: Accelerator | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    run_info: Mapping[str, Any] | None = None,
    validator: Validator | None = None,
    objective: torch.nn.Module | None = None,
) -> TrainResult:
    """Fine-tune ``unet`` in place on ``data`` with the denoising + FCR loss.

    Writes to ``run_dir``: ``train_log.csv``, ``checkpoints/step_*`` every ``checkpoint_every``
    steps (and at the end), final weights ``unet/`` (and ``unet_ema/`` when EMA is on) in
    diffusers' safetensors format. ``resume`` continues from the latest checkpoint. ``stop_after``
    ends after that many optimizer steps as an interruption would (for tests and time budgets).
    ``validator`` with ``cfg.validate_every`` > 0: checkpoint selection (:mod:`fcr.train.validation`),
    writing ``validation.csv``, ``early_stopping.json`` and the best step's weights ``unet_best/``.
    ``objective``: another loss with :class:`FCRObjective`'s interface (``.unet`` is ``unet``;
    ``forward(x0, states, generator)`` returns the total, its main term and its FCR term), e.g.
    :class:`fcr.train.distillation.ProgressiveObjective`; the log's ``denoise`` column is its main term.
    """
    run_dir = Path(run_dir)
    if accelerator is None:
        accelerator = build_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision)
    else:
        check_process_group(accelerator)
    if objective is None:
        objective = FCRObjective(unet, noise_scheduler, fcr)
    elif objective.unet is not unet:
        raise ValueError("objective.unet must be the unet being trained")
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad],  # all of them, or a LoRA's adapters
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
    )
    ema = copy.deepcopy(unet).float().requires_grad_(False) if cfg.ema_decay > 0 else None

    ckpt_dir = run_dir / "checkpoints"
    log_path = run_dir / contract.TRAIN_LOG
    start_step, resumed_from = 0, None
    if resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        state = load_training_checkpoint(last, unet, optimizer, ema)
        start_step = resumed_from = int(state["step"])
    objective, optimizer = accelerator.prepare(objective, optimizer)
    if ema is not None:
        ema.to(accelerator.device)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * world
    rows = read_step_log(log_path, start_step) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"train": cfg.record(), "fcr": asdict(fcr), "num_examples": len(data), "processes": world,
                "distributed_type": str(accelerator.distributed_type), **(run_info or {})}
        (run_dir / contract.TRAIN_CONFIG).write_text(json.dumps(info, indent=2, default=str))

    selection = None
    if validator is not None and cfg.validate_every > 0:
        selection = EarlyStopping(cfg.validate_window, cfg.early_stopping_patience)
        selection.replay(read_step_log(run_dir / contract.VALIDATION_LOG, start_step))  # same on every process
    stopped_early = False

    end_step = cfg.max_train_steps if stop_after is None else min(cfg.max_train_steps, stop_after)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=cfg.max_train_steps,
               disable=not (progress and accelerator.is_main_process), desc="train")
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    last_good = latest_checkpoint(ckpt_dir)
    step = start_step
    for step in bar:
        lr = cfg.learning_rate * lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, device=accelerator.device)
        grad_norm = float("nan")
        for micro in range(cfg.gradient_accumulation_steps):
            micro_step = step * cfg.gradient_accumulation_steps + micro
            gen = _generator(cfg.seed, step, micro, rank)
            idx = batch_indices(len(data), global_batch, micro_step, cfg.seed, rank, cfg.train_batch_size)
            drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
            x0, states, *condition = data.batch(idx, drop, gen)  # + channels a conditioned UNet reads
            x0, states = x0.to(accelerator.device), states.to(accelerator.device)
            condition = [c.to(accelerator.device) for c in condition]
            with accelerator.accumulate(objective):
                total, denoise, fcr_term = objective(x0, states, gen, *condition)
                finite = torch.isfinite(total)
                if world > 1:  # every process stops together (a lone one would leave the others waiting)
                    finite = accelerator.reduce(finite.float().reshape(1), reduction="sum").item() == world
                if not finite:
                    raise TrainingDivergedError(
                        f"loss became {total.item()} at step {step + 1} (denoise {denoise.item()}, fcr {fcr_term.item()}); "
                        f"last good checkpoint: {last_good or 'none'}"
                    )
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    grad_norm = float(accelerator.clip_grad_norm_(objective.parameters(), cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([total.detach(), denoise, fcr_term]) / cfg.gradient_accumulation_steps
            window_images += len(idx) * world
        if ema is not None:
            _ema_update(ema, accelerator.unwrap_model(objective).unet, cfg.ema_decay, step)

        done = step + 1
        if done % cfg.log_every == 0 or done == end_step:
            sums = accelerator.reduce(sums, reduction="mean")
            now = time.perf_counter()
            row = dict(zip(("total", "denoise", "fcr"), sums.tolist()))
            row.update(step=done, lr=lr, grad_norm=grad_norm,
                       images_per_s=window_images / max(now - window_start, 1e-9), elapsed_s=now - run_start)
            window_start, window_images = now, 0
            if accelerator.is_main_process:
                rows.append(row)
                write_step_log(log_path, rows, LOG_COLUMNS)
                bar.set_postfix(loss=f"{row['total']:.4f}", fcr=f"{row['fcr']:.4f}")
        if selection is not None and (done % cfg.validate_every == 0 or done == cfg.max_train_steps):
            # Every process computes the same check on identical replicas, so all stop together.
            improved = selection.update(done, validator(accelerator.unwrap_model(objective).unet))
            stopped_early = selection.should_stop() and done < cfg.max_train_steps
            if accelerator.is_main_process:
                write_step_log(run_dir / contract.VALIDATION_LOG, selection.rows, VALIDATION_COLUMNS)
                if improved:
                    accelerator.unwrap_model(objective).unet.save_pretrained(run_dir / contract.BEST_UNET,
                                                                            safe_serialization=True)
                write_selection(run_dir / contract.EARLY_STOPPING, selection, "psnr_cached_to_full_db", done,
                                stopped_early)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_train_steps or stopped_early:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap AcceleratedOptimizer
                model = accelerator.unwrap_model(objective).unet
                last_good = save_training_checkpoint(ckpt_dir, done, model, inner_optimizer, {"seed": cfg.seed}, ema)
                prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        step = done
        if stopped_early:
            break
    bar.close()

    unet_dir = ema_dir = None
    if (step >= cfg.max_train_steps or stopped_early) and accelerator.is_main_process:
        model = accelerator.unwrap_model(objective).unet
        unet_dir = run_dir / "unet"
        model.save_pretrained(unet_dir, safe_serialization=True)
        if ema is not None:
            ema_dir = run_dir / "unet_ema"
            ema.save_pretrained(ema_dir, safe_serialization=True)
    if world > 1:
        _check_replicas(accelerator, accelerator.unwrap_model(objective).unet, run_dir)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, step, log_path, unet_dir, ema_dir, resumed_from)


def _check_replicas(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path) -> None:
    """Data-parallel processes must end with identical weights: gather a checksum of every
    process's parameters, write them to ``run_dir/replicas.json`` (main process), raise if they differ."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        local = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).to(accelerator.device)
    sums = accelerator.gather(local.reshape(1, 3)).cpu()
    if accelerator.is_main_process:
        (run_dir / "replicas.json").write_text(json.dumps(
            {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
             "backend": accelerator.state.backend, "param_checksums": sums.tolist()}, indent=2))
    if not bool((sums == sums[0]).all()):
        raise DistributedSetupError(f"the processes ended with different weights (checksums {sums.tolist()})")

