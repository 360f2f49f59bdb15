"""The embedded in-painting domain: FCR against the λ = 0 control on an in-painting UNet, real data.

An in-painting UNet is made from the shipped ``base`` model (:func:`fcr.backends.inpainting.inpainting_unet`:
``conv_in`` widened with zero weights for ``[mask, masked image]``) and fine-tuned on Fashion-MNIST's
training split with one random rectangular mask per image, once per arm (the λ = 0 control and FCR)
and training seed; both arms of a seed share the start, data order, noise and masks. Every run then
in-paints the same held-out test images, masks and noise with full DDIM sampling and with the cached
samplers. Endpoints, per image: ``psnr_vs_full``, the cached in-painting against the same model's full
one (the study's primary endpoint), and ``masked_psnr``, the repainted region against the real image.
Contrasts (FCR − control, per image the mean over each arm's training runs, paired; Holm over the cached
configurations) are pre-registered in the parameter file; with several training seeds each contrast
also gets a run-level interval over the seed-matched pairs, which carries the training runs' variance.

    python -m fcr.experiments.inpainting -f params/inpainting_demo.yaml

Resumable: each arm's weights and each (arm, configuration)'s samples are written when finished and
reused; the tables and figures are rebuilt from them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file, save_file

from fcr.backends.embedded.model import MANIFEST, load_split, prepare_embedded_data
from fcr.backends.generate import initial_noise, sampling_scheduler
from fcr.backends.inpainting import PixelInpaintingData, inpainting_unet, pixel_inpainting_condition, random_masks
from fcr.backends.models import build_noise_scheduler, load_embedded_unet, load_unet_folder
from fcr.core.loss import FCRConfig
from fcr.markers import make_portable
from fcr.core.sampler import key_steps, sample
from fcr.eval.fidelity import pixel_fidelity
from fcr.stats import decide_family, mean_ci_over_seeds, paired_difference, paired_mde
from fcr.train.loop import TrainConfig, train

__all__ = ["InpaintingDemo", "contrasts", "evaluate_arm", "per_image_table", "run", "run_name", "train_arm"]


@dataclass(frozen=True)
class InpaintingDemo:
    """The demo's parameters (``params/inpainting_demo.yaml``; every key required, none unknown)."""

    data_dir: str
    out_dir: str
    base_model: str
    arms: dict[str, float]  # run name -> lambda_fcr; the first is the control
    train_steps: int
    train_batch_size: int
    learning_rate: float
    delta_max: int
    fcr_sampling_steps: int
    n_eval: int
    eval_batch_size: int
    num_inference_steps: int
    guidance_scale: float
    strides: list[int]
    deep_cache_intervals: list[int]
    seed: int  # the evaluation noise's seed
    training_seeds: list[int]  # one training run per arm and seed (data order, noise); seed 0's run is named <arm>
    eval_offset: int  # the first held-out test image evaluated: images eval_offset .. eval_offset + n_eval - 1
    train_mask_seed: int
    eval_mask_seed: int
    planning_sd_diff_db: float  # SD of paired per-image differences assumed for the power calculation

    @classmethod
    def from_yaml(cls, path: str | Path) -> InpaintingDemo:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name: f for f in fields(cls)}
        unknown, missing = sorted(set(raw) - set(names)), sorted(set(names) - set(raw))
        if unknown or missing:
            raise ValueError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}")
        for name, value in raw.items():
            kind = {"int": int, "float": (int, float), "str": str, "dict[str, float]": dict, "list[int]": list}[names[name].type]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{path}: parameter {name!r} must be {names[name].type}; got {value!r}")
        demo = cls(**raw)
        if len(demo.arms) != 2 or any(v < 0 for v in demo.arms.values()):
            raise ValueError(f"{path}: parameter 'arms' must name a control and one FCR arm with lambda >= 0")
        seeds = demo.training_seeds
        if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
            raise ValueError(f"{path}: parameter 'training_seeds' must be distinct integers >= 0, at least one; got {seeds}")
        if demo.eval_offset < 0 or demo.n_eval < 2:
            raise ValueError(f"{path}: parameters 'eval_offset' >= 0 and 'n_eval' >= 2 required; got {demo.eval_offset}, {demo.n_eval}")
        return demo

    def runs(self) -> list[tuple[str, str, int]]:
        """Every training run as (run name, arm, training seed), seed-major: each seed's pair finishes together."""
        return [(run_name(arm, s), arm, s) for s in self.training_seeds for arm in self.arms]

    def configs(self) -> dict[str, dict[str, Any]]:
        """Sampling configurations: name -> sample() keywords (full sampling first)."""
        n = self.num_inference_steps
        out: dict[str, dict[str, Any]] = {"full": {}}
        out.update({f"FD-{s}": {"key_steps": key_steps(n, "uniform", s)} for s in self.strides})
        out.update({f"DeepCache-{i}-b0": {"key_steps": key_steps(n, "uniform", i), "deep_cache_branch": 0}
                    for i in self.deep_cache_intervals})
        return out


