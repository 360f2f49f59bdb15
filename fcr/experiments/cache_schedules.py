"""Budgeted cache schedules: which steps run the full UNet (key steps) and which reuse its cache, chosen
on calibration prompts and noise for a FLOP budget, then evaluated on held-out ones like any configuration.

The search scores a schedule by an additive proxy measured once along the original's full guided DDIM
trajectory of the calibration set: ``E[k, i]``, the error of step ``i``'s cached prediction with the
cache filled at step ``k`` (the full pass at ``z_k``; DeepCache's shallow path at ``z_i``, or encoder
reuse's decoder alone), against the full prediction at ``z_i``, measured where the step lands in the
final image's scale (:func:`fcr.core.grid_ddim.landing_scales`). A schedule's proxy is the sum of
``E[k(i), i]`` over its non-key steps. For a given number of key steps (one cost: key steps cost a full
pass, the rest a cached one) dynamic programming finds the key steps with the least proxy exactly;
the budget then picks the largest number of key steps that fits, per cache mode, and the mode with the
least proxy. First-order: errors are taken along the full trajectory, not the cached one, and summed;
the pilot (outputs/cache_aware_pilot) found its 5-key choice 2.2 dB worse than uniform DeepCache-10-b0
at the same cost on held-out noise. So the budget's schedule is chosen by *measured* calibration
fidelity instead (:func:`select_by_rollouts`): every candidate that fits (the proxy's best key steps
under the final-image weighting and unweighted, and the uniform schedule with as many key steps) is
sampled on the calibration set and compared with full sampling of the same prompts and noise.

Each schedule uses one cache mode throughout (DeepCache at one branch, or encoder reuse), so it is an
ordinary :class:`fcr.core.configurations.SamplingConfig` with explicit key steps that notebook 03 samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fcr.core import unet as fcr_unet
from fcr.core.configurations import SamplingConfig
from fcr.core.grid_ddim import landing_scales, predicted_x0_eps
from fcr.core.sampler import apply_guidance, guidance_context, sample
from fcr.experiments.sweep import model_labels

__all__ = ["CacheMode", "ScheduleChoice", "best_key_steps", "best_schedules", "relative_flops", "schedule_proxy", "cache_error_table", "choose_schedule", "mode_costs",
           "schedule_front", "search_schedules", "select_by_rollouts", "uniform_schedules", "candidates_for_budget",
           "refine_by_rollouts"]


@dataclass(frozen=True)
class CacheMode:
    """What a non-key step runs: DeepCache's shallow path at ``branch``, or (``branch`` None) the
    decoder on the key step's encoder features (Faster Diffusion's encoder reuse)."""

    branch: int | None

    @property
    def label(self) -> str:
        return "FD" if self.branch is None else f"DeepCache-b{self.branch}"


@torch.no_grad()
def cache_error_table(unet: Any, scheduler: Any, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                      guidance_scale: float, num_inference_steps: int, mode: CacheMode, max_gap: int) -> torch.Tensor:
    """``E[k, i]`` (``num_inference_steps`` squared; inf where ``i <= k`` or ``i - k > max_gap``): the
    mean over the calibration batch of the final-image-scale squared error of step ``i``'s cached
    prediction with the cache from step ``k``, along the full guided DDIM trajectory from ``noise``."""
    n = num_inference_steps
    context = guidance_context(cond, uncond, len(noise), guidance_scale)
    two = context.shape[0] != len(noise)
    branch = None if mode.branch is None else fcr_unet.deep_branch(unet, mode.branch)
    a_t, _, weight = landing_scales(scheduler, n)
    timesteps = scheduler.timesteps

    def net(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if two else x

    def guided(out: torch.Tensor) -> torch.Tensor:
        return apply_guidance(out, guidance_scale) if two else out

    def noise_of(out: torch.Tensor, i: int) -> torch.Tensor:
        return predicted_x0_eps(out.float(), latents[i].float(), a_t[i], scheduler.config.prediction_type)[1]

    latents, full_noise, caches = [], [], []
    z = noise * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        x = net(z)
        features = fcr_unet.encode(unet, x, t, context)
        caches.append(features if branch is None else fcr_unet.deep_hidden(unet, x, t, context, branch))
        pred = guided(fcr_unet.decode(unet, features, t, context))
        latents.append(z)
        full_noise.append(noise_of(pred, i))
        z = scheduler.step(pred, t, z, eta=0.0, return_dict=False)[0]
    table = torch.full((n, n), float("inf"))
    for k in range(n):
        for i in range(k + 1, min(n, k + max_gap + 1)):
            t = timesteps[i]
            if branch is None:
                out = fcr_unet.decode(unet, caches[k], t, context)
            else:
                out = fcr_unet.shallow_forward(unet, net(latents[i]), t, context, caches[k], branch)
            table[k, i] = weight[i] * (noise_of(guided(out), i) - full_noise[i]).pow(2).mean()
    return table


def _segment_costs(table: torch.Tensor) -> list[list[float]]:
    """``S[k][stop]``: the proxy of the non-key steps ``k+1 .. stop-1`` reading the cache of key step
    ``k`` (0 when there are none; inf once a step lies beyond the table's ``max_gap``)."""
    n = table.shape[0]
    out = [[0.0] * (n + 1) for _ in range(n)]
    for k in range(n):
        run = torch.cumsum(table[k, k + 1:].double(), 0).tolist()
        for stop in range(k + 2, n + 1):
            out[k][stop] = run[stop - k - 2]
    return out


def schedule_proxy(table: torch.Tensor, keys: Sequence[int]) -> float:
    """The summed proxy of the schedule with key steps ``keys``."""
    costs, bounds = _segment_costs(table), [*keys, table.shape[0]]
    return sum(costs[k][stop] for k, stop in zip(bounds[:-1], bounds[1:]))


def best_schedules(table: torch.Tensor, max_keys: int) -> dict[int, tuple[list[int], float]]:
    """For every number of key steps ``m <= max_keys`` (step 0 always one): the key steps with the least
    summed proxy and that proxy (``[]`` and inf when no schedule keeps every gap within the table's
    ``max_gap``). One exact dynamic programme serves every ``m``."""
    n = table.shape[0]
    if not 1 <= max_keys <= n:
        raise ValueError(f"need 1 <= n_keys <= {n}; got {max_keys}")
    inf, seg = float("inf"), _segment_costs(table)
    # best[m][j]: least proxy of steps 0..j-1 with m keys, the last at j; back[m][j]: the key before j
    best = [[inf] * n for _ in range(max_keys + 1)]
    back = [[-1] * n for _ in range(max_keys + 1)]
    best[1][0] = 0.0
    for m in range(2, max_keys + 1):
        for j in range(1, n):
            for k in range(j):
                if best[m - 1][k] < inf:
                    cost = best[m - 1][k] + seg[k][j]
                    if cost < best[m][j]:
                        best[m][j], back[m][j] = cost, k
    out = {}
    for m in range(1, max_keys + 1):
        totals = [best[m][j] + seg[j][n] if best[m][j] < inf else inf for j in range(n)]
        last = min(range(n), key=lambda j: totals[j])
        if totals[last] == inf:
            out[m] = ([], inf)
            continue
        keys, r = [last], m
        while keys[-1] != 0:
            keys.append(back[r][keys[-1]])
            r -= 1
        out[m] = (sorted(keys), totals[last])
    return out


def best_key_steps(table: torch.Tensor, n_keys: int) -> tuple[list[int], float]:
    """The ``n_keys`` key steps with the least summed proxy, and that proxy (:func:`best_schedules`)."""
    return best_schedules(table, n_keys)[n_keys]


def mode_costs(unet: Any, sample_shape: Sequence[int], seq_len: int, mode: CacheMode) -> tuple[float, float]:
    """FLOPs of one full pass and one cached step of ``mode`` at batch 1 (``torch.utils.flop_counter``)."""
    from fcr.eval.profiling import deep_cache_flops, unet_flops

    if mode.branch is None:
        f = unet_flops(unet, sample_shape, seq_len)
        return float(f["full"]), float(f["decoder"])
    f = deep_cache_flops(unet, sample_shape, seq_len, mode.branch)
    return float(f["full"]), float(f["shallow"])


@dataclass(frozen=True)
class ScheduleChoice:
    """One searched schedule: its mode, key steps, calibration proxy and FLOPs relative to full sampling."""

    mode: CacheMode
    key_steps: tuple[int, ...]
    proxy: float
    relative_flops: float
    num_inference_steps: int
    source: str = "proxy"  # proxy (final-image weighting), proxy_unweighted or uniform
    calibration_psnr: float | None = None  # measured by select_by_rollouts

    @property
    def name(self) -> str:
        if self.source == "uniform":  # the sweep's own name for it
            stride = self.key_steps[1] - self.key_steps[0] if len(self.key_steps) > 1 else self.num_inference_steps
            return f"FD-{stride}" if self.mode.branch is None else f"DeepCache-{stride}-b{self.mode.branch}"
        tag = "" if self.source != "refined" else "r"
        return f"Searched-{self.mode.label}-{len(self.key_steps)}k{tag}"

    def config(self) -> SamplingConfig:
        """The configuration notebook 03 samples (explicit key steps, DDIM)."""
        return SamplingConfig(self.name, "ddim", self.num_inference_steps, self.key_steps, None, self.mode.branch)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode.label, "deep_branch": self.mode.branch,
                "key_steps": list(self.key_steps), "n_keys": len(self.key_steps), "proxy": self.proxy,
                "relative_flops": self.relative_flops, "num_inference_steps": self.num_inference_steps,
                "source": self.source, "calibration_psnr": self.calibration_psnr}


