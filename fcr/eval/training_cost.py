"""Training compute: FLOPs of one training step (denoising, with or without the FCR term) and the
compute of a training run folder (steps x images per step), for the seed's overhead criterion."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcr import contract
from fcr.eval.profiling import FLOP_FORMULAS

__all__ = ["RunCompute", "TrainingRunError", "sampler_training_cost", "embedded_flops_per_image", "round_cost", "overhead_percent", "run_compute",
           "training_step_flops"]

WRITTEN_BY = "the fine-tune (notebook 02_finetune / python -m fcr train)"


class TrainingRunError(ValueError):
    """A training run folder lacks a file or value its compute needs (the message names it)."""


def training_step_flops(
    unet: torch.nn.Module,
    batch: int = 2,
    lambda_fcr: float = 0.0,
    *,
    noise_scheduler: Any = None,
    seq_len: int = 16,
    seed: int = 0,
    **fcr_kwargs: Any,
) -> int:
    """FLOPs of one training step (forward + backward of :func:`fcr.core.loss.fcr_training_loss`) at ``batch``.

    Counted with ``torch.utils.flop_counter`` (matrix products, convolutions, attention; 2 FLOPs per
    multiply-accumulate; element-wise work and the optimizer update count zero). Inputs are random:
    the count depends on shapes only. λ > 0 adds the encoder forward + backward on x_{t−Δ}; the value
    of λ (and Δ_max, the feature group) does not change the count. Gradients are cleared afterwards.
    """
    from fcr.backends.models import build_noise_scheduler
    from fcr.core.loss import FCRConfig, fcr_training_loss

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    param = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(param.device, param.dtype)
    cond = torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=gen).to(param.device, param.dtype)
    scheduler = noise_scheduler if noise_scheduler is not None else build_noise_scheduler()
    was_training = unet.training
    unet.train()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        with torch.enable_grad(), counter:
            parts = fcr_training_loss(unet, scheduler, x0, cond, FCRConfig(lambda_fcr=lambda_fcr, **fcr_kwargs),
                                      torch.Generator(device=param.device).manual_seed(seed))
            parts.total.backward()
    finally:
        unet.zero_grad(set_to_none=True)
        unet.train(was_training)
    return int(counter.get_total_flops())


def overhead_percent(finetune_flops: float, pretraining_flops: float) -> float:
    """Fine-tune compute as a percentage of pre-training compute."""
    if pretraining_flops <= 0:
        raise ValueError("pre-training compute must be positive")
    return 100.0 * float(finetune_flops) / float(pretraining_flops)


@dataclass
class RunCompute:
    """Training compute of one run folder: optimizer steps × images per step × FLOPs per image."""

    run: str
    architecture: str
    lambda_fcr: float
    steps: int
    images_per_step: int
    steps_source: str
    parent: str | None

    @property
    def images(self) -> int:
        return self.steps * self.images_per_step


def run_compute(run_dir: str | Path) -> RunCompute:
    """Steps, batch and λ of a training run folder (train_config.json, params.yaml, train_log.csv).

    Steps are the last logged step of ``train_log.csv`` (what actually ran), else ``max_train_steps``.
    Images per step = ``train_batch_size × gradient_accumulation_steps × processes``.
    """
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / contract.TRAIN_CONFIG
    if not config_path.is_file():
        raise TrainingRunError(f"missing {config_path}: it is written by {WRITTEN_BY}")
    cfg = json.loads(config_path.read_text())
    train = cfg.get("train", {})
    params_path = run_dir / contract.RUN_PARAMS
    params = yaml.safe_load(params_path.read_text()) if params_path.is_file() else {}
    arch = params.get("architecture") or cfg.get("architecture")
    if not arch:
        raise TrainingRunError(f"missing {params_path} (or no 'architecture' in it): written by {WRITTEN_BY}")
    log = run_dir / contract.TRAIN_LOG
    steps, source = None, ""
    if log.is_file():
        steps_col = pd.read_csv(log, usecols=["step"])["step"]
        if len(steps_col):
            steps, source = int(steps_col.max()), f"last logged step of {log}"
    if steps is None:
        if "max_train_steps" not in train:
            raise TrainingRunError(f"{run_dir / 'train_config.json'}: no train.max_train_steps and no {log}")
        steps, source = int(train["max_train_steps"]), f"max_train_steps of {run_dir / 'train_config.json'} (no log)"
    per_step = int(train.get("train_batch_size", 0)) * int(train.get("gradient_accumulation_steps", 1)) * int(
        cfg.get("processes", 1))
    if per_step < 1:
        raise TrainingRunError(f"{run_dir / 'train_config.json'}: no train.train_batch_size")
    lam = float(cfg.get("fcr", {}).get("lambda_fcr", params.get("lambda_fcr", 0.0)))
    parent = cfg.get("model", params.get("model"))
    return RunCompute(run_dir.name, str(arch), lam, steps, per_step, source,
                      None if parent in (None, "scratch", "") else str(parent))


def embedded_flops_per_image() -> Callable[[str, bool], float]:
    """``flops(architecture, fcr)``: training FLOPs per image of an embedded architecture with
    (λ > 0) or without the FCR term, counted once per pair by :func:`training_step_flops`."""
    cache: dict[tuple[str, bool], float] = {}

    def flops(arch: str, fcr: bool) -> float:
        if (arch, fcr) not in cache:
            from fcr.backends.models import build_embedded_unet

            torch.manual_seed(0)
            unet = build_embedded_unet(arch)
            batch = 2
            cache[(arch, fcr)] = training_step_flops(unet, batch, 0.1 if fcr else 0.0) / batch
        return cache[(arch, fcr)]

    return flops


def round_cost(folder: str | Path, record_file: str = contract.DISTILLATION_FILE) -> tuple[float, float]:
    """(training FLOPs, logged wall time in s) of one finished distillation round or run (or, with
    ``record_file`` its record, a cache-aware fine-tune): FLOPs per example (its record) x examples
    per step x the last logged step."""
    record = json.loads((Path(folder) / record_file).read_text())
    log = pd.read_csv(Path(folder) / contract.TRAIN_LOG)
    steps = int(log["step"].iloc[-1])
    return float(record["train_flops_per_example"]) * record["train_batch_size"] * steps, float(log["elapsed_s"].iloc[-1])


def sampler_training_cost(models: dict[str, str]) -> pd.DataFrame:
    """Training cost of the models among ``models`` ({label: source}) trained for a sampler: distilled
    students and cache-aware fine-tunes, what they cost before they sample cheaply, reported beside
    sampling cost (never folded into it). One row per such model: ``train_flops`` (FLOPs per example x
    examples seen; a progressive student's rounds so far summed: round r needs rounds 1..r) and
    ``train_wall_s`` (logged wall time); ``distillation`` (its method) or ``cache_training`` (the
    cached configuration it was trained for)."""
    from fcr.backends.models import read_cache_training, read_distillation, resolve_unet_dir

    rows = []
    for label, source in models.items():
        try:
            unet_dir = resolve_unet_dir(source)
        except FileNotFoundError:
            continue
        folder = unet_dir.parent
        record = read_cache_training(unet_dir)
        if record is not None:
            flops, wall = round_cost(folder, contract.CACHE_TRAINING_FILE)
            rows.append({"model": label, "cache_training": record["configuration"], "lora_rank": record.get("lora_rank"),
                         "train_flops": flops, "train_wall_s": wall})
            continue
        record = read_distillation(unet_dir)
        if record is None:
            continue
        rounds = [folder]
        if record.get("method") == "progressive":  # this round and the ones before it, beside it
            rounds = [p for p in folder.parent.glob("round*_steps*")
                      if contract.ROUND_FOLDER.fullmatch(p.name) and int(p.name[5:].split("_")[0]) <= record["index"]]
        costs = [round_cost(r) for r in rounds]
        flops, wall = sum(c[0] for c in costs), sum(c[1] for c in costs)
        rows.append({"model": label, "distillation": record["method"], "rounds": len(rounds),
                     "lora_rank": record.get("lora_rank"), "train_flops": flops, "train_wall_s": wall})
    return pd.DataFrame(rows, columns=["model", "distillation", "rounds", "cache_training", "lora_rank", "train_flops",
                                       "train_wall_s"])