def run_name(arm: str, training_seed: int) -> str:
    """A training run's folder name: ``<arm>`` for seed 0, ``<arm>_seed<s>`` otherwise (the study's naming)."""
    return arm if training_seed == 0 else f"{arm}_seed{training_seed}"


def train_arm(demo: InpaintingDemo, arm: str, lambda_fcr: float, training_seed: int = 0, progress: bool = True) -> Path:
    """Fine-tune one run of an arm's in-painting UNet (skipped when its weights exist); returns its folder."""
    run_dir = Path(demo.out_dir) / run_name(arm, training_seed)
    if (run_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return run_dir
    data, _ = load_split(demo.data_dir, "train")
    unet = inpainting_unet(load_embedded_unet(demo.base_model), condition_channels=2).train()
    cfg = TrainConfig(seed=training_seed, learning_rate=demo.learning_rate, train_batch_size=demo.train_batch_size,
                      max_train_steps=demo.train_steps, lr_warmup_steps=10, lr_schedule="constant", ema_decay=0.0,
                      caption_dropout=0.1, checkpoint_every=max(1, demo.train_steps // 4), keep_checkpoints=1,
                      log_every=10, mixed_precision="no")
    fcr = FCRConfig(lambda_fcr=lambda_fcr, delta_max=demo.delta_max, delta_units="sampling",
                    sampling_steps=demo.fcr_sampling_steps)
    train(unet, build_noise_scheduler(), PixelInpaintingData(data, demo.train_mask_seed), cfg, fcr, run_dir,
          progress=progress, run_info={"base_model": demo.base_model, "domain": "inpainting"})
    return run_dir


def _eval_inputs(demo: InpaintingDemo) -> dict[str, torch.Tensor]:
    test, _ = load_split(demo.data_dir, "test")
    if demo.eval_offset + demo.n_eval > len(test.images):
        raise ValueError(f"eval_offset + n_eval = {demo.eval_offset + demo.n_eval} exceeds the {len(test.images)} test images")
    idx = torch.arange(demo.eval_offset, demo.eval_offset + demo.n_eval)
    images = test.images[idx]
    masks = random_masks(idx.tolist(), images.shape[-1], demo.eval_mask_seed)
    # Noise, like masks, is keyed by the test image's index: the same image gets the same z_T in every run.
    return {"images": images, "masks": masks, "states": test.prompt_states[test.prompt_ids[idx]], "index": idx,
            "empty": test.empty_state[None], "noise": initial_noise(idx.tolist(), tuple(images.shape[1:]), demo.seed),
            "condition": pixel_inpainting_condition(images, masks)}


@torch.no_grad()
def evaluate_arm(demo: InpaintingDemo, name: str, inputs: dict[str, torch.Tensor], progress: bool = True) -> dict[str, Path]:
    """In-paint the evaluation set with every configuration (each written when done, reused)."""
    folder = Path(demo.out_dir) / name / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    unet = None
    out = {}
    for config, kwargs in demo.configs().items():
        path = folder / f"{config}.safetensors"
        out[config] = path
        if path.is_file():
            continue
        unet = unet or load_unet_folder(Path(demo.out_dir) / name / "unet", name).eval()
        scheduler = sampling_scheduler("ddim", build_noise_scheduler())
        parts = []
        for start in range(0, demo.n_eval, demo.eval_batch_size):
            rows = slice(start, start + demo.eval_batch_size)
            parts.append(sample(unet, scheduler, inputs["noise"][rows], inputs["states"][rows],
                                uncond_hidden_states=inputs["empty"], guidance_scale=demo.guidance_scale,
                                num_inference_steps=demo.num_inference_steps, channel_condition=inputs["condition"][rows],
                                progress=progress, **kwargs).latents.clamp(-1, 1))
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"images": torch.cat(parts).contiguous()}, str(tmp), metadata={"config": config})
        tmp.replace(path)
    return out


