"""Flat, validated parameters from YAML files, papermill parameters or a notebook namespace.

Parameters are flat keys (papermill's ``-f`` merge is a shallow ``dict.update``). Every key is
declared once in :data:`SCHEMA` with its type, default and constraint; :func:`validate` fails at
once with one :class:`ConfigError` naming the key and what is allowed, before any work is done.
YAML is read with ``yaml.safe_load`` (YAML 1.1: ``1e-4`` is a *string*, ``1.0e-4`` a float), so a
number-looking string for a numeric key gets a message that says how to write it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["rule_of", "SCHEMA", "SETTING_TASKS", "TASKS", "ConfigError", "Param", "from_namespace", "load_params", "load_yaml", "merge", "validate"]


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type or impossible."""


Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Param:
    """One parameter: expected type ("int", "float", "bool", "str", "int_list", "float_list",
    "str_list", "key_schedule"), default, one-line doc, allowed choices and an extra check that
    returns an error text or None."""

    kind: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    check: Check | None = None


def _described(check: Check, rule: str) -> Check:
    """``check`` with a readable ``rule`` (docs/parameters.md shows it)."""
    check.rule = rule  # type: ignore[attr-defined]
    return check


def rule_of(param: Param) -> str:
    """The constraint of ``param`` in words: its choices and its check's rule."""
    parts = [f"one of {', '.join(map(str, param.choices))}"] if param.choices else []
    if param.check is not None:
        parts.append(getattr(param.check, "rule", "checked by a custom rule (fcr/config.py)"))
    return "; ".join(parts)


