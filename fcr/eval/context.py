"""The run context of an evaluation notebook: built ONCE from validated parameters, passed down as
typed objects, so the sweep and the robustness runner are one runner each for both settings.

:func:`build_context` loads every model of a run (embedded UNet folders or SD checkpoints / run
folders) behind :class:`fcr.backends.generate.SamplingModel`, the setting's scorer
(:mod:`fcr.eval.scoring`), and the sampling options every configuration shares. Everything that can
fail (missing data, unknown models, metric weights) fails here, before anything is generated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fcr.backends.generate import GenerationResult, NoiseHook, SamplingModel, SchedulerHook, generate
from fcr.backends.models import (
    EMBEDDED_ARCHITECTURES,
    ModelNotFoundError,
    embedded_unet_config,
    model_training_params,
    read_cache_training,
    read_distillation,
    resolve_device,
    resolve_unet_dir,
)
from fcr.core.configurations import SamplingConfig
from fcr.core.sampler import PriorNoise
from fcr.core.scale_shift import SCALE_SHIFT_FILE, CacheScaleShift, load_scale_shift
from fcr.eval.results import weights_fingerprint
from fcr.eval.scoring import EmbeddedScorer, SDScorer, reference_features
from fcr.options import Options

__all__ = [
    "LoadedModel",
    "RunContext",
    "Sampling",
    "architecture_config",
    "architecture_name",
    "build_context",
    "load_models",
    "model_meta",
    "model_origins",
    "sd_weights_id",
]


def architecture_config(unet: torch.nn.Module) -> dict[str, Any]:
    """The UNet config without bookkeeping keys, JSON-normalised (tuples become lists)."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def architecture_name(unet: torch.nn.Module) -> str:
    """``base`` / ``base-v`` when the UNet is that embedded architecture, else ``arch-<hash>``."""
    config = architecture_config(unet)
    for name in EMBEDDED_ARCHITECTURES:
        wanted = json.loads(json.dumps(embedded_unet_config(name, config.get("sample_size", 32))))
        if all(config.get(k) == v for k, v in wanted.items()):
            return name
    return "arch-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def model_meta(source: str) -> dict[str, Any]:
    """``original_model`` (the model it was fine-tuned or distilled from) and ``lambda_fcr`` of a run
    folder's params.yaml (None for models without one), and ``distillation``: a distilled student's
    record (:func:`fcr.backends.models.read_distillation`), ``cache_training``: a cache-aware fine-tune's
    (:func:`fcr.backends.models.read_cache_training`); None for other models."""
    try:
        unet_dir = resolve_unet_dir(source)
    except ModelNotFoundError:
        return {"original_model": None, "lambda_fcr": None, "distillation": None, "cache_training": None}
    trained = model_training_params(unet_dir) or {}
    return {"original_model": trained.get("model"), "lambda_fcr": trained.get("lambda_fcr"),
            "distillation": read_distillation(unet_dir), "cache_training": read_cache_training(unet_dir)}


def model_origins(models: Mapping[str, str]) -> dict[str, str]:
    """{label: label of the model it was fine-tuned from} for models whose origin
    (``model_training_params(...)["model"]``) is itself one of ``models``: the same source string
    (e.g. an SD hub id) or the same resolved UNet folder (so ``base`` and ``models/base`` match)."""
    resolved: dict[str, Path] = {}
    for label, source in models.items():
        with contextlib.suppress(ModelNotFoundError):
            resolved[label] = resolve_unet_dir(source)
    out: dict[str, str] = {}
    for label, folder in resolved.items():
        origin = (model_training_params(folder) or {}).get("model")
        if not origin or origin == "scratch":
            continue
        origin_dir = None
        with contextlib.suppress(ModelNotFoundError):
            origin_dir = resolve_unet_dir(str(origin))
        for other, source in models.items():
            same_dir = origin_dir is not None and resolved.get(other) == origin_dir
            if other != label and (str(source) == str(origin) or same_dir):
                out[label] = other
                break
    return out


@dataclass(frozen=True)
class Sampling:
    """How every configuration of a run samples: guidance, decoding mode, prior noise, batch size."""

    guidance_scale: float
    parallel: bool
    prior_noise: bool
    prior_noise_alpha: float
    prior_noise_threshold: float
    batch_size: int

    @classmethod
    def from_options(cls, opts: Options) -> Sampling:
        return cls(float(opts.sampling.guidance_scale), bool(opts.sampling.parallel_decoding), bool(opts.sampling.prior_noise),
                   float(opts.sampling.prior_noise_alpha), float(opts.sampling.prior_noise_threshold),
                   int(opts.evaluation.eval_batch_size))

    def prior_for(self, config: SamplingConfig) -> PriorNoise:
        """Prior noise injection for cached configurations only: the plain lines (full, DPM++)
        stay the unmodified samplers they are references for."""
        return PriorNoise(self.prior_noise and config.key_steps is not None and config.deep_branch is None,
                          self.prior_noise_alpha,
                          self.prior_noise_threshold)


