"""Fine-tuning (and base pre-training) runs from validated parameters: what notebook 02 and
``python -m fcr train`` call. Picks the data, model and noise schedule of the setting, writes the
parameters next to the results, then runs :func:`fcr.train.loop.train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fcr import contract
from fcr.backends.embedded.model import EmbeddedModel, embedded_prompt_set, load_split, prepare_embedded_data
from fcr.backends.models import build_embedded_unet, build_noise_scheduler, check_prediction_type, load_embedded_unet
from fcr.config import ConfigError
from fcr.options import Options
from fcr.train.loop import TrainConfig, TrainResult, fcr_config, train
from fcr.train.validation import CachedFidelityValidator, Validator

__all__ = ["FINETUNE_KEYS", "TrainingSetup", "embedded_validator", "finetune", "run_dir", "training_setup", "write_params"]


# Every parameter a fine-tune reads (embedded and SD). Notebook 02 declares all of them in its
# parameters cell: papermill injects only declared keys, so a missing one would silently fall back to
# its default (tests/test_notebooks.py checks this list against the code and the notebook).
FINETUNE_KEYS = (
    "setting",
    "seed",
    "device",
    "output_dir",
    "run_name",
    "data_dir",
    "train_data",
    "train_subset",
    "eval_prompts",
    "model",
    "revision",
    "variant",
    "architecture",
    "text_encoder",
    "prediction_type",
    "num_train_timesteps",
    "beta_schedule",
    "resolution",
    "train_style",
    "max_text_length",
    "lambda_fcr",
    "delta_max",
    "delta_units",
    "fcr_sampling_steps",
    "feature_group",
    "fcr_deep_branch",
    "fcr_normalize",
    "shared_noise",
    "learning_rate",
    "adam_beta1",
    "adam_beta2",
    "weight_decay",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "max_grad_norm",
    "lr_schedule",
    "lr_warmup_steps",
    "mixed_precision",
    "ema_decay",
    "caption_dropout",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "validate_every",
    "validate_images",
    "validate_seed",
    "validate_stride",
    "validate_window",
    "early_stopping_patience",
    "validate_steps",
    "validate_guidance_scale",
    "num_eval_images",
    "train_objective",
    "cache_mode",
    "cache_interval",
    "cache_branch",
    "cache_loss",
    "cache_horizon",
    "cache_rollouts",
    "cache_trainable",
    "cache_lora_rank",
    "cache_steps",
    "cache_guidance_scale",
    "cache_prior_noise",
)


def run_dir(opts: Options) -> Path:
    """``output_dir/run_name``: where a run's log, checkpoints and weights go."""
    return Path(opts.run.output_dir) / opts.run.run_name


def write_params(folder: Path, opts: Options) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / contract.RUN_PARAMS).write_text(yaml.safe_dump(opts.to_flat(), sort_keys=True))


@dataclass
class TrainingSetup:
    """What a training run of a setting starts from: the model to train, its training noise schedule,
    the data, the accelerator (None: :func:`fcr.train.loop.train` builds one) and what the run records."""

    unet: Any
    noise_scheduler: Any
    data: Any
    accelerator: Any
    run_info: dict[str, Any]

    def empty_prompt_states(self) -> Any:
        """The empty prompt's text states (one row, on the model's device): a guided teacher's unconditional input."""
        import torch

        one = torch.zeros(1, dtype=torch.long)
        return self.data.batch(one, torch.ones(1, dtype=torch.bool), torch.Generator().manual_seed(0))[1].to(self.unet.device)


def training_setup(opts: Options) -> TrainingSetup:
    """Load the model, noise schedule and data that validated ``opts`` name (embedded or SD); write
    nothing. Used by fine-tuning and by distillation (whose teacher is this model)."""
    if opts.run.setting == "sd":
        return _sd_setup(opts)
    prepare_embedded_data(opts.data.data_dir, seed=0, max_text_length=opts.backbone.max_text_length)
    examples, _ = load_split(opts.data.data_dir, "train", style=opts.data.train_style)
    if opts.backbone.model == "scratch":
        import torch

        torch.manual_seed(opts.run.seed)  # the initialisation is part of the run's determinism
        unet = build_embedded_unet(opts.backbone.architecture, opts.backbone.resolution)
    else:
        check_prediction_type(opts.backbone.model, opts.backbone.prediction_type)
        unet = load_embedded_unet(opts.backbone.model)
    noise_scheduler = build_noise_scheduler(opts.backbone.num_train_timesteps, opts.backbone.beta_schedule, opts.backbone.prediction_type)
    return TrainingSetup(unet, noise_scheduler, examples, None, {"model": opts.backbone.model, "setting": opts.run.setting})


