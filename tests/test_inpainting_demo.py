"""The embedded in-painting domain (fcr.backends.inpainting, fcr.experiments.inpainting) on real
Fashion-MNIST and the shipped `base` model, at code-path sizes (2 training steps, 4 images)."""

from __future__ import annotations

from pathlib import Path

import pytest
import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file
from equivalence import assert_float32_equivalent

from fcr.backends.inpainting import inpainting_unet, pixel_inpainting_condition, random_masks
from fcr.backends.models import load_embedded_unet
from fcr.experiments import inpainting

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def test_a_widened_unet_predicts_what_the_original_does() -> None:
    base = load_embedded_unet("base").eval()
    wide = inpainting_unet(base, condition_channels=2).eval()
    assert wide.config.in_channels == base.config.in_channels + 2
    gen = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 1, 32, 32, generator=gen), torch.randn(2, 16, 384, generator=gen)
    condition = pixel_inpainting_condition(x.clamp(-1, 1), random_masks([0, 1], 32, seed=0))
    # Zero weights add exact zeros, but a wider convolution may sum in another order: float32 rounding apart.
    assert_float32_equivalent(wide(torch.cat([x, condition], 1), 500, states).sample, base(x, 500, states).sample)


def test_pixel_condition_hides_the_masked_pixels() -> None:
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    masks = random_masks([3, 4], 32, seed=1)
    condition = pixel_inpainting_condition(images, masks)
    assert torch.equal(condition[:, :1], masks)
    assert bool((condition[:, 1:][masks.bool()] == 0).all()) and torch.equal(condition[:, 1:][~masks.bool()], images[~masks.bool()])
    with pytest.raises(ValueError, match="mask of shape"):
        pixel_inpainting_condition(images, masks[:, :, :16])


