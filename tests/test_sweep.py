"""Stride sweep: configurations, resumable result files, stale detection, cost counters.

The UNet here is a randomly initialised scratch model: code paths only, never results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fcr.config import ConfigError, to_options
from fcr.options import Options
from fcr.core.configurations import SamplingConfig, configs_for_model, sweep_configurations
from fcr.core.sampler import FD_50LS, sample
from fcr.eval import context
from fcr.eval.results import StaleResultError
from fcr.experiments import sweep
from fcr.experiments.sweep import evaluate_cost, paired_comparison, run_sweep, summarize
from fcr.backends.embedded.model import all_prompts
from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import ModelNotFoundError, build_embedded_unet, build_noise_scheduler

REFERENCE_N = 50  # real test images used as the reference set (tests only; results use all 10k)


def test_configurations_cover_strides_50ls_and_dpm() -> None:
    configs = sweep_configurations([1, 5, 10], 50, "ddim", include_50ls=True, dpm_reference_steps=20)
    assert [c.name for c in configs] == ["full", "FD-5", "FD-10", "FD-50ls", "DPM++-20"]
    by_name = {c.name: c for c in configs}
    assert by_name["full"].key_steps is None and by_name["full"].stride == 1
    assert by_name["FD-5"].key_steps == tuple(range(0, 50, 5))
    assert by_name["FD-10"].as_dict()["n_key_steps"] == 5
    assert by_name["FD-50ls"].key_steps == FD_50LS
    dpm = by_name["DPM++-20"]
    assert (dpm.scheduler, dpm.num_inference_steps, dpm.key_steps) == ("dpmsolver++", 20, None)
    plain = sweep_configurations([1], 10, "ddim", include_50ls=False, dpm_reference_steps=0)
    assert [c.name for c in plain] == ["full"]
    json.dumps(dpm.as_dict())  # result files store it


def test_cached_dpm_configs_and_reference_lines_only_for_the_original_model() -> None:
    configs = sweep_configurations([1, 10], 50, "ddim", include_50ls=True, dpm_reference_steps=20, dpm_strides=[10])
    cached = {c.name: c for c in configs}["DPM++-FD-10"]
    assert (cached.scheduler, cached.num_inference_steps, cached.key_steps, cached.stride) == ("dpmsolver++", 20, (0, 10), 10)
    assert [c.name for c in configs_for_model(configs, 0, False)] == ["full", "FD-10", "FD-50ls", "DPM++-20", "DPM++-FD-10"]
    assert [c.name for c in configs_for_model(configs, 1, False)] == ["full", "FD-10", "DPM++-FD-10"]
    assert len(configs_for_model(configs, 1, True)) == len(configs)
    with pytest.raises(ValueError, match="dpm_strides"):
        sweep_configurations([1], 50, "ddim", dpm_reference_steps=20, dpm_strides=[25])
    with pytest.raises(ValueError, match="dpm_reference_steps"):
        sweep_configurations([1], 50, "ddim", dpm_reference_steps=0, dpm_strides=[10])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A scratch UNet saved as a run folder and a text-state cache of random states."""
    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    unet = build_embedded_unet("base")
    unet.save_pretrained(root / "run" / "unet", safe_serialization=True)
    prompts = all_prompts()
    data_dir = root / "data"
    data_dir.mkdir()
    states = torch.randn(len(prompts), 16, 384)
    meta = {"prompts": json.dumps(prompts), "max_length": "16", "hidden_size": "384", "encoder": "random"}
    save_file({"states": states}, str(data_dir / "text_states.safetensors"), metadata=meta)
    params = to_options({
        "setting": "embedded", "device": "cpu", "data_dir": str(data_dir), "output_dir": str(root / "out"),
        "sweep_models": [str(root / "run")], "strides": [1, 3], "num_inference_steps": 6, "include_50ls": True,
        "dpm_reference_steps": 3, "num_eval_images": 10, "eval_batch_size": 10, "seeds": [0],
        "guidance_scale": 2.0, "profile_batches": [1], "profile_repeats": 1, "n_bootstrap": 10,
    })
    return {"root": root, "unet": unet, "params": params}


