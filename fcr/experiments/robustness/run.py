"""The robustness runner: one result file per model x configuration x stress x seed, written as
each finishes (embedded and SD)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fcr.config import ConfigError
from fcr.eval.results import module_fingerprint, run_or_load, save_safetensors_atomic, weights_fingerprint
from fcr.eval.stats import bootstrap_ci
from fcr.experiments.robustness.attack import ATTACK_STEP_FACTOR
from fcr.experiments.robustness.prompts import (
    OOD_FILES,
    SD_OOD_FILES,
    load_ood_prompts,
    load_sd_prompt_list,
    ood_prompt_set,
    ood_text_states,
    prompt_files_digest,
)
from fcr.experiments.robustness.sampling import generate_sd_stressed, generate_stressed, to_classifier_size
from fcr.experiments.robustness.stresses import (
    Stress,
    attack_stride,
    result_stem,
    robustness_configurations,
    stress_definitions,
)
from fcr.experiments.sweep import (
    architecture_name,
    prior_noise_for,
    reference_features,
    score_images,
)
from fcr.settings.generate import PromptSet, embedded_prompt_set
from fcr.settings.models import (
    ModelNotFoundError,
    load_unet_folder,
    model_training_params,
    noise_scheduler_for,
    resolve_device,
    resolve_unet_dir,
)

# ----------------------------------------------------------------------------- the run




def _stress_key(stress: Stress, params: Mapping[str, Any], attack: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parameters that shape a stress's result (only its own, so changing e.g. the attack
    budget leaves the other stresses' results valid)."""
    key: dict[str, Any] = {"stress": stress.name, "prompt_templates": stress.prompts}
    if stress.resolution is not None:
        key["stress_resolution"] = stress.resolution
    if stress.schedule_noise_std is not None:
        # One perturbation per image batch: the batch size shapes the result.
        key.update(schedule_noise_std=stress.schedule_noise_std, eval_batch_size=params["eval_batch_size"])
    if stress.adversarial and attack is not None:
        key.update(adversarial_epsilon=attack["epsilon"], adversarial_steps=attack["steps"],
                   attack_stride=attack["stride"], attack_step_factor=ATTACK_STEP_FACTOR)
    if stress.prompts == "ood":
        files = SD_OOD_FILES if params["setting"] == "sd" else OOD_FILES
        key["ood_prompt_files"] = prompt_files_digest(files)
    return key


def _model_meta(source: str) -> dict[str, Any]:
    """``original_model`` (the model it was fine-tuned from) and ``lambda_fcr`` of a run folder's
    params.yaml (None for models without one)."""
    try:
        trained = model_training_params(resolve_unet_dir(source)) or {}
    except ModelNotFoundError:
        trained = {}
    return {"original_model": trained.get("model"), "lambda_fcr": trained.get("lambda_fcr")}


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


