"""Model construction: the embedded default UNet (built in code) and the Stable Diffusion loaders.

The embedded UNet is a miniature of Stable Diffusion's: a ``UNet2DConditionModel`` with
cross-attention on the token hidden states of a frozen text encoder (MiniLM, width 384),
on 1-channel 32x32 Fashion-MNIST images in pixel space.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from fcr import contract
from fcr.options import Options
from fcr.paths import REPO_ROOT

__all__ = [
    "EMBEDDED_ARCHITECTURES",
    "EMBEDDED_MODELS",
    "ModelNotFoundError",
    "build_embedded_unet",
    "build_noise_scheduler",
    "check_prediction_type",
    "model_training_params",
    "noise_scheduler_for",
    "read_cache_training",
    "read_distillation",
    "resolve_device",
    "embedded_unet_config",
    "load_embedded_unet",
    "resolve_unet_dir",
]

MINILM_HIDDEN_SIZE = 384

# Two sizes: ``base`` plays SD1.5 (epsilon prediction), ``base-v`` plays SD2.1 (v prediction,
# another width/depth, linear attention projections as SD2.x).
EMBEDDED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "base": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=False,
    ),
    "base-v": dict(
        block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(4, 8, 8),
        norm_num_groups=8,
        use_linear_projection=True,
    ),
}


def embedded_unet_config(architecture: str = "base", sample_size: int = 32) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of an embedded architecture."""
    if architecture not in EMBEDDED_ARCHITECTURES:
        raise ValueError(f"unknown embedded architecture {architecture!r}; allowed: {sorted(EMBEDDED_ARCHITECTURES)}")
    return dict(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        cross_attention_dim=MINILM_HIDDEN_SIZE,
        mid_block_type="UNetMidBlock2DCrossAttn",
        **EMBEDDED_ARCHITECTURES[architecture],
    )


def build_embedded_unet(architecture: str = "base", sample_size: int = 32) -> UNet2DConditionModel:
    """A randomly initialised embedded UNet (weights come from training or a checkpoint)."""
    return UNet2DConditionModel(**embedded_unet_config(architecture, sample_size))


# ----------------------------------------------------------------------------- schedulers and loading

# Stable Diffusion's training noise schedule (scaled_linear, 0.00085 -> 0.012 over 1000 steps).
SD_NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)

# Where the shipped embedded base models live (trained by this repository's own code).
MODELS_DIR = REPO_ROOT / "models"
EMBEDDED_MODELS = {
    "base": "python -m fcr train -f params/fashion_mnist.yaml -f params/pretrain_base.yaml (then copy the run folder to models/base)",
    "base-v": "python -m fcr train -f params/fashion_mnist.yaml -f params/pretrain_base_v.yaml",
    "derivative": "python -m fcr train -f params/fashion_mnist.yaml -f params/pretrain_derivative.yaml",
}


def build_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """The training noise schedule (SD's betas), from which sampling schedulers take their config."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        **SD_NOISE_SCHEDULE,
    )


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that does not resolve to trained weights."""


def resolve_unet_dir(model: str, models_dir: str | Path | None = None) -> Path:
    """Folder of a diffusers UNet for an embedded model name or a training run folder.

    A run folder prefers EMA weights (``unet_ema``) over raw ones (``unet``).
    """
    models_dir = Path(models_dir) if models_dir is not None else MODELS_DIR
    candidates = [models_dir / model] if model in EMBEDDED_MODELS else [Path(model)]
    for base in candidates:
        for sub in ("unet_ema", "unet", "."):
            folder = base / sub
            if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
                return folder.resolve()
    if model in EMBEDDED_MODELS:
        raise ModelNotFoundError(
            f"embedded model {model!r} has not been trained: expected weights under {models_dir / model}; "
            f"it is produced by {EMBEDDED_MODELS[model]}"
        )
    raise ModelNotFoundError(
        f"model {model!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) nor a folder with a "
        "diffusers UNet (config.json + *.safetensors, or unet/ / unet_ema/ inside a training run folder)"
    )


def load_unet_folder(folder: str | Path, label: str | None = None) -> UNet2DConditionModel:
    """Load a diffusers UNet folder from safetensors (never pickle); corrupt or mismatched files
    raise ModelNotFoundError naming the folder (and the model's label when given)."""
    try:
        return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
    except Exception as exc:  # corrupt or mismatched files
        of = f" of {label!r}" if label is not None else ""
        raise ModelNotFoundError(f"could not load the UNet{of} in {folder}: {exc}") from exc


def load_embedded_unet(model: str, models_dir: str | Path | None = None) -> UNet2DConditionModel:
    """Load an embedded UNet from safetensors (never pickle)."""
    return load_unet_folder(resolve_unet_dir(model, models_dir))


def model_training_params(unet_dir: str | Path) -> dict[str, Any] | None:
    """The params.yaml of the run that produced a UNet folder (its parent run folder), if any."""
    import yaml

    path = Path(unet_dir).parent / contract.RUN_PARAMS
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_distillation(unet_dir: str | Path) -> dict[str, Any] | None:
    """The distillation record (:data:`fcr.contract.DISTILLATION_FILE`) of the round that produced a
    UNet folder (its parent folder); None for a model that is not a distilled student."""
    path = Path(unet_dir).parent / contract.DISTILLATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_cache_training(unet_dir: str | Path) -> dict[str, Any] | None:
    """The record (:data:`fcr.contract.CACHE_TRAINING_FILE`) of the cache-aware fine-tune that produced a
    UNet folder (its parent folder); None for other models."""
    path = Path(unet_dir).parent / contract.CACHE_TRAINING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_prediction_type(model: str, prediction_type: str, models_dir: str | Path | None = None) -> None:
    """Refuse to use a model with another prediction type than it was trained for."""
    trained = model_training_params(resolve_unet_dir(model, models_dir))
    if trained is not None and trained.get("prediction_type") not in (None, prediction_type):
        from fcr.config import ConfigError

        raise ConfigError(
            f"parameter 'prediction_type': model {model!r} was trained with {trained['prediction_type']!r}, "
            f"got {prediction_type!r}"
        )


def resolve_device(name: str | None) -> torch.device:
    """The ``device`` parameter as a torch device: ``auto`` (or None) is CUDA when available, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def noise_scheduler_for(unet_dir: Path, opts: Options) -> tuple[Any, dict[str, Any]]:
    """The training noise scheduler of a UNet folder and its schedule keys: a run folder's recorded
    schedule wins over ``opts``, so e.g. a v-prediction model is never sampled as an epsilon model."""
    trained = model_training_params(unet_dir) or {}
    schedule = {k: trained.get(k, getattr(opts.backbone, k)) for k in ("num_train_timesteps", "beta_schedule", "prediction_type")}
    return build_noise_scheduler(**schedule), schedule
