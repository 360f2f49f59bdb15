"""Stride sweep: quality and cost of Faster-Diffusion sampling configurations, per model and seed.

Every configuration of a model samples the SAME prompts from the SAME initial noise for a given
seed (:mod:`fcr.settings.generate`), so differences between configurations are paired. Quality is measured
with the embedded classifier (:mod:`fcr.eval.classifier`) against real Fashion-MNIST test images; cost
(FLOPs, wall time, peak memory, network passes) depends on the architecture and configuration
only, so it is measured once per architecture x configuration. Each result is a JSON file written
as soon as it is finished (:func:`fcr.eval.results.run_or_load`): a re-run skips finished ones and a
file made with other parameters raises :class:`fcr.eval.results.StaleResultError`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fcr.contract import model_label
from fcr.core.configurations import SamplingConfig, configs_for_model, sweep_configurations
from fcr.core.sampler import PriorNoise, sample
from fcr.eval.metrics import (
    DEFAULT_EXTRACTOR_NAME,
    FrechetToReference,
    feature_statistics,
    metrics_from_features,
)
from fcr.eval.profiling import count_flops, environment_info, peak_memory, sampling_flops_ratio, time_fn, unet_flops
from fcr.eval.results import module_fingerprint, run_or_load, save_safetensors_atomic, weights_fingerprint
from fcr.eval.stats import bootstrap_ci, bootstrap_metric, mean_ci_over_seeds, paired_test
from fcr.settings.generate import PromptSet, embedded_prompt_set, generate, sampling_scheduler
from fcr.settings.models import (
    EMBEDDED_ARCHITECTURES,
    build_noise_scheduler,
    embedded_unet_config,
    load_unet_folder,
    noise_scheduler_for,
    resolve_device,
    resolve_unet_dir,
)

__all__ = [
    "QUALITY_METRICS",
    "SamplingConfig",
    "cost_table",
    "evaluate_cost",
    "evaluate_quality",
    "score_images",
    "load_samples",
    "load_side_file",
    "model_labels",
    "paired_comparison",
    "prior_noise_for",
    "quality_stem",
    "reference_features",
    "run_sweep",
    "summarize",
    "configs_for_model",
    "sweep_configurations",
]

FD_COLUMN = f"fd_{DEFAULT_EXTRACTOR_NAME}"
# Quality columns averaged over seeds by :func:`summarize` (when present).
QUALITY_METRICS: tuple[str, ...] = (
    FD_COLUMN,
    f"kid_{DEFAULT_EXTRACTOR_NAME}",
    f"precision_{DEFAULT_EXTRACTOR_NAME}",
    f"recall_{DEFAULT_EXTRACTOR_NAME}",
    f"is_{DEFAULT_EXTRACTOR_NAME}",
    "class_accuracy",
    "class_prob",
    "fid",
    "clip_score",
)
# Pass counters copied from the sampler statistics into result rows.
PASS_COUNTERS: tuple[str, ...] = ("unet_passes", "encoder_passes", "decoder_passes", "decoder_steps")


# ----------------------------------------------------------------------------- configurations


# ----------------------------------------------------------------------------- helpers


def _arch_config(unet: torch.nn.Module) -> dict[str, Any]:
    """The UNet config without bookkeeping keys, JSON-normalised (tuples become lists)."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def architecture_name(unet: torch.nn.Module) -> str:
    """``base`` / ``base-v`` when the UNet is that embedded architecture, else ``arch-<hash>``."""
    config = _arch_config(unet)
    for name in EMBEDDED_ARCHITECTURES:
        wanted = json.loads(json.dumps(embedded_unet_config(name, config.get("sample_size", 32))))
        if all(config.get(k) == v for k, v in wanted.items()):
            return name
    return "arch-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]


def model_labels(sources: Sequence[str]) -> dict[str, str]:
    """Short, unique labels for model sources (:func:`fcr.contract.model_label`); two run folders of
    the same name keep their parent folder too."""
    labels: dict[str, str] = {}
    for source in sources:
        label = model_label(source)
        if label in labels:  # two run folders of the same name: keep the parent too
            label = "/".join(Path(source).parts[-2:])
        labels[label] = source
    return labels


