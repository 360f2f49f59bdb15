"""Typed, frozen option objects: the parameters inside the library, grouped by concern.

Each option is declared once, here, as a dataclass field with its type, default, constraint and
one-line doc. At the edge, parameters stay flat keys (papermill's ``-f`` is a shallow merge):
:mod:`fcr.config` derives its flat schema from these fields, validates a flat mapping (errors name
the flat key) and :meth:`Options.from_flat` turns the result into one :class:`Options`. Library
functions take a group (``opts.sampling``) or the whole :class:`Options`, never the raw dict.

Dataclasses rather than pydantic models: validation already happens once, at the flat edge, with
messages that name the flat key papermill users write; inside, frozen dataclasses cost no import
time, add no dependency and make accidental mutation an error. A field's name *is* its flat key,
so ``grep lambda_fcr`` finds YAML, notebooks and library alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union

__all__ = ["GROUPS", "KeySchedule", "Options", "field_specs", "group_of", "option"]

KeySchedule = Union[str, tuple[int, ...]]  # "uniform", "50ls" or explicit key-step indices
Check = Callable[[Any], "str | None"]

SCHEDULER_NAMES = ("ddim", "dpmsolver++", "euler")
FEATURE_GROUP_NAMES = ("all", "early", "mid", "late", "deep")  # "deep": FCR-deep (DeepCache's reused feature)


def option(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None, check: Check | None = None) -> Any:
    """A dataclass field with its doc, allowed choices and an extra check (returns an error text or None)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "check": check})


def _described(check: Check, rule: str) -> Check:
    """``check`` with a readable ``rule`` (docs/parameters.md shows it)."""
    check.rule = rule  # type: ignore[attr-defined]
    return check


def _at_least(lo: float) -> Check:
    return _described(lambda v: None if v >= lo else f"must be >= {lo}", f">= {lo}")


_positive = _described(lambda v: None if v > 0 else "must be > 0", "> 0")
_fraction = _described(lambda v: None if 0.0 <= v <= 1.0 else "must be within [0, 1]", "within [0, 1]")
_non_blank = _described(lambda v: None if v.strip() else "must not be empty", "not empty")
_win_rate = _described(lambda v: None if 0.0 < v < 1.0 and v != 0.5 else "must lie in (0, 1) and differ from 0.5",
                       "in (0, 1), not 0.5")


def _each(check: Check) -> Check:
    def run(values: list) -> str | None:
        for v in values:
            err = check(v)
            if err:
                return f"every entry {err} (got {v!r})"
        return None

    return _described(run, f"every entry {getattr(check, 'rule', 'checked')}")


def _non_empty(check: Check | None = None) -> Check:
    def run(values: list) -> str | None:
        if not values:
            return "must not be empty"
        return check(values) if check else None

    return _described(run, "non-empty" + (f", {getattr(check, 'rule', 'checked')}" if check else ""))


def _source_spec(v: str) -> str | None:
    model, sep, config = v.rpartition(":")
    return None if sep and model and config else "must be '<model>:<config>' of a sweep, e.g. 'base:FD-5'"


_source_spec = _described(_source_spec, "'<model>:<config>' of a sweep")
_gold_spec = _described(lambda v: None if v == "mismatched_prompt" else _source_spec(v),
                        "'mismatched_prompt' or '<model>:<config>' of a sweep")


@dataclass(frozen=True)
class RunOptions:
    """What runs where: backend, seeds, device and output folders."""

    setting: str = option("embedded", "embedded default (Fashion-MNIST + MiniLM) or Stable Diffusion", choices=("embedded", "sd"))
    seed: int = option(0, "global seed", check=_at_least(0))
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds of repeated runs", check=_non_empty(_each(_at_least(0))))
    device: str = option("auto", "torch device", choices=("auto", "cpu", "cuda"))
    output_dir: str = option("outputs/embedded", "where results are written")
    run_name: str = option("default", "name of this variation's folder under output_dir")


