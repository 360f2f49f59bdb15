"""Encoder-feature variance across timestep gaps: ``σ²_Δ = E ‖Enc(x_t) − Enc(x_{t−Δ})‖²`` with
``x_t`` and ``x_{t−Δ}`` made from the SAME clean image ``x_0`` and the SAME noise ``ε`` (FCR's
shared-noise pairs), the image's true caption as conditioning, and the distance
:func:`fcr.core.loss.feature_distance` over a feature group of :func:`fcr.core.unet.feature_group_indices`:
exactly the quantity the FCR term penalises, raw and normalised (scale-invariant). Δ is counted in
training timesteps (``units='train'``) or in sampling steps (``units='sampling'``: entries ``i`` and
``i+Δ`` of the sampling scheduler's grid, what a cache suffers when features of step ``i`` are reused
``Δ`` steps later). Every model sees identical ``(x_0, ε, u)`` draws, so models are compared image
by image. The regression on quality drops is :mod:`fcr.experiments.mechanistic`."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fcr.core import unet as fcr_unet
from fcr.core.loss import per_sample_feature_distance
from fcr.core.unet import FEATURE_GROUPS
from fcr.options import Options

__all__ = [
    "UNITS",
    "VARIANTS",
    "ModelVariance",
    "VarianceDraws",
    "VarianceInputs",
    "gap_timesteps",
    "load_variance_inputs",
    "measure_feature_variance",
    "per_sample_feature_distance",
    "run_variance",
    "sampling_grid",
    "variance_draws",
]

UNITS: tuple[str, ...] = ("train", "sampling")
# Distance variants: "abs" = raw feature_distance, "norm" = its scale-invariant form.
VARIANTS: tuple[str, ...] = ("abs", "norm")


# ----------------------------------------------------------------------------- inputs and draws


@dataclass
class VarianceInputs:
    """Clean images ``x0`` (N, C, H, W) in [-1, 1], their captions' text states (N, L, D), and
    where they come from (indices into the split, labels)."""

    x0: torch.Tensor
    states: torch.Tensor
    indices: np.ndarray
    labels: np.ndarray
    split: str = "val"

    def digest(self) -> str:
        """Short hash of the images and states (which inputs made a result)."""
        h = hashlib.sha256()
        h.update(self.x0.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(self.states.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def load_variance_inputs(data_dir: str | Path, n: int, seed: int, style: str = "none") -> VarianceInputs:
    """``n`` held-out images of the embedded validation split (carved from the official train set,
    never trained on), a seeded subset, with their true captions in training templates."""
    from fcr.backends.embedded.model import load_split

    examples, labels = load_split(data_dir, "val", style=style)
    if n > len(examples):
        raise ValueError(f"num_variance_images={n} exceeds the {len(examples)} validation images")
    idx = np.sort(np.random.default_rng([seed, 5]).choice(len(examples), size=n, replace=False))
    t_idx = torch.from_numpy(idx)
    states = examples.prompt_states[examples.prompt_ids[t_idx]]
    return VarianceInputs(examples.images[t_idx].float(), states.float(), idx, labels[idx], "val")


@dataclass
class VarianceDraws:
    """Per image ``i``: noise ``ε_i`` (shape of the image) and ``u_i`` in [0, 1), which places the
    anchor timestep in its valid range for every Δ. Image ``i``'s draws depend on ``(seed, i)``
    only, so every model (and any batch size) sees the same ones."""

    noise: torch.Tensor
    u: np.ndarray
    seed: int


def variance_draws(n: int, shape: Sequence[int], seed: int) -> VarianceDraws:
    """Seeded draws for ``n`` images of ``shape`` (C, H, W)."""
    noise, u = [], []
    for i in range(n):
        s_noise, s_u = np.random.SeedSequence([seed, i, 11]).generate_state(2)
        noise.append(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s_noise))))
        u.append(np.random.default_rng(int(s_u)).random())
    return VarianceDraws(torch.stack(noise), np.asarray(u, dtype=np.float64), seed)


def sampling_grid(noise_scheduler: Any, scheduler_name: str, num_inference_steps: int) -> torch.Tensor:
    """The sampling scheduler's timesteps (int64, noisiest first), as :func:`fcr.core.sampler.sample`
    steps through them."""
    from fcr.backends.generate import sampling_scheduler

    sched = sampling_scheduler(scheduler_name, noise_scheduler)
    sched.set_timesteps(num_inference_steps)
    ts = sched.timesteps.detach().cpu()
    if not torch.equal(ts, ts.round()):
        raise ValueError(f"{scheduler_name} at {num_inference_steps} steps has non-integer timesteps {ts.tolist()}")
    return ts.round().long()


def gap_timesteps(
    units: str,
    delta: int,
    u: np.ndarray,
    num_train_timesteps: int,
    grid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, t_prev)`` (int64, one per ``u``) with ``t_prev`` the less noisy end of a gap of ``delta``.

    ``train``: ``t = Δ + floor(u (T − Δ))`` (uniform on ``{Δ..T−1}``), ``t_prev = t − Δ``.
    ``sampling``: on ``grid`` (length n, noisiest first) the anchor index is
    ``i = n − 1 − Δ − floor(u (n − Δ))`` (uniform on ``{0..n−1−Δ}``; small ``u`` = low noise, as in
    train units), ``t = grid[i]``, ``t_prev = grid[i + Δ]``. ``delta = 0`` gives ``t_prev = t``.
    """
    u = np.asarray(u, dtype=np.float64)
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if units == "train":
        n = num_train_timesteps - delta
        if n < 1:
            raise ValueError(f"delta={delta} training timesteps must be < num_train_timesteps={num_train_timesteps}")
        t = delta + np.minimum(np.floor(u * n).astype(np.int64), n - 1)
        return torch.from_numpy(t), torch.from_numpy(t - delta)
    if units == "sampling":
        if grid is None:
            raise ValueError("sampling units need the sampling grid")
        n = len(grid) - delta
        if n < 1:
            raise ValueError(f"delta={delta} sampling steps must be < num_inference_steps={len(grid)}")
        i = (len(grid) - 1 - delta) - np.minimum(np.floor(u * n).astype(np.int64), n - 1)
        i = torch.from_numpy(i)
        return grid[i].long(), grid[i + delta].long()
    raise ValueError(f"units must be one of {list(UNITS)}, got {units!r}")


