"""Stride sweep: quality and cost of Faster-Diffusion sampling configurations, per model and seed.

Every configuration of a model samples the SAME prompts from the SAME initial noise for a given
seed (:mod:`fcr.backends.generate`), so differences between configurations are paired. Quality is measured
with the embedded classifier (:mod:`fcr.eval.classifier`) against real Fashion-MNIST test images; cost
(FLOPs, wall time, peak memory, network passes) depends on the architecture and configuration
only, so it is measured once per architecture x configuration. Each result is a JSON file written
as soon as it is finished (:func:`fcr.eval.results.run_or_load`): a re-run skips finished ones and a
file made with other parameters raises :class:`fcr.eval.results.StaleResultError`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import build_noise_scheduler
from fcr.config import ConfigError
from fcr.contract import model_label
from fcr.core.configurations import (
    SamplingConfig,
    configs_for_model,
    configurations_of,
    student_configurations,
    sweep_configurations,
)
from fcr.core.sampler import PriorNoise, sample
from fcr.core.tgate import tgate_sample
from fcr.core.token_merging import token_merging
from fcr.eval.context import LoadedModel, RunContext, architecture_config, build_context, model_meta
from fcr.eval.metrics import DEFAULT_EXTRACTOR_NAME
from fcr.eval.profiling import (
    count_flops,
    deep_cache_flops,
    deep_cache_flops_ratio,
    environment_info,
    peak_memory,
    sampling_flops_ratio,
    time_fn,
    unet_flops,
)
from fcr.eval.results import adopt_cell, run_or_load, save_safetensors_atomic
from fcr.eval.scoring import FD_COLUMN
from fcr.stats import mean_ci_over_seeds, paired_test
from fcr.analysis.paired import load_side_file, quality_stem
from fcr.options import Options

__all__ = [
    "QUALITY_METRICS",
    "SamplingConfig",
    "cost_table",
    "evaluate_cost",
    "evaluate_quality",
    "load_samples",
    "load_side_file",
    "architecture_configurations",
    "model_configurations",
    "model_labels",
    "planned_configurations",
    "paired_comparison",
    "quality_stem",
    "run_sweep",
    "summarize",
    "configs_for_model",
    "sweep_configurations",
]

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


# ----------------------------------------------------------------------------- quality


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


def evaluate_quality(
    ctx: RunContext,
    loaded: LoadedModel,
    config: SamplingConfig,
    prompts: Any,
    *,
    seed: int,
    out_dir: Path,
    stem: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate one image per prompt with ``config`` and score it with the run's scorer.

    Returns the scorer's set metrics (embedded: FD and friends with percentile bootstrap 95 %
    intervals over generated images, the reference set held fixed; SD: FID and CLIPScore), the
    sampler's pass counters per sampling run (one batch) and the sampling wall time (SD: decoding
    included). ``out_dir/quality/<stem>.safetensors`` receives the per-image tensors (embedded: the
    uint8 images, prompted-class probability, correctness, probabilities, features; SD: CLIPScore)
    for paired tests between configurations; SD images go to ``out_dir/images/<stem>/``.
    """
    start = time.perf_counter()
    gen = ctx.generate(loaded, prompts, config, seed=seed, progress=progress)
    images = ctx.images(loaded, gen.images)
    sampling_s = time.perf_counter() - start
    metrics, per_image = ctx.scorer.score(images, prompts, seed=seed, image_dir=out_dir / "images" / stem)
    save_safetensors_atomic(
        per_image, out_dir / "quality" / f"{stem}.safetensors",
        {"model": loaded.label, "config": config.name, "seed": str(seed),
         "prompts": json.dumps(ctx.prompt_texts(prompts))},
    )
    # The sampler counts network calls per batched sampling run (a call processes the whole batch).
    n_runs = gen.stats["sampling_runs"]
    counters = {k: gen.stats.get(k, 0) / n_runs for k in PASS_COUNTERS}
    return {
        **metrics,
        **{f"{k}_per_run": v for k, v in counters.items()},
        "sampling_runs": n_runs,
        "sampling_s": sampling_s,
    }