@dataclass(frozen=True)
class DataOptions:
    """Training and evaluation data: the prepared embedded folder or SD's local files."""

    data_dir: str = option("outputs/embedded/data", "prepared embedded data (splits, captions, text states)")
    train_data: str = option("", "SD training data (local): image+caption folder, img2dataset output, ArtBench-10 root, .parquet or webdataset .tar")
    train_subset: int = option(50000, "training items sampled from train_data (seeded by seed)", check=_at_least(1))
    eval_prompts: str = option("", "SD evaluation prompts: COCO captions JSON, Flickr30k results.csv/token file, ImageNet class list or a prompt list (.txt/.tsv)")
    eval_prompt_kind: str = option("auto", "kind of eval_prompts ('auto' detects it)", choices=("auto", "coco", "flickr30k", "imagenet", "prompts"))
    captions_per_image: int = option(1, "COCO/Flickr30k captions taken per image (0 = all); val2017 has 5,000 images", check=_at_least(0))
    train_style: str = option("none", "visual domain of the training images (fcr.backends.embedded.data.apply_style)", choices=("none", "high_contrast"))


@dataclass(frozen=True)
class BackboneOptions:
    """The model: which UNet, its text encoder, noise schedule and image size."""

    model: str = option("base", "'scratch' (random init of `architecture`), an embedded model (base, base-v, derivative), a training run folder, or an SD repo id/folder")
    architecture: str = option("base", "embedded UNet architecture", choices=("base", "base-v"))
    revision: str = option("", "SD: hub revision (branch, tag or commit) of `model`; '' = the default branch")
    variant: str = option("", "SD: weight-file variant of `model`, e.g. 'fp16'; '' = the full-precision files")
    text_encoder: str = option("minilm", "text encoder: 'minilm' (embedded) or a repo id/folder")
    prediction_type: str = option("epsilon", "what the UNet predicts", choices=("epsilon", "v_prediction"))
    num_train_timesteps: int = option(1000, "training diffusion steps T", check=_at_least(2))
    beta_schedule: str = option("scaled_linear", "training beta schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    resolution: int = option(32, "image side in pixels", check=_at_least(8))
    max_text_length: int = option(16, "tokens of the text encoder input", check=_at_least(2))


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled and cached (Faster Diffusion's key steps, prior noise)."""

    scheduler: str = option("ddim", "sampling scheduler", choices=SCHEDULER_NAMES)
    num_inference_steps: int = option(50, "sampling steps", check=_at_least(1))
    guidance_scale: float = option(4.0, "classifier-free guidance scale", check=_at_least(1.0))
    key_schedule: KeySchedule = option("uniform", "'uniform' (every stride-th step), '50ls' or an explicit list of key-step indices")
    stride: int = option(5, "key-step stride for the uniform schedule", check=_at_least(1))
    parallel_decoding: bool = option(True, "decode a key step and its non-key steps as one batch")
    prior_noise: bool = option(True, "Faster Diffusion's prior noise injection")
    prior_noise_alpha: float = option(0.003, "weight of z_T added before each late step", check=_at_least(0.0))
    prior_noise_threshold: float = option(0.5, "inject when t / T is below this", check=_fraction)


@dataclass(frozen=True)
class FCROptions:
    """The FCR term of the fine-tuning loss."""

    lambda_fcr: float = option(0.1, "weight of the FCR term", check=_at_least(0.0))
    delta_max: int = option(10, "largest timestep gap of an FCR pair", check=_at_least(1))
    delta_units: str = option("train", "units of delta_max: training timesteps or sampling steps", choices=("train", "sampling"))
    fcr_sampling_steps: int = option(50, "sampling steps that define one 'sampling' delta unit", check=_at_least(1))
    feature_group: str = option("all", "encoder features the FCR term compares", choices=FEATURE_GROUP_NAMES)
    fcr_deep_branch: int = option(0, "DeepCache skip branch whose reused deep feature FCR-deep compares (feature_group: deep)", check=_at_least(0))
    fcr_normalize: bool = option(False, "scale-invariant FCR (difference over feature energy)")
    shared_noise: bool = option(True, "same noise for both latents of an FCR pair")


@dataclass(frozen=True)
class TrainingOptions:
    """The fine-tuning loop: optimiser, batch, length, checkpoints, logging."""

    learning_rate: float = option(1.0e-5, "AdamW learning rate", check=_positive)
    adam_beta1: float = option(0.9, "AdamW beta1", check=_fraction)
    adam_beta2: float = option(0.999, "AdamW beta2", check=_fraction)
    weight_decay: float = option(1.0e-2, "AdamW weight decay", check=_at_least(0.0))
    train_batch_size: int = option(128, "per-process batch size", check=_at_least(1))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", check=_at_least(1))
    max_train_steps: int = option(10000, "optimizer steps", check=_at_least(1))
    max_grad_norm: float = option(1.0, "gradient clipping norm", check=_positive)
    mixed_precision: str = option("no", "accelerate mixed precision", choices=("no", "fp16", "bf16"))
    ema_decay: float = option(0.0, "EMA decay (0 disables EMA)", check=_fraction)
    caption_dropout: float = option(0.1, "probability of the empty caption (for CFG)", check=_fraction)
    checkpoint_every: int = option(500, "steps between resumable checkpoints", check=_at_least(1))
    keep_checkpoints: int = option(2, "most recent checkpoints kept (older ones are deleted)", check=_at_least(1))
    log_every: int = option(10, "steps between log rows", check=_at_least(1))
    lr_schedule: str = option("constant", "learning-rate schedule after warm-up", choices=("constant", "cosine"))
    lr_warmup_steps: int = option(0, "linear warm-up steps", check=_at_least(0))
    # Checkpoint selection on a mini-validation set (fcr.train.validation).
    validate_every: int = option(0, "steps between checks of the mini-validation set (0: no checks, no selection)", check=_at_least(0))
    validate_images: int = option(16, "prompts (and noises) of the mini-validation set", check=_at_least(1))
    validate_seed: int = option(1000, "seed of the mini-validation prompts and noises: never an evaluation seed", check=_at_least(0))
    validate_stride: int = option(10, "the check's metric: PSNR of FD-<stride> to full sampling", check=_at_least(2))
    validate_steps: int = option(50, "DDIM steps of the check's full sampling (as the evaluation's num_inference_steps)", check=_at_least(2))
    validate_guidance_scale: float = option(4.0, "guidance scale of the check's sampling (as the evaluation's)", check=_at_least(1.0))
    validate_window: int = option(3, "checks in the moving average that picks the best step", check=_at_least(1))
    early_stopping_patience: int = option(0, "checks without a new best before training stops (0: train every step, keep the best)", check=_at_least(0))


@dataclass(frozen=True)
class DistillationOptions:
    """Distillation of ``model``, progressive or consistency (notebook 02b, fcr.train.distillation)."""

    distill_method: str = option("progressive", "progressive (Salimans & Ho: halving rounds) or consistency (LCM: one student, few-step sampler)", choices=("progressive", "consistency"))
    distill_base_steps: int = option(64, "progressive: DDIM steps of the first round's teacher (the original, guided), halved each round; consistency: the solver's DDIM grid (LCM's original_inference_steps)", check=_at_least(2))
    distill_rounds: int = option(4, "progressive: halving rounds (distill_base_steps must halve exactly this often)", check=_at_least(1))
    distill_guidance_scale: float = option(4.0, "classifier-free guidance scale of the teacher, folded into the students (sampled unguided)", check=_at_least(1.0))
    distill_sampling_steps: tuple[int, ...] = option((1, 2, 4, 8), "consistency: the student's sampler step counts the sweep runs ('CD-N')", check=_non_empty(_each(_at_least(1))))
    distill_lora: bool = option(False, "consistency: train rank-distill_lora_rank LoRA adapters (peft; merged at the end) instead of every weight")
    distill_lora_rank: int = option(4, "consistency: LoRA rank (with distill_lora)", check=_at_least(1))


@dataclass(frozen=True)
class CacheTrainingOptions:
    """Cache-aware fine-tuning (fcr.train.cache_aware): the model's cached DDIM sampling trained to
    reproduce the frozen original's full sampling. Its own step count and guidance (notebook 02 does
    not read the sampling options), set to what the evaluation samples with."""

    train_objective: str = option("denoise_fcr", "denoise_fcr (denoising + lambda_fcr * FCR on images) or cache_aware (the cached sampler's prediction matches the original's full one; prompts and noise only)", choices=("denoise_fcr", "cache_aware"))
    cache_steps: int = option(50, "DDIM steps of the cached sampler trained for (as the evaluation's num_inference_steps)", check=_at_least(2))
    cache_guidance_scale: float = option(4.0, "guidance scale of the cached sampler trained for (as the evaluation's)", check=_at_least(1.0))
    cache_prior_noise: bool = option(True, "encoder caching: Faster Diffusion's prior noise injection in the rollouts (default alpha and threshold), as the evaluation's FD samples")
    cache_mode: str = option("deepcache", "the cached sampler trained for: deepcache (DeepCache-N-bB) or encoder (Faster Diffusion's FD-N)", choices=("deepcache", "encoder"))
    cache_interval: int = option(10, "a key step every cache_interval steps (N of DeepCache-N-bB, s of FD-s)", check=_at_least(2))
    cache_branch: int = option(0, "DeepCache's skip branch (cache_mode deepcache; DeepCacheSDHelper's cache_branch_id)", check=_at_least(0))
    cache_loss: str = option("step", "step (noise error at a step of the cached trajectory), step_weighted (weighted by the step's effect on the final image), trajectory (final-image error of a cached rollout over cache_horizon windows)", choices=("step", "step_weighted", "trajectory"))
    cache_horizon: int = option(1, "trajectory: key-step windows rolled out with gradient (0: to the end of sampling)", check=_at_least(0))
    cache_rollouts: int = option(8, "cached trajectories the student samples per micro-batch; training points are drawn from them", check=_at_least(1))
    cache_trainable: str = option("all", "all weights, uncached (only the layers a cached step recomputes), lora (peft adapters, merged at the end) or scale_shift (Block Caching's per-step, per-channel scale and shift of the reused tensors; the UNet frozen)", choices=("all", "uncached", "lora", "scale_shift"))
    cache_lora_rank: int = option(8, "LoRA rank (cache_trainable lora)", check=_at_least(1))


@dataclass(frozen=True)
class EvaluationOptions:
    """Scoring generated images: sizes, bootstrap, cost timing, FID and CLIP references."""

    num_eval_images: int = option(1000, "generated images per configuration", check=_at_least(1))
    eval_batch_size: int = option(100, "images per sampling batch", check=_at_least(1))
    n_bootstrap: int = option(200, "bootstrap resamples of the per-configuration intervals", check=_at_least(10))
    profile_batches: tuple[int, ...] = option((1, 8), "batch sizes of the cost timing", check=_non_empty(_each(_at_least(1))))
    profile_repeats: int = option(3, "timed repeats per batch size (after one warm-up run)", check=_at_least(1))
    fid_reference: str = option("", "SD sweep: clean-fid custom statistics name or a folder of reference images")
    fid_inception_dir: str = option("", "SD: folder holding clean-fid's Inception file inception-2015-12-05.pt (no download); '' = clean-fid fetches it")
    clip_model: str = option("ViT-L-14", "SD CLIPScore: open_clip model name, or a local open_clip model-config .json")
    clip_pretrained: str = option("openai", "SD CLIPScore: open_clip pretrained tag, or a local checkpoint file (.safetensors)")
    fid_mode: str = option("clean", "SD: clean-fid's resize mode of the Inception features ('clean': PIL bicubic; 'legacy_tensorflow': the TF FID code's)", choices=("clean", "legacy_tensorflow"))
    eval_shards: int = option(16, "`python -m fcr evaluate`: shards of each configuration's prompts (written as they finish; the number of launched processes must divide it)", check=_at_least(1))
    device_hour_price: float = option(0.0, "price of one hour of the timed device (e.g. USD per GPU-hour): the cost tables add cost per 1,000 images; 0 = no price", check=_at_least(0.0))


@dataclass(frozen=True)
class SweepOptions:
    """The stride sweep (notebook 03): models and the configurations beside FD-s."""

    sweep_models: tuple[str, ...] = option(("base",), "models (embedded names or run folders) compared in the sweep", check=_non_empty())
    strides: tuple[int, ...] = option((1, 5, 10, 15, 20), "strides of a sweep", check=_non_empty(_each(_at_least(1))))
    include_50ls: bool = option(True, "add Faster Diffusion's non-uniform '50ls' key steps to the sweep")
    dpm_reference_steps: int = option(20, "steps of the plain DPM-Solver++ reference line (0 disables it)", check=_at_least(0))
    dpm_strides: tuple[int, ...] = option((), "strides of DPM-Solver++ with encoder caching ('DPM++-FD-s', at dpm_reference_steps steps)", check=_each(_at_least(2)))
    deep_cache_intervals: tuple[int, ...] = option((), "DeepCache intervals of a sweep ('DeepCache-N-bB': the full UNet every N steps, the shallow path between)", check=_each(_at_least(2)))
    deep_cache_branches: tuple[int, ...] = option((0,), "DeepCache skip branches (DeepCacheSDHelper's cache_branch_id) of every DeepCache interval", check=_non_empty(_each(_at_least(0))))
    plain_steps: tuple[int, ...] = option((), "step counts of the plain sweep scheduler below num_inference_steps ('DDIM-N'): the fewer-steps peer of a frontier", check=_each(_at_least(1)))
    dpm_steps: tuple[int, ...] = option((), "step counts of plain DPM-Solver++ besides dpm_reference_steps ('DPM++-k'): the frontier's solver peer", check=_each(_at_least(1)))
    tome_ratios: tuple[float, ...] = option((), "Token Merging ratios of full sampling ('ToMe-P-dD', P = 100 x ratio; fcr.core.token_merging, self-attention, 2x2 cells): the training-free token peer of a frontier", check=_each(_described(lambda v: None if 0.0 < v <= 0.75 else "must lie in (0, 0.75]", "in (0, 0.75]")))
    tome_max_downsample: int = option(1, "Token Merging merges the transformer blocks at most this far downsampled from the latent (SD: 1; the embedded UNets have attention at 4 only)", choices=(1, 2, 4, 8))
    tgate_gate_steps: tuple[int, ...] = option((), "T-GATE gate steps of full sampling ('TGATE-gG'; fcr.core.tgate with the package's sp_interval 5, fi_interval 1, warm_up 2): cross-attention cached and guidance dropped from step G on", check=_each(_at_least(1)))
    reference_lines_all_models: bool = option(False, "run FD-50ls, plain DPM++, ToMe and T-GATE for every model, not only the first (the original)")
    adopt_cells_from: tuple[str, ...] = option((), "sweep result folders whose finished quality cells this sweep adopts where its own are missing and every parameter that shaped them is identical (others are computed; embedded setting only)")
    searched_schedules: str = option("", "a schedules.json of `python -m fcr schedules`: its chosen budgeted schedules ('Searched-<mode>-<K>k') join the sweep for every model")
    # The schedule search (python -m fcr schedules; fcr.experiments.cache_schedules), on the first sweep model.
    schedule_budgets: tuple[float, ...] = option((), "FLOP budgets (relative to full sampling) the search picks a schedule for", check=_each(_described(lambda v: None if 0.0 < v < 1.0 else "must lie in (0, 1)", "in (0, 1)")))
    schedule_branches: tuple[int, ...] = option((0, 1), "DeepCache branches the search tries (each schedule uses one mode throughout)", check=_each(_at_least(0)))
    schedule_encoder_reuse: bool = option(True, "the search also tries Faster Diffusion's encoder reuse")
    schedule_max_gap: int = option(20, "most steps a cache is reused for", check=_at_least(1))
    schedule_calibration_images: int = option(32, "calibration prompts and noises of the search", check=_at_least(1))
    schedule_refine_rounds: int = option(0, "rounds of local search (one key step moved by up to 2 steps, measured on the calibration set) from the chosen schedule; 0: none", check=_at_least(0))
    schedule_calibration_seed: int = option(9000, "seed of the calibration prompts and noises: never an evaluation seed", check=_at_least(0))


@dataclass(frozen=True)
class RobustnessOptions:
    """The stress tests (notebook 04)."""

    robustness_models: tuple[str, ...] = option(("base",), "models (embedded names or run folders) stress-tested in notebook 04", check=_non_empty())
    robustness_strides: tuple[int, ...] = option((1, 10), "strides stress-tested (1 = full sampling)", check=_non_empty(_each(_at_least(1))))
    stresses: tuple[str, ...] = option(("none", "heldout_prompts", "ood_prompts", "high_resolution", "perturbed_schedule", "adversarial_noise"), "stress conditions of notebook 04 ('none' is the unstressed reference)", check=_non_empty())
    num_robustness_images: int = option(100, "images per model x stride x stress x seed in notebook 04", check=_at_least(1))
    stress_resolution: int = option(64, "image side of the high-resolution stress (SD: 1024)", check=_at_least(8))
    schedule_noise_std: float = option(0.05, "std of the per-step relative perturbation of sigma_t", check=_at_least(0.0))
    adversarial_epsilon: float = option(0.1, "L-inf budget of the adversarial z_T perturbation, in units of the noise std", check=_at_least(0.0))
    adversarial_steps: int = option(10, "signed-gradient steps of the adversarial attack on z_T", check=_at_least(1))
    reuse_results_from: str = option("", "a notebook-04 result folder whose cells this run adopts where its own are missing and the parameters are identical (others are computed); empty: none")


@dataclass(frozen=True)
class MechanisticOptions:
    """Feature variance and trajectory drift (notebook 05)."""

    variance_models: tuple[str, ...] = option(("base",), "models whose encoder-feature variance notebook 05 measures", check=_non_empty())
    variance_delta_max: int = option(10, "largest gap in training timesteps of the feature variance", check=_at_least(1))
    variance_max_stride: int = option(20, "largest gap in sampling steps of the feature variance", check=_at_least(1))
    num_variance_images: int = option(256, "held-out images of the feature-variance estimate", check=_at_least(2))
    quality_tables: tuple[str, ...] = option((), "quality CSVs (notebooks 03 / 04) whose drops notebook 05 regresses on feature variance")
    trajectory_seeds: tuple[int, ...] = option((), "sweep seeds whose prompts and noise notebook 05 measures encoder drift along the sampled trajectories of (empty: not measured)", check=_each(_at_least(0)))
    trajectory_images: int = option(64, "first prompts of each trajectory seed measured (at most the sweep's num_eval_images)", check=_at_least(2))
    trajectory_strides: tuple[int, ...] = option((10, 20), "cache strides of the trajectory drift (each a FD-s of the sweep)", check=_non_empty(_each(_at_least(2))))


@dataclass(frozen=True)
class FrontierOptions:
    """The quality-vs-cost frontier (notebook 06)."""

    frontier_models: tuple[str, ...] = option(("base",), "models of the frontier's sweep, the original first (the pipeline fills it)", check=_non_empty())
    frontier_sweep_run: str = option("frontier", "run name of the 03_stride_sweep run the frontier reads (<output_dir>/sweep/<run>/)", check=_non_blank)
    frontier_cost: str = option("flops_per_image", "cost axis of the frontier and its matched-cost table", choices=("flops_per_image", "time_per_image_s_bs1", "time_per_image_s_bs8"))
    frontier_endpoint: str = option("psnr", "paired fidelity endpoint to the original's full sampling (quality axis)", choices=("psnr", "ssim", "rmse", "feature_distance", "clip_drift"))
    frontier_budgets: tuple[str, ...] = option(("FD-5", "FD-10"), "configurations of the original whose cost is a matched-cost budget", check=_non_empty())


@dataclass(frozen=True)
class HumanOptions:
    """The human A/B preference study (notebook 07, fcr.human)."""

    human_sweep_dir: str = option("outputs/study/exp-1-main-ablation/sweep/main", "finished 03_stride_sweep run folder whose images the pair set shows")
    human_a: str = option("fcr_lambda0.10_fd10:FD-10", "side A of every test pair, '<model>:<config>' of the sweep", check=_source_spec)
    human_b: str = option("base:FD-5", "side B of every test pair, '<model>:<config>' of the sweep", check=_source_spec)
    human_seeds: tuple[int, ...] = option((0, 1, 2, 3, 4), "sweep seeds whose prompt/noise pairs are drawn", check=_non_empty(_each(_at_least(0))))
    human_pairs: int = option(280, "test pairs (prompt/noise pairs of A vs B) in the set", check=_at_least(1))
    human_repeat_rate: float = option(0.1, "repeat pairs (a test pair again, sides swapped) as a fraction of human_pairs", check=_fraction)
    human_gold_rate: float = option(0.1, "gold attention-check pairs as a fraction of human_pairs", check=_fraction)
    human_gold: str = option("mismatched_prompt", "gold pairs: 'mismatched_prompt' (the other side shows another class) or a clearly broken '<model>:<config>'", check=_gold_spec)
    human_pair_dir: str = option("outputs/human/pairs", "folder of the pair set (images/, pairs.csv, pair_set.json)")
    human_ratings_db: str = option("outputs/human/ratings.sqlite", "SQLite file of the ratings (lab app and MTurk import)")
    human_analysis_dir: str = option("outputs/human/analysis", "where notebook 07 writes its tables and figures")
    human_min_gold_pass: float = option(0.75, "attention rule: a rating session below this gold pass rate is excluded", check=_fraction)
    human_power_win_rates: tuple[float, ...] = option((0.55, 0.6, 0.65), "win rates of A the power table sizes the study for", check=_non_empty(_each(_win_rate)))


GROUPS = {"run": RunOptions, "data": DataOptions, "backbone": BackboneOptions, "sampling": SamplingOptions, "fcr": FCROptions, "training": TrainingOptions, "distillation": DistillationOptions, "cache_training": CacheTrainingOptions, "evaluation": EvaluationOptions, "sweep": SweepOptions, "robustness": RobustnessOptions, "mechanistic": MechanisticOptions, "frontier": FrontierOptions, "human": HumanOptions}


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _flat(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Options:
    """Every option of a run, one frozen group per concern (``opts.sampling.num_inference_steps``)."""

    run: RunOptions = field(default_factory=RunOptions)
    data: DataOptions = field(default_factory=DataOptions)
    backbone: BackboneOptions = field(default_factory=BackboneOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    fcr: FCROptions = field(default_factory=FCROptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    distillation: DistillationOptions = field(default_factory=DistillationOptions)
    cache_training: CacheTrainingOptions = field(default_factory=CacheTrainingOptions)
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    sweep: SweepOptions = field(default_factory=SweepOptions)
    robustness: RobustnessOptions = field(default_factory=RobustnessOptions)
    mechanistic: MechanisticOptions = field(default_factory=MechanisticOptions)
    frontier: FrontierOptions = field(default_factory=FrontierOptions)
    human: HumanOptions = field(default_factory=HumanOptions)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Options:
        """Typed options from flat keys that :func:`fcr.config.validate` accepted (lists become
        tuples; keys left out keep their defaults)."""
        unknown = [k for k in flat if k not in _GROUP_OF]
        if unknown:
            raise KeyError(f"unknown option {unknown[0]!r}: validate flat parameters with fcr.config.validate first")
        per_group: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for key, value in flat.items():
            per_group[_GROUP_OF[key]][key] = _frozen(value)
        return cls(**{name: GROUPS[name](**values) for name, values in per_group.items()})

    def to_flat(self) -> dict[str, Any]:
        """The flat keys (lists, not tuples): what run folders record and stage fingerprints hash."""
        return {f.name: _flat(getattr(group, f.name)) for name in GROUPS for group in (getattr(self, name),)
                for f in fields(group)}

    def value(self, key: str) -> Any:
        """The value of flat ``key``, for code that names keys in messages (``opts.value("train_data")``)."""
        return getattr(getattr(self, _GROUP_OF[key]), key)

    def with_flat(self, **changes: Any) -> Options:
        """A copy with some flat keys changed (not validated: for values that are valid already)."""
        return Options.from_flat({**self.to_flat(), **changes})


def field_specs() -> dict[str, tuple[str, Any, dict[str, Any]]]:
    """{flat key: (type annotation, default, metadata)} of every option, in declaration order."""
    out: dict[str, tuple[str, Any, dict[str, Any]]] = {}
    for group in GROUPS.values():
        for f in fields(group):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = (str(f.type), default, dict(f.metadata))
    return out


def group_of(key: str) -> str:
    """The group (attribute of :class:`Options`) that holds flat ``key``."""
    return _GROUP_OF[key]


_GROUP_OF = {f.name: name for name, group in GROUPS.items() for f in fields(group)}
