"""Sampling configurations: plain sampling, encoder caching at given key steps, or DeepCache (the
full UNet at the key steps, the shallow path between them), with a name (``full``, ``FD-s``,
``FD-50ls``, ``DDIM-N``, ``DPM++-k``, ``DPM++-FD-s``, ``DeepCache-N-bB``) that every result file and
table uses. Built from the sweep's parameters by :func:`sweep_configurations`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fcr.core.grid_ddim import GridDDIM
from fcr.core.sampler import key_steps
from fcr.core.tgate import TGateSettings
from fcr.core.token_merging import TokenMergeSettings
from fcr.options import SamplingOptions, SweepOptions

__all__ = ["SamplingConfig", "configs_for_model", "configurations_of", "searched_configurations", "student_configurations",
           "sweep_configurations"]


@dataclass(frozen=True)
class SamplingConfig:
    """One sampling configuration: plain (``key_steps`` None) or encoder caching at ``key_steps``.

    ``stride`` is the uniform encoder-caching stride the configuration stands for (1 for plain
    sampling with the sweep's scheduler, None for non-uniform schedules, reference lines and
    DeepCache). ``deep_branch``: DeepCache's skip branch (``cache_branch_id``); None for encoder
    caching and plain sampling.
    """

    name: str
    scheduler: str
    num_inference_steps: int
    key_steps: tuple[int, ...] | None
    stride: int | None = None
    deep_branch: int | None = None
    token_merge: float | None = None  # ToMe's ratio (fcr.core.token_merging); None: no token merging
    token_merge_downsample: int | None = None  # ToMe's max_downsample (with token_merge)
    tgate_gate: int | None = None  # T-GATE's gate step (fcr.core.tgate, the package's other defaults)
    guidance_scale: float | None = None  # None: the run's; 1.0 for a student with the guidance folded in
    grid_base_steps: int | None = None  # a distilled student's sampler: every grid_stride-th point of the
    grid_stride: int | None = None  # original's grid_base_steps-step DDIM grid (fcr.core.grid_ddim)

    def grid_scheduler(self, scheduler: Any) -> Any:
        """The scheduler this configuration samples with, given the run's ``scheduler`` of its family:
        a progressive student's :class:`fcr.core.grid_ddim.GridDDIM` on that DDIM's schedule, a consistency
        student's LCM sampler on its solver grid (``original_inference_steps``), else ``scheduler``."""
        if self.grid_base_steps is None:
            return scheduler
        if self.grid_stride is None:
            return type(scheduler).from_config(scheduler.config, original_inference_steps=int(self.grid_base_steps))
        return GridDDIM(scheduler, int(self.grid_base_steps), int(self.grid_stride))

    def token_merge_settings(self) -> TokenMergeSettings | None:
        """ToMe's settings of this configuration (None: no token merging)."""
        if self.token_merge is None:
            return None
        return TokenMergeSettings(self.token_merge, max_downsample=self.token_merge_downsample or 1)

    def tgate_settings(self) -> TGateSettings | None:
        """T-GATE's settings of this configuration (None: no T-GATE)."""
        return None if self.tgate_gate is None else TGateSettings(gate_step=self.tgate_gate)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy, with the number of key steps (full or encoder passes per image). A
        configuration without DeepCache (ToMe) has no ``deep_branch`` (``token_merge``) entry, so
        the result files of the other configurations keep the keys they were written with."""
        out = asdict(self)
        for key in ("deep_branch", "token_merge", "token_merge_downsample", "tgate_gate", "guidance_scale",
                    "grid_base_steps", "grid_stride"):
            if out[key] is None:
                del out[key]
        out["key_steps"] = None if self.key_steps is None else list(self.key_steps)
        out["n_key_steps"] = self.num_inference_steps if self.key_steps is None else len(self.key_steps)
        return out


def sweep_configurations(
    strides: Sequence[int],
    num_inference_steps: int,
    scheduler: str,
    include_50ls: bool = True,
    dpm_reference_steps: int = 20,
    dpm_strides: Sequence[int] = (),
    deep_cache_intervals: Sequence[int] = (),
    deep_cache_branches: Sequence[int] = (0,),
    plain_steps: Sequence[int] = (),
    dpm_steps: Sequence[int] = (),
    tome_ratios: Sequence[float] = (),
    tome_max_downsample: int = 1,
    tgate_gate_steps: Sequence[int] = (),
) -> list[SamplingConfig]:
    """Configurations of a sweep: ``full`` for stride 1, ``FD-s`` (uniform key steps) for s > 1,
    ``FD-50ls`` (Faster Diffusion's non-uniform preset), ``DPM++-k``: plain DPM-Solver++ at
    ``k`` steps, the reference line of the original paper (disabled by ``k = 0``), and
    ``DPM++-FD-s``: DPM-Solver++ at ``k`` steps with encoder caching at uniform stride ``s``
    (exp-2's "FCR + DPM-Solver" combination); ``DeepCache-N-bB``: DeepCache with the full UNet every
    ``N`` steps (uniform) and skip branch ``B``, for every interval x branch. The fewer-steps peers
    of a quality-vs-cost frontier: ``DDIM-N`` (the sweep's scheduler, plain, at each of
    ``plain_steps`` < ``num_inference_steps``; named after the scheduler) and plain ``DPM++-k`` at each
    of ``dpm_steps`` besides the reference line; ``ToMe-P-dD``: full sampling with Token Merging at
    ratio ``P / 100`` for each of ``tome_ratios``, in the blocks downsampled at most ``D`` times;
    ``TGATE-gG``: full sampling with T-GATE from gate step ``G`` for each of ``tgate_gate_steps``."""
    if dpm_reference_steps < 0:
        raise ValueError(f"dpm_reference_steps must be >= 0 (0 disables it); got {dpm_reference_steps}")
    if dpm_strides and dpm_reference_steps == 0:
        raise ValueError("dpm_strides needs dpm_reference_steps > 0 (the DPM-Solver++ step count)")
    n = int(num_inference_steps)
    configs: list[SamplingConfig] = []
    for s in dict.fromkeys(int(s) for s in strides):  # unique, order kept
        if s < 1:
            raise ValueError(f"strides must be >= 1; got {s}")
        if s == 1:
            configs.append(SamplingConfig("full", scheduler, n, None, stride=1))
        else:
            configs.append(SamplingConfig(f"FD-{s}", scheduler, n, tuple(key_steps(n, "uniform", s)), stride=s))
    if include_50ls:
        configs.append(SamplingConfig("FD-50ls", scheduler, n, tuple(key_steps(n, "50ls"))))
    for steps in dict.fromkeys(int(k) for k in plain_steps):
        if not 1 <= steps < n:
            raise ValueError(f"plain_steps must lie in [1, num_inference_steps={n}); got {steps}")
        configs.append(SamplingConfig(f"{scheduler.upper()}-{steps}", scheduler, steps, None))
    plain_dpm = ([int(dpm_reference_steps)] if dpm_reference_steps > 0 else []) + [int(k) for k in dpm_steps]
    for steps in dict.fromkeys(plain_dpm):
        if steps < 1:
            raise ValueError(f"dpm_steps must be >= 1; got {steps}")
        configs.append(SamplingConfig(f"DPM++-{steps}", "dpmsolver++", steps, None))
    k = int(dpm_reference_steps)
    for s in dict.fromkeys(int(s) for s in dpm_strides):
        if not 1 < s <= k:
            raise ValueError(f"dpm_strides must lie in (1, dpm_reference_steps={k}]; got {s}")
        configs.append(SamplingConfig(f"DPM++-FD-{s}", "dpmsolver++", k, tuple(key_steps(k, "uniform", s)), stride=s))
    for interval in dict.fromkeys(int(i) for i in deep_cache_intervals):
        if not 1 < interval < n:
            raise ValueError(f"deep_cache_intervals must lie in (1, num_inference_steps={n}); got {interval}")
        for branch in dict.fromkeys(int(b) for b in deep_cache_branches):
            configs.append(SamplingConfig(f"DeepCache-{interval}-b{branch}", scheduler, n,
                                          tuple(key_steps(n, "uniform", interval)), deep_branch=branch))
    for ratio in dict.fromkeys(float(r) for r in tome_ratios):
        if not 0 < ratio <= 0.75:
            raise ValueError(f"tome_ratios must lie in (0, 0.75]; got {ratio}")
        configs.append(SamplingConfig(f"ToMe-{round(100 * ratio)}-d{tome_max_downsample}", scheduler, n, None,
                                      token_merge=ratio, token_merge_downsample=int(tome_max_downsample)))
    for gate in dict.fromkeys(int(g) for g in tgate_gate_steps):
        if not 1 <= gate <= n:
            raise ValueError(f"tgate_gate_steps must lie in [1, num_inference_steps={n}]; got {gate}")
        configs.append(SamplingConfig(f"TGATE-g{gate}", scheduler, n, None, tgate_gate=gate))
    return configs


def configurations_of(sampling: SamplingOptions, sweep: SweepOptions) -> list[SamplingConfig]:
    """:func:`sweep_configurations` of a run's sampling and sweep options, then the searched schedules
    of ``searched_schedules`` (:func:`searched_configurations`)."""
    configs = sweep_configurations(
        sweep.strides, sampling.num_inference_steps, sampling.scheduler, sweep.include_50ls,
        sweep.dpm_reference_steps, sweep.dpm_strides, sweep.deep_cache_intervals,
        sweep.deep_cache_branches, sweep.plain_steps, sweep.dpm_steps, sweep.tome_ratios, sweep.tome_max_downsample,
        sweep.tgate_gate_steps,
    )
    if sweep.searched_schedules:  # a uniform schedule the search chose may be one of the sweep's already
        names = {c.name for c in configs}
        configs += [c for c in searched_configurations(sweep.searched_schedules, sampling.num_inference_steps)
                    if c.name not in names]
    return configs


def searched_configurations(path: str, num_inference_steps: int) -> list[SamplingConfig]:
    """The budgeted schedules a search chose (``chosen`` of its schedules.json,
    :mod:`fcr.experiments.cache_schedules`): DDIM with explicit key steps, DeepCache at a branch or
    encoder reuse. A file searched for another step count raises ValueError."""
    import json
    from pathlib import Path

    chosen = json.loads(Path(path).read_text())["chosen"]
    out: dict[str, SamplingConfig] = {}
    for record in chosen:
        if record["num_inference_steps"] != num_inference_steps:
            raise ValueError(f"{path}: searched for {record['num_inference_steps']} steps, the sweep samples "
                             f"{num_inference_steps}")
        out.setdefault(record["name"], SamplingConfig(record["name"], "ddim", num_inference_steps,
                                                      tuple(record["key_steps"]), None, record["deep_branch"]))
    return list(out.values())


def student_configurations(distillation: Mapping[str, Any], sweep: SweepOptions) -> list[SamplingConfig]:
    """The configurations of a distilled student (``distillation``: its record,
    :data:`fcr.contract.DISTILLATION_FILE`): a progressive round's ``PD-N`` (its own N-step sampler), a
    consistency student's ``CD-N`` for each of its sampling step counts (LCM's sampler), unguided (the
    guidance is folded in); ``<sampler>-FD-s``: encoder caching at uniform stride ``s`` within it, for
    each sweep stride with ``1 < s < N``; ``<sampler>-DeepCache-i-bB``: DeepCache within it, for each
    sweep interval ``1 < i < N`` x branch (FCR + distillation: a student trained with the FCR term)."""
    method = distillation.get("method")
    base = int(distillation["base_steps"])
    guidance = float(distillation.get("sampling_guidance_scale", 1.0))
    if method == "progressive":
        samplers = [("PD", "ddim", int(distillation["steps"]), int(distillation["stride"]))]
    elif method == "consistency":
        samplers = [("CD", "lcm", int(n), None) for n in distillation["sampling_steps"]]
    else:
        raise ValueError(f"unknown distillation method {method!r}")
    configs = []
    for prefix, scheduler, n, stride in samplers:
        student = dict(guidance_scale=guidance, grid_base_steps=base, grid_stride=stride)
        configs.append(SamplingConfig(f"{prefix}-{n}", scheduler, n, None, **student))
        for s in dict.fromkeys(int(s) for s in sweep.strides):
            if 1 < s < n:
                configs.append(SamplingConfig(f"{prefix}-{n}-FD-{s}", scheduler, n, tuple(key_steps(n, "uniform", s)),
                                              **student))
        for interval in dict.fromkeys(int(i) for i in sweep.deep_cache_intervals):
            if 1 < interval < n:
                for branch in dict.fromkeys(int(b) for b in sweep.deep_cache_branches):
                    configs.append(SamplingConfig(f"{prefix}-{n}-DeepCache-{interval}-b{branch}", scheduler, n,
                                                  tuple(key_steps(n, "uniform", interval)), deep_branch=branch,
                                                  **student))
    return configs


def configs_for_model(configs: Sequence[SamplingConfig], index: int, all_models: bool,
                      student: Sequence[SamplingConfig] | None = None) -> list[SamplingConfig]:
    """The configurations model number ``index`` of a sweep runs: every one for the first model
    (the original), and for the others all but the reference lines (``FD-50ls``, the plain
    samplers at other step counts, ``DDIM-N`` and ``DPM++-k``, ``ToMe-P-dD`` and ``TGATE-gG``) unless ``all_models``;
    they only place the original model's curve and cost CPU time. A distilled student runs its own
    configurations ``student`` (:func:`student_configurations`) instead."""
    if student is not None:
        return list(student)
    if index == 0 or all_models:
        return list(configs)
    return [c for c in configs if not (c.name == "FD-50ls" or (c.key_steps is None and c.name != "full"))]
