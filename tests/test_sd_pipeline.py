"""The Stable Diffusion setting end to end through the pipeline runner, on a tiny SD pipeline built
in code (random weights: code paths only, never results): notebook 01 (data) -> 02 (FCR fine-tune
on real Fashion-MNIST images with captions) -> 03 (stride sweep of the base model and of the
fine-tuned run folder) -> 04 (robustness) -> 05 (feature variance on held-out images, its regression)
-> the report. CLIP and Inception are tiny local stand-ins passed through
the documented parameters (clip_model / clip_pretrained, fid_inception_dir), exactly as a user
without internet points them at local weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sd_standins import local_metric_weights
from test_sd import RES, tiny_components

from fcr.backends.embedded.data import TRAIN_TEMPLATES, caption, write_caption_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.sd_e2e
def test_sd_setting_end_to_end_through_the_pipeline(tmp_path: Path) -> None:
    model = tiny_components().save_pretrained(tmp_path / "tiny_sd")
    # 12 images: the fine-tune takes 8 (train_subset), notebook 05 measures on the 4 it left out.
    images = write_caption_folder(tmp_path / "train_images", 12, RES)
    reference = write_caption_folder(tmp_path / "fid_reference", 8, RES)  # same images, no captions needed
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{caption(label, TRAIN_TEMPLATES[0])}\n" for label in range(10)))
    overlay = {
        "model": str(model), "train_data": str(images), "eval_prompts": str(prompts), "fid_reference": str(reference),
        **local_metric_weights(tmp_path / "metric_weights"),
        "device": "cpu", "resolution": RES, "mixed_precision": "no", "prediction_type": "epsilon",
        "train_subset": 8, "train_batch_size": 2, "gradient_accumulation_steps": 1, "max_train_steps": 2,
        "checkpoint_every": 2, "log_every": 1, "fcr_sampling_steps": 10, "delta_max": 2,
        "num_inference_steps": 10, "strides": [1, 5, 10], "include_50ls": False, "dpm_reference_steps": 0,
        "num_eval_images": 4, "eval_batch_size": 4, "seeds": [0], "profile_batches": [1], "profile_repeats": 1,
        "n_bootstrap": 10, "robustness_strides": [1, 2], "num_robustness_images": 4,
        "stresses": ["none", "ood_prompts", "high_resolution", "perturbed_schedule"], "stress_resolution": 2 * RES,
        "num_variance_images": 4, "variance_delta_max": 2, "variance_max_stride": 9,
    }
    overlay_file = tmp_path / "tiny_sd.yaml"
    overlay_file.write_text(yaml.safe_dump(overlay))
    manifest = tmp_path / "experiments.yaml"
    manifest.write_text(yaml.safe_dump({"experiments": [{
        "experiment_id": "exp-1-main-ablation",
        "settings": {"sd": {
            "params": [str(REPO / "params" / "sd15.yaml"), str(overlay_file)],
            "finetunes": {"fcr": [str(REPO / "params" / "variations" / "fcr_lambda0.10_fd10.yaml"), str(overlay_file)]},
            "notebooks": [{"notebook": "03_stride_sweep", "models": [str(model), "fcr"]},
                          {"notebook": "04_robustness", "models": [str(model), "fcr"]},
                          {"notebook": "05_mechanistic_regression", "models": [str(model), "fcr"]}],
            "backbones": [{"original": str(model), "role": "SD1.5 role (tiny)", "fcr_models": {0.1: "fcr"}}],
        }},
    }]}))
    root = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fcr.pipeline", "run", "--setting", "sd", "--root", str(root), "--manifest", str(manifest),
         "-f", str(overlay_file)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    exp = root / "exp-1-main-ablation"
    run = exp / "fcr"
    assert (run / "params.yaml").is_file() and any((run / "unet").glob("*.safetensors"))
    quality = pd.read_csv(exp / "sweep" / "main" / "quality.csv")
    assert set(quality["model"]) == {"tiny_sd", "fcr"}
    assert {"full", "FD-5", "FD-10"} <= set(quality["config"])
    assert quality["fid"].notna().all() and (quality["clip_score"] >= 0).all()
    # The fine-tuned run folder was sampled as its own model: its images differ from the base's.
    by = quality.set_index(["model", "config"])
    assert by.loc[("fcr", "full"), "fid"] != by.loc[("tiny_sd", "full"), "fid"]
    robustness = pd.read_csv(exp / "robustness" / "main" / "robustness.csv")
    assert {"none", "ood_prompts", "high_resolution", "perturbed_schedule"} <= set(robustness["stress"])
    assert set(robustness["model"]) == {"tiny_sd", "fcr"}

    # Notebook 05 measured both models on the same held-out latents and paired the fine-tune with
    # its base; the regression joined the sweep's FID drops (strides 5 and 10) with the variance.
    mech = exp / "mechanistic" / "main"
    variance = pd.read_csv(mech / "variance.csv")
    assert set(variance["model"]) == {"tiny_sd", "fcr"}
    reduction = pd.read_csv(mech / "variance_reduction.csv")
    assert set(reduction["model"]) == {"fcr"} and set(reduction["original_model"]) == {"tiny_sd"}
    points = pd.read_csv(mech / "regression_points.csv")
    assert set(points["stride"]) >= {5, 10} and points["fd_increase_pct"].notna().all()
    keys = [json.loads(p.read_text())["config"] for p in (mech / "variance").glob("*.json")]
    assert len({k["inputs"] for k in keys}) == 1  # the same held-out inputs for both models

    # The report reads the SD backbone from the manifest and its FID / CLIPScore results (code paths
    # only: random tiny weights): one row per criterion for the backbone, the exp-1 table with the run
    # folder's FID, criterion c from the SD robustness run.
    verdict = pd.read_csv(root / "report" / "verdict.csv")
    scopes = verdict.groupby("criterion")["scope"].apply(list)
    for criterion in ("a. quality preservation (stride 10)", "b. speed-up vs FD-5", "c. robustness"):
        assert any(str(s).startswith("tiny_sd (SD1.5 role (tiny))") for s in scopes[criterion]), criterion
    mechanistic = verdict[verdict["criterion"].str.startswith("e. mechanistic")]
    assert (mechanistic["measured"] != "n/a").any(), mechanistic.to_dict("records")
    table = pd.read_csv(root / "report" / "exp1_table.csv").set_index("variation")
    assert table.loc["FCR λ=0.1, FD-10", "fd"] == pytest.approx(by.loc[("fcr", "FD-10"), "fid"])
    assert table.loc["FD-5-baseline", "fd"] == pytest.approx(by.loc[("tiny_sd", "FD-5"), "fid"])