@dataclass
class LoadedModel:
    """One model of a run: its label, where it came from, the sampling adapter, its noise schedule
    (``schedule``: the keys result files record), a fingerprint of its weights and its
    architecture's name."""

    label: str
    source: str
    model: SamplingModel
    schedule: dict[str, Any]
    weights: str
    architecture: str
    meta: dict[str, Any] = field(default_factory=dict)
    # A scale_shift cache-aware fine-tune's correction (fcr.core.scale_shift), used by the one
    # configuration it was trained for; None for every other model.
    cache_correction: CacheScaleShift | None = None

    def correction_for(self, config: SamplingConfig) -> CacheScaleShift | None:
        """The correction that applies to ``config`` (None when it was trained for another one)."""
        c = self.cache_correction
        return c if c is not None and c.applies_to(config.name, config.num_inference_steps) else None


@dataclass
class RunContext:
    """Everything an evaluation runner needs, built once by :func:`build_context`."""

    setting: str
    device: torch.device
    sampling: Sampling
    models: dict[str, LoadedModel]
    scorer: EmbeddedScorer | SDScorer
    opts: Options = field(default_factory=Options)

    @property
    def sampling_key(self) -> dict[str, Any]:
        """The shared sampling options as they appear in every result file's key."""
        s = self.sampling
        key: dict[str, Any] = {"setting": self.setting, "guidance_scale": s.guidance_scale,
                               "parallel_decoding": s.parallel, "prior_noise_alpha": s.prior_noise_alpha,
                               "prior_noise_threshold": s.prior_noise_threshold}
        if self.setting == "sd":
            key["resolution"] = self.opts.backbone.resolution
        return key

    def eval_prompts(self, n: int, seed: int, templates: str = "train") -> Any:
        """:func:`eval_prompts` of this run."""
        return eval_prompts(self.opts, n, seed, templates)

    @staticmethod
    def prompt_texts(prompts: Any) -> list[str]:
        """The prompt strings of a prompt set (embedded) or list (SD)."""
        return list(getattr(prompts, "texts", prompts))

    def generate(
        self,
        loaded: LoadedModel,
        prompts: Any,
        config: SamplingConfig,
        *,
        seed: int,
        image_size: int | None = None,
        noise_hook: NoiseHook | None = None,
        scheduler_hook: SchedulerHook | None = None,
        first_index: int = 0,
        progress: bool = False,
        desc: str = "generate",
    ) -> GenerationResult:
        """:func:`fcr.backends.generate.generate` of one configuration with the run's sampling options
        (``first_index``: where ``prompts`` start in the whole set, for a shard of it)."""
        s = self.sampling
        hook = scheduler_hook
        if config.grid_base_steps is not None:  # a distilled student's own sampler, then any stress
            def hook(batch: int, scheduler: Any) -> Any:
                grid = config.grid_scheduler(scheduler)
                return grid if scheduler_hook is None else scheduler_hook(batch, grid)
        guidance = s.guidance_scale if config.guidance_scale is None else config.guidance_scale
        return generate(
            loaded.model, prompts, seed=seed, scheduler_name=config.scheduler,
            num_inference_steps=config.num_inference_steps, guidance_scale=guidance,
            key_steps=config.key_steps, parallel=s.parallel, prior_noise=s.prior_for(config),
            batch_size=s.batch_size, image_size=image_size, noise_hook=noise_hook, scheduler_hook=hook,
            deep_cache_branch=config.deep_branch, token_merge=config.token_merge_settings(), tgate=config.tgate_settings(), first_index=first_index, progress=progress, desc=desc,
            cache_correction=loaded.correction_for(config),
        )

    def images(self, loaded: LoadedModel, latents: torch.Tensor) -> Any:
        """What the scorer reads: the embedded pixels as they are, SD latents decoded by the VAE."""
        if self.setting != "sd":
            return latents
        from fcr.backends.sd.model import decode_latents

        out: list[Any] = []
        for start in range(0, latents.shape[0], self.sampling.batch_size):
            out += decode_latents(loaded.model.vae, latents[start : start + self.sampling.batch_size])
        return out


def eval_prompts(opts: Options, n: int, seed: int, templates: str = "train") -> Any:
    """The ``n`` evaluation prompts of ``seed`` for validated ``opts``, the same for every model and
    configuration: embedded: class-balanced captions of the training (or held-out) templates from
    ``data_dir``; SD: ``eval_prompts``."""
    if opts.run.setting == "sd":
        from fcr.backends.sd.params import sd_eval_prompts

        return sd_eval_prompts(opts, n, seed)
    from fcr.backends.embedded.model import embedded_prompt_set

    return embedded_prompt_set(opts.data.data_dir, n, seed, templates=templates)


def _correction_of(source: str, device: torch.device) -> CacheScaleShift | None:
    """The scale-shift saved in a UNet folder (or a run folder's ``unet/``), if any. Its file is one
    of the folder's ``*.safetensors``, so it enters the weights' fingerprint."""
    try:
        unet_dir = resolve_unet_dir(source)
    except ModelNotFoundError:
        return None
    path = unet_dir / SCALE_SHIFT_FILE
    return load_scale_shift(path).to(device) if path.is_file() else None