def relative_flops(n_keys: int, num_steps: int, full: float, cached: float) -> float:
    """FLOPs of a schedule relative to full sampling: key steps cost ``full``, the others ``cached``."""
    return (n_keys * full + (num_steps - n_keys) * cached) / (num_steps * full)


def schedule_front(tables: dict[CacheMode, torch.Tensor], costs: dict[CacheMode, tuple[float, float]],
                   source: str = "proxy") -> list[ScheduleChoice]:
    """For every mode and number of key steps, the best key steps and their relative FLOPs."""
    out = []
    for mode, table in tables.items():
        n = table.shape[0]
        for m, (keys, proxy) in best_schedules(table, n).items():
            if keys:
                out.append(ScheduleChoice(mode, tuple(keys), proxy, relative_flops(m, n, *costs[mode]), n, source))
    return out


def uniform_schedules(tables: dict[CacheMode, torch.Tensor], costs: dict[CacheMode, tuple[float, float]]) -> list[ScheduleChoice]:
    """The uniform schedules (a key step every ``s`` steps, s >= 2) of every mode, with their proxy."""
    out = []
    for mode, table in tables.items():
        n = table.shape[0]
        for stride in range(2, n):
            keys = tuple(range(0, n, stride))
            out.append(ScheduleChoice(mode, keys, schedule_proxy(table, keys), relative_flops(len(keys), n, *costs[mode]),
                                      n, "uniform"))
    return out


