"""Budgeted cache schedules: the error table is what it says, the key-step search is exact, the budget
picks what fits (tiny random UNets: code paths, never results)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.core import unet as fcr_unet
from fcr.core.sampler import apply_guidance, sample
from fcr.experiments.cache_schedules import (
    CacheMode,
    ScheduleChoice,
    best_key_steps,
    cache_error_table,
    choose_schedule,
    mode_costs,
    schedule_front,
)


def _proxy(table: torch.Tensor, keys: list[int]) -> float:
    """The reference proxy, written out independently of the library's: each non-key step's entry."""
    bounds = [*keys, table.shape[0]]
    return sum(float(table[k, i]) for k, stop in zip(bounds[:-1], bounds[1:]) for i in range(k + 1, stop))


def _gap_table(n: int) -> torch.Tensor:
    """A table whose error grows with the distance to the key step (every gap allowed)."""
    table = torch.full((n, n), float("inf"))
    for k in range(n):
        for i in range(k + 1, n):
            table[k, i] = float(i - k)
    return table


def test_the_key_step_search_is_exact() -> None:
    """Against every key-step set of a 7-step table (random errors, some gaps forbidden)."""
    n, g = 7, torch.Generator().manual_seed(0)
    table = torch.full((n, n), float("inf"))
    for k in range(n):
        for i in range(k + 1, min(n, k + 4)):  # max gap 3
            table[k, i] = float(torch.rand(1, generator=g)) * (i - k)
    for m in range(1, n + 1):
        sets = [[0, *rest] for rest in itertools.combinations(range(1, n), m - 1)]
        brute = min(_proxy(table, s) for s in sets)
        keys, proxy = best_key_steps(table, m)
        if brute == float("inf"):
            assert keys == [] and proxy == float("inf")
        else:
            assert proxy == pytest.approx(brute) and len(keys) == m and keys[0] == 0
            assert _proxy(table, keys) == pytest.approx(proxy)
    with pytest.raises(ValueError, match="n_keys"):
        best_key_steps(table, 0)


@pytest.mark.parametrize("mode", [CacheMode(0), CacheMode(None)], ids=["deepcache", "encoder"])
def test_the_error_table_measures_a_cached_step_along_the_full_trajectory(mode: CacheMode) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_embedded_unet("base", sample_size=16).eval()
    g = torch.Generator().manual_seed(1)
    noise, cond, uncond = torch.randn(2, 1, 16, 16, generator=g), torch.randn(2, 4, 384, generator=g), torch.zeros(1, 4, 384)
    ddim = sampling_scheduler("ddim", build_noise_scheduler())
    table = cache_error_table(unet, ddim, noise, cond, uncond, 3.0, 6, mode, max_gap=3)
    assert table.shape == (6, 6)
    finite = torch.isfinite(table)
    assert finite.sum() == sum(min(5, k + 3) - k for k in range(6))  # i in k+1 .. k+3 within 6 steps
    assert (table[finite] > 0).all()
    # one entry by hand: the full trajectory to step 1, the cache of step 0 used at step 1
    path = []
    sample(unet, sampling_scheduler("ddim", build_noise_scheduler()), noise, cond, uncond_hidden_states=uncond,
           guidance_scale=3.0, num_inference_steps=6, on_latents=lambda i, z: path.append(z))
    ctx = torch.cat([uncond.expand(2, -1, -1), cond])
    two = lambda x: torch.cat([x, x])  # noqa: E731
    t0, t1 = ddim.timesteps[0], ddim.timesteps[1]
    with torch.no_grad():
        full = apply_guidance(unet(two(path[1]), t1, ctx).sample, 3.0)
        if mode.branch is None:
            cached = fcr_unet.decode(unet, fcr_unet.encode(unet, two(path[0]), t0, ctx), t1, ctx)
        else:
            branch = fcr_unet.deep_branch(unet, 0)
            deep = fcr_unet.deep_hidden(unet, two(path[0]), t0, ctx, branch)
            cached = fcr_unet.shallow_forward(unet, two(path[1]), t1, ctx, deep, branch)
    from fcr.core.grid_ddim import landing_scales

    weight = landing_scales(ddim, 6)[2]
    expected = weight[1] * (apply_guidance(cached, 3.0) - full).pow(2).mean()
    torch.testing.assert_close(table[0, 1], expected, rtol=1e-3, atol=1e-9)


def test_the_budget_picks_the_least_proxy_that_fits_and_names_the_cheapest_otherwise() -> None:
    n = 5
    table = _gap_table(n)
    deep, enc = CacheMode(0), CacheMode(None)
    front = schedule_front({deep: table, enc: 2 * table}, {deep: (10.0, 3.0), enc: (10.0, 6.0)})
    assert {c.mode for c in front} == {deep, enc} and len(front) == 2 * n
    choice = choose_schedule(front, 0.6)
    assert choice.relative_flops <= 0.6 and choice.mode == deep
    assert choice.proxy == min(c.proxy for c in front if c.relative_flops <= 0.6)
    config = choice.config()
    assert config.key_steps == choice.key_steps and config.deep_branch == 0 and config.name.startswith("Searched-")
    with pytest.raises(ValueError, match="below the cheapest schedule"):
        choose_schedule(front, 0.3)
    assert isinstance(choice, ScheduleChoice) and choice.record()["n_keys"] == len(choice.key_steps)


def test_mode_costs_are_counted_flops() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_embedded_unet("base", sample_size=16).eval()
    full, shallow = mode_costs(unet, (1, 16, 16), 4, CacheMode(0))
    full_fd, decoder = mode_costs(unet, (1, 16, 16), 4, CacheMode(None))
    assert full == full_fd and 0 < shallow < full and 0 < decoder < full


def test_the_search_command_writes_schedules_the_sweep_samples(tmp_path) -> None:
    """`python -m fcr schedules` on the shipped `base` model (6 steps, 4 calibration images): one chosen
    schedule per budget within it, read back as sweep configurations; a budget below the cheapest
    schedule fails with one line naming the key, before anything is written."""
    import json

    from fcr.__main__ import main
    from fcr.backends.embedded.model import prepare_embedded_data
    from fcr.config import load_options
    from fcr.core.configurations import configurations_of

    data_dir = tmp_path / "data"
    try:
        prepare_embedded_data(data_dir)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    args = ["schedules", "-f", "params/fashion_mnist.yaml", "--set", f"data_dir={data_dir}",
            "--set", f"output_dir={tmp_path}", "--set", "run_name=s",
            "--set", "num_inference_steps=6", "--set", "schedule_calibration_images=4", "--set", "schedule_max_gap=3",
            "--set", "schedule_branches=[0]", "--set", "sweep_models=[base]", "--set", "device=cpu"]
    assert main([*args, "--set", "schedule_budgets=[0.01]"]) == 2
    assert not (tmp_path / "s").exists()
    assert main([*args, "--set", "schedule_budgets=[0.5, 0.8]"]) == 0
    written = json.loads((tmp_path / "s" / "schedules.json").read_text())
    assert [c["budget"] for c in written["chosen"]] == [0.5, 0.8]
    assert all(c["relative_flops"] <= c["budget"] for c in written["chosen"])
    assert {c["mode"] for c in written["front"]} == {"DeepCache-b0", "FD"}
    opts = load_options("params/fashion_mnist.yaml", overrides={"num_inference_steps": 6, "strides": [1],
                                                                "include_50ls": False, "dpm_reference_steps": 0,
                                                                "searched_schedules": str(tmp_path / "s" / "schedules.json")})
    names = [c.name for c in configurations_of(opts.sampling, opts.sweep)]
    assert names[0] == "full" and set(names[1:]) == {c["name"] for c in written["chosen"]}
    from fcr.experiments.frontier import method_family

    assert {method_family(n) for n in names[1:]} <= {"Searched DeepCache-b0", "Searched FD", "DeepCache b0", "FD"}
    assert {c["budget"] for c in written["candidates"]} == {0.5, 0.8}
    assert all(c["calibration_psnr"] is not None for c in written["candidates"] + written["chosen"])
    for chosen in written["chosen"]:  # the best measured candidate of its budget
        tried = [c for c in written["candidates"] if c["budget"] == chosen["budget"]]
        assert chosen["calibration_psnr"] == max(c["calibration_psnr"] for c in tried)
    with pytest.raises(ValueError, match="searched for 6 steps"):
        configurations_of(opts.sampling.__class__(num_inference_steps=50), opts.sweep)


def test_candidates_are_the_largest_fitting_schedule_per_mode_and_source_and_rollouts_pick_one() -> None:
    from fcr.experiments.cache_schedules import candidates_for_budget, select_by_rollouts, uniform_schedules

    table = _gap_table(6)
    deep = CacheMode(0)
    front = schedule_front({deep: table}, {deep: (10.0, 2.0)}) + uniform_schedules({deep: table}, {deep: (10.0, 2.0)})
    uniform = [c for c in front if c.source == "uniform"]
    assert [c.key_steps for c in uniform][:2] == [(0, 2, 4), (0, 3)] and uniform[0].name == "DeepCache-2-b0"
    candidates = candidates_for_budget(front, 0.5)
    assert {c.source for c in candidates} == {"proxy", "uniform"}
    assert all(c.relative_flops <= 0.5 for c in candidates)
    assert max(len(c.key_steps) for c in candidates if c.source == "proxy") == 2  # (2 * 10 + 4 * 2) / 60 <= 0.5
    best, scored = select_by_rollouts(candidates, lambda c: 30.0 - len(c.key_steps) if c.source == "uniform" else 20.0)
    assert best.source == "uniform" and all(c.calibration_psnr is not None for c in scored)
    with pytest.raises(ValueError, match="below the cheapest"):
        candidates_for_budget(front, 0.1)


def test_local_search_moves_key_steps_while_the_measured_score_improves() -> None:
    from fcr.experiments.cache_schedules import refine_by_rollouts

    start = ScheduleChoice(CacheMode(0), (0, 10, 20, 30, 40), 1.0, 0.26, 50, "uniform")
    target = (0, 6, 14, 24, 38)  # a made-up optimum: the score is minus the distance to it
    score = lambda c: -float(sum(abs(a - b) for a, b in zip(c.key_steps, target)))  # noqa: E731
    best, scored = refine_by_rollouts(start, score, rounds=50, max_gap=20)
    assert best.key_steps == target and best.source == "refined" and best.name == "Searched-DeepCache-b0-5kr"
    assert best.relative_flops == start.relative_flops and best.key_steps[0] == 0 and scored > 0
    assert best.calibration_psnr == 0.0
    same, _ = refine_by_rollouts(replace_score := ScheduleChoice(CacheMode(0), target, 1.0, 0.26, 50), score, rounds=5)
    assert same.key_steps == target and same.source == "proxy"  # nothing better nearby: unchanged
    gapped, _ = refine_by_rollouts(start, score, rounds=50, max_gap=10)
    assert max(b - a for a, b in zip(gapped.key_steps, [*gapped.key_steps[1:], 50])) <= 10
    from fcr.experiments.frontier import method_family

    assert method_family(best.name) == "Searched DeepCache-b0" and replace_score.source == "proxy"