def run_robustness(
    params: Mapping[str, Any],
    models: Mapping[str, str],
    out_dir: str | Path,
    progress: bool = True,
    *,
    reference_n: int | None = None,
) -> pd.DataFrame:
    """Every model x configuration x stress x seed of validated ``params``; ``models`` maps labels
    to model names or run folders. One row per result (key columns, metrics, ``model_source``,
    ``original_model``, ``lambda_fcr``); results live in ``out_dir/results`` (JSON, plus a
    safetensors side file of images and per-image scores). ``reference_n`` limits the real
    reference images (tests only)."""
    if params["setting"] == "sd":
        return _run_robustness_sd(params, models, out_dir, progress)

    from fcr.eval.classifier import load_classifier
    from fcr.eval.profiling import environment_info

    out_dir = Path(out_dir)
    stresses = stress_definitions(params)
    configs = robustness_configurations(params)
    attacks = {c.name: attack_stride(c, params["robustness_strides"]) for c in configs} if any(
        s.adversarial for s in stresses.values()) else {}
    unet_dirs = {label: resolve_unet_dir(source) for label, source in models.items()}
    text_states = Path(params["data_dir"]) / "text_states.safetensors"
    if not text_states.is_file():
        raise FileNotFoundError(f"{text_states} not found: prepare the data with notebooks/01_data_prep.ipynb")
    manifest = Path(params["data_dir"]) / "manifest.json"
    if manifest.is_file() and "ood_prompts" in stresses:
        # OOD states must have the token length the training states (and the models) have.
        prepared = json.loads(manifest.read_text()).get("max_text_length", params["max_text_length"])
        if prepared != params["max_text_length"]:
            raise ConfigError(f"parameter 'max_text_length': {params['max_text_length']} but {params['data_dir']} "
                              f"was prepared with {prepared}")
    device = resolve_device(params.get("device"))
    classifier = load_classifier(map_location=device)
    loaded = {}
    for label, folder in unet_dirs.items():
        unet = load_unet_folder(folder, label).eval()
        res = stresses.get("high_resolution")
        if res is not None and res.resolution <= unet.config.sample_size:
            raise ConfigError(
                f"parameter 'stress_resolution': {res.resolution} is not above {label!r}'s training size "
                f"{unet.config.sample_size}"
            )
        loaded[label] = (unet, *noise_scheduler_for(folder, params), weights_fingerprint(folder))
    arches = {label: architecture_name(item[0]) for label, item in loaded.items()}
    ref_feats = reference_features(
        classifier, out_dir / "reference" / f"fashion_mnist_test_features_n{reference_n or 'all'}.safetensors",
        n=reference_n,
    )
    ood_table = ood_states = None
    if "ood_prompts" in stresses:
        ood_table = load_ood_prompts()
        ood_states = ood_text_states(ood_table["prompt"].tolist(), out_dir / "text_states_ood.safetensors",
                                     max_length=params["max_text_length"])
    classifier_id = module_fingerprint(classifier)
    meta = {label: _model_meta(source) for label, source in models.items()}
    common = {
        "setting": "embedded", "guidance_scale": params["guidance_scale"],
        "parallel_decoding": params["parallel_decoding"], "prior_noise_alpha": params["prior_noise_alpha"],
        "prior_noise_threshold": params["prior_noise_threshold"], "classifier": classifier_id,
        "n_reference": int(ref_feats.shape[0]), "n_bootstrap": params["n_bootstrap"],
        "num_robustness_images": params["num_robustness_images"],
    }
    rows = []
    n = params["num_robustness_images"]
    # The attack on z_T ignores the key steps: `full` reuses the largest stride's attack (same
    # model, prompts, noise and seed) instead of recomputing it.
    attack_caches: dict[tuple[int, str], dict] = {}
    for seed in params["seeds"]:
        attack_caches.clear()  # one seed's attacks at a time (memory)
        prompt_sets: dict[str, tuple[PromptSet, list[str] | None]] = {}
        for kind in {s.prompts for s in stresses.values()}:
            if kind == "ood":
                prompt_sets[kind] = ood_prompt_set(ood_table, ood_states, n, seed)
            else:
                prompt_sets[kind] = (embedded_prompt_set(params["data_dir"], n, seed, templates=kind), None)
        for label, (unet, noise_scheduler, schedule, weights_id) in loaded.items():
            for config in configs:
                prior = prior_noise_for(params, config)
                for stress in stresses.values():
                    prompts, kinds = prompt_sets[stress.prompts]
                    attack = None
                    if stress.adversarial:
                        attack = {"stride": attacks[config.name], "epsilon": params["adversarial_epsilon"],
                                  "steps": params["adversarial_steps"]}
                    stem = result_stem(label, config.name, stress.name, seed)
                    key = {
                        **common, **config.as_dict(), **schedule, **_stress_key(stress, params, attack),
                        "model": label, "model_source": str(models[label]), "weights": weights_id,
                        "config": config.name, "seed": seed, "prior_noise": prior.enabled,
                    }

                    def compute(unet=unet, noise_scheduler=noise_scheduler, config=config, prior=prior,
                                stress=stress, prompts=prompts, kinds=kinds, attack=attack, stem=stem, seed=seed,
                                label=label):
                        start = time.perf_counter()
                        images, stats = generate_stressed(
                            unet, noise_scheduler, prompts, config, stress,
                            guidance_scale=params["guidance_scale"], parallel=params["parallel_decoding"],
                            prior_noise=prior, batch_size=params["eval_batch_size"], attack=attack,
                            attack_cache=attack_caches.setdefault((seed, label), {}), device=device,
                            progress=progress,
                        )
                        sampling_s = time.perf_counter() - start
                        # Images larger than the classifier's input are pooled to 32x32 first.
                        metrics, per_image = score_images(to_classifier_size(images), prompts.labels, classifier,
                                                          ref_feats, n_boot=params["n_bootstrap"], seed=seed)
                        result = {**metrics, "sampling_s": sampling_s, "image_size": int(images.shape[-1]),
                                  **{k: v for k, v in stats.items() if not isinstance(v, list)}}
                        if kinds is not None:  # accuracy per OOD prompt kind (nan: no image of that kind)
                            correct = per_image["correct"].numpy()
                            for kind in OOD_FILES:
                                mask = np.array([k == kind for k in kinds])
                                acc = float(correct[mask].mean()) if mask.any() else math.nan
                                result[f"class_accuracy_{kind}"] = acc
                        images_u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                        save_safetensors_atomic(
                            {"images": images_u8, "labels": torch.as_tensor(prompts.labels), **per_image},
                            out_dir / "results" / f"{stem}.safetensors",
                            {"model": label, "config": config.name, "stress": stress.name, "seed": str(seed),
                             "prompts": json.dumps(prompts.texts)},
                        )
                        return result

                    result, computed = run_or_load(
                        out_dir / "results" / f"{stem}.json", key, compute, environment_info(device)
                    )
                    if progress:
                        print(f"robustness {stem}: {'computed' if computed else 'loaded'}", flush=True)
                    rows.append({**key, **result, **meta[label], "architecture": arches[label]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- Stable Diffusion


def _sd_prompts(params: Mapping[str, Any], kind: str, n: int, seed: int) -> tuple[list[str], list[str] | None]:
    """The evaluation prompts (``eval_prompts``, e.g. COCO captions) for every stress but ``ood_prompts``, which alternates the
    abstract and medical lists (seeded choice within each)."""
    if kind == "ood":
        lists = {name: load_sd_prompt_list(name) for name in SD_OOD_FILES}
        kinds = [list(lists)[i % len(lists)] for i in range(n)]
        rng = np.random.default_rng([int(seed), 13])
        return [lists[k][int(rng.integers(len(lists[k])))] for k in kinds], kinds
    from fcr.settings.sd_params import sd_eval_prompts

    return sd_eval_prompts(params, n, seed), None


def _run_robustness_sd(
    params: Mapping[str, Any], models: Mapping[str, str], out_dir: str | Path, progress: bool
) -> pd.DataFrame:
    """The SD robustness run (GPU machine): FID (clean-fid, against ``fid_reference``; COCO-prompt
    stresses only, as the OOD lists have no reference images) and CLIPScore per result. Not
    exercised with real weights here."""
    from fcr.eval.metrics import clip_score, load_clip, sd_fid
    from fcr.eval.profiling import environment_info
    from fcr.settings.sd import decode_latents, load_sd_components
    from fcr.settings.sd_params import sd_fid_reference

    out_dir = Path(out_dir)
    stresses = stress_definitions(params)
    configs = robustness_configurations(params)
    if not params["fid_reference"]:
        raise ConfigError("parameter 'fid_reference': give a clean-fid statistics name or a folder of reference images")
    attacks = {c.name: attack_stride(c, params["robustness_strides"]) for c in configs} if any(
        s.adversarial for s in stresses.values()) else {}
    device = resolve_device(params.get("device"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    components = {label: load_sd_components(source, device=device, dtype=dtype, revision=params["revision"] or None,
                                            variant=params["variant"] or None) for label, source in models.items()}
    ref_kw = sd_fid_reference(params)
    clip_model = load_clip(params["clip_model"], params["clip_pretrained"] or None, device)
    n = params["num_robustness_images"]
    rows = []
    for seed in params["seeds"]:
        prompt_sets = {kind: _sd_prompts(params, kind, n, seed) for kind in {s.prompts for s in stresses.values()}}
        for label, parts in components.items():
            native = parts.unet.config.sample_size * parts.vae_scale_factor
            res = stresses.get("high_resolution")
            if res is not None and res.resolution <= native:
                raise ConfigError(f"parameter 'stress_resolution': {res.resolution} is not above {label!r}'s {native}")
            for config in configs:
                prior = prior_noise_for(params, config)
                for stress in stresses.values():
                    prompts, kinds = prompt_sets[stress.prompts]
                    attack = None
                    if stress.adversarial:
                        attack = {"stride": attacks[config.name], "epsilon": params["adversarial_epsilon"],
                                  "steps": params["adversarial_steps"]}
                    stem = result_stem(label, config.name, stress.name, seed)
                    key = {
                        "setting": "sd", **config.as_dict(), **_stress_key(stress, params, attack),
                        "model": label, "model_source": str(models[label]), "config": config.name, "seed": seed,
                        "num_robustness_images": n, "guidance_scale": params["guidance_scale"],
                        "parallel_decoding": params["parallel_decoding"], "prior_noise": prior.enabled,
                        "prior_noise_alpha": prior.alpha, "prior_noise_threshold": prior.threshold,
                        "fid_reference": params["fid_reference"], "n_bootstrap": params["n_bootstrap"],
                    }

                    def compute(parts=parts, config=config, prior=prior, stress=stress, prompts=prompts,
                                kinds=kinds, attack=attack, stem=stem, seed=seed):
                        start = time.perf_counter()
                        latents, stats = generate_sd_stressed(
                            parts, prompts, config, stress, guidance_scale=params["guidance_scale"],
                            parallel=params["parallel_decoding"], prior_noise=prior,
                            batch_size=params["eval_batch_size"], seed=seed, attack=attack,
                        )
                        images = []
                        for i in range(0, latents.shape[0], params["eval_batch_size"]):
                            images += decode_latents(parts.vae, latents[i : i + params["eval_batch_size"]])
                        sampling_s = time.perf_counter() - start
                        folder = out_dir / "images" / stem
                        folder.mkdir(parents=True, exist_ok=True)
                        for i, image in enumerate(images):
                            image.save(folder / f"{i:06d}.png")
                        clip = clip_score(images, prompts, device=device, clip=clip_model)
                        est, lo, hi = bootstrap_ci(clip, n_boot=params["n_bootstrap"], seed=seed)
                        result = {"clip_score": est, "clip_score_lo": lo, "clip_score_hi": hi,
                                  "fid": sd_fid(folder, device=device, **ref_kw) if kinds is None else math.nan,
                                  "sampling_s": sampling_s, "images": str(folder),
                                  **{k: v for k, v in stats.items() if not isinstance(v, list)}}
                        if kinds is not None:  # per prompt list (the lists alternate, so both are present)
                            for kind in SD_OOD_FILES:
                                mine = [c for c, k in zip(clip, kinds) if k == kind]
                                result[f"clip_score_{kind}"] = float(np.mean(mine))
                        save_safetensors_atomic({"clip_score": torch.from_numpy(clip)},
                                                 out_dir / "results" / f"{stem}.safetensors",
                                                 {"model": label, "config": config.name, "stress": stress.name,
                                                  "seed": str(seed), "prompts": json.dumps(list(prompts))})
                        return result

                    result, computed = run_or_load(
                        out_dir / "results" / f"{stem}.json", key, compute, environment_info(device)
                    )
                    if progress:
                        print(f"robustness {stem}: {'computed' if computed else 'loaded'}", flush=True)
                    rows.append({**key, **result, **_model_meta(str(models[label]))})
    return pd.DataFrame(rows)