def finetune(opts: Options, *, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train a UNet with denoising + λ·FCR as ``opts`` say (they must be validated already).

    SD: data are ``train_subset`` items (seeded by ``seed``) of ``train_data``, the model
    ``opts.backbone.model`` (repo id, short name or folder), images at ``resolution``. Results go to
    ``output_dir/run_name``."""
    if opts.run.setting == "sd" and opts.training.validate_every:
        raise ConfigError("parameter 'validate_every': checkpoint selection is implemented for the embedded setting "
                          "only; set it to 0 for Stable Diffusion")
    setup = training_setup(opts)
    folder = run_dir(opts)
    objective, run_info = None, setup.run_info
    if opts.cache_training.train_objective == "cache_aware":  # checks the branch before anything is written
        from fcr.train.cache_aware import cache_objective

        objective, record = cache_objective(opts, setup)
        run_info = {**run_info, "cache_training": record}
    main = setup.accelerator is None or setup.accelerator.is_main_process
    if main:
        write_params(folder, opts)
    result = train(
        setup.unet,
        setup.noise_scheduler,
        setup.data,
        TrainConfig.from_options(opts),
        fcr_config(opts),
        folder,
        accelerator=setup.accelerator,
        progress=progress,
        stop_after=stop_after,
        run_info=run_info,
        validator=embedded_validator(opts, setup.noise_scheduler) if opts.run.setting != "sd" and objective is None else None,
        objective=objective,
    )
    if objective is not None and main and result.unet_dir is not None:
        from fcr.train.cache_aware import finish_cache_training

        finish_cache_training(setup.unet, folder, record)
    return result


def embedded_validator(opts: Options, noise_scheduler: Any) -> Validator | None:
    """The checkpoint-selection check of an embedded fine-tune (None when ``validate_every`` is 0):
    FD-``validate_stride`` against full sampling on ``validate_images`` prompts and noises of
    ``validate_seed`` (:class:`fcr.train.validation.CachedFidelityValidator`)."""
    t = opts.training
    if t.validate_every == 0:
        return None
    prompts = embedded_prompt_set(opts.data.data_dir, t.validate_images, t.validate_seed)
    return CachedFidelityValidator(
        lambda unet: EmbeddedModel(unet, noise_scheduler, unet.device), prompts, seed=t.validate_seed,
        stride=t.validate_stride, num_inference_steps=t.validate_steps, guidance_scale=t.validate_guidance_scale,
        batch_size=t.validate_images)


def _sd_setup(opts: Options) -> TrainingSetup:
    """The SD model (float32 UNet; VAE and text encoder in the mixed-precision dtype), its data and accelerator."""
    import torch
    from accelerate import Accelerator

    from fcr.backends.sd.data import sample_subset
    from fcr.backends.sd.model import SDTrainData, check_train_files, load_sd_components, load_train_items

    prompts_only = opts.cache_training.train_objective == "cache_aware"
    if prompts_only:  # a caption file: cache-aware fine-tuning needs prompts and noise, no images
        from fcr.backends.sd.prompts import read_prompt_list

        try:
            items = sample_subset(read_prompt_list(opts.data.train_data), opts.data.train_subset, opts.run.seed)
        except (OSError, ValueError) as err:
            raise ConfigError(f"parameter 'train_data': {err}") from err
    else:
        items = sample_subset(load_train_items(opts.data.train_data), opts.data.train_subset, opts.run.seed)
        check_train_files(items)
    cfg = TrainConfig.from_options(opts)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=opts.run.device == "cpu",
    )
    # The trained UNet stays float32 (accelerate keeps fp32 master weights and autocasts).
    parts = load_sd_components(opts.backbone.model, device=accelerator.device, dtype=torch.float32,
                               revision=opts.backbone.revision or None, variant=opts.backbone.variant or None)
    repo_prediction = parts.noise_scheduler.config.prediction_type
    if opts.backbone.prediction_type != repo_prediction:
        # Training with the other target would silently ruin the model (SD2.1 is v_prediction).
        raise ConfigError(
            f"parameter 'prediction_type': {opts.backbone.prediction_type!r} but {opts.backbone.model!r} was trained "
            f"with {repo_prediction!r}; set prediction_type: {repo_prediction}"
        )
    # The frozen VAE and text encoder run in the mixed-precision dtype.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    parts.vae.to(dtype=weight_dtype)
    parts.text_encoder.to(dtype=weight_dtype)
    if prompts_only:
        from fcr.backends.sd.model import SDPromptData, vae_scale_factor

        side = opts.backbone.resolution // vae_scale_factor(parts.vae)
        data = SDPromptData(items, parts.tokenizer, parts.text_encoder,
                            (parts.unet.config.in_channels, side, side))
    else:
        data = SDTrainData(items, parts.vae, parts.tokenizer, parts.text_encoder, opts.backbone.resolution)
    info = {"model": opts.backbone.model, "setting": "sd", "train_data": opts.data.train_data,
            "scheduler_config": parts.scheduler_config}
    return TrainingSetup(parts.unet, parts.noise_scheduler, data, accelerator, info)