def prior_noise_for(params: Mapping[str, Any], config: SamplingConfig) -> PriorNoise:
    """Prior noise injection as the parameters say, for cached configurations only: the plain lines
    (full, DPM++) stay the unmodified samplers they are references for."""
    enabled = bool(params["prior_noise"]) and config.key_steps is not None
    return PriorNoise(enabled, params["prior_noise_alpha"], params["prior_noise_threshold"])


# ----------------------------------------------------------------------------- reference features


def reference_features(
    classifier: torch.nn.Module,
    cache_path: str | Path | None = None,
    *,
    root: str | Path | None = None,
    n: int | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Classifier features ``(N, D)`` of real Fashion-MNIST official test images (the first ``n``,
    all 10k by default), cached in ``cache_path`` (computed once; a cache made by another
    classifier or ``n`` is recomputed). ``root``: where Fashion-MNIST lies (see fcr.settings.data)."""
    from fcr.eval.classifier import extract_features
    from fcr.settings import data

    fingerprint = module_fingerprint(classifier)
    wanted = {"classifier": fingerprint, "n": str(n), "split": "test"}
    if cache_path is not None and Path(cache_path).is_file():
        with safe_open(str(cache_path), framework="pt") as f:
            if (f.metadata() or {}) == wanted:
                return f.get_tensor("features")
    images, _ = data.load_fashion_mnist("test", root=root)
    if n is not None:
        images = images[:n]
    feats = extract_features(classifier, data.to_model_range(images), batch_size)
    if cache_path is not None:
        save_safetensors_atomic({"features": feats}, Path(cache_path), wanted)
    return feats


# ----------------------------------------------------------------------------- quality


def score_images(
    images: torch.Tensor,
    labels: np.ndarray,
    classifier: torch.nn.Module,
    ref_feats: torch.Tensor,
    *,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Score images in [-1, 1] at the classifier's size against ``ref_feats``: the set metrics of
    :func:`fcr.eval.metrics.metrics_from_features` plus percentile bootstrap 95 % intervals over images
    (``*_lo`` / ``*_hi``; the reference set held fixed) for the FD, class accuracy and prompted-class
    probability. Returns the metrics and per-image tensors (``prompted_prob``, ``correct``,
    ``probs``, ``features``) for paired tests."""
    from fcr.eval.classifier import extract_features, predict_proba

    # Features and probabilities once, shared by the set metrics and the per-image tensors.
    feats = extract_features(classifier, images)
    probs = predict_proba(classifier, images)
    label_t = torch.as_tensor(labels, dtype=torch.long)
    metrics = metrics_from_features(feats, ref_feats, probs, labels, is_splits=min(10, len(labels)), seed=seed)
    prompted = probs[torch.arange(len(label_t)), label_t].double().numpy()
    correct = (probs.argmax(dim=1) == label_t).double().numpy()
    # The reference is fixed, so the replicates use FrechetToReference (exact, no sqrtm per replicate).
    _, fd_lo, fd_hi = bootstrap_metric(FrechetToReference(*feature_statistics(ref_feats)), feats.double().numpy(),
                                       n_boot=n_boot, seed=seed)
    _, acc_lo, acc_hi = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
    _, prob_lo, prob_hi = bootstrap_ci(prompted, n_boot=n_boot, seed=seed)
    metrics.update({
        f"{FD_COLUMN}_lo": fd_lo, f"{FD_COLUMN}_hi": fd_hi,
        "class_accuracy_lo": acc_lo, "class_accuracy_hi": acc_hi,
        "class_prob_lo": prob_lo, "class_prob_hi": prob_hi,
    })
    per_image = {"prompted_prob": torch.from_numpy(prompted), "correct": torch.from_numpy(correct),
                 "probs": probs, "features": feats}
    return metrics, per_image


def evaluate_quality(
    model_label: str,
    unet: torch.nn.Module,
    noise_scheduler: Any,
    config: SamplingConfig,
    prompts: PromptSet,
    classifier: torch.nn.Module,
    ref_feats: torch.Tensor,
    *,
    guidance_scale: float,
    parallel: bool,
    prior_noise: PriorNoise | None,
    batch_size: int,
    n_boot: int,
    seed: int,
    side_file: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Generate one image per prompt with ``config`` and score it against ``ref_feats``.

    Returns the set metrics of :func:`fcr.eval.metrics.metrics_from_features`, percentile bootstrap
    95 % intervals over generated images (``*_lo`` / ``*_hi``; the reference set is held fixed)
    for the FD, class accuracy and prompted-class probability, the sampler's pass counters per
    sampling run (one batch) and the sampling wall time. ``side_file`` (safetensors) receives the images (uint8),
    per-image prompted-class probability, correctness, probabilities and features, for paired
    tests between configurations.
    """
    start = time.perf_counter()
    gen = generate(
        unet,
        noise_scheduler,
        prompts,
        scheduler_name=config.scheduler,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=guidance_scale,
        key_steps=None if config.key_steps is None else list(config.key_steps),
        parallel=parallel,
        prior_noise=prior_noise,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    sampling_s = time.perf_counter() - start
    metrics, per_image = score_images(gen.images, prompts.labels, classifier, ref_feats, n_boot=n_boot, seed=seed)
    if side_file is not None:
        images_u8 = ((gen.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        save_safetensors_atomic(
            {"images": images_u8, "labels": torch.as_tensor(prompts.labels, dtype=torch.long), **per_image},
            Path(side_file),
            {"model": model_label, "config": config.name, "seed": str(seed), "prompts": json.dumps(prompts.texts)},
        )
    # The sampler counts network calls per batched sampling run (a call processes the whole batch).
    n_runs = -(-len(prompts) // batch_size)
    counters = {k: gen.stats.get(k, 0) / n_runs for k in PASS_COUNTERS}
    return {
        **metrics,
        **{f"{k}_per_run": v for k, v in counters.items()},
        "sampling_runs": n_runs,
        "sampling_s": sampling_s,
    }


def load_side_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The per-image tensors :func:`evaluate_quality` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is written by run_sweep / evaluate_quality")
    return load_file(str(path))


def load_samples(
    out_dir: str | Path, model: str, configs: Sequence[str], seed: int, n: int = 8
) -> dict[str, torch.Tensor]:
    """The first ``n`` generated images (uint8 ``(n, 1, H, W)``) of each configuration: the same
    prompts and initial noise in every configuration."""
    folder = Path(out_dir) / "quality"
    return {c: load_side_file(folder / f"{quality_stem(model, c, seed)}.safetensors")["images"][:n] for c in configs}


def quality_stem(model: str, config: str, seed: int) -> str:
    return f"{model.replace('/', '_')}__{config}__seed{seed}"


def paired_comparison(out_dir: str | Path, model: str, config_a: str, config_b: str, seed: int) -> dict[str, Any]:
    """Paired t and Wilcoxon tests of ``config_a`` vs ``config_b`` on the per-image prompted-class
    probability (same prompts and initial noise), plus the difference in class accuracy."""
    folder = Path(out_dir) / "quality"
    a = load_side_file(folder / f"{quality_stem(model, config_a, seed)}.safetensors")
    b = load_side_file(folder / f"{quality_stem(model, config_b, seed)}.safetensors")
    if not torch.equal(a["labels"], b["labels"]):
        raise ValueError(f"{config_a} and {config_b} of {model} (seed {seed}) were not made from the same prompts")
    test = paired_test(a["prompted_prob"].numpy(), b["prompted_prob"].numpy())
    return {
        "model": model,
        "config_a": config_a,
        "config_b": config_b,
        "seed": seed,
        **test,
        "accuracy_diff": float(a["correct"].mean() - b["correct"].mean()),
    }


# ----------------------------------------------------------------------------- cost


def evaluate_cost(
    unet: torch.nn.Module,
    config: SamplingConfig,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 3,
    guidance_scale: float = 4.0,
    seq_len: int = 16,
    device: str | torch.device = "cpu",
    parallel: bool = True,
    prior_noise: PriorNoise | None = None,
    noise_scheduler: Any = None,
) -> dict[str, Any]:
    """Cost of one sampling run of ``config`` (random inputs: cost does not depend on them).

    ``time_per_image_s_bs{b}``: median over ``repeats`` timed runs (after one warm-up run) of
    the sampling wall time divided by the batch ``b`` (CUDA-synchronised clocks on a GPU);
    ``flops_per_image``: ``FlopCounterMode`` count of one sampling call at batch 1 (guidance
    doubles the UNet batch); ``flops_bound_ratio``: the analytic FLOP ratio to plain sampling at
    the same steps, from the UNet's measured encoder share; ``peak_memory_bytes`` at the
    largest batch (process-wide RSS high-water mark on CPU); network-call counters of the
    batch-1 run (``*_per_run``; a batched decoder call counts once).
    """
    device = torch.device(device)
    unet = unet.to(device).eval()
    noise_scheduler = noise_scheduler if noise_scheduler is not None else build_noise_scheduler()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cross = unet.config.cross_attention_dim
    keys = None if config.key_steps is None else list(config.key_steps)
    dtype = next(unet.parameters()).dtype
    gen = torch.Generator().manual_seed(0)

    def make_run(batch: int):
        noise = torch.randn(batch, *shape, generator=gen).to(device, dtype)
        cond = torch.randn(batch, seq_len, cross, generator=gen).to(device, dtype)
        uncond = torch.randn(1, seq_len, cross, generator=gen).to(device, dtype) if guidance_scale > 1 else None

        def run():
            return sample(
                unet,
                sampling_scheduler(config.scheduler, noise_scheduler),
                noise,
                cond,
                uncond_hidden_states=uncond,
                guidance_scale=guidance_scale,
                num_inference_steps=config.num_inference_steps,
                key_steps=keys,
                parallel=parallel,
                prior_noise=prior_noise,
            )

        return run

    one = make_run(1)
    stats = one().stats
    out: dict[str, Any] = {f"{k}_per_run": float(getattr(stats, k)) for k in PASS_COUNTERS}
    out["decoder_batch_sizes"] = list(stats.decoder_batch_sizes)
    out["flops_per_image"] = float(count_flops(one))
    share = unet_flops(unet, shape, seq_len)["encoder_share"]
    out["encoder_share"] = float(share)
    out["flops_bound_ratio"] = float(sampling_flops_ratio(share, config.num_inference_steps, keys))
    run = one
    for b in batch_sizes:
        run = make_run(int(b))
        timing = time_fn(run, warmup=1, repeats=repeats, device=device)
        out[f"time_per_image_s_bs{b}"] = timing["median_s"] / b
        out[f"time_per_image_min_s_bs{b}"] = timing["min_s"] / b
        out[f"time_all_s_bs{b}"] = list(timing["all_s"])
    out["peak_memory_bytes"] = float(peak_memory(run, device))
    out["peak_memory_batch"] = int(max(batch_sizes))
    return out


def cost_table(cost: pd.DataFrame, reference: str = "FD-5", batch_size: int | None = None) -> pd.DataFrame:
    """Cost per architecture x configuration with speed-ups against ``reference``: measured time
    and FLOPs, next to the analytic FLOP bound (from the encoder share) of the same ratio."""
    if cost.empty:
        return cost
    rows = []
    for arch, group in cost.groupby("architecture", sort=False):
        group = group.set_index("config")
        time_cols = sorted((c for c in group.columns if c.startswith("time_per_image_s_bs")), key=lambda c: int(c[19:]))
        col = f"time_per_image_s_bs{batch_size}" if batch_size is not None else time_cols[-1]
        # FLOP bounds are relative to plain sampling at each row's own steps; rescale by steps so
        # rows with different step counts (the DPM++ line) are comparable.
        bound = group["flops_bound_ratio"] * group["num_inference_steps"]
        has_ref = reference in group.index
        for name, row in group.iterrows():
            out = {"architecture": arch, "config": name, "n_key_steps": row["n_key_steps"],
                   "num_inference_steps": row["num_inference_steps"], "flops_per_image": row["flops_per_image"],
                   "time_per_image_s": row[col], "time_column": col}
            if has_ref:
                ref = group.loc[reference]
                out[f"time_speedup_vs_{reference}"] = ref[col] / row[col]
                out[f"flops_speedup_vs_{reference}"] = ref["flops_per_image"] / row["flops_per_image"]
                out[f"bound_flops_speedup_vs_{reference}"] = bound[reference] / bound[name]
            if "full" in group.index:
                out["flops_ratio_vs_full"] = row["flops_per_image"] / group.loc["full", "flops_per_image"]
                out["bound_flops_ratio_vs_full"] = bound[name] / bound["full"]
                out["time_speedup_vs_full"] = group.loc["full", col] / row[col]
            rows.append(out)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- summaries


def summarize(quality: pd.DataFrame, metrics: Sequence[str] = QUALITY_METRICS) -> pd.DataFrame:
    """Mean and Student-t 95 % interval over seeds per model x configuration
    (``<metric>``, ``<metric>_lo``, ``<metric>_hi``; nan bounds with one seed)."""
    present = [m for m in metrics if m in quality.columns]
    rows = []
    for (model, config), group in quality.groupby(["model", "config"], sort=False):
        row: dict[str, Any] = {"model": model, "config": config, "n_seeds": len(group)}
        for extra in ("architecture", "stride", "n_key_steps", "num_inference_steps", "scheduler"):
            if extra in group.columns:
                row[extra] = group[extra].iloc[0]
        for m in present:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean_ci_over_seeds(group[m].to_numpy(dtype=float))
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the sweep


def run_sweep(
    params: Mapping[str, Any],
    models: Mapping[str, str],
    out_dir: str | Path,
    progress: bool = True,
    *,
    reference_n: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quality (per seed x model x configuration) and cost (per architecture x configuration)
    of the sweep that validated ``params`` describe; ``models`` maps labels to model names or
    run folders. Returns ``(quality, cost)`` tables; results live under ``out_dir/quality`` and
    ``out_dir/cost``. ``reference_n`` limits the real reference images (tests only)."""
    if params["setting"] == "sd":
        return _run_sweep_sd(params, models, out_dir, progress)

    from fcr.eval.classifier import load_classifier

    out_dir = Path(out_dir)
    configs = sweep_configurations(
        params["strides"], params["num_inference_steps"], params["scheduler"],
        params["include_50ls"], params["dpm_reference_steps"], params["dpm_strides"],
    )
    # Everything that can fail does so before anything is generated or written.
    unet_dirs = {label: resolve_unet_dir(source) for label, source in models.items()}
    text_states = Path(params["data_dir"]) / "text_states.safetensors"
    if not text_states.is_file():
        raise FileNotFoundError(f"{text_states} not found: prepare the data with notebooks/01_data_prep.ipynb")
    device = resolve_device(params.get("device"))
    classifier = load_classifier(map_location=device)
    loaded = {}
    for label, folder in unet_dirs.items():
        unet = load_unet_folder(folder, label).eval()
        loaded[label] = (unet, *noise_scheduler_for(folder, params), weights_fingerprint(folder))

    arches = {label: architecture_name(item[0]) for label, item in loaded.items()}
    ref_feats = reference_features(
        classifier, out_dir / "reference" / f"fashion_mnist_test_features_n{reference_n or 'all'}.safetensors",
        n=reference_n,
    )
    classifier_id = module_fingerprint(classifier)
    common = {
        "setting": "embedded",
        "guidance_scale": params["guidance_scale"],
        "parallel_decoding": params["parallel_decoding"],
        "prior_noise_alpha": params["prior_noise_alpha"],
        "prior_noise_threshold": params["prior_noise_threshold"],
    }
    quality_rows = []
    seq_len = 0
    for seed in params["seeds"]:
        prompts = embedded_prompt_set(params["data_dir"], params["num_eval_images"], seed)
        seq_len = int(prompts.states.shape[1])  # token states per prompt, for the cost inputs
        for index, (label, (unet, noise_scheduler, schedule, weights_id)) in enumerate(loaded.items()):
            for config in configs_for_model(configs, index, params["reference_lines_all_models"]):
                prior = prior_noise_for(params, config)
                stem = quality_stem(label, config.name, seed)
                # eval_batch_size is left out: an image does not depend on how it is batched.
                key = {
                    **common, **config.as_dict(), **schedule,
                    "model": label, "model_source": str(models[label]), "weights": weights_id,
                    "config": config.name, "seed": seed, "num_eval_images": params["num_eval_images"],
                    "prompt_templates": "train", "prior_noise": prior.enabled,
                    "classifier": classifier_id, "n_reference": int(ref_feats.shape[0]),
                    "n_bootstrap": params["n_bootstrap"],
                }

                def compute(unet=unet, noise_scheduler=noise_scheduler, config=config, prior=prior, stem=stem,
                            seed=seed, label=label):
                    return evaluate_quality(
                        label, unet, noise_scheduler, config, prompts, classifier, ref_feats,
                        guidance_scale=params["guidance_scale"], parallel=params["parallel_decoding"],
                        prior_noise=prior, batch_size=params["eval_batch_size"], n_boot=params["n_bootstrap"],
                        seed=seed, side_file=out_dir / "quality" / f"{stem}.safetensors", device=device,
                        progress=progress,
                    )

                result, computed = run_or_load(
                    out_dir / "quality" / f"{stem}.json", key, compute, environment_info(device)
                )
                if progress:
                    print(f"quality {stem}: {'computed' if computed else 'loaded'}", flush=True)
                quality_rows.append({**key, **result, "architecture": arches[label]})

    cost_rows = []
    done_arch: set[str] = set()
    for label, (unet, noise_scheduler, _, _) in loaded.items():
        arch = arches[label]
        if arch in done_arch:  # cost depends on the architecture, not the weights
            continue
        done_arch.add(arch)
        for config in configs:
            prior = prior_noise_for(params, config)
            key = {
                **common, **config.as_dict(),
                "architecture": arch, "architecture_config": _arch_config(unet), "config": config.name,
                "batch_sizes": list(params["profile_batches"]), "repeats": params["profile_repeats"],
                "seq_len": seq_len, "device": device.type, "prior_noise": prior.enabled,
            }

            def compute_cost(unet=unet, config=config, prior=prior, noise_scheduler=noise_scheduler):
                return evaluate_cost(
                    unet, config, batch_sizes=params["profile_batches"], repeats=params["profile_repeats"],
                    guidance_scale=params["guidance_scale"], seq_len=seq_len, device=device,
                    parallel=params["parallel_decoding"], prior_noise=prior, noise_scheduler=noise_scheduler,
                )

            result, computed = run_or_load(
                out_dir / "cost" / f"{arch}__{config.name}.json", key, compute_cost, environment_info(device)
            )
            if progress:
                print(f"cost {arch}__{config.name}: {'computed' if computed else 'loaded'}", flush=True)
            cost_rows.append({k: v for k, v in {**key, **result}.items() if k != "architecture_config"})
    return pd.DataFrame(quality_rows), pd.DataFrame(cost_rows)


# ----------------------------------------------------------------------------- Stable Diffusion


def _run_sweep_sd(
    params: Mapping[str, Any], models: Mapping[str, str], out_dir: str | Path, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The SD sweep (GPU machine): COCO captions, clean-fid FID and CLIPScore per configuration.

    Needs ``eval_prompts`` (e.g. COCO captions JSON) and ``fid_reference`` (clean-fid custom
    statistics name, or a folder of reference images). Not exercised with real weights here.
    """
    from fcr.eval.metrics import clip_score, load_clip, sd_fid
    from fcr.settings.sd import generate_sd as _generate_sd
    from fcr.settings.sd import load_sd_components
    from fcr.settings.sd_params import sd_eval_prompts, sd_fid_reference

    if not params["fid_reference"]:
        raise ValueError("parameter 'fid_reference': give a clean-fid statistics name or a folder of reference images")
    out_dir = Path(out_dir)
    device = resolve_device(params.get("device"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    configs = sweep_configurations(
        params["strides"], params["num_inference_steps"], params["scheduler"],
        params["include_50ls"], params["dpm_reference_steps"], params["dpm_strides"],
    )
    components = {label: load_sd_components(source, device=device, dtype=dtype, revision=params["revision"] or None,
                                            variant=params["variant"] or None) for label, source in models.items()}
    ref_kw = sd_fid_reference(params)
    clip = load_clip(params["clip_model"], params["clip_pretrained"] or None, device)  # once, for every configuration
    quality_rows, cost_rows = [], []
    for seed in params["seeds"]:
        prompts = sd_eval_prompts(params, params["num_eval_images"], seed)
        for index, (label, parts) in enumerate(components.items()):
            for config in configs_for_model(configs, index, params["reference_lines_all_models"]):
                prior = prior_noise_for(params, config)
                stem = quality_stem(label, config.name, seed)
                key = {
                    "setting": "sd", **config.as_dict(), "model": label, "model_source": str(models[label]),
                    "config": config.name, "seed": seed, "num_eval_images": len(prompts),
                    "guidance_scale": params["guidance_scale"], "parallel_decoding": params["parallel_decoding"],
                    "prior_noise": prior.enabled, "prior_noise_alpha": prior.alpha,
                    "prior_noise_threshold": prior.threshold, "fid_reference": params["fid_reference"],
                    "n_bootstrap": params["n_bootstrap"], "resolution": params["resolution"],
                }

                def compute(parts=parts, config=config, prior=prior, stem=stem, seed=seed, label=label):
                    start = time.perf_counter()
                    images = _generate_sd(
                        parts, prompts, scheduler_name=config.scheduler,
                        num_inference_steps=config.num_inference_steps, guidance_scale=params["guidance_scale"],
                        key_steps=None if config.key_steps is None else list(config.key_steps),
                        parallel=params["parallel_decoding"], prior_noise=prior, seed=seed,
                        batch_size=params["eval_batch_size"], progress=False,
                    )
                    sampling_s = time.perf_counter() - start
                    folder = out_dir / "images" / stem
                    folder.mkdir(parents=True, exist_ok=True)
                    for i, image in enumerate(images):
                        image.save(folder / f"{i:06d}.png")
                    fid = sd_fid(folder, device=device, **ref_kw)
                    scores = clip_score(images, prompts, device=device, clip=clip)
                    est, lo, hi = bootstrap_ci(scores, n_boot=params["n_bootstrap"], seed=seed)
                    save_safetensors_atomic(
                        {"clip_score": torch.from_numpy(scores)}, out_dir / "quality" / f"{stem}.safetensors",
                        {"model": label, "config": config.name, "seed": str(seed)},
                    )
                    return {"fid": fid, "clip_score": est, "clip_score_lo": lo, "clip_score_hi": hi,
                            "sampling_s": sampling_s, "images": str(folder)}

                result, _ = run_or_load(out_dir / "quality" / f"{stem}.json", key, compute, environment_info(device))
                quality_rows.append({**key, **result, "architecture": "sd"})  # the cost rows' architecture
    first = next(iter(components.values()))
    for config in configs:
        prior = prior_noise_for(params, config)
        key = {"setting": "sd", **config.as_dict(), "architecture": "sd", "config": config.name,
               "architecture_config": _arch_config(first.unet), "batch_sizes": list(params["profile_batches"]),
               "repeats": params["profile_repeats"], "seq_len": 77, "device": device.type,
               "guidance_scale": params["guidance_scale"], "parallel_decoding": params["parallel_decoding"],
               "prior_noise": prior.enabled}

        def compute_cost(config=config, prior=prior):
            return evaluate_cost(
                first.unet, config, batch_sizes=params["profile_batches"], repeats=params["profile_repeats"],
                guidance_scale=params["guidance_scale"], seq_len=77, device=device,
                parallel=params["parallel_decoding"], prior_noise=prior,
                noise_scheduler=first.noise_scheduler,
            )

        result, _ = run_or_load(
            out_dir / "cost" / f"sd__{config.name}.json", key, compute_cost, environment_info(device)
        )
        cost_rows.append({k: v for k, v in {**key, **result}.items() if k != "architecture_config"})
    return pd.DataFrame(quality_rows), pd.DataFrame(cost_rows)