def candidates_for_budget(front: Sequence[ScheduleChoice], budget: float) -> list[ScheduleChoice]:
    """What :func:`select_by_rollouts` samples for ``budget``: per mode and source, the schedule with the
    most key steps that fits (ties: the least proxy). ValueError naming the cheapest when none fits."""
    choose_schedule(front, budget)  # raises when nothing fits
    best: dict[tuple[CacheMode, str], ScheduleChoice] = {}
    for c in front:
        if c.relative_flops <= budget + 1e-12:
            key = (c.mode, c.source)
            if key not in best or (len(c.key_steps), -c.proxy) > (len(best[key].key_steps), -best[key].proxy):
                best[key] = c
    return list(best.values())


def refine_by_rollouts(start: ScheduleChoice, score: Any, rounds: int, max_shift: int = 2,
                       max_gap: int | None = None) -> tuple[ScheduleChoice, int]:
    """Local search from ``start`` at its cost (same mode, same number of key steps): each round tries
    moving one key step (never step 0) by up to ``max_shift`` steps, keeping key steps distinct, ordered
    and at most ``max_gap`` apart, and takes the move with the best ``score`` (measured calibration
    PSNR) when it beats the current one; stops after ``rounds`` rounds or when no move helps. Returns the
    best schedule (``source`` "refined" when it moved) and how many schedules were scored."""
    best = start if start.calibration_psnr is not None else replace(start, calibration_psnr=float(score(start)))
    n, scored = start.num_inference_steps, 0
    for _ in range(rounds):
        keys, moves = list(best.key_steps), []
        for j in range(1, len(keys)):
            for shift in (d for k in range(1, max_shift + 1) for d in (-k, k)):
                new = sorted({*keys[:j], keys[j] + shift, *keys[j + 1:]})
                if len(new) != len(keys) or not 0 < keys[j] + shift < n:
                    continue
                if max_gap is not None and max(b - a for a, b in zip([*new], [*new[1:], n])) > max_gap:
                    continue
                moves.append(tuple(new))
        if not moves:
            break
        candidates = [replace(best, key_steps=m, source="refined", calibration_psnr=None) for m in dict.fromkeys(moves)]
        candidates = [replace(c, calibration_psnr=float(score(c))) for c in candidates]
        scored += len(candidates)
        top = max(candidates, key=lambda c: c.calibration_psnr)
        if top.calibration_psnr <= best.calibration_psnr:
            break
        best = top
    return best, scored


