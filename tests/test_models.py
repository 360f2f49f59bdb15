"""Embedded model resolution and loading: clear errors for untrained or mismatched models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fcr.config import ConfigError
from fcr.backends.models import (
    ModelNotFoundError,
    build_embedded_unet,
    check_prediction_type,
    load_embedded_unet,
    resolve_unet_dir,
)


def test_untrained_embedded_model_names_the_producer(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'base-v' has not been trained.*pretrain_base_v.yaml"):
        resolve_unet_dir("base-v", models_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither an embedded model"):
        resolve_unet_dir(str(tmp_path / "nowhere"))


def test_run_folder_prefers_ema_and_checks_prediction_type(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run = tmp_path / "run"
    build_embedded_unet("base").save_pretrained(run / "unet")
    ema = build_embedded_unet("base")
    ema.save_pretrained(run / "unet_ema")
    (run / "params.yaml").write_text(yaml.safe_dump({"prediction_type": "epsilon"}))
    assert resolve_unet_dir(str(run)) == (run / "unet_ema").resolve()
    loaded = load_embedded_unet(str(run))
    assert torch.equal(loaded.conv_in.weight, ema.conv_in.weight)
    check_prediction_type(str(run), "epsilon")
    with pytest.raises(ConfigError, match="trained with 'epsilon'"):
        check_prediction_type(str(run), "v_prediction")


def test_corrupt_weights_raise_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    build_embedded_unet("base").save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelNotFoundError, match="could not load"):
        load_embedded_unet(str(folder))