def load_models(
    opts: Options,
    models: Mapping[str, str],
    device: torch.device,
    check_model: Callable[[LoadedModel], None] | None = None,
) -> dict[str, LoadedModel]:
    """Every model of ``models`` ({label: model name or run folder}) behind its setting's sampling
    adapter: embedded UNet folders (every name resolved before any is loaded), or SD checkpoints /
    run folders (fp16 on CUDA). ``check_model`` runs on each as it is loaded."""
    check = check_model or (lambda loaded: None)
    loaded: dict[str, LoadedModel] = {}
    if opts.run.setting == "sd":
        from fcr.backends.sd.model import load_sd_components

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        for label, source in models.items():
            parts = load_sd_components(source, device=device, dtype=dtype, revision=opts.backbone.revision or None,
                                       variant=opts.backbone.variant or None)
            # Cost depends on the architecture only: every SD model of a run shares the name "sd".
            loaded[label] = LoadedModel(label, str(source), parts, {}, sd_weights_id(str(source), opts), "sd",
                                        model_meta(str(source)), _correction_of(str(source), device))
            check(loaded[label])
        return loaded
    from fcr.backends.embedded.model import EmbeddedModel
    from fcr.backends.models import load_unet_folder, noise_scheduler_for

    unet_dirs = {label: resolve_unet_dir(source) for label, source in models.items()}
    for label, folder in unet_dirs.items():
        unet = load_unet_folder(folder, label).eval()
        noise_scheduler, schedule = noise_scheduler_for(folder, opts)
        loaded[label] = LoadedModel(
            label, str(models[label]), EmbeddedModel(unet, noise_scheduler, device),
            schedule, weights_fingerprint(folder), architecture_name(unet),
            model_meta(str(models[label])), _correction_of(str(folder), device),
        )
        check(loaded[label])
    return loaded


def build_context(
    opts: Options,
    models: Mapping[str, str],
    out_dir: str | Path,
    *,
    reference_n: int | None = None,
    check_model: Callable[[LoadedModel], None] | None = None,
    require_fid_reference: bool = True,
) -> RunContext:
    """The run context of validated ``opts`` for ``models`` ({label: model name or run folder}).
    ``out_dir`` holds the cached reference features (embedded); ``reference_n`` limits the real
    reference images (tests only). ``check_model`` runs on each model as it is loaded, before the
    scorer is built or anything is written (e.g. a stress size against the native size).
    ``require_fid_reference=False``: an SD run may leave ``fid_reference`` empty (prompt lists)."""
    device = resolve_device(opts.run.device)
    sampling = Sampling.from_options(opts)
    if opts.run.setting == "sd":
        from fcr.backends.sd.params import sd_fid_reference
        from fcr.config import ConfigError
        from fcr.eval.sd_metrics import load_clip

        if require_fid_reference and not opts.evaluation.fid_reference:
            raise ConfigError("parameter 'fid_reference': give a clean-fid statistics name or a folder of reference "
                              "images")
        loaded = load_models(opts, models, device, check_model)
        clip = load_clip(opts.evaluation.clip_model, opts.evaluation.clip_pretrained or None, device)  # once, for every config
        scorer = SDScorer(clip, sd_fid_reference(opts), device, opts.evaluation.n_bootstrap, opts.evaluation.fid_reference)
        return RunContext("sd", device, sampling, loaded, scorer, opts)
    from fcr.eval.classifier import load_classifier

    for source in models.values():
        resolve_unet_dir(source)  # an unknown model fails before anything else
    text_states = Path(opts.data.data_dir) / "text_states.safetensors"
    if not text_states.is_file():
        raise FileNotFoundError(f"{text_states} not found: prepare the data with notebooks/01_data_prep.ipynb")
    classifier = load_classifier(map_location=device)
    loaded = load_models(opts, models, device, check_model)
    ref_feats = reference_features(
        classifier, Path(out_dir) / "reference" / f"fashion_mnist_test_features_n{reference_n or 'all'}.safetensors",
        n=reference_n,
    )
    scorer = EmbeddedScorer(classifier, ref_feats, opts.evaluation.n_bootstrap)
    return RunContext("embedded", device, sampling, loaded, scorer, opts)


def sd_weights_id(source: str, opts: Options) -> str:
    """What identifies an SD model's weights in result keys: a fine-tuning run folder's UNet files
    (fingerprint), a checkpoint's id with the ``revision`` / ``variant`` it is loaded at."""
    from fcr.backends.sd.model import sd_run_base

    folder = Path(source).expanduser()
    if sd_run_base(folder) is not None:
        return weights_fingerprint(resolve_unet_dir(str(folder)))
    return f"{source}@{opts.backbone.revision or 'default'}/{opts.backbone.variant or 'default'}"


