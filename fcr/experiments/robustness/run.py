"""The robustness runner: one result file per model x configuration x stress x seed, written as
each finishes (embedded and SD)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fcr.config import ConfigError
from fcr.eval.context import LoadedModel, build_context
from fcr.eval.profiling import environment_info
from fcr.eval.results import adopt_cell, run_or_load, save_safetensors_atomic
from fcr.eval.scoring import per_kind_means
from fcr.experiments.robustness.attack import ATTACK_STEP_FACTOR
from fcr.experiments.robustness.prompts import OOD_FILES, SD_OOD_FILES, StressPrompts, prompt_files_digest
from fcr.experiments.robustness.sampling import AttackCache, StressHooks
from fcr.experiments.robustness.stresses import (
    Stress,
    attack_stride,
    result_stem,
    robustness_configurations,
    stress_definitions,
)
from fcr.options import Options

__all__ = ["run_robustness"]

# Images per adversarial-attack chunk: SD's backward pass holds one image at a time.
SD_ATTACK_CHUNK = 1


def _stress_key(stress: Stress, opts: Options, attack: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parameters that shape a stress's result (only its own, so changing e.g. the attack
    budget leaves the other stresses' results valid)."""
    key: dict[str, Any] = {"stress": stress.name, "prompt_templates": stress.prompts}
    if stress.resolution is not None:
        key["stress_resolution"] = stress.resolution
    if stress.schedule_noise_std is not None:
        # One perturbation per image batch: the batch size shapes the result.
        key.update(schedule_noise_std=stress.schedule_noise_std, eval_batch_size=opts.evaluation.eval_batch_size)
    if stress.adversarial and attack is not None:
        key.update(adversarial_epsilon=attack["epsilon"], adversarial_steps=attack["steps"],
                   attack_stride=attack["stride"], attack_step_factor=ATTACK_STEP_FACTOR)
    if stress.prompts == "ood":
        files = SD_OOD_FILES if opts.run.setting == "sd" else OOD_FILES
        key["ood_prompt_files"] = prompt_files_digest(files)
    return key


def _check_inputs(opts: Options, stresses: Mapping[str, Stress]) -> None:
    """Embedded: OOD text states must have the token length the prepared training states (and the
    models) have."""
    manifest = Path(opts.data.data_dir) / "manifest.json"
    if opts.run.setting == "embedded" and manifest.is_file() and "ood_prompts" in stresses:
        prepared = json.loads(manifest.read_text()).get("max_text_length", opts.backbone.max_text_length)
        if prepared != opts.backbone.max_text_length:
            raise ConfigError(f"parameter 'max_text_length': {opts.backbone.max_text_length} but {opts.data.data_dir} "
                              f"was prepared with {prepared}")


def _check_resolution(stresses: Mapping[str, Stress]):
    """A check of each loaded model: the high-resolution stress must be above its native size."""
    res = stresses.get("high_resolution")

    def check(loaded: LoadedModel) -> None:
        native = loaded.model.native_resolution
        if res is not None and res.resolution <= native:
            raise ConfigError(
                f"parameter 'stress_resolution': {res.resolution} is not above {loaded.label!r}'s training size "
                f"{native}"
            )

    return check


