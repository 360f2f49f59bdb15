"""The sweep's quality evaluation at the seed's scale: ``python -m fcr evaluate``, one process or many.

    accelerate launch --num_processes 8 -m fcr evaluate -f params/sd15.yaml -f params/eval/coco30k.yaml
    torchrun --nproc_per_node 2 -m fcr evaluate -f ...      # the same; gloo on a CPU-only machine

Every (seed, model, configuration) of the sweep that the parameters describe is split into
``eval_shards`` fixed shards of its prompts (:mod:`fcr.eval.sharding`); process ``r`` of ``P``
computes shards ``r, r + P, ...``, writing each shard's per-image tensors as it finishes (a killed
run resumes from the finished shards, with any number of processes). Image ``i`` is sampled from the
noise of ``(seed, i)``, so the per-image results do not depend on the number of processes. After all
processes are done, the first gathers every configuration and computes its set metrics once
(:func:`fcr.eval.sd_evaluation.set_metrics`). Stable Diffusion only: the embedded setting's
evaluation fits one process (notebook 03).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fcr.analysis.paired import quality_stem
from fcr.config import ConfigError
from fcr.eval.context import RunContext, build_context
from fcr.eval.profiling import environment_info
from fcr.eval.results import run_or_load, save_safetensors_atomic
from fcr.eval.sd_evaluation import InceptionFeatures, measure_images, reference_set, set_metrics
from fcr.eval.sharding import ShardPlan, ShardingError, gather_shards, run_shards
from fcr.experiments.sweep import model_configurations
from fcr.core.configurations import configurations_of
from fcr.options import Options

__all__ = ["evaluate_sharded", "evaluation_dir"]

PR_K = 3  # neighbours of improved precision/recall (Kynkäänniemi et al.)


def evaluation_dir(opts: Options) -> Path:
    """Where ``python -m fcr evaluate`` writes: ``output_dir/run_name/evaluation``."""
    return Path(opts.run.output_dir) / opts.run.run_name / "evaluation"


def _plans(opts: Options, ctx: RunContext, rank: int, world: int) -> dict[int, tuple[list[str], ShardPlan, list[int]]]:
    """{seed: (prompts, shard plan, this process's shards)}; a plan the processes cannot share fails here."""
    out = {}
    for seed in opts.run.seeds:
        prompts = list(ctx.eval_prompts(opts.evaluation.num_eval_images, seed))
        try:
            plan = ShardPlan(len(prompts), min(opts.evaluation.eval_shards, len(prompts)))
            out[seed] = (prompts, plan, plan.assigned(rank, world))
        except ShardingError as err:
            raise ConfigError(f"parameter 'eval_shards': {err}") from err
    return out


def evaluate_sharded(
    opts: Options,
    models: Mapping[str, str],
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> pd.DataFrame | None:
    """Run this process's shards of every configuration, wait for all processes (``barrier``),
    then on process 0 gather and score each configuration; returns the quality table there (None
    on the others). Results: ``evaluation_dir(opts)/shards/<stem>/``, ``quality/<stem>.json`` (+ the
    per-image CLIPScore and CLIP image embedding the paired tests read) and ``quality.csv``."""
    if opts.run.setting != "sd":
        raise ConfigError("parameter 'setting': `python -m fcr evaluate` evaluates Stable Diffusion; the embedded "
                          "setting's sweep runs in notebook 03")
    out_dir = evaluation_dir(opts)
    ctx = build_context(opts, models, out_dir, require_fid_reference=False)
    plans = _plans(opts, ctx, rank, world)  # everything that can fail does so before a shard is written
    ev = opts.evaluation
    inception = InceptionFeatures(ev.fid_inception_dir or None, ev.fid_mode, ctx.device)
    clip = ctx.scorer.clip  # type: ignore[union-attr]
    configs = configurations_of(opts.sampling, opts.sweep)
    jobs: list[tuple[int, Any, Any, dict[str, Any]]] = []
    for seed, (prompts, plan, mine) in plans.items():
        for index, loaded in enumerate(ctx.models.values()):
            for config in model_configurations(configs, index, loaded, opts):
                key = {
                    **ctx.sampling_key, **config.as_dict(), **loaded.schedule,
                    "model": loaded.label, "model_source": loaded.source, "weights": loaded.weights,
                    "config": config.name, "seed": seed, "num_eval_images": len(prompts),
                    "eval_prompts": opts.data.eval_prompts, "eval_shards": plan.num_shards,
                    "inception": inception.identity, "clip_model": ev.clip_model, "clip_pretrained": ev.clip_pretrained,
                    "prior_noise": ctx.sampling.prior_for(config).enabled,
                }
                jobs.append((seed, loaded, config, key))

                def measure(items: range, loaded=loaded, config=config, seed=seed, prompts=prompts) -> dict[str, torch.Tensor]:
                    part = prompts[items.start : items.stop]
                    gen = ctx.generate(loaded, part, config, seed=seed, first_index=items.start)
                    return measure_images(ctx.images(loaded, gen.images), part, inception, clip, ctx.device)

                stem = quality_stem(loaded.label, config.name, seed)
                run_shards(plan, out_dir / "shards" / stem, key, measure, mine, progress=progress and rank == 0,
                           desc=f"{stem} (process {rank + 1}/{world})")
    barrier()
    if rank != 0:
        return None
    reference = (reference_set(ev.fid_reference, inception, clip, ctx.device, Path(opts.data.data_dir) / "fid_reference",
                               ev.fid_mode) if ev.fid_reference else None)
    rows = []
    for seed, loaded, config, key in jobs:
        prompts, plan, _ = plans[seed]
        stem = quality_stem(loaded.label, config.name, seed)
        full_key = {**key, "fid_reference": ev.fid_reference, "n_bootstrap": ev.n_bootstrap, "pr_k": PR_K}

        def score(stem=stem, plan=plan, key=key, seed=seed, loaded=loaded, config=config) -> dict[str, Any]:
            per_image = gather_shards(plan, out_dir / "shards" / stem, key)
            sizes = [len(plan.items(s)) for s in range(plan.num_shards)]
            save_safetensors_atomic({"clip_score": per_image["clip_score"], "clip_image": per_image["clip_image"]},
                                    out_dir / "quality" / f"{stem}.safetensors",
                                    {"model": loaded.label, "config": config.name, "seed": str(seed)})
            return set_metrics(per_image, reference, shard_sizes=sizes, n_bootstrap=ev.n_bootstrap, seed=seed, pr_k=PR_K)

        result, _ = run_or_load(out_dir / "quality" / f"{stem}.json", full_key, score, environment_info(ctx.device),
                                requires={out_dir / "quality" / f"{stem}.safetensors": ("clip_score",)})
        rows.append({**full_key, **result, "processes": world})
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "quality.csv", index=False)
    return table
