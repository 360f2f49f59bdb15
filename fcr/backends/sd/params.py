"""What the Stable Diffusion setting's parameters point at: checks before any work (local data
paths, resolutions, stresses, local metric weights), the evaluation prompts, the FID reference,
and notebook 01's SD data preparation. Kept apart from :mod:`fcr.backends.sd.model` (models, training, sampling)
so the fine-tune's own parameters stay readable there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fcr.backends.sd.data import sample_subset, subset_indices
from fcr.backends.sd.model import SD_NATIVE_RESOLUTION, check_train_files, load_train_items, sd_run_base
from fcr.backends.sd.prompts import read_eval_prompts
from fcr.config import ConfigError
from fcr.options import Options

__all__ = ["SD_STRESSES", "check_sd_params", "native_resolution", "prepare_sd_data", "sd_eval_prompts", "sd_fid_reference"]

# Stresses of notebook 04 that exist for SD ('heldout_prompts' needs the embedded caption templates).
SD_STRESSES = ("none", "ood_prompts", "high_resolution", "perturbed_schedule", "adversarial_noise")


def native_resolution(model: str) -> int | None:
    """Image side the model's UNet was trained at: known short names, or ``unet.sample_size`` x the
    VAE factor read from a local folder's configs (a run folder: its base's); None when unknown
    without downloading (a hub id that is not a short name)."""
    if model in SD_NATIVE_RESOLUTION:
        return SD_NATIVE_RESOLUTION[model]
    folder = Path(model).expanduser()
    base = sd_run_base(folder) if folder.is_dir() else None
    if base is not None:
        return native_resolution(base["model"])
    unet_cfg, vae_cfg = folder / "unet" / "config.json", folder / "vae" / "config.json"
    if not (unet_cfg.is_file() and vae_cfg.is_file()):
        return None
    sample_size = json.loads(unet_cfg.read_text())["sample_size"]
    factor = 2 ** (len(json.loads(vae_cfg.read_text())["block_out_channels"]) - 1)
    return int(sample_size if isinstance(sample_size, int) else sample_size[0]) * factor


def _need_path(opts: Options, key: str, what: str) -> None:
    if not opts.value(key):
        raise ConfigError(f"parameter {key!r}: empty; the SD setting needs {what}")
    if not Path(opts.value(key)).expanduser().exists():
        raise ConfigError(f"parameter {key!r}: {opts.value(key)!r} does not exist ({what})")


def _check_reference(opts: Options) -> None:
    """``fid_reference`` of the sharded evaluation: a folder of images or existing clean-fid statistics."""
    reference = opts.evaluation.fid_reference
    if Path(reference).expanduser().is_dir():
        return
    from cleanfid import fid

    if not fid.test_stats_exists(reference.lower(), opts.evaluation.fid_mode):
        raise ConfigError(f"parameter 'fid_reference': {reference!r} is neither a folder of images nor clean-fid "
                          f"statistics of mode {opts.evaluation.fid_mode!r}")


def check_sd_params(opts: Options, task: str) -> None:
    """SD checks of :func:`fcr.config.check_task`: local data paths, resolutions (multiples of the
    VAE factor 8, not below the model's native size), stresses that apply to SD, local metric weights."""
    if task in ("data", "finetune", "distill"):
        _need_path(opts, "train_data", "local training data (image+caption folder, img2dataset output, ArtBench-10, .parquet or .tar)")
    if task in ("data", "sweep", "robustness", "evaluate"):
        _need_path(opts, "eval_prompts", "evaluation prompts (e.g. MS-COCO's annotations/captions_val2017.json)")
    if task == "evaluate" and opts.evaluation.fid_reference:  # optional: a bare prompt list has none
        _check_reference(opts)
    if task in ("sweep", "robustness", "evaluate"):
        if not opts.evaluation.fid_reference and task != "evaluate":
            raise ConfigError("parameter 'fid_reference': empty; give a clean-fid statistics name or a folder of reference images")
        if opts.evaluation.fid_inception_dir:
            if not (Path(opts.evaluation.fid_inception_dir) / "inception-2015-12-05.pt").is_file():
                raise ConfigError(f"parameter 'fid_inception_dir': no inception-2015-12-05.pt in {opts.evaluation.fid_inception_dir!r}")
            if opts.evaluation.fid_reference and not Path(opts.evaluation.fid_reference).is_dir():
                raise ConfigError(
                    "parameter 'fid_reference': with fid_inception_dir give a folder of reference images (clean-fid "
                    "builds cached statistics with its own Inception; or copy the file to /tmp, where clean-fid looks)"
                )
        for key in ("clip_model", "clip_pretrained"):
            value = opts.value(key)
            if value.endswith((".json", ".safetensors", ".bin", ".pt")) and not Path(value).expanduser().is_file():
                raise ConfigError(f"parameter {key!r}: local file {value!r} does not exist")
    if task == "mechanistic":
        _need_path(opts, "train_data", "held-out image+caption pairs: the train_data items outside the fine-tune's subset")
    sizes = [("resolution", opts.backbone.resolution)]
    if task == "robustness" and "high_resolution" in opts.robustness.stresses:
        sizes.append(("stress_resolution", opts.robustness.stress_resolution))
    models = {"sweep": opts.sweep.sweep_models, "evaluate": opts.sweep.sweep_models, "robustness": opts.robustness.robustness_models,
              "mechanistic": opts.mechanistic.variance_models, "frontier": opts.frontier.frontier_models}.get(task, [opts.backbone.model])
    for key, size in sizes:
        if size % 8:
            raise ConfigError(f"parameter {key!r}: SD image sides are multiples of 8 (the VAE factor), got {size}")
        for model in models:
            native = native_resolution(model)
            if native is not None and size < native:
                raise ConfigError(
                    f"parameter {key!r}: {size} is below {model!r}'s native resolution {native}; "
                    f"SD models degrade sharply below the size they were trained at"
                )
    if task == "robustness":
        bad = [name for name in opts.robustness.stresses if name not in SD_STRESSES]
        if bad:
            raise ConfigError(f"parameter 'stresses': {bad} do not apply to the SD setting; allowed {list(SD_STRESSES)}")


def sd_eval_prompts(opts: Options, n: int, seed: int) -> list[str]:
    """The ``n`` evaluation prompts of ``seed`` from ``eval_prompts`` (any source kind of
    :func:`fcr.backends.embedded.data.read_eval_prompts`); the same list for every model and configuration."""
    if not opts.data.eval_prompts:
        raise ConfigError("parameter 'eval_prompts': empty; give e.g. MS-COCO's annotations/captions_val2017.json")
    try:
        return read_eval_prompts(opts.data.eval_prompts, n, seed, kind=opts.data.eval_prompt_kind,
                                 captions_per_image=opts.data.captions_per_image or None)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"parameter 'eval_prompts': {err}") from err