def _at_least(lo: float) -> Check:
    return _described(lambda v: None if v >= lo else f"must be >= {lo}", f">= {lo}")


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _fraction(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be within [0, 1]"


_positive.rule = "> 0"  # type: ignore[attr-defined]
_fraction.rule = "within [0, 1]"  # type: ignore[attr-defined]


def _each(check: Check) -> Check:
    def run(values: list) -> str | None:
        for v in values:
            err = check(v)
            if err:
                return f"every entry {err} (got {v!r})"
        return None

    return _described(run, f"every entry {getattr(check, 'rule', 'checked')}")


def _source_spec(v: str) -> str | None:
    model, sep, config = v.rpartition(":")
    return None if sep and model and config else "must be '<model>:<config>' of a sweep, e.g. 'base:FD-5'"


_source_spec.rule = "'<model>:<config>' of a sweep"  # type: ignore[attr-defined]


def _non_empty(check: Check | None = None) -> Check:
    def run(values: list) -> str | None:
        if not values:
            return "must not be empty"
        return check(values) if check else None

    return _described(run, "non-empty" + (f", {getattr(check, 'rule', 'checked')}" if check else ""))


SCHEDULER_NAMES = ("ddim", "dpmsolver++", "euler")
FEATURE_GROUP_NAMES = ("all", "early", "mid", "late", "deep")  # "deep": FCR-deep (DeepCache's reused feature)

SCHEMA: dict[str, Param] = {
    # --- run ---
    "setting": Param("str", "embedded", "embedded default (Fashion-MNIST + MiniLM) or Stable Diffusion", ("embedded", "sd")),
    "seed": Param("int", 0, "global seed", check=_at_least(0)),
    "seeds": Param("int_list", [0, 1, 2], "seeds of repeated runs", check=_non_empty(_each(_at_least(0)))),
    "device": Param("str", "auto", "torch device", ("auto", "cpu", "cuda")),
    "output_dir": Param("str", "outputs/embedded", "where results are written"),
    "run_name": Param("str", "default", "name of this variation's folder under output_dir"),
    "data_dir": Param("str", "outputs/embedded/data", "prepared embedded data (splits, captions, text states)"),
    "train_data": Param("str", "", "SD training data (local): image+caption folder, img2dataset output, ArtBench-10 root, .parquet or webdataset .tar"),
    "train_subset": Param("int", 50000, "training items sampled from train_data (seeded by seed)", check=_at_least(1)),
    "eval_prompts": Param("str", "", "SD evaluation prompts: COCO captions JSON, Flickr30k results.csv/token file, ImageNet class list or a prompt list (.txt/.tsv)"),
    "eval_prompt_kind": Param("str", "auto", "kind of eval_prompts ('auto' detects it)", ("auto", "coco", "flickr30k", "imagenet", "prompts")),
    "captions_per_image": Param("int", 1, "COCO/Flickr30k captions taken per image (0 = all); val2017 has 5,000 images", check=_at_least(0)),
    # --- models ---
    "model": Param("str", "base", "'scratch' (random init of `architecture`), an embedded model (base, base-v, derivative), a training run folder, or an SD repo id/folder"),
    "architecture": Param("str", "base", "embedded UNet architecture", ("base", "base-v")),
    "revision": Param("str", "", "SD: hub revision (branch, tag or commit) of `model`; '' = the default branch"),
    "variant": Param("str", "", "SD: weight-file variant of `model`, e.g. 'fp16'; '' = the full-precision files"),
    "text_encoder": Param("str", "minilm", "text encoder: 'minilm' (embedded) or a repo id/folder"),
    "prediction_type": Param("str", "epsilon", "what the UNet predicts", ("epsilon", "v_prediction")),
    "num_train_timesteps": Param("int", 1000, "training diffusion steps T", check=_at_least(2)),
    "beta_schedule": Param("str", "scaled_linear", "training beta schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")),
    "resolution": Param("int", 32, "image side in pixels", check=_at_least(8)),
    "train_style": Param("str", "none", "visual domain of the training images (fcr.backends.embedded.data.apply_style)", ("none", "high_contrast")),
    "max_text_length": Param("int", 16, "tokens of the text encoder input", check=_at_least(2)),
    # --- sampling (Faster Diffusion) ---
    "scheduler": Param("str", "ddim", "sampling scheduler", SCHEDULER_NAMES),
    "num_inference_steps": Param("int", 50, "sampling steps", check=_at_least(1)),
    "guidance_scale": Param("float", 4.0, "classifier-free guidance scale", check=_at_least(1.0)),
    "key_schedule": Param("key_schedule", "uniform", "'uniform' (every stride-th step), '50ls' or an explicit list of key-step indices"),
    "stride": Param("int", 5, "key-step stride for the uniform schedule", check=_at_least(1)),
    "strides": Param("int_list", [1, 5, 10, 15, 20], "strides of a sweep", check=_non_empty(_each(_at_least(1)))),
    "parallel_decoding": Param("bool", True, "decode a key step and its non-key steps as one batch"),
    "prior_noise": Param("bool", True, "Faster Diffusion's prior noise injection"),
    "prior_noise_alpha": Param("float", 0.003, "weight of z_T added before each late step", check=_at_least(0.0)),
    "prior_noise_threshold": Param("float", 0.5, "inject when t / T is below this", check=_fraction),
    # --- FCR loss ---
    "lambda_fcr": Param("float", 0.1, "weight of the FCR term", check=_at_least(0.0)),
    "delta_max": Param("int", 10, "largest timestep gap of an FCR pair", check=_at_least(1)),
    "delta_units": Param("str", "train", "units of delta_max: training timesteps or sampling steps", ("train", "sampling")),
    "fcr_sampling_steps": Param("int", 50, "sampling steps that define one 'sampling' delta unit", check=_at_least(1)),
    "feature_group": Param("str", "all", "encoder features the FCR term compares", FEATURE_GROUP_NAMES),
    "fcr_deep_branch": Param("int", 0, "DeepCache skip branch whose reused deep feature FCR-deep compares (feature_group: deep)", check=_at_least(0)),
    "fcr_normalize": Param("bool", False, "scale-invariant FCR (difference over feature energy)"),
    "shared_noise": Param("bool", True, "same noise for both latents of an FCR pair"),
    # --- training ---
    "learning_rate": Param("float", 1.0e-5, "AdamW learning rate", check=_positive),
    "adam_beta1": Param("float", 0.9, "AdamW beta1", check=_fraction),
    "adam_beta2": Param("float", 0.999, "AdamW beta2", check=_fraction),
    "weight_decay": Param("float", 1.0e-2, "AdamW weight decay", check=_at_least(0.0)),
    "train_batch_size": Param("int", 128, "per-process batch size", check=_at_least(1)),
    "gradient_accumulation_steps": Param("int", 1, "micro-batches per optimizer step", check=_at_least(1)),
    "max_train_steps": Param("int", 10000, "optimizer steps", check=_at_least(1)),
    "max_grad_norm": Param("float", 1.0, "gradient clipping norm", check=_positive),
    "lr_schedule": Param("str", "constant", "learning-rate schedule after warm-up", ("constant", "cosine")),
    "lr_warmup_steps": Param("int", 0, "linear warm-up steps", check=_at_least(0)),
    "mixed_precision": Param("str", "no", "accelerate mixed precision", ("no", "fp16", "bf16")),
    "ema_decay": Param("float", 0.0, "EMA decay (0 disables EMA)", check=_fraction),
    "caption_dropout": Param("float", 0.1, "probability of the empty caption (for CFG)", check=_fraction),
    "checkpoint_every": Param("int", 500, "steps between resumable checkpoints", check=_at_least(1)),
    "keep_checkpoints": Param("int", 2, "most recent checkpoints kept (older ones are deleted)", check=_at_least(1)),
    "log_every": Param("int", 10, "steps between log rows", check=_at_least(1)),
    # --- evaluation ---
    "num_eval_images": Param("int", 1000, "generated images per configuration", check=_at_least(1)),
    "eval_batch_size": Param("int", 100, "images per sampling batch", check=_at_least(1)),
    # --- stride sweep ---
    "sweep_models": Param("str_list", ["base"], "models (embedded names or run folders) compared in the sweep", check=_non_empty()),
    "include_50ls": Param("bool", True, "add Faster Diffusion's non-uniform '50ls' key steps to the sweep"),
    "dpm_reference_steps": Param("int", 20, "steps of the plain DPM-Solver++ reference line (0 disables it)", check=_at_least(0)),
    "dpm_strides": Param("int_list", [], "strides of DPM-Solver++ with encoder caching ('DPM++-FD-s', at dpm_reference_steps steps)", check=_each(_at_least(2))),
    "deep_cache_intervals": Param("int_list", [], "DeepCache intervals of a sweep ('DeepCache-N-bB': the full UNet every N steps, the shallow path between)", check=_each(_at_least(2))),
    "deep_cache_branches": Param("int_list", [0], "DeepCache skip branches (DeepCacheSDHelper's cache_branch_id) of every DeepCache interval", check=_non_empty(_each(_at_least(0)))),
    "plain_steps": Param("int_list", [], "step counts of the plain sweep scheduler below num_inference_steps ('DDIM-N'): the fewer-steps peer of a frontier", check=_each(_at_least(1))),
    "dpm_steps": Param("int_list", [], "step counts of plain DPM-Solver++ besides dpm_reference_steps ('DPM++-k'): the frontier's solver peer", check=_each(_at_least(1))),
    "reference_lines_all_models": Param("bool", False, "run FD-50ls and plain DPM++ for every model, not only the first (the original)"),
    "profile_batches": Param("int_list", [1, 8], "batch sizes of the cost timing", check=_non_empty(_each(_at_least(1)))),
    "profile_repeats": Param("int", 3, "timed repeats per batch size (after one warm-up run)", check=_at_least(1)),
    "n_bootstrap": Param("int", 200, "bootstrap resamples of the per-configuration intervals", check=_at_least(10)),
    "fid_reference": Param("str", "", "SD sweep: clean-fid custom statistics name or a folder of reference images"),
    "fid_inception_dir": Param("str", "", "SD: folder holding clean-fid's Inception file inception-2015-12-05.pt (no download); '' = clean-fid fetches it"),
    "clip_model": Param("str", "ViT-L-14", "SD CLIPScore: open_clip model name, or a local open_clip model-config .json"),
    "clip_pretrained": Param("str", "openai", "SD CLIPScore: open_clip pretrained tag, or a local checkpoint file (.safetensors)"),
    # --- robustness (notebook 04) ---
    "robustness_models": Param("str_list", ["base"], "models (embedded names or run folders) stress-tested in notebook 04", check=_non_empty()),
    "robustness_strides": Param("int_list", [1, 10], "strides stress-tested (1 = full sampling)", check=_non_empty(_each(_at_least(1)))),
    "stresses": Param("str_list", ["none", "heldout_prompts", "ood_prompts", "high_resolution", "perturbed_schedule", "adversarial_noise"],
                      "stress conditions of notebook 04 ('none' is the unstressed reference)", check=_non_empty()),
    "num_robustness_images": Param("int", 100, "images per model x stride x stress x seed in notebook 04", check=_at_least(1)),
    "stress_resolution": Param("int", 64, "image side of the high-resolution stress (SD: 1024)", check=_at_least(8)),
    "schedule_noise_std": Param("float", 0.05, "std of the per-step relative perturbation of sigma_t", check=_at_least(0.0)),
    "adversarial_epsilon": Param("float", 0.1, "L-inf budget of the adversarial z_T perturbation, in units of the noise std", check=_at_least(0.0)),
    "adversarial_steps": Param("int", 10, "signed-gradient steps of the adversarial attack on z_T", check=_at_least(1)),
    # --- mechanistic regression (notebook 05) ---
    "variance_models": Param("str_list", ["base"], "models whose encoder-feature variance notebook 05 measures", check=_non_empty()),
    "variance_delta_max": Param("int", 10, "largest gap in training timesteps of the feature variance", check=_at_least(1)),
    "variance_max_stride": Param("int", 20, "largest gap in sampling steps of the feature variance", check=_at_least(1)),
    "num_variance_images": Param("int", 256, "held-out images of the feature-variance estimate", check=_at_least(2)),
    "quality_tables": Param("str_list", [], "quality CSVs (notebooks 03 / 04) whose drops notebook 05 regresses on feature variance"),
    "trajectory_seeds": Param("int_list", [], "sweep seeds whose prompts and noise notebook 05 measures encoder drift along the sampled trajectories of (empty: not measured)", check=_each(_at_least(0))),
    "trajectory_images": Param("int", 64, "first prompts of each trajectory seed measured (at most the sweep's num_eval_images)", check=_at_least(2)),
    "trajectory_strides": Param("int_list", [10, 20], "cache strides of the trajectory drift (each a FD-s of the sweep)", check=_non_empty(_each(_at_least(2)))),
    # --- quality-vs-cost frontier (notebook 06) ---
    "frontier_models": Param("str_list", ["base"], "models of the frontier's sweep, the original first (the pipeline fills it)", check=_non_empty()),
    "frontier_sweep_run": Param("str", "frontier", "run name of the 03_stride_sweep run the frontier reads (<output_dir>/sweep/<run>/)", check=lambda v: None if v.strip() else "must not be empty"),
    "frontier_cost": Param("str", "flops_per_image", "cost axis of the frontier and its matched-cost table",
                           ("flops_per_image", "time_per_image_s_bs1", "time_per_image_s_bs8")),
    "frontier_endpoint": Param("str", "psnr", "paired fidelity endpoint to the original's full sampling (quality axis)",
                               ("psnr", "ssim", "rmse", "feature_distance", "clip_drift")),
    "frontier_budgets": Param("str_list", ["FD-5", "FD-10"], "configurations of the original whose cost is a matched-cost budget", check=_non_empty()),
    # --- human A/B preference study (fcr.human, notebook 07) ---
    "human_sweep_dir": Param("str", "outputs/study/exp-1-main-ablation/sweep/main", "finished 03_stride_sweep run folder whose images the pair set shows"),
    "human_a": Param("str", "fcr_lambda0.10_fd10:FD-10", "side A of every test pair, '<model>:<config>' of the sweep", check=_source_spec),
    "human_b": Param("str", "base:FD-5", "side B of every test pair, '<model>:<config>' of the sweep", check=_source_spec),
    "human_seeds": Param("int_list", [0, 1, 2, 3, 4], "sweep seeds whose prompt/noise pairs are drawn", check=_non_empty(_each(_at_least(0)))),
    "human_pairs": Param("int", 280, "test pairs (prompt/noise pairs of A vs B) in the set", check=_at_least(1)),
    "human_repeat_rate": Param("float", 0.1, "repeat pairs (a test pair again, sides swapped) as a fraction of human_pairs", check=_fraction),
    "human_gold_rate": Param("float", 0.1, "gold attention-check pairs as a fraction of human_pairs", check=_fraction),
    "human_gold": Param("str", "mismatched_prompt", "gold pairs: 'mismatched_prompt' (the other side shows another class) or a clearly broken '<model>:<config>'",
                        check=lambda v: None if v == "mismatched_prompt" else _source_spec(v)),
    "human_pair_dir": Param("str", "outputs/human/pairs", "folder of the pair set (images/, pairs.csv, pair_set.json)"),
    "human_ratings_db": Param("str", "outputs/human/ratings.sqlite", "SQLite file of the ratings (lab app and MTurk import)"),
    "human_analysis_dir": Param("str", "outputs/human/analysis", "where notebook 07 writes its tables and figures"),
    "human_min_gold_pass": Param("float", 0.75, "attention rule: a rating session below this gold pass rate is excluded", check=_fraction),
    "human_power_win_rates": Param("float_list", [0.55, 0.6, 0.65], "win rates of A the power table sizes the study for",
                                   check=_non_empty(_each(lambda v: None if 0.0 < v < 1.0 and v != 0.5 else "must lie in (0, 1) and differ from 0.5"))),
    # --- experiments, verdict, report ---
}