def _sweep(params: Options, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    calls = []
    real = context.generate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("key_steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "generate", counting)  # where RunContext.generate looks it up
    models = sweep.model_labels(params.value("sweep_models"))
    try:
        quality, cost = run_sweep(params, models, out, progress=False, reference_n=REFERENCE_N)
    except FileNotFoundError as exc:
        if "fashion" in str(exc).lower():
            pytest.skip(f"Fashion-MNIST not available: {exc}")
        raise
    return quality, cost, calls


def test_sweep_writes_once_skips_then_refuses_stale(workspace: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    params, out = workspace["params"], workspace["root"] / "out" / "sweep"
    quality, cost, calls = _sweep(params, out, monkeypatch)
    names = ["full", "FD-3", "FD-50ls", "DPM++-3"]
    assert len(calls) == len(names)
    assert sorted(p.stem for p in (out / "quality").glob("*.json")) == sorted(f"run__{n}__seed0" for n in names)
    assert sorted(p.stem for p in (out / "cost").glob("*.json")) == sorted(f"base__{n}" for n in names)
    assert len(list((out / "quality").glob("*.safetensors"))) == len(names)
    assert set(quality["config"]) == set(names) and (quality["n_generated"] == 10).all()
    row = quality.set_index("config").loc["FD-3"]
    assert row["fd_fashioncnn_lo"] <= row["fd_fashioncnn_hi"] and 0 <= row["class_accuracy"] <= 1
    assert row["encoder_passes_per_run"] == 2 and row["decoder_steps_per_run"] == 6

    again, _, calls_again = _sweep(params, out, monkeypatch)
    assert calls_again == []  # everything loaded from the result files
    assert again["fd_fashioncnn"].tolist() == quality["fd_fashioncnn"].tolist()

    with pytest.raises(StaleResultError, match="guidance_scale"):
        _sweep(params.with_flat(guidance_scale=3.0), out, monkeypatch)

    # Per-image side files support paired tests between configurations; one seed -> nan t-bounds.
    test = paired_comparison(out, "run", "FD-3", "full", 0)
    assert test["n"] == 10 and 0 <= test["p_t"] <= 1
    summary = summarize(quality)
    assert (summary["n_seeds"] == 1).all() and summary["fd_fashioncnn_lo"].isna().all()
    table = sweep.cost_table(cost, reference="FD-3")
    assert math.isclose(table.set_index("config").loc["FD-3", "time_speedup_vs_FD-3"], 1.0)
    assert "cost_per_1k_images" not in table  # no price, no money column
    priced = sweep.cost_table(cost, reference="FD-3", device_hour_price=3.6).set_index("config")
    # 3.6 per hour is 0.001 per second: 1,000 images cost their time per image in those units.
    assert priced["cost_per_1k_images"].to_numpy() == pytest.approx(priced["time_per_image_s"].to_numpy())


def test_a_sweep_adopts_another_sweeps_identical_cells_and_only_those(workspace: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    params = workspace["params"].with_flat(strides=[1], include_50ls=False, dpm_reference_steps=0)
    first = tmp_path / "first"
    quality, _, calls = _sweep(params, first, monkeypatch)
    assert len(calls) == 1  # full only

    # A later sweep with one more configuration samples only that one; `full` is copied whole.
    second = tmp_path / "second"
    wider = params.with_flat(strides=[1, 3], adopt_cells_from=[str(first)])
    both, _, calls = _sweep(wider, second, monkeypatch)
    assert calls == [(0, 3)]  # FD-3 only
    stored = json.loads((second / "quality" / "run__full__seed0.json").read_text())
    assert stored["adopted_from"] == str(first / "quality" / "run__full__seed0.json")
    assert (second / "quality" / "run__full__seed0.safetensors").read_bytes() == \
        (first / "quality" / "run__full__seed0.safetensors").read_bytes()
    assert both.set_index("config").loc["full", "fd_fashioncnn"] == quality.set_index("config").loc["full", "fd_fashioncnn"]

    # Any parameter that shapes the images (here the guidance) makes a cell its own: nothing adopted.
    _, _, calls = _sweep(wider.with_flat(guidance_scale=3.0), tmp_path / "third", monkeypatch)
    assert len(calls) == 2
    # A folder that is no sweep's, or the sweep's own, fails before anything is written.
    for bad in (tmp_path / "nowhere", tmp_path / "fourth"):
        (tmp_path / "fourth" / "quality").mkdir(parents=True, exist_ok=True)
        with pytest.raises(ConfigError, match="adopt_cells_from"):
            _sweep(wider.with_flat(adopt_cells_from=[str(bad)]), tmp_path / "fourth", monkeypatch)
    assert not list((tmp_path / "fourth" / "quality").iterdir())


def test_missing_model_fails_before_anything_is_written(workspace: dict, tmp_path: Path, monkeypatch) -> None:
    params = workspace["params"].with_flat(sweep_models=[str(tmp_path / "never_trained")])
    out = tmp_path / "out"
    with pytest.raises(ModelNotFoundError, match="never_trained"):
        _sweep(params, out, monkeypatch)
    assert not out.exists()
    monkeypatch.setattr("fcr.backends.models.MODELS_DIR", tmp_path / "empty_models")  # an embedded model not trained yet
    with pytest.raises(ModelNotFoundError, match="has not been trained"):
        run_sweep(params.with_flat(sweep_models=["base-v"]), {"base-v": "base-v"}, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("key_steps", [None, (0, 3), (0, 1, 2, 3, 4)])
def test_cost_pass_counts_agree_with_the_sampler(workspace: dict, key_steps) -> None:
    unet = workspace["unet"]
    config = SamplingConfig("probe", "ddim", 6, key_steps)
    cost = evaluate_cost(unet, config, batch_sizes=(1,), repeats=1, guidance_scale=2.0, seq_len=16)
    noise = torch.randn(1, 1, 32, 32)
    cond = torch.randn(1, 16, 384)
    stats = sample(
        unet, sampling_scheduler("ddim", build_noise_scheduler()), noise, cond,
        uncond_hidden_states=torch.zeros(1, 16, 384), guidance_scale=2.0, num_inference_steps=6,
        key_steps=None if key_steps is None else list(key_steps),
    ).stats
    for name in sweep.PASS_COUNTERS:
        assert cost[f"{name}_per_run"] == getattr(stats, name), name
    assert cost["decoder_batch_sizes"] == stats.decoder_batch_sizes
    assert cost["flops_per_image"] > 0 and cost["time_per_image_s_bs1"] > 0
    if key_steps is None:
        assert cost["flops_bound_ratio"] == 1.0
    else:
        assert 0 < cost["flops_bound_ratio"] < 1


def test_cost_of_a_deepcache_configuration(workspace: dict) -> None:
    from fcr.eval.profiling import deep_cache_flops, deep_cache_flops_ratio

    unet = workspace["unet"]
    config = SamplingConfig("DeepCache-3-b0", "ddim", 6, (0, 3), deep_branch=0)
    cost = evaluate_cost(unet, config, batch_sizes=(1,), repeats=1, guidance_scale=2.0, seq_len=16)
    assert (cost["unet_passes_per_run"], cost["shallow_passes_per_run"], cost["encoder_passes_per_run"]) == (2, 4, 0)
    share = deep_cache_flops(unet, (1, 32, 32), 16, 0)["shallow_share"]
    assert cost["flops_bound_ratio"] == pytest.approx(deep_cache_flops_ratio(share, 6, 2))
    # The counted FLOPs of the whole run are two full and four shallow passes of the guided batch of 2.
    passes = deep_cache_flops(unet, (1, 32, 32), 16, 0, batch=2)
    assert cost["flops_per_image"] == pytest.approx(2 * passes["full"] + 4 * passes["shallow"], rel=0.02)
