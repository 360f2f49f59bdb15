"""The embedded in-painting domain (fcr.backends.inpainting, fcr.experiments.inpainting) on real
Fashion-MNIST and the shipped `base` model, at code-path sizes (2 training steps, 4 images)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
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


@pytest.mark.slow  # data preparation (MiniLM), two 2-step fine-tunes, 4 configurations x 2 arms
def test_demo_end_to_end_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = inpainting.InpaintingDemo.from_yaml(_params(tmp_path))
    frame = inpainting.run(demo, progress=False)
    out = tmp_path / "out"
    assert set(frame["config"]) == {"full", "FD-2", "DeepCache-2-b0"} and int(frame["primary"].sum()) == 2
    assert bool(frame["ci_lo"].le(frame["mean_diff_db"]).all()) and bool(frame["p_holm"].ge(frame["p_t"]).all())
    for name in demo.arms:
        assert (out / name / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert len(list((out / name / "samples").glob("*.safetensors"))) == 3
    assert (out / "figures" / "inpainting_examples.png").is_file() and (out / "demo.json").is_file()
    before = (out / "per_image.csv").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished arm or configuration was run again")

    monkeypatch.setattr(inpainting, "train", refuse)
    monkeypatch.setattr(inpainting, "sample", refuse)
    inpainting.run(demo, progress=False)
    assert (out / "per_image.csv").read_text() == before