def load_samples(
    out_dir: str | Path, model: str, configs: Sequence[str], seed: int, n: int = 8
) -> dict[str, torch.Tensor]:
    """The first ``n`` generated images (uint8 ``(n, 1, H, W)``) of each configuration: the same
    prompts and initial noise in every configuration."""
    folder = Path(out_dir) / "quality"
    return {c: load_side_file(folder / f"{quality_stem(model, c, seed)}.safetensors")["images"][:n] for c in configs}


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
    if config.guidance_scale is not None:  # a distilled student: sampled without guidance
        guidance_scale = config.guidance_scale
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
            if config.tgate_gate is not None:
                return tgate_sample(unet, config.grid_scheduler(sampling_scheduler(config.scheduler, noise_scheduler)), noise, cond,
                                    uncond_hidden_states=uncond, guidance_scale=guidance_scale,
                                    num_inference_steps=config.num_inference_steps, settings=config.tgate_settings())
            with token_merging(unet, config.token_merge_settings(), shape[1:], torch.Generator().manual_seed(0)):
                return sample(
                    unet,
                    config.grid_scheduler(sampling_scheduler(config.scheduler, noise_scheduler)),
                    noise,
                    cond,
                    uncond_hidden_states=uncond,
                    guidance_scale=guidance_scale,
                    num_inference_steps=config.num_inference_steps,
                    key_steps=keys,
                    parallel=parallel,
                    prior_noise=prior_noise,
                    deep_cache_branch=config.deep_branch,
                    generator=torch.Generator().manual_seed(0),  # LCM's step noise: never the global generator
                )

        return run

    one = make_run(1)
    stats = one().stats
    out: dict[str, Any] = {f"{k}_per_run": float(getattr(stats, k)) for k in PASS_COUNTERS}
    out["decoder_batch_sizes"] = list(stats.decoder_batch_sizes)
    out["flops_per_image"] = float(count_flops(one))
    share = unet_flops(unet, shape, seq_len)["encoder_share"]
    out["encoder_share"] = float(share)
    if config.token_merge is not None or config.tgate_gate is not None:  # no analytic bound: FLOPs are counted
        out["flops_bound_ratio"] = float("nan")
    elif config.deep_branch is None:
        out["flops_bound_ratio"] = float(sampling_flops_ratio(share, config.num_inference_steps, keys))
    else:  # DeepCache: full passes at the key steps, the shallow path at the others
        out["shallow_passes_per_run"] = float(stats.shallow_passes)
        shallow = deep_cache_flops(unet, shape, seq_len, config.deep_branch)["shallow_share"]
        out["shallow_share"] = float(shallow)
        out["flops_bound_ratio"] = float(deep_cache_flops_ratio(shallow, config.num_inference_steps, keys))
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


def cost_table(cost: pd.DataFrame, reference: str = "FD-5", batch_size: int | None = None,
               device_hour_price: float = 0.0) -> pd.DataFrame:
    """Cost per architecture x configuration with speed-ups against ``reference``: measured time
    and FLOPs, next to the analytic FLOP bound (from the encoder share) of the same ratio. A
    ``device_hour_price`` > 0 (the price of one hour of the timed device) adds the money cost of
    1,000 images at the measured time per image (``cost_per_1k_images``)."""
    if device_hour_price < 0:
        raise ValueError(f"device_hour_price must be >= 0, got {device_hour_price}")
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
            if device_hour_price > 0:
                out["cost_per_1k_images"] = row[col] * 1000 / 3600 * device_hour_price
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


def model_configurations(configs: Sequence[SamplingConfig], index: int, loaded: LoadedModel,
                         opts: Options) -> list[SamplingConfig]:
    """What model number ``index`` of a sweep runs (:func:`configs_for_model`): a distilled student
    its own sampler's configurations (:func:`student_configurations`)."""
    record = loaded.meta.get("distillation")
    student = student_configurations(record, opts.sweep) if record else None
    return configs_for_model(configs, index, opts.sweep.reference_lines_all_models, student)


def planned_configurations(opts: Options, models: Mapping[str, str]) -> dict[str, list[SamplingConfig]]:
    """{label: the configurations it will run} of a sweep over ``models`` ({label: source}, the
    original first), read from the run folders' records without loading any weights."""
    configs = configurations_of(opts.sampling, opts.sweep)
    out: dict[str, list[SamplingConfig]] = {}
    for index, (label, source) in enumerate(models.items()):
        record = model_meta(str(source)).get("distillation")
        student = student_configurations(record, opts.sweep) if record else None
        out[label] = configs_for_model(configs, index, opts.sweep.reference_lines_all_models, student)
    return out


def architecture_configurations(configs: Sequence[SamplingConfig], ctx: RunContext, arch: str) -> list[SamplingConfig]:
    """Every configuration some model of architecture ``arch`` runs, once: the sweep's, then the
    distilled students' (cost depends on the architecture and the configuration only)."""
    out = {c.name: c for c in configs}
    for loaded in ctx.models.values():
        if loaded.architecture == arch and loaded.meta.get("distillation"):
            for config in student_configurations(loaded.meta["distillation"], ctx.opts.sweep):
                out.setdefault(config.name, config)
    return list(out.values())