def _params(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "params" / "inpainting_demo.yaml").read_text())
    raw.update({"data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "out"), "train_steps": 2,
                "train_batch_size": 4, "n_eval": 4, "eval_batch_size": 2, "num_inference_steps": 4, "strides": [2],
                "deep_cache_intervals": [2], **changes})
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_parameter_file_is_checked_key_by_key(tmp_path: Path) -> None:
    assert inpainting.InpaintingDemo.from_yaml(REPO / "params" / "inpainting_demo.yaml").n_eval == 128
    with pytest.raises(ValueError, match=r"parameter 'learning_rate' must be float; got '1e-4'"):
        inpainting.InpaintingDemo.from_yaml(_params(tmp_path, learning_rate="1e-4"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stride'\]"):
        inpainting.InpaintingDemo.from_yaml(_params(tmp_path, stride=3))
    with pytest.raises(ValueError, match=r"parameter 'training_seeds' must be distinct"):
        inpainting.InpaintingDemo.from_yaml(_params(tmp_path, training_seeds=[1, 1]))
    with pytest.raises(ValueError, match=r"parameter 'training_seeds' must be distinct"):
        inpainting.InpaintingDemo.from_yaml(_params(tmp_path, training_seeds=[]))
    replication = inpainting.InpaintingDemo.from_yaml(REPO / "params" / "inpainting_replication.yaml")
    assert [name for name, _, _ in replication.runs()][:2] == ["control_lambda0_seed1", "fcr_lambda0.10_seed1"]


def test_contrasts_average_runs_per_image_and_pair_runs_by_seed(tmp_path: Path) -> None:
    from scipy import stats

    demo = inpainting.InpaintingDemo.from_yaml(_params(tmp_path, training_seeds=[0, 1, 2]))
    gen = np.random.default_rng(0)
    rows = []  # arbitrary per-image values: this checks the arithmetic, not a result
    for arm in demo.arms:
        for seed in demo.training_seeds:
            for config in demo.configs():
                rows.append(pd.DataFrame({"arm": arm, "training_seed": seed, "config": config, "index": np.arange(5),
                                          "psnr_vs_full": gen.normal(30, 2, 5), "masked_psnr": gen.normal(20, 2, 5)}))
    table = pd.concat(rows, ignore_index=True)
    frame = inpainting.contrasts(table, demo).set_index(["endpoint", "config"])
    per_seed = inpainting.run_contrasts(table, demo)
    row = frame.loc[("psnr_vs_full", "DeepCache-2-b0")]
    cell = table[(table["config"] == "DeepCache-2-b0")].pivot_table(index="index", columns=["arm", "training_seed"],
                                                                     values="psnr_vs_full")
    diff = cell["fcr_lambda0.10"].mean(axis=1) - cell["control_lambda0"].mean(axis=1)
    assert row["n"] == 5 and row["runs_per_arm"] == 3 and row["mean_diff_db"] == pytest.approx(diff.mean())
    assert row["p_t"] == pytest.approx(stats.ttest_1samp(diff, 0).pvalue)
    seeds = per_seed.query("endpoint == 'psnr_vs_full' and config == 'DeepCache-2-b0'")["mean_diff_db"].to_numpy()
    by_seed = (cell["fcr_lambda0.10"] - cell["control_lambda0"]).mean(axis=0).to_numpy()
    assert seeds == pytest.approx(by_seed)
    half = stats.t.ppf(0.975, 2) * by_seed.std(ddof=1) / np.sqrt(3)
    assert (row["run_ci_lo"], row["run_ci_hi"]) == pytest.approx((by_seed.mean() - half, by_seed.mean() + half))
    assert len(frame) == 2 + 3 and bool(frame["p_holm"].ge(frame["p_t"]).all())
    assert frame["tests_in_family"].to_dict() == {k: (2 if k[0] == "psnr_vs_full" else 3) for k in frame.index}
    undecided = frame.loc[frame["p_holm"] >= 0.05]
    assert all(r.startswith("not detectable at n = 5 (MDE") for r in undecided["reading"])
    assert set(frame.loc[frame["p_holm"] < 0.05, "reading"]) <= {"FCR better", "FCR worse"}


@pytest.mark.slow  # data preparation (MiniLM), two 2-step fine-tunes, 4 configurations x 2 arms
def test_demo_end_to_end_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = inpainting.InpaintingDemo.from_yaml(_params(tmp_path, training_seeds=[0, 1], eval_offset=2))
    frame = inpainting.run(demo, progress=False)
    out = tmp_path / "out"
    assert set(frame["config"]) == {"full", "FD-2", "DeepCache-2-b0"} and int(frame["primary"].sum()) == 2
    assert bool(frame["ci_lo"].le(frame["mean_diff_db"]).all()) and bool(frame["p_holm"].ge(frame["p_t"]).all())
    assert bool(frame["run_ci_lo"].le(frame["run_ci_hi"]).all())  # two seeds: a finite run-level interval
    for name in ("control_lambda0", "control_lambda0_seed1", "fcr_lambda0.10", "fcr_lambda0.10_seed1"):
        assert (out / name / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert len(list((out / name / "samples").glob("*.safetensors"))) == 3
    # Seeds change the training run: the two control runs' weights differ.
    weights = [load_file(str(out / n / "unet" / "diffusion_pytorch_model.safetensors")) for n in ("control_lambda0", "control_lambda0_seed1")]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    table = pd.read_csv(out / "per_image.csv")
    assert sorted(set(table["index"])) == [2, 3, 4, 5] and sorted(set(table["training_seed"])) == [0, 1]
    # Masks and noise are keyed by the test image: image 3 gets the same inputs whatever the offset.
    shifted = inpainting._eval_inputs(demo)
    plain = inpainting._eval_inputs(inpainting.InpaintingDemo.from_yaml(_params(tmp_path, eval_offset=0)))
    for key in ("images", "masks", "noise", "condition", "states"):
        assert torch.equal(shifted[key][1], plain[key][3]), key
    assert (out / "figures" / "inpainting_examples.png").is_file() and (out / "demo.json").is_file()
    before = (out / "per_image.csv").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished arm or configuration was run again")

    monkeypatch.setattr(inpainting, "train", refuse)
    monkeypatch.setattr(inpainting, "sample", refuse)
    inpainting.run(demo, progress=False)
    assert (out / "per_image.csv").read_text() == before
