"""The training loop: learning, the FCR term, determinism, resume, divergence, checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcr.core.loss import FCRConfig, fcr_training_loss
from fcr.backends.embedded import data
from fcr.backends.embedded.model import EmbeddedTrainData
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.train.checkpoint import CheckpointError, latest_checkpoint, load_module_weights, save_module_weights
from fcr.train.loop import TrainConfig, TrainingDivergedError, batch_indices, lr_factor, train


def _real_examples(n: int = 32) -> EmbeddedTrainData:
    """Real Fashion-MNIST images; conditioning states are random here (code-path test only)."""
    try:
        images, labels = data.load_fashion_mnist("test", download=False)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    gen = torch.Generator().manual_seed(0)
    return EmbeddedTrainData(
        images=data.to_model_range(images[:n]),
        prompt_ids=torch.as_tensor(labels[:n]),
        prompt_states=torch.randn(10, 4, 384, generator=gen),
        empty_state=torch.zeros(4, 384),
    )


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_embedded_unet("base")


def _cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=2e-3, train_batch_size=16, max_train_steps=4, checkpoint_every=2, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def _log(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path: Path) -> None:
    examples = _real_examples(16)
    sched = build_noise_scheduler()
    unet = _unet()
    x0, states = examples.images, examples.prompt_states[examples.prompt_ids]

    def fixed_loss() -> float:
        with torch.no_grad():
            parts = fcr_training_loss(unet, sched, x0, states, FCRConfig(), torch.Generator().manual_seed(123))
        return parts.denoise.item()

    before = fixed_loss()
    train(unet, sched, examples, _cfg(max_train_steps=15, checkpoint_every=100, caption_dropout=0.0), FCRConfig(), tmp_path, progress=False)
    after = fixed_loss()
    assert after < 0.7 * before


def test_fcr_term_is_zero_at_lambda_zero_and_positive_otherwise(tmp_path: Path) -> None:
    examples = _real_examples()
    sched = build_noise_scheduler()
    r0 = train(_unet(), sched, examples, _cfg(max_train_steps=2), FCRConfig(lambda_fcr=0.0), tmp_path / "a", progress=False)
    r1 = train(_unet(), sched, examples, _cfg(max_train_steps=2), FCRConfig(lambda_fcr=0.1), tmp_path / "b", progress=False)
    log0, log1 = _log(r0.log_path), _log(r1.log_path)
    assert all(row["fcr"] == 0.0 and row["total"] == row["denoise"] for row in log0)
    assert all(row["fcr"] > 0.0 for row in log1)
    assert log1[0]["total"] == pytest.approx(log1[0]["denoise"] + 0.1 * log1[0]["fcr"], rel=1e-5)
    # Same data, same draws: the first step's denoising loss is the same with and without FCR.
    assert log0[0]["denoise"] == pytest.approx(log1[0]["denoise"], rel=1e-6)


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    examples = _real_examples()
    sched = build_noise_scheduler()
    cfg = _cfg(max_train_steps=4, checkpoint_every=2, ema_decay=0.9)
    fcr = FCRConfig(lambda_fcr=0.1)
    full = train(_unet(), sched, examples, cfg, fcr, tmp_path / "full", progress=False)

    # Interrupted after step 3: the last checkpoint is step 2, step 3's work is lost and redone.
    part = train(_unet(), sched, examples, cfg, fcr, tmp_path / "resumed", progress=False, stop_after=3)
    assert part.last_step == 3 and part.unet_dir is None
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_0000002"
    resumed = train(_unet(seed=99), sched, examples, cfg, fcr, tmp_path / "resumed", progress=False)
    assert resumed.resumed_from == 2 and resumed.last_step == 4

    for sub in ("unet", "unet_ema"):
        a = load_file(str(tmp_path / "full" / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # The log has one row per step, none duplicated by the resume.
    assert [int(r["step"]) for r in _log(resumed.log_path)] == [1, 2, 3, 4]
    assert [r["total"] for r in _log(resumed.log_path)] == [r["total"] for r in _log(full.log_path)]


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    examples = _real_examples()
    sched = build_noise_scheduler()
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(_unet(), sched, examples, _cfg(max_train_steps=2, seed=seed), FCRConfig(lambda_fcr=0.1), tmp_path / name, progress=False)
        runs[name] = load_file(str(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "conv_in.weight"
    assert torch.equal(runs["a"][key], runs["b"][key])
    assert not torch.equal(runs["a"][key], runs["c"][key])


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import fcr.train.loop as train_module

    examples = _real_examples()
    real_loss = train_module.fcr_training_loss
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        parts = real_loss(*args, **kwargs)
        if calls["n"] == 3:
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(train_module, "fcr_training_loss", exploding)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3.*step_0000002"):
        train(_unet(), build_noise_scheduler(), examples, _cfg(max_train_steps=4), FCRConfig(), tmp_path, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"


def test_batch_indices_shard_and_cover_each_epoch() -> None:
    n, local, world = 100, 10, 2
    per_epoch = n // (local * world)
    seen = torch.cat([batch_indices(n, local * world, m, 0, r, local) for m in range(per_epoch) for r in range(world)])
    assert sorted(seen.tolist()) == list(range(n))  # every example exactly once per epoch
    assert torch.equal(batch_indices(n, 20, 7, 0, 1, 10), batch_indices(n, 20, 7, 0, 1, 10))
    assert not torch.equal(batch_indices(n, 20, 0, 0, 0, 10), batch_indices(n, 20, per_epoch, 0, 0, 10))
    with pytest.raises(ValueError, match="larger than the data set"):
        batch_indices(10, 20, 0, 0, 0, 20)


def test_lr_schedule() -> None:
    cfg = TrainConfig(learning_rate=1.0, max_train_steps=110, lr_warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, TrainConfig(lr_schedule="constant")) == 1.0


def test_checkpoint_files_are_safetensors_and_mismatches_fail(tmp_path: Path) -> None:
    unet = _unet()
    save_module_weights(unet, tmp_path / "w.safetensors")
    other = _unet(seed=5)
    load_module_weights(other, tmp_path / "w.safetensors")
    assert torch.equal(other.conv_in.weight, unet.conv_in.weight)
    with pytest.raises(CheckpointError, match="does not match"):
        load_module_weights(build_embedded_unet("base-v"), tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_module_weights(unet, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_module_weights(unet, tmp_path / "missing.safetensors")


def test_only_the_most_recent_checkpoints_are_kept(tmp_path: Path) -> None:
    train(_unet(), build_noise_scheduler(), _real_examples(), _cfg(max_train_steps=4, checkpoint_every=1, keep_checkpoints=2),
          FCRConfig(), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