def _type_error(key: str, kind: str, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str) and kind in ("float", "int"):
        try:
            float(value)
            hint = (
                f" YAML 1.1 reads numbers like {value!r} as strings: write it with a dot and a signed "
                f"exponent (e.g. 1.0e-4) or as a plain decimal."
            )
        except ValueError:
            pass
    return ConfigError(f"parameter {key!r}: expected {kind}, got {type(value).__name__} {value!r}.{hint}")


def _coerce(key: str, kind: str, value: Any) -> Any:
    """Check ``value`` against ``kind``; ints are accepted for floats, bools never for numbers."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(key, kind, value)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, kind, value)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, kind, value)
        if not math.isfinite(value):
            raise ConfigError(f"parameter {key!r}: must be a finite number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise _type_error(key, kind, value)
        return value
    if kind in ("int_list", "float_list", "str_list"):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, f"a list of {kind[:-5]}", value)
        return [_coerce(f"{key}[{i}]", kind[:-5], v) for i, v in enumerate(value)]
    if kind == "key_schedule":
        if isinstance(value, str):
            if value not in ("uniform", "50ls"):
                raise ConfigError(f"parameter {key!r}: allowed 'uniform', '50ls' or a list of key-step indices, got {value!r}")
            return value
        return _coerce(key, "int_list", value)
    raise AssertionError(f"unknown parameter kind {kind!r}")


def _check_key_schedule(params: dict[str, Any]) -> None:
    keys = params["key_schedule"]
    if isinstance(keys, str):
        return
    n = params["num_inference_steps"]
    if not keys:
        raise ConfigError("parameter 'key_schedule': an explicit list must not be empty")
    if keys[0] != 0:
        raise ConfigError(f"parameter 'key_schedule': must start with key step 0 (the first step always runs the encoder), got {keys}")
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise ConfigError(f"parameter 'key_schedule': key steps must be strictly increasing, got {keys}")
    if keys[-1] >= n:
        raise ConfigError(f"parameter 'key_schedule': key steps must lie in [0, num_inference_steps={n}), got {keys}")


def validate(params: Mapping[str, Any], *, fill_defaults: bool = True) -> dict[str, Any]:
    """Validate flat parameters and return them with defaults filled in.

    Raises :class:`ConfigError` with one message naming the first bad key.
    """
    unknown = [k for k in params if k not in SCHEMA]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, SCHEMA, n=1)
        did_you_mean = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown parameter {key!r}{did_you_mean}; known parameters: {', '.join(sorted(SCHEMA))}")
    out: dict[str, Any] = {k: p.default for k, p in SCHEMA.items()} if fill_defaults else {}
    for key, value in params.items():
        spec = SCHEMA[key]
        value = _coerce(key, spec.kind, value)
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"parameter {key!r}: allowed {list(spec.choices)}, got {value!r}")
        if spec.check is not None:
            err = spec.check(value)
            if err:
                raise ConfigError(f"parameter {key!r}: {err}, got {value!r}")
        out[key] = value
    if fill_defaults:
        _check_key_schedule(out)
    return out


TASKS = ("data", "finetune", "sweep", "robustness", "mechanistic", "frontier", "human")
# The tasks each setting implements.
SETTING_TASKS = {"embedded": TASKS, "sd": TASKS}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one flat YAML mapping with ``yaml.safe_load``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {str(path)!r} does not exist")
    with path.open() as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"parameter file {str(path)!r} must hold a mapping of flat keys, got {type(data).__name__}")
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"parameter file {str(path)!r}: key {key!r} holds a mapping; parameters are flat keys "
                              "(papermill merges -f files with a shallow update)")
    return data


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow merge, later layers win: exactly what papermill does with repeated ``-f`` files."""
    out: dict[str, Any] = {}
    for layer in layers:
        out.update(layer)
    return out


def load_params(*paths: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load, merge (in order) and validate YAML files, then ``overrides``."""
    return validate(merge(*(load_yaml(p) for p in paths), overrides or {}))


def from_namespace(namespace: Mapping[str, Any], before: Iterable[str]) -> dict[str, Any]:
    """Validate the parameters a notebook defined or papermill injected.

    ``before`` is the set of global names that existed before the parameters cell; every new
    public name is a parameter, so a misspelt injected key fails here instead of papermill's
    mere warning.
    """
    skip = set(before)
    return validate({k: v for k, v in namespace.items() if k not in skip and not k.startswith("_")})