def _masked_psnr(images: torch.Tensor, real: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """PSNR (dB, range 2) of the repainted pixels against the real ones."""
    err = ((images - real).double() ** 2 * masks).flatten(1).sum(1) / masks.flatten(1).sum(1)
    return (20 * torch.log10(2.0 / err.sqrt())).numpy()


def per_image_table(demo: InpaintingDemo, inputs: dict[str, torch.Tensor]) -> pd.DataFrame:
    rows = []
    for name, arm, training_seed in demo.runs():
        folder = Path(demo.out_dir) / name / "samples"
        full = load_file(str(folder / "full.safetensors"))["images"]
        for config in demo.configs():
            images = load_file(str(folder / f"{config}.safetensors"))["images"]
            fid = pixel_fidelity(images, full)
            rows.append(pd.DataFrame({"arm": arm, "training_seed": training_seed, "lambda_fcr": demo.arms[arm],
                                      "config": config, "index": inputs["index"].numpy(), "psnr_vs_full": fid["psnr"].numpy(),
                                      "ssim_vs_full": fid["ssim"].numpy(),
                                      "masked_psnr": _masked_psnr(images, inputs["images"], inputs["masks"])}))
    return pd.concat(rows, ignore_index=True)


def _per_run(table: pd.DataFrame, endpoint: str, config: str) -> pd.DataFrame:
    """One configuration's endpoint: a row per test image, a column per (arm, training seed)."""
    return table[table["config"] == config].pivot_table(index="index", columns=["arm", "training_seed"], values=endpoint)


def _pairs(table: pd.DataFrame, demo: InpaintingDemo):
    """Per endpoint and configuration: the per-image table of (arm, training seed) columns."""
    for endpoint in ("psnr_vs_full", "masked_psnr"):
        for config in [c for c in demo.configs() if endpoint == "masked_psnr" or c != "full"]:
            yield endpoint, config, _per_run(table, endpoint, config)


def contrasts(table: pd.DataFrame, demo: InpaintingDemo) -> pd.DataFrame:
    """FCR − control per cached configuration and endpoint; Holm within each endpoint.

    The paired test runs over test images, each image's value the mean over its arm's training runs (as the
    study's primary contrast), so it is conditional on those runs. With several seeds, ``run_ci_lo/hi`` is the
    t interval over the seed-matched run pairs' mean differences (:func:`run_contrasts`): it carries the
    training runs' variance. ``mde_db`` is at Holm's strictest level, alpha / tests of the endpoint.
    """
    control, fcr = list(demo.arms)
    per_seed = run_contrasts(table, demo).groupby(["endpoint", "config"], sort=False)["mean_diff_db"]
    families = []
    for endpoint, configs in itertools.groupby(_pairs(table, demo), key=lambda item: item[0]):
        rows = []
        for _, config, per_run in configs:
            a, b = per_run[fcr].mean(axis=1).to_numpy(), per_run[control].mean(axis=1).to_numpy()
            _, run_lo, run_hi = mean_ci_over_seeds(per_seed.get_group((endpoint, config)).to_numpy())
            rows.append({"endpoint": endpoint, "config": config, "runs_per_arm": len(demo.training_seeds),
                         **paired_difference(a, b), "run_ci_lo": run_lo, "run_ci_hi": run_hi,
                         "primary": endpoint == "psnr_vs_full"})
        families.append(decide_family(pd.DataFrame(rows)))
    frame = pd.concat(families, ignore_index=True).rename(columns={
        "estimate": "mean_diff_db", "p": "p_t", "sd_diff": "sd_diff_db", "mde": "mde_db", "m": "tests_in_family"})
    frame["reading"] = frame.pop("verdict").map(lambda v: f"FCR {v}" if v in ("better", "worse") else v)
    return frame


def run_contrasts(table: pd.DataFrame, demo: InpaintingDemo) -> pd.DataFrame:
    """FCR − control per training seed (the two runs that share start, data order and noise), mean over images."""
    control, fcr = list(demo.arms)
    rows = []
    for endpoint, config, per_run in _pairs(table, demo):
        diff = (per_run[fcr] - per_run[control]).mean(axis=0)
        rows += [{"endpoint": endpoint, "config": config, "training_seed": int(s), "mean_diff_db": float(d)}
                 for s, d in diff.items()]
    return pd.DataFrame(rows)


def _figures(demo: InpaintingDemo, table: pd.DataFrame, inputs: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    figures = Path(demo.out_dir) / "figures"
    figures.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    # One point per test image: the mean over its arm's training runs (the contrasts' unit).
    table = table.groupby(["arm", "config", "index"], as_index=False, sort=False)[["psnr_vs_full", "masked_psnr"]].mean()
    cached = table[table["config"] != "full"]
    sns.pointplot(cached, x="config", y="psnr_vs_full", hue="arm", errorbar=("ci", 95), dodge=0.3, ax=axes[0])
    axes[0].set(title="cached vs the same model's full in-painting", ylabel="PSNR (dB)")
    sns.pointplot(table, x="config", y="masked_psnr", hue="arm", errorbar=("ci", 95), dodge=0.3, ax=axes[1])
    axes[1].set(title="repainted region vs the real image", ylabel="PSNR (dB)")
    fig.tight_layout()
    fig.savefig(figures / "inpainting_psnr.png", dpi=120)
    plt.close(fig)
    shown = min(6, demo.n_eval)
    columns = [("real", inputs["images"]), ("masked input", inputs["condition"][:, 1:])]
    for arm in demo.arms:  # the first training run of each arm
        name = run_name(arm, demo.training_seeds[0])
        for config in ("full", f"FD-{max(demo.strides)}"):
            columns.append((f"{name}\n{config}", load_file(str(Path(demo.out_dir) / name / "samples" / f"{config}.safetensors"))["images"]))
    fig, axes = plt.subplots(shown, len(columns), figsize=(1.4 * len(columns), 1.4 * shown), squeeze=False)
    for j, (title, images) in enumerate(columns):
        axes[0, j].set_title(title, fontsize=7)
        for i in range(shown):
            axes[i, j].imshow(images[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(figures / "inpainting_examples.png", dpi=120)
    plt.close(fig)


def run(demo: InpaintingDemo, progress: bool = True) -> pd.DataFrame:
    """Train every run, in-paint, write per_image.csv, contrasts.csv, run_contrasts.csv, figures and demo.json."""
    start = time.perf_counter()
    if not (Path(demo.data_dir) / MANIFEST).is_file():
        prepare_embedded_data(demo.data_dir)
    inputs = _eval_inputs(demo)
    for name, arm, training_seed in demo.runs():  # each run trained, then evaluated: finished runs are whole
        train_arm(demo, arm, demo.arms[arm], training_seed, progress)
        evaluate_arm(demo, name, inputs, progress)
        make_portable(Path(demo.out_dir) / name)  # a finished run is committed as it is: no machine paths
    out = Path(demo.out_dir)
    table = per_image_table(demo, inputs)
    table.to_csv(out / "per_image.csv", index=False)
    frame = contrasts(table, demo)
    frame.to_csv(out / "contrasts.csv", index=False)
    run_contrasts(table, demo).to_csv(out / "run_contrasts.csv", index=False)
    _figures(demo, table, inputs)
    make_portable(out)  # the weights' configs name the base model's folder: relative to the checkout
    planned = paired_mde(demo.planning_sd_diff_db, demo.n_eval)
    (out / "demo.json").write_text(json.dumps({"parameters": asdict(demo), "planned_mde_db": planned,
                                               "tests": int(frame["primary"].sum()), "seconds_this_invocation": time.perf_counter() - start},
                                              indent=2))
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.experiments.inpainting", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--params", required=True, help="the demo's parameter file")
    args = parser.parse_args(argv)
    try:
        demo = InpaintingDemo.from_yaml(args.params)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(run(demo).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