def run_robustness(
    opts: Options,
    models: Mapping[str, str],
    out_dir: str | Path,
    progress: bool = True,
    *,
    reference_n: int | None = None,
) -> pd.DataFrame:
    """Every model x configuration x stress x seed of validated ``opts``, in either setting;
    ``models`` maps labels to model names or run folders. One row per result (key columns,
    metrics, ``model_source``, ``original_model``, ``lambda_fcr``); results live in
    ``out_dir/results`` (JSON, plus a safetensors side file of per-image scores; embedded: the
    images too, SD: PNGs in ``out_dir/images``). SD's FID is computed for the evaluation-prompt
    stresses only (the OOD lists have no reference images). ``reference_n`` limits the real
    reference images (embedded; tests only)."""
    out_dir = Path(out_dir)
    stresses = stress_definitions(opts)
    configs = robustness_configurations(opts)
    attacks = {c.name: attack_stride(c, opts.robustness.robustness_strides) for c in configs} if any(
        s.adversarial for s in stresses.values()) else {}
    _check_inputs(opts, stresses)
    ctx = build_context(opts, models, out_dir, reference_n=reference_n, check_model=_check_resolution(stresses))
    prompt_source = StressPrompts(ctx, {s.prompts for s in stresses.values()}, out_dir, opts.backbone.max_text_length)
    chunk = SD_ATTACK_CHUNK if ctx.setting == "sd" else None
    n = opts.robustness.num_robustness_images
    common = {**ctx.sampling_key, **ctx.scorer.key, "num_robustness_images": n}
    rows = []
    reuse = Path(opts.robustness.reuse_results_from) if opts.robustness.reuse_results_from else None
    if reuse is not None and ctx.setting == "sd":
        raise ConfigError("parameter 'reuse_results_from': the SD setting keeps its images as PNGs; not supported")
    # The attack on z_T ignores the key steps: `full` reuses the largest stride's attack (same
    # model, prompts, noise and seed) instead of recomputing it.
    attack_caches: dict[tuple[int, str], AttackCache] = {}
    for seed in opts.run.seeds:
        attack_caches.clear()  # one seed's attacks at a time (memory)
        prompt_sets = {kind: prompt_source.get(kind, n, seed) for kind in {s.prompts for s in stresses.values()}}
        for loaded in ctx.models.values():
            for config in configs:
                prior = ctx.sampling.prior_for(config)
                for stress in stresses.values():
                    prompts, kinds = prompt_sets[stress.prompts]
                    attack = None
                    if stress.adversarial:
                        attack = {"stride": attacks[config.name], "epsilon": opts.robustness.adversarial_epsilon,
                                  "steps": opts.robustness.adversarial_steps}
                    stem = result_stem(loaded.label, config.name, stress.name, seed)
                    key = {
                        **common, **config.as_dict(), **loaded.schedule, **_stress_key(stress, opts, attack),
                        "model": loaded.label, "model_source": loaded.source, "weights": loaded.weights,
                        "config": config.name, "seed": seed, "prior_noise": prior.enabled,
                    }

                    def compute(loaded=loaded, config=config, stress=stress, prompts=prompts, kinds=kinds,
                                attack=attack, stem=stem, seed=seed):
                        cache = attack_caches.setdefault((seed, loaded.label), {})
                        hooks = StressHooks(stress, config, seed=seed, batch_size=opts.evaluation.eval_batch_size,
                                            attack=attack, attack_cache=cache, **({"chunk_size": chunk} if chunk else {}))
                        start = time.perf_counter()
                        gen = ctx.generate(loaded, prompts, config, seed=seed, image_size=stress.resolution,
                                           noise_hook=hooks.noise_hook, scheduler_hook=hooks.scheduler_hook,
                                           progress=progress, desc=f"{config.name}/{stress.name}")
                        images = ctx.images(loaded, gen.images)
                        sampling_s = time.perf_counter() - start
                        # Embedded images larger than the classifier's input are pooled to its size.
                        metrics, per_image = ctx.scorer.score(images, prompts, seed=seed,
                                                              image_dir=out_dir / "images" / stem,
                                                              with_fid=kinds is None)
                        result = {**metrics, "sampling_s": sampling_s,
                                  "image_size": int(stress.resolution or loaded.model.native_resolution),
                                  **{k: v for k, v in gen.stats.items() if not isinstance(v, list)}}
                        if stress.adversarial:
                            result["attack_batches_reused"] = hooks.batches_reused
                        if kinds is not None:  # alignment per OOD prompt list (nan: no image of that list)
                            values = per_image[ctx.scorer.alignment_per_image]
                            means = per_kind_means(values, kinds, prompt_source.files)
                            result.update({f"{ctx.scorer.alignment}_{kind}": v for kind, v in means.items()})
                        save_safetensors_atomic(
                            per_image, out_dir / "results" / f"{stem}.safetensors",
                            {"model": loaded.label, "config": config.name, "stress": stress.name, "seed": str(seed),
                             "prompts": json.dumps(ctx.prompt_texts(prompts))},
                        )
                        return result

                    # A finished run's identical cell (embedded: images in the side file).
                    adopt_cell([reuse] if reuse is not None else [], out_dir, "results", stem, key)
                    result, computed = run_or_load(
                        out_dir / "results" / f"{stem}.json", key, compute, environment_info(ctx.device),
                        requires={out_dir / "results" / f"{stem}.safetensors": ()},
                    )
                    if progress:
                        print(f"robustness {stem}: {'computed' if computed else 'loaded'}", flush=True)
                    rows.append({**key, **result, **loaded.meta, "architecture": loaded.architecture})
    return pd.DataFrame(rows)