def sd_fid_reference(opts: Options) -> dict[str, Any]:
    """Keyword arguments of :func:`fcr.eval.sd_metrics.sd_fid` from ``fid_reference`` (a folder of reference
    images, or the name of clean-fid statistics) and ``fid_inception_dir`` (local Inception file)."""
    ref = Path(opts.evaluation.fid_reference).expanduser()
    kw: dict[str, Any] = {"ref_dir": ref} if ref.is_dir() else {"ref_stats_name": opts.evaluation.fid_reference}
    if opts.evaluation.fid_inception_dir:
        kw["inception_dir"] = opts.evaluation.fid_inception_dir
    return kw


def prepare_sd_data(opts: Options) -> dict[str, Any]:
    """Notebook 01's SD branch: check the training subset and draw the evaluation prompt subset.

    Writes ``data_dir/sd_manifest.json`` and ``data_dir/eval_prompts.json`` (the seeded prompt
    subset shared by every configuration, so comparisons are paired).
    """
    out = Path(opts.data.data_dir)
    items = sample_subset(load_train_items(opts.data.train_data), opts.data.train_subset, opts.run.seed)
    check_train_files(items)
    prompts = sd_eval_prompts(opts, opts.evaluation.num_eval_images, opts.run.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_prompts.json").write_text(json.dumps(prompts))
    manifest = {"train_data": opts.data.train_data, "num_train_items": len(items), "seed": opts.run.seed,
                "eval_prompts": opts.data.eval_prompts, "num_eval_prompts": len(prompts), "resolution": opts.backbone.resolution}
    (out / "sd_manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def sd_heldout_items(opts: Options) -> list[tuple[Any, str]]:
    """The (image, caption) items of ``train_data`` that the fine-tune's seeded ``train_subset``
    (same ``seed``) left out: never trained on, they are SD's held-out images (the embedded
    setting's validation split) for the feature-variance measurement of notebook 05."""
    items = load_train_items(opts.data.train_data)
    if opts.data.train_subset >= len(items):
        raise ConfigError(
            f"parameter 'train_subset': {opts.data.train_subset} takes all {len(items)} items of train_data, leaving no "
            "held-out images for the feature variance; lower it or give a larger train_data"
        )
    rest = np.setdiff1d(np.arange(len(items)), subset_indices(len(items), opts.data.train_subset, opts.run.seed))
    return [items[int(i)] for i in rest]
