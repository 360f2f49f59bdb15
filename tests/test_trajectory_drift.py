"""Encoder-feature drift along sampled trajectories (issue #12, item 5), on a scratch UNet:
code paths only, no result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from equivalence import assert_float32_equivalent

from fcr.core.loss import feature_distance
from fcr.core.sampler import sample
from fcr.core.unet import feature_group_indices
from fcr.experiments.trajectory_drift import DriftRecorder, drift_key, trajectory_drift
from fcr.backends.embedded.model import EmbeddedModel, PromptSet
from fcr.backends.generate import generate, initial_noise, sampling_scheduler
from fcr.backends.models import build_embedded_unet, build_noise_scheduler

STEPS = 8


@pytest.fixture(scope="module")
def tiny() -> dict:
    torch.manual_seed(0)
    unet = build_embedded_unet("base", sample_size=16).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = PromptSet(labels=np.arange(3) % 10, texts=[f"p{i}" for i in range(3)],
                        states=torch.randn(3, 16, 384, generator=gen), empty_state=torch.randn(16, 384, generator=gen),
                        seed=3)
    return {"model": EmbeddedModel(unet, build_noise_scheduler()), "prompts": prompts}


def _brute_force_drift(model: EmbeddedModel, prompts: PromptSet, i: int, stride: int, group: str, normalize: bool,
                       guidance_scale: float) -> float:
    """Image i alone: every step's encoder features kept, the drift formula written out."""
    feats = []
    noise = initial_noise(range(i, i + 1), model.latent_shape(None), prompts.seed)
    cond, uncond = model.condition(prompts, i, i + 1, guidance_scale > 1)
    sample(model.unet, sampling_scheduler("ddim", model.noise_scheduler), noise, cond, uncond_hidden_states=uncond,
           guidance_scale=guidance_scale, num_inference_steps=STEPS, key_steps=list(range(STEPS)), parallel=False,
           on_encoder=lambda step, f: feats.append(f))
    ix = feature_group_indices(model.unet, group)
    values = []
    for j in range(STEPS):
        if j % stride:
            k = stride * (j // stride)
            rows = [feature_distance(feats[k].map(lambda x, r=r: x[r : r + 1]), feats[j].map(lambda x, r=r: x[r : r + 1]),
                                     ix, normalize) for r in range(feats[j].batch_size)]
            values.append(float(torch.stack(rows).mean()))
    return float(np.mean(values))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_drift_matches_its_definition_and_images_are_full_sampling(tiny: dict, guidance_scale: float) -> None:
    model, prompts = tiny["model"], tiny["prompts"]
    out = trajectory_drift(model, prompts, seed=prompts.seed, strides=[2, 3], groups=["all", "mid"],
                           num_inference_steps=STEPS, guidance_scale=guidance_scale, batch_size=2)
    assert set(out.drift) == {drift_key(s, g, v) for s in (2, 3) for g in ("all", "mid") for v in ("abs", "norm")}
    for s, g, v in ((2, "all", "abs"), (3, "mid", "norm")):
        for i in (0, 2):  # one image of each batch
            expected = _brute_force_drift(model, prompts, i, s, g, v == "norm", guidance_scale)
            assert out.drift[drift_key(s, g, v)][i] == pytest.approx(expected, rel=1e-5)
    assert (out.drift[drift_key(2, "all", "abs")] > 0).all()
    # Every step a key step is full sampling: the same images as the plain UNet, to float32 rounding.
    plain = generate(model, prompts, seed=prompts.seed, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                     batch_size=3)
    assert_float32_equivalent(out.images, plain.images)


def test_drift_strides_are_checked(tiny: dict) -> None:
    with pytest.raises(ValueError, match="must be >= 2"):
        DriftRecorder(2, [1], {"all": [0]}, guidance=False)
    with pytest.raises(ValueError, match="< num_inference_steps"):
        trajectory_drift(tiny["model"], tiny["prompts"], seed=0, strides=[STEPS], num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    """Two scratch run folders, sweep cells of their prompts (seeded stand-in images: the pairing
    and the statistics' code paths are tested, no result) with per-image fidelity files, and the
    trajectory drift of the same prompts and noise."""
    import json

    from safetensors.torch import save_file

    from fcr.config import to_options
    from fcr.eval.context import eval_prompts
    from fcr.eval.results import save_safetensors_atomic
    from fcr.experiments.drift_regression import run_trajectory_drift
    from fcr.experiments.paired_fidelity import fidelity_table
    from fcr.experiments.sweep import model_labels, quality_stem
    from fcr.backends.embedded.model import all_prompts

    root = tmp_path_factory.mktemp("drift")
    for i, name in enumerate(("run_a", "run_b")):
        torch.manual_seed(i)
        build_embedded_unet("base", sample_size=16).save_pretrained(root / name / "unet", safe_serialization=True)
    data_dir = root / "data"
    data_dir.mkdir()
    texts = all_prompts()
    meta = {"prompts": json.dumps(texts), "max_length": "16", "hidden_size": "384", "encoder": "random"}
    save_file({"states": torch.randn(len(texts), 16, 384, generator=torch.Generator().manual_seed(0))},
              str(data_dir / "text_states.safetensors"), metadata=meta)
    params = to_options({
        "setting": "embedded", "device": "cpu", "data_dir": str(data_dir), "output_dir": str(root / "out"),
        "sweep_models": [str(root / "run_a"), str(root / "run_b")], "strides": [1, 2, 3], "num_inference_steps": 6,
        "num_eval_images": 8, "eval_batch_size": 4, "seeds": [0], "guidance_scale": 2.0,
    })
    models = model_labels(params.value("sweep_models"))
    out = root / "out" / "sweep"
    prompt_meta = json.dumps(eval_prompts(params, 8, 0).texts)
    gen = torch.Generator().manual_seed(2)
    rows = []
    for model in models:
        full = torch.rand(8, 1, 16, 16, generator=gen)
        for config, level in (("full", 0.0), ("FD-2", 0.05), ("FD-3", 0.1)):
            images = ((full + level * torch.randn(full.shape, generator=gen)).clamp(0, 1) * 255).round().to(torch.uint8)
            save_safetensors_atomic({"images": images}, out / "quality" / f"{quality_stem(model, config, 0)}.safetensors",
                                    {"prompts": prompt_meta})
            rows.append({"model": model, "config": config, "seed": 0})
    import pandas as pd

    fidelity_table(out, pd.DataFrame(rows), {}, n_boot=10)
    files = run_trajectory_drift(params, models, out, seeds=[0], n_images=6, strides=[2, 3], progress=False)
    return {"params": params, "models": models, "out": out, "files": files}


def test_drift_runner_uses_the_sweeps_prompts_and_noise_and_resumes(swept: dict) -> None:
    from fcr.eval.context import eval_prompts, load_models
    from fcr.experiments.drift_regression import drift_file, run_trajectory_drift
    from safetensors.torch import load_file

    params, out = swept["params"], swept["out"]
    assert [p.name for p in swept["files"]] == ["run_a__seed0.safetensors", "run_b__seed0.safetensors"]
    # The stored drift is that of the sweep's first 6 prompts from their z_T (seeded by (seed, i)).
    loaded = load_models(params, {"run_a": swept["models"]["run_a"]}, torch.device("cpu"))["run_a"]
    prompts = eval_prompts(params, params.value("num_eval_images"), 0).head(6)
    again = trajectory_drift(loaded.model, prompts, seed=0, strides=[2, 3], num_inference_steps=6, guidance_scale=2.0,
                             batch_size=3)
    stored = load_file(str(drift_file(out, "run_a", 0)))
    for key, values in again.drift.items():  # batch 3 vs the runner's 4: float32 rounding only
        assert np.allclose(stored[key].numpy(), values, rtol=1e-5, atol=0)
    mtime = drift_file(out, "run_a", 0).stat().st_mtime_ns
    run_trajectory_drift(params, swept["models"], out, seeds=[0], n_images=6, strides=[2, 3], progress=False)
    assert drift_file(out, "run_a", 0).stat().st_mtime_ns == mtime  # same request: kept, not recomputed
    with pytest.raises(ValueError, match="exceeds"):
        run_trajectory_drift(params, swept["models"], out, seeds=[0], n_images=9, strides=[2], progress=False)


def test_drift_regression_fits_on_the_joined_points(swept: dict, tmp_path) -> None:
    import shutil

    from fcr.experiments.drift_regression import drift_file, drift_points, drift_regression

    points = drift_points(swept["out"], swept["out"], ["run_a", "run_b"], [0], [2, 3])
    assert len(points) == 2 * 2 * 6 and set(points["pair"]) == {f"0:{i}" for i in range(6)}
    assert points["drift"].gt(0).all() and points["psnr"].notna().all()
    fit = drift_regression(points)
    assert fit["n_points"] == 24 and fit["n_pairs"] == 6 and fit["n_models"] == 2 and fit["strides"] == [2, 3]
    assert 0 <= fit["as_written"]["r2"] <= 1
    partial = fit["partial"]
    assert partial["r2_with_drift"] >= partial["r2_stride_model"] - 1e-12 and 0 <= partial["partial_r2_drift"] <= 1
    mixed = fit["mixed"]
    assert mixed["lo"] <= mixed["slope"] <= mixed["hi"] and 0 <= mixed["p"] <= 1
    # Drift of other prompts than the sweep's: refused, the points would not be paired.
    other = tmp_path / "other"
    shutil.copytree(swept["out"], other)
    shutil.copy(drift_file(other, "run_b", 0), drift_file(other, "run_a", 0))
    from safetensors.torch import load_file, save_file

    bad = load_file(str(drift_file(other, "run_a", 0)))
    save_file(bad, str(drift_file(other, "run_a", 0)), metadata={"prompts": '["another prompt"]'})
    with pytest.raises(ValueError, match="not the first 1"):
        drift_points(other, other, ["run_a"], [0], [2])


def test_notebook_section_writes_points_and_the_report_reads_them(swept: dict) -> None:
    from fcr import contract
    from fcr.config import ConfigError
    from fcr.experiments.drift_regression import run_drift_regression
    from fcr.report.mechanism import trajectory_section
    from fcr.backends.checks import check_task

    out = swept["out"]
    params = swept["params"].with_flat(trajectory_seeds=[0], trajectory_images=6, trajectory_strides=[2, 3],
                                       quality_tables=[str(out / contract.QUALITY)])
    check_task(params, "mechanistic")
    for bad, key in (({"trajectory_strides": [6]}, "trajectory_strides"), ({"trajectory_images": 9}, "trajectory_images"),
                     ({"quality_tables": []}, "trajectory_seeds")):
        with pytest.raises(ConfigError, match=key):
            check_task(params.with_flat(**bad), "mechanistic")
    assert run_drift_regression(params.with_flat(trajectory_seeds=[]), swept["models"], out) is None
    points, fit = run_drift_regression(params, swept["models"], out, progress=False)  # drift files reused
    assert (out / contract.TRAJECTORY_POINTS).is_file() and len(points) == fit["n_points"] == 24
    text = "\n".join(trajectory_section(out, "Mechanism"))
    assert f"{fit['n_points']} points" in text and "partial R² of drift" in text and "mixed model" in text
    assert trajectory_section(out / "nowhere", "Mechanism") == []
    from fcr.analysis.mechanism import criterion_e

    rows = {r["criterion"]: r for r in criterion_e([out], []) if "trajectory" in r["criterion"]}
    assert rows["e. mechanistic: trajectory drift, as written"]["value"] == pytest.approx(fit["as_written"]["r2"])
    assert rows["e. mechanistic: trajectory drift, mixed model"]["kind"] == "context"
