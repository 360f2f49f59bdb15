"""Checkpoint selection on a mini-validation set: the moving average, the best step's weights,
resume, early stopping and the cached-fidelity check itself (tiny models: code paths only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fcr import contract
from fcr.backends.embedded.model import EmbeddedModel, PromptSet
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.config import ConfigError, to_options
from fcr.core.loss import FCRConfig
from fcr.train.loop import train
from fcr.train.checkpoint import read_step_log
from fcr.train.validation import CachedFidelityValidator, EarlyStopping
from tests.test_train import _cfg, _real_examples, _unet


class ScriptedCheck:
    """A validator double: returns the scripted values in order and keeps the weights it was shown."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.seen = list(values), []

    def __call__(self, unet: torch.nn.Module) -> float:
        self.seen.append({k: v.detach().clone() for k, v in unet.state_dict().items()})
        return self.values[len(self.seen) - 1]


def test_moving_average_picks_the_best_step_and_patience_stops() -> None:
    stopping = EarlyStopping(window=2, patience=2)
    improved = [stopping.update(step, v) for step, v in [(10, 1.0), (20, 3.0), (30, 2.0), (40, 0.0), (50, 5.0)]]
    # Moving averages 1, 2, 2.5, 1, 2.5: a new best at steps 10, 20 and 30 (2.5 > 2), not at 40 or 50.
    assert improved == [True, True, True, False, False]
    assert [r["moving_average"] for r in stopping.rows] == [1.0, 2.0, 2.5, 1.0, 2.5]
    assert stopping.state.best_step == 30 and stopping.should_stop()
    replayed = EarlyStopping(window=2, patience=2)
    replayed.replay([{"step": str(r["step"]), "value": str(r["value"])} for r in stopping.rows])
    assert replayed.rows == stopping.rows and replayed.state == stopping.state
    assert not EarlyStopping(window=1, patience=0).should_stop()  # patience 0 never stops
    nan_first = EarlyStopping(window=1)
    assert not nan_first.update(1, math.nan) and nan_first.update(2, 0.5)  # a failed check is never best


def test_best_step_weights_are_kept_and_a_resume_reproduces_the_selection(tmp_path: Path) -> None:
    examples, sched = _real_examples(), build_noise_scheduler()
    cfg = _cfg(max_train_steps=6, checkpoint_every=2, validate_every=2, validate_window=1)
    check = ScriptedCheck([1.0, 3.0, 2.0])  # steps 2, 4, 6: step 4 is best
    result = train(_unet(), sched, examples, cfg, FCRConfig(lambda_fcr=0.1), tmp_path / "full", progress=False,
                   validator=check)
    assert result.last_step == 6 and result.unet_dir is not None
    best = load_file(str(tmp_path / "full" / contract.BEST_UNET / "diffusion_pytorch_model.safetensors"))
    for key, value in check.seen[1].items():  # the weights the step-4 check saw
        torch.testing.assert_close(best[key], value, rtol=0, atol=0)
    record = json.loads((tmp_path / "full" / contract.EARLY_STOPPING).read_text())
    assert record["best_step"] == 4 and record["checks"] == 3 and record["last_step"] == 6
    assert not record["stopped_early"]

    # Killed after step 5 (last checkpoint: step 4); the resumed run redoes step 6's check only.
    train(_unet(), sched, examples, cfg, FCRConfig(lambda_fcr=0.1), tmp_path / "resumed", progress=False,
          validator=ScriptedCheck([1.0, 3.0, 2.0]), stop_after=5)
    again = ScriptedCheck([2.0])
    train(_unet(seed=9), sched, examples, cfg, FCRConfig(lambda_fcr=0.1), tmp_path / "resumed", progress=False,
          validator=again)
    assert len(again.seen) == 1
    full_log = read_step_log(tmp_path / "full" / contract.VALIDATION_LOG, 10**9)
    assert read_step_log(tmp_path / "resumed" / contract.VALIDATION_LOG, 10**9) == full_log
    resumed_best = load_file(str(tmp_path / "resumed" / contract.BEST_UNET / "diffusion_pytorch_model.safetensors"))
    for key in best:
        torch.testing.assert_close(resumed_best[key], best[key], rtol=0, atol=0)


def test_patience_ends_training_early_and_keeps_its_final_weights(tmp_path: Path) -> None:
    cfg = _cfg(max_train_steps=10, checkpoint_every=5, validate_every=1, validate_window=1, early_stopping_patience=2)
    result = train(_unet(), build_noise_scheduler(), _real_examples(), cfg, FCRConfig(), tmp_path, progress=False,
                   validator=ScriptedCheck([3.0, 1.0, 1.0, 9.0]))
    assert result.last_step == 3 and result.unet_dir is not None  # two checks without a new best after step 1
    record = json.loads((tmp_path / contract.EARLY_STOPPING).read_text())
    assert record["best_step"] == 1 and record["stopped_early"] and record["last_step"] == 3


def _prompts(n: int) -> PromptSet:
    gen = torch.Generator().manual_seed(0)
    return PromptSet(labels=np.arange(n) % 10, texts=[f"p{i}" for i in range(n)],
                     states=torch.randn(n, 4, 384, generator=gen), empty_state=torch.zeros(4, 384), seed=5)


def test_cached_fidelity_check_is_deterministic_and_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    unet = build_embedded_unet("base", 16).train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    sched = build_noise_scheduler()
    check = CachedFidelityValidator(lambda u: EmbeddedModel(u, sched), _prompts(3), seed=5, stride=3,
                                    num_inference_steps=6, guidance_scale=2.0, batch_size=2)
    first, second = check(unet), check(unet)
    assert first == second and math.isfinite(first) and first < 100.0  # cached != full for a random UNet
    assert unet.training
    for key, value in unet.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="stride"):
        CachedFidelityValidator(lambda u: EmbeddedModel(u, sched), _prompts(1), seed=5, stride=1,
                                num_inference_steps=6, guidance_scale=2.0, batch_size=1)


def test_validation_parameters_fail_at_validation() -> None:
    with pytest.raises(ConfigError, match="validate_stride"):
        to_options({"validate_every": 25, "validate_stride": 60, "validate_steps": 50})
    with pytest.raises(ConfigError, match="validate_every"):
        to_options({"validate_every": -1})
    assert to_options({"validate_stride": 60, "validate_steps": 50}).training.validate_every == 0  # off: not checked