# ----------------------------------------------------------------------------- measurement


@torch.no_grad()
def measure_feature_variance(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    inputs: VarianceInputs,
    draws: VarianceDraws,
    *,
    deltas: Mapping[str, Sequence[int]],
    grid: torch.Tensor | None = None,
    groups: Sequence[str] = FEATURE_GROUPS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[tuple[str, int, str, str], np.ndarray]:
    """Per-image distances ``{(units, delta, group, variant): (N,) float64}`` for ``deltas``
    (``{"train": [...], "sampling": [...]}``; sampling units need ``grid``, see
    :func:`sampling_grid`). ``x_t = add_noise(x0, ε, t)``, ``x_{t−Δ} = add_noise(x0, ε, t−Δ)``;
    also returns the timesteps under ``(units, delta, "t", "")`` and ``(units, delta, "t_prev", "")``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    unet = unet.to(device).eval()
    dtype = next(unet.parameters()).dtype
    num_train = int(noise_scheduler.config.num_train_timesteps)
    index = {g: fcr_unet.feature_group_indices(unet, g) for g in groups}
    n = inputs.x0.shape[0]
    if draws.noise.shape != inputs.x0.shape:
        raise ValueError(f"noise draws {tuple(draws.noise.shape)} do not match the images {tuple(inputs.x0.shape)}")
    jobs = [(units, int(d)) for units in UNITS for d in deltas.get(units, ())]
    out: dict[tuple[str, int, str, str], np.ndarray] = {}
    for units, delta in tqdm(jobs, disable=not progress, desc="feature variance"):
        t, t_prev = gap_timesteps(units, delta, draws.u, num_train, grid)
        out[(units, delta, "t", "")] = t.numpy().astype(np.float64)
        out[(units, delta, "t_prev", "")] = t_prev.numpy().astype(np.float64)
        parts: dict[tuple[str, str], list[torch.Tensor]] = {(g, v): [] for g in groups for v in VARIANTS}
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            x0 = inputs.x0[sl].to(device, dtype)
            eps = draws.noise[sl].to(device, dtype)
            states = inputs.states[sl].to(device, dtype)
            tb, pb = t[sl].to(device), t_prev[sl].to(device)
            feats_t = fcr_unet.encode(unet, noise_scheduler.add_noise(x0, eps, tb), tb, states)
            feats_p = fcr_unet.encode(unet, noise_scheduler.add_noise(x0, eps, pb), pb, states)
            for g in groups:
                for v in VARIANTS:
                    parts[(g, v)].append(per_sample_feature_distance(feats_t, feats_p, index[g], v == "norm").cpu())
        for (g, v), chunks in parts.items():
            out[(units, delta, g, v)] = torch.cat(chunks).double().numpy()
    return out


# ----------------------------------------------------------------------------- per-model results


@dataclass
class ModelVariance:
    """One model's per-image distances and where the model comes from.

    ``original_model``: the model a fine-tuned run folder was fine-tuned from ('' otherwise);
    ``original_label``: the label of that model among the measured ones ('' if not measured).
    """

    label: str
    source: str
    values: dict[tuple[str, int, str, str], np.ndarray]
    original_model: str = ""
    original_label: str = ""
    lambda_fcr: float = math.nan
    style: str = "none"
    result: dict[str, Any] = field(default_factory=dict)


def _key_name(key: tuple[str, int, str, str]) -> str:
    return "/".join(str(k) for k in key)


def _parse_key(name: str) -> tuple[str, int, str, str]:
    units, delta, group, variant = name.split("/")
    return units, int(delta), group, variant


def _save_values(values: Mapping[tuple[str, int, str, str], np.ndarray], path: Path, meta: Mapping[str, str]) -> None:
    from fcr.eval.results import save_safetensors_atomic

    save_safetensors_atomic({_key_name(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in values.items()},
                             path, dict(meta))


def _load_values(path: Path) -> dict[tuple[str, int, str, str], np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing but its result file exists: delete the .json next to it to recompute"
        )
    return {_parse_key(k): v.numpy() for k, v in load_file(str(path)).items()}


def _summary(values: Mapping[tuple[str, int, str, str], np.ndarray]) -> dict[str, float]:
    # Mean per (units, delta, group, variant), stored in the JSON result for a quick look.
    return {_key_name(k): float(np.mean(v)) for k, v in values.items() if k[2] not in ("t", "t_prev")}


def _match_original(original: str, unet_dirs: Mapping[str, Path], sources: Mapping[str, str]) -> str:
    """Label of the measured model that ``original`` names (by label, source or resolved folder)."""
    from fcr.backends.models import ModelNotFoundError, resolve_unet_dir

    if not original:
        return ""
    for label, source in sources.items():
        if original in (label, source):
            return label
    try:
        folder = resolve_unet_dir(original)
    except ModelNotFoundError:
        return ""
    return next((label for label, d in unet_dirs.items() if Path(d).resolve() == folder), "")


def load_sd_variance_inputs(opts: Options, components: Any, batch_size: int = 8) -> VarianceInputs:
    """SD's held-out inputs: ``num_variance_images`` items (seeded by ``seed``) of the ``train_data``
    items the fine-tune left out (:func:`fcr.backends.sd.params.sd_heldout_items`), as VAE latents
    at ``resolution`` (posterior sample from a generator seeded by ``seed``, no flip) with the CLIP
    states of their captions, exactly as SD's training examples are made."""
    from fcr.backends.sd.model import SDTrainData
    from fcr.backends.sd.params import sd_heldout_items

    items = sd_heldout_items(opts)
    n = opts.mechanistic.num_variance_images
    if n > len(items):
        raise ValueError(f"num_variance_images={n} exceeds the {len(items)} held-out train_data items")
    idx = np.sort(np.random.default_rng([opts.run.seed, 5]).choice(len(items), size=n, replace=False))
    data = SDTrainData([items[int(i)] for i in idx], components.vae, components.tokenizer, components.text_encoder,
                       opts.backbone.resolution, random_flip=False)
    generator = torch.Generator().manual_seed(int(opts.run.seed))
    latents, states = [], []
    for start in range(0, n, batch_size):
        batch = torch.arange(start, min(start + batch_size, n))
        x0, c = data.batch(batch, torch.zeros(len(batch), dtype=torch.bool), generator)
        latents.append(x0.cpu())
        states.append(c.cpu())
    return VarianceInputs(torch.cat(latents), torch.cat(states), idx, np.full(n, -1), "train_data held out")


@dataclass
class _Measured:
    """A model to measure: its loaded form and where its inputs and origin come from."""

    loaded: Any  # fcr.eval.context.LoadedModel
    original: str
    lambda_fcr: float
    style: str
    inputs_key: str  # models with the same key share the inputs (embedded: image style; SD: VAE)


def _targets(opts: Options, models: Mapping[str, str], device: torch.device) -> list[_Measured]:
    """Every model loaded once (fcr.eval.context.load_models), with its original model (a fine-tuned
    run folder's base; none for shipped embedded names and scratch runs) and image style."""
    from fcr.backends.models import EMBEDDED_MODELS, model_training_params, resolve_unet_dir
    from fcr.eval.context import load_models

    out = []
    for label, loaded in load_models(opts, models, device).items():
        lam = loaded.meta["lambda_fcr"]
        original = str(loaded.meta["original_model"] or "")
        if opts.run.setting == "sd":
            out.append(_Measured(loaded, original, float(lam) if lam is not None else math.nan, "none",
                                 original or loaded.source))
            continue
        trained = model_training_params(resolve_unet_dir(loaded.source)) or {}
        style = str(trained.get("train_style", "none"))
        original = "" if loaded.source in EMBEDDED_MODELS or original == "scratch" else original
        out.append(_Measured(loaded, original, float(trained.get("lambda_fcr", math.nan)), style, style))
    return out


def run_variance(
    opts: Options,
    models: Mapping[str, str],
    out_dir: str | Path,
    *,
    inputs: VarianceInputs | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[ModelVariance]:
    """Measure (or load) the feature variance of every model in ``models`` (label -> embedded name,
    SD checkpoint or run folder) for validated ``opts``; results under ``out_dir/variance`` (JSON
    via :func:`fcr.eval.results.run_or_load` plus per-image safetensors). The inputs are held-out
    images never trained on: the embedded validation split (:func:`load_variance_inputs`), or SD's
    ``train_data`` items outside the fine-tune's subset (:func:`load_sd_variance_inputs`), shared by
    every model with the same VAE. ``inputs`` replaces them (tests only)."""

    from fcr.backends.models import ModelNotFoundError, resolve_device, resolve_unet_dir
    from fcr.eval.profiling import environment_info
    from fcr.eval.results import run_or_load

    out_dir = Path(out_dir)
    device = resolve_device(opts.run.device)
    deltas = {"train": list(range(1, opts.mechanistic.variance_delta_max + 1)),
              "sampling": list(range(1, opts.mechanistic.variance_max_stride + 1))}
    if opts.mechanistic.variance_max_stride >= opts.sampling.num_inference_steps:
        raise ValueError(
            f"parameter 'variance_max_stride': must be < num_inference_steps={opts.sampling.num_inference_steps}"
        )
    targets = _targets(opts, models, device)
    cached_inputs: dict[str, VarianceInputs] = {}
    results = []
    for t in targets:
        m = t.loaded
        if t.inputs_key not in cached_inputs:
            if inputs is not None:
                cached_inputs[t.inputs_key] = inputs
            elif opts.run.setting == "sd":
                cached_inputs[t.inputs_key] = load_sd_variance_inputs(opts, m.model)
            else:
                cached_inputs[t.inputs_key] = load_variance_inputs(opts.data.data_dir, opts.mechanistic.num_variance_images,
                                                                   opts.run.seed, t.style)
        inp = cached_inputs[t.inputs_key]
        if opts.mechanistic.variance_delta_max >= m.model.noise_scheduler.config.num_train_timesteps:
            raise ValueError("parameter 'variance_delta_max': must be < the model's num_train_timesteps")
        schedule = m.schedule or {k: m.model.noise_scheduler.config[k]
                                  for k in ("num_train_timesteps", "beta_schedule", "prediction_type")}
        key = {
            "setting": opts.run.setting, "model": m.label, "model_source": m.source, "weights": m.weights,
            **schedule, "split": inp.split, "inputs": inp.digest(), "num_variance_images": int(inp.x0.shape[0]),
            "prompt_templates": "train", "train_style": t.style, "seed": opts.run.seed, "shared_noise": True,
            "deltas_train": deltas["train"], "deltas_sampling": deltas["sampling"], "scheduler": opts.sampling.scheduler,
            "num_inference_steps": opts.sampling.num_inference_steps, "feature_groups": list(FEATURE_GROUPS),
            "distance": "fcr.core.loss.feature_distance",
        }
        side = out_dir / "variance" / f"{m.label.replace('/', '_')}.safetensors"

        def compute(m=m, inp=inp, side=side):
            noise_scheduler = m.model.noise_scheduler
            draws = variance_draws(inp.x0.shape[0], inp.x0.shape[1:], opts.run.seed)
            grid = sampling_grid(noise_scheduler, opts.sampling.scheduler, opts.sampling.num_inference_steps)
            values = measure_feature_variance(m.model.unet, noise_scheduler, inp, draws, deltas=deltas, grid=grid,
                                              batch_size=batch_size, device=device, progress=progress)
            _save_values(values, side, {"model": m.label, "seed": str(opts.run.seed)})
            return {"mean": _summary(values), "grid": grid.tolist(), "side_file": side.name}

        result, computed = run_or_load(out_dir / "variance" / f"{m.label.replace('/', '_')}.json", key, compute,
                                       environment_info(device))
        if progress:
            print(f"variance {m.label}: {'computed' if computed else 'loaded'}", flush=True)
        results.append(ModelVariance(
            label=m.label, source=m.source, values=_load_values(side), original_model=t.original,
            lambda_fcr=t.lambda_fcr, style=t.style, result=result,
        ))
    sources = {m.label: m.source for m in results}
    unet_dirs = {}
    for t in targets:
        with contextlib.suppress(ModelNotFoundError):
            unet_dirs[t.loaded.label] = resolve_unet_dir(t.loaded.source)
    for m in results:
        m.original_label = _match_original(m.original_model, unet_dirs, sources) if m.original_model else ""
        if m.original_label == m.label:
            m.original_label = ""
    return results