def select_by_rollouts(candidates: Sequence[ScheduleChoice], score: Any) -> tuple[ScheduleChoice, list[ScheduleChoice]]:
    """Each candidate with ``score(candidate)`` (its mean calibration PSNR to full sampling), and the best."""
    scored = [replace(c, calibration_psnr=float(score(c))) for c in candidates]
    return max(scored, key=lambda c: (c.calibration_psnr, -c.relative_flops)), scored


def choose_schedule(front: Sequence[ScheduleChoice], budget: float) -> ScheduleChoice:
    """The schedule with the least calibration proxy whose relative FLOPs are within ``budget``;
    ValueError naming the cheapest schedule when none fits."""
    fits = [c for c in front if c.relative_flops <= budget + 1e-12]
    if not fits:
        cheapest = min(front, key=lambda c: c.relative_flops)
        raise ValueError(f"budget {budget:.3f} is below the cheapest schedule ({cheapest.name}: "
                         f"{cheapest.relative_flops:.3f} of full sampling)")
    return min(fits, key=lambda c: (c.proxy, c.relative_flops))


def search_schedules(opts: Any, out_file: str | Path, *, progress: bool = True) -> list[ScheduleChoice]:
    """The schedule search of validated ``opts`` on the first sweep model (the original): error tables
    on ``schedule_calibration_images`` prompts and noises of ``schedule_calibration_seed``, the front
    and one chosen schedule per ``schedule_budgets`` entry, written to ``out_file`` (JSON: ``front``,
    ``chosen``, ``calibration``) for the sweep's ``searched_schedules``. A budget below the cheapest
    schedule fails naming ``schedule_budgets`` before any table is computed or anything written."""
    from fcr.backends.generate import initial_noise
    from fcr.config import ConfigError
    from fcr.backends.models import resolve_device
    from fcr.eval.context import eval_prompts, load_models
    from fcr.eval.fidelity import pixel_fidelity

    s, n = opts.sweep, opts.sampling.num_inference_steps
    if not s.schedule_budgets:
        raise ConfigError("parameter 'schedule_budgets': empty; give the FLOP budgets to search schedules for")
    device = resolve_device(opts.run.device)
    label, source = next(iter(model_labels(s.sweep_models).items()))
    loaded = load_models(opts, {label: source}, device)[label].model
    guidance = opts.sampling.guidance_scale > 1
    prompts = eval_prompts(opts, s.schedule_calibration_images, s.schedule_calibration_seed)
    cond, uncond = loaded.condition(prompts, 0, len(prompts), guidance)
    shape = loaded.latent_shape(None)
    noise = initial_noise(range(len(prompts)), shape, s.schedule_calibration_seed).to(device, loaded.unet.dtype)
    modes = [CacheMode(b) for b in dict.fromkeys(s.schedule_branches)] + ([CacheMode(None)] if s.schedule_encoder_reuse else [])
    if not modes:
        raise ConfigError("parameter 'schedule_branches': empty and schedule_encoder_reuse false: no mode to search")
    costs = {m: mode_costs(loaded.unet, shape, int(cond.shape[1]), m) for m in modes}
    cheapest = min(relative_flops(1, n, *c) for c in costs.values())
    low = [b for b in s.schedule_budgets if b < cheapest]
    if low:
        raise ConfigError(f"parameter 'schedule_budgets': {low[0]} is below the cheapest schedule ({cheapest:.3f} of "
                          "full sampling: one full pass, every other step cached)")
    tables = {}
    for mode in modes:
        if progress:
            print(f"error table: {mode.label}", flush=True)
        tables[mode] = cache_error_table(loaded.unet, loaded.make_scheduler("ddim"), noise, cond, uncond,
                                         opts.sampling.guidance_scale, n, mode, s.schedule_max_gap)
    weight = landing_scales(loaded.make_scheduler("ddim"), n)[2]
    unweighted = {m: t / weight[None, :] for m, t in tables.items()}
    front = schedule_front(tables, costs) + schedule_front(unweighted, costs, "proxy_unweighted") + uniform_schedules(tables, costs)
    kw = dict(uncond_hidden_states=uncond, guidance_scale=opts.sampling.guidance_scale, num_inference_steps=n)
    with torch.no_grad():
        full = loaded.finish(sample(loaded.unet, loaded.make_scheduler("ddim"), noise, cond, **kw).latents).float()

    def score(c: ScheduleChoice) -> float:
        with torch.no_grad():
            out = sample(loaded.unet, loaded.make_scheduler("ddim"), noise, cond, key_steps=list(c.key_steps),
                         deep_cache_branch=c.mode.branch, **kw).latents
        return float(pixel_fidelity(loaded.finish(out).float(), full)["psnr"].mean())  # the evaluation's PSNR

    chosen, tried = [], []
    for budget in s.schedule_budgets:
        best, scored = select_by_rollouts(candidates_for_budget(front, budget), score)
        if s.schedule_refine_rounds:
            best, _ = refine_by_rollouts(best, score, s.schedule_refine_rounds, max_gap=s.schedule_max_gap)
            scored = [*scored, best] if best.source == "refined" else scored
        chosen.append(best)
        tried += [{"budget": budget, **c.record()} for c in scored]
        if progress:
            print(f"budget {budget}: {best.name} ({best.calibration_psnr:.2f} dB on calibration)", flush=True)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps({
        "front": [c.record() for c in front],
        "candidates": tried,
        "chosen": [{"budget": b, **c.record()} for b, c in zip(s.schedule_budgets, chosen)],
        "calibration": {"model": label, "source": str(source), "images": len(prompts),
                        "seed": s.schedule_calibration_seed, "guidance_scale": opts.sampling.guidance_scale,
                        "max_gap": s.schedule_max_gap},
    }, indent=2))
    return chosen