def adoption_sources(folders: Sequence[str], setting: str, out_dir: Path) -> list[Path]:
    """The sweep folders named by ``adopt_cells_from``, checked before anything is written."""
    sources = [Path(f) for f in folders]
    if sources and setting == "sd":  # its images live as PNG folders beside the cells
        raise ConfigError("parameter 'adopt_cells_from': the SD setting keeps its images as PNGs; not supported")
    for source in sources:
        if not (source / "quality").is_dir() or source.resolve() == out_dir.resolve():
            raise ConfigError(f"parameter 'adopt_cells_from': {source} is not another sweep's result folder")
    return sources


def run_sweep(
    opts: Options,
    models: Mapping[str, str],
    out_dir: str | Path,
    progress: bool = True,
    *,
    reference_n: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quality (per seed x model x configuration) and cost (per architecture x configuration)
    of the sweep that validated ``opts`` describe, in either setting; ``models`` maps labels to
    model names or run folders. Returns ``(quality, cost)`` tables; results live under
    ``out_dir/quality`` and ``out_dir/cost``. ``reference_n`` limits the real reference images
    (embedded; tests only). SD needs ``eval_prompts`` (e.g. COCO captions) and ``fid_reference``."""
    out_dir = Path(out_dir)
    configs = configurations_of(opts.sampling, opts.sweep)
    # Everything that can fail does so here, before anything is generated or written.
    ctx = build_context(opts, models, out_dir, reference_n=reference_n)
    adopt_from = adoption_sources(opts.sweep.adopt_cells_from, ctx.setting, out_dir)
    templates = "train" if ctx.setting == "embedded" else "eval_prompts"
    quality_rows = []
    seq_len = 0
    for seed in opts.run.seeds:
        prompts = ctx.eval_prompts(opts.evaluation.num_eval_images, seed)
        for index, loaded in enumerate(ctx.models.values()):
            # Token states per prompt, for the cost inputs.
            seq_len = int(loaded.model.condition(prompts, 0, 1, False)[0].shape[1])
            for config in model_configurations(configs, index, loaded, opts):
                prior = ctx.sampling.prior_for(config)
                stem = quality_stem(loaded.label, config.name, seed)
                # eval_batch_size is left out: an image does not depend on how it is batched.
                key = {
                    **ctx.sampling_key, **config.as_dict(), **loaded.schedule,
                    "model": loaded.label, "model_source": loaded.source, "weights": loaded.weights,
                    "config": config.name, "seed": seed, "num_eval_images": len(prompts),
                    "prompt_templates": templates, "prior_noise": prior.enabled, **ctx.scorer.key,
                }

                def compute(loaded=loaded, config=config, stem=stem, seed=seed):
                    return evaluate_quality(ctx, loaded, config, prompts, seed=seed, out_dir=out_dir, stem=stem,
                                            progress=progress)

                adopted = adopt_cell(adopt_from, out_dir, "quality", stem, key)
                result, computed = run_or_load(
                    out_dir / "quality" / f"{stem}.json", key, compute, environment_info(ctx.device),
                    requires={out_dir / "quality" / f"{stem}.safetensors": ()},  # the paired tests read it
                )
                if progress:
                    print(f"quality {stem}: {'adopted' if adopted else 'computed' if computed else 'loaded'}", flush=True)
                quality_rows.append({**key, **result, "architecture": loaded.architecture})

    cost_rows = []
    done_arch: set[str] = set()
    for loaded in ctx.models.values():
        arch, unet = loaded.architecture, loaded.model.unet
        if arch in done_arch:  # cost depends on the architecture, not the weights
            continue
        done_arch.add(arch)
        for config in architecture_configurations(configs, ctx, arch):
            prior = ctx.sampling.prior_for(config)
            key = {
                **ctx.sampling_key, **config.as_dict(),
                "architecture": arch, "architecture_config": architecture_config(unet), "config": config.name,
                "batch_sizes": list(opts.evaluation.profile_batches), "repeats": opts.evaluation.profile_repeats,
                "seq_len": seq_len, "device": ctx.device.type, "prior_noise": prior.enabled,
            }

            def compute_cost(unet=unet, config=config, prior=prior, noise_scheduler=loaded.model.noise_scheduler):
                return evaluate_cost(
                    unet, config, batch_sizes=opts.evaluation.profile_batches, repeats=opts.evaluation.profile_repeats,
                    guidance_scale=opts.sampling.guidance_scale, seq_len=seq_len, device=ctx.device,
                    parallel=opts.sampling.parallel_decoding, prior_noise=prior, noise_scheduler=noise_scheduler,
                )

            result, computed = run_or_load(
                out_dir / "cost" / f"{arch}__{config.name}.json", key, compute_cost, environment_info(ctx.device)
            )
            if progress:
                print(f"cost {arch}__{config.name}: {'computed' if computed else 'loaded'}", flush=True)
            cost_rows.append({k: v for k, v in {**key, **result}.items() if k != "architecture_config"})
    return pd.DataFrame(quality_rows), pd.DataFrame(cost_rows)
