"""Cache-aware fine-tuning: train a model so that its *cached* sampling (DeepCache-N-bB or FD-N)
reproduces the frozen original's *full* sampling. Needs prompts and noise only, no images.

Each micro-batch the student samples ``rollouts`` cached trajectories from fresh noise (no gradient;
:func:`fcr.core.sampler.sample`, the evaluation's own sampler), so training sees the latents its
cached sampler actually reaches (on-policy, as HarmoniCa and Learning-to-Cache train). Losses:

- ``step``: at a random step ``j`` of a trajectory (window of key step ``k``), the student's guided
  cached prediction (deep state or encoder features from ``z_k``, with gradient through the key
  pass too, then the shallow path or the decoder at ``j``) against the frozen original's guided full
  prediction at the same latent ``z_j``; squared error of the implied noise.
- ``step_weighted``: the same error measured where the DDIM step lands, in the final image's scale
  (``z / sqrt(alpha_bar)``): a noise error ``d`` moves it by ``(s_next - s_j) d`` with
  ``s = sqrt((1 - alpha_bar) / alpha_bar)``, carried unchanged to the end to first order (so a step
  weighs by its effect on the final image). Weights are normalised to mean 1 over the steps.
- ``trajectory``: from the key step of a random window, the student's cached sampler runs
  ``horizon`` windows (0: to the end) with gradient (each network call checkpointed) and the original's
  full sampler the same steps from the same latent; squared error of the landing latents in the
  final image's scale (``step_weighted`` is its first-order, one-step version).

Trainable parts (:func:`trainable_parameters`): everything, the layers a cached step recomputes
(``uncached``: DeepCache's shallow path, FD's decoder), LoRA adapters (peft, merged at the end), or
Block Caching's scale-shift of the reused tensors (``scale_shift``, :mod:`fcr.core.scale_shift`; the
UNet frozen, the correction saved beside its weights). Sampling cost is untouched: the trained model
runs the same cached sampler, same passes, same FLOPs (the scale-shift adds elementwise work only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch.utils.checkpoint import checkpoint

from fcr.contract import CACHE_TRAINING_FILE
from fcr.core import unet as fcr_unet
from fcr.core.grid_ddim import landing_scales, predicted_x0_eps
from fcr.core.loss import FCRConfig
from fcr.core.sampler import PriorNoise, apply_guidance, key_steps, sample
from fcr.core.scale_shift import SCALE_SHIFT_FILE, CacheScaleShift
from fcr.train.teacher import TeacherStudent

__all__ = ["CACHE_LOSSES", "SCALE_SHIFT_ATTR", "CacheAwareObjective", "CacheTarget", "cache_objective", "cache_target", "finish_cache_training",
           "scale_shift_of", "trainable_parameters", "training_flops_per_example", "uncached_parameter_names"]

CACHE_LOSSES = ("step", "step_weighted", "trajectory")


@dataclass(frozen=True)
class CacheTarget:
    """The cached sampler a model is trained for: DDIM with ``num_inference_steps``, a key step every
    ``interval`` steps, DeepCache at ``deep_branch`` (None: Faster Diffusion's encoder caching),
    classifier-free guidance at ``guidance_scale``, prior noise (encoder caching only, as evaluated)."""

    num_inference_steps: int
    interval: int
    deep_branch: int | None
    guidance_scale: float
    prior_noise: PriorNoise = field(default_factory=PriorNoise)

    @property
    def key_steps(self) -> list[int]:
        return key_steps(self.num_inference_steps, "uniform", self.interval)

    @property
    def name(self) -> str:
        """The sampling configuration's name in result tables."""
        if self.deep_branch is None:
            return f"FD-{self.interval}"
        return f"DeepCache-{self.interval}-b{self.deep_branch}"

    def key_of(self, step: torch.Tensor) -> torch.Tensor:
        """The key step whose cache step ``step`` reads (uniform schedule)."""
        return torch.div(step, self.interval, rounding_mode="floor") * self.interval

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["prior_noise"] = asdict(self.prior_noise)
        return {**out, "configuration": self.name}


# Where a scale_shift fine-tune keeps its correction during training: a submodule of the student, so
# the training loop's optimizer, checkpoints and resume carry it with no change.
SCALE_SHIFT_ATTR = "cache_scale_shift"


def scale_shift_of(unet: Any) -> CacheScaleShift | None:
    """The correction a ``scale_shift`` fine-tune trains (None for the other trainable parts)."""
    return getattr(unet, SCALE_SHIFT_ATTR, None)


def _cached_prediction(unet: Any, target: CacheTarget, z_key: torch.Tensor, t_key: torch.Tensor, z: torch.Tensor,
                       t: torch.Tensor, context: torch.Tensor, branch: Any, step: torch.Tensor | None = None,
                       cached: torch.Tensor | None = None) -> torch.Tensor:
    """The cached sampler's network output at ``(z, t)`` with the cache filled at ``(z_key, t_key)``
    (per-sample timesteps; ``t == t_key`` gives the full pass). Encoder caching never reads ``z``.
    ``step``/``cached``: per-sample step index and whether it reads the cache, for the scale-shift."""
    correction = scale_shift_of(unet)
    if target.deep_branch is None:
        features = fcr_unet.encode(unet, z_key, t_key, context)
        if correction is not None:
            features = correction.correct_features(features, step, cached)
        return fcr_unet.decode(unet, features, t, context)
    deep = fcr_unet.deep_hidden(unet, z_key, t_key, context, branch)
    if correction is not None:
        deep = correction.correct_deep(deep, step, cached)
    return fcr_unet.shallow_forward(unet, z, t, context, deep, branch)


def uncached_parameter_names(unet: Any, target: CacheTarget) -> set[str]:
    """Names of the parameters a cached (non-key) step computes with: found by a backward pass of one
    cached step on a tiny input with the cache detached (DeepCache: the shallow path; FD: the decoder)."""
    z, ctx = fcr_unet.probe_inputs(unet)
    t_key, t = torch.tensor([500], device=z.device), torch.tensor([480], device=z.device)
    with torch.no_grad():
        if target.deep_branch is None:
            cache = fcr_unet.encode(unet, z, t_key, ctx)
        else:
            branch = fcr_unet.deep_branch(unet, target.deep_branch)
            cache = fcr_unet.deep_hidden(unet, z, t_key, ctx, branch)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(True)
    try:
        if target.deep_branch is None:
            out = fcr_unet.decode(unet, cache, t, ctx)
        else:
            out = fcr_unet.shallow_forward(unet, z, t, ctx, cache, branch)
        grads = torch.autograd.grad(out.sum(), [p for _, p in unet.named_parameters()], allow_unused=True)
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
    return {name for (name, _), g in zip(unet.named_parameters(), grads) if g is not None}


def trainable_parameters(unet: Any, target: CacheTarget, trainable: str, lora_rank: int = 8) -> int:
    """Set which of ``unet``'s weights train: ``all``, ``uncached`` (:func:`uncached_parameter_names`)
    ``lora`` (rank ``lora_rank`` adapters, :func:`fcr.train.consistency.add_lora`) or ``scale_shift``
    (a :class:`CacheScaleShift` attached as ``unet.cache_scale_shift``, the UNet frozen). Returns how
    many parameters train."""
    if trainable == "all":
        unet.requires_grad_(True)
    elif trainable == "uncached":
        names = uncached_parameter_names(unet, target)
        for name, p in unet.named_parameters():
            p.requires_grad_(name in names)
    elif trainable == "lora":
        from fcr.train.consistency import add_lora

        add_lora(unet, lora_rank)
    elif trainable == "scale_shift":
        unet.requires_grad_(False)
        if scale_shift_of(unet) is None:
            unet.add_module(SCALE_SHIFT_ATTR, CacheScaleShift.for_unet(unet, target.name, target.num_inference_steps,
                                                                       target.deep_branch))
        scale_shift_of(unet).requires_grad_(True)
    else:
        raise ValueError(f"unknown trainable part {trainable!r}; allowed: all, uncached, lora, scale_shift")
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


class CacheAwareObjective(TeacherStudent):
    """The loss of cache-aware fine-tuning inside ``forward`` (for :func:`fcr.train.loop.train`):
    ``.unet`` is the student, ``teacher`` the frozen original; ``scheduler``: the DDIM sampler of the
    evaluation; ``uncond_states``: the empty prompt's text states (one row)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, scheduler: Any, target: CacheTarget,
                 uncond_states: torch.Tensor, *, loss: str = "step", horizon: int = 1, rollouts: int = 8) -> None:
        super().__init__(student, teacher, uncond_states, FCRConfig(lambda_fcr=0.0))
        if loss not in CACHE_LOSSES:
            raise ValueError(f"unknown cache loss {loss!r}; allowed: {list(CACHE_LOSSES)}")
        if target.interval >= target.num_inference_steps:
            raise ValueError(f"cache interval {target.interval} must be < num_inference_steps {target.num_inference_steps}")
        if horizon < 0 or rollouts < 1:
            raise ValueError(f"horizon must be >= 0 and rollouts >= 1; got {horizon}, {rollouts}")
        self.scheduler, self.target, self.loss, self.horizon, self.rollouts = scheduler, target, loss, horizon, rollouts
        self.branch = None if target.deep_branch is None else fcr_unet.deep_branch(student, target.deep_branch)
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(f"cache-aware fine-tuning trains for DDIM sampling; got {type(scheduler).__name__}")
        self.prediction_type = scheduler.config.prediction_type
        if getattr(scheduler.config, "thresholding", False):
            raise ValueError("cache-aware fine-tuning follows DDIM without dynamic thresholding")
        a_t, a_next, weight = landing_scales(scheduler, target.num_inference_steps)
        self.register_buffer("timesteps", scheduler.timesteps.long().clone(), persistent=False)
        self.register_buffer("alpha_t", a_t, persistent=False)
        self.register_buffer("alpha_next", a_next, persistent=False)
        self.register_buffer("step_weight", weight, persistent=False)

    # ------------------------------------------------------------------ rollouts
    def rollout(self, noise: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The student's cached trajectories from ``noise``: ``[steps + 1, batch, ...]`` latents, the
        one each step starts from, then the result (no gradient)."""
        path: list[torch.Tensor] = []
        t = self.target
        sample(self.unet, self.scheduler, noise, states, uncond_hidden_states=self.uncond_states.to(states.dtype),
               guidance_scale=t.guidance_scale, num_inference_steps=t.num_inference_steps, key_steps=t.key_steps,
               parallel=False, prior_noise=t.prior_noise, deep_cache_branch=t.deep_branch,
               cache_correction=scale_shift_of(self.unet), on_latents=lambda i, z: path.append(z.detach()))
        return torch.stack(path)

    def student_cached(self, z_key: torch.Tensor, t_key: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                       states: torch.Tensor, step: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """The student's guided cached prediction (with gradient); ``step``: each sample's step
        index, ``cached``: whether it reads the cache (False at its key step)."""
        g = self.target.guidance_scale
        if g <= 1:
            return _cached_prediction(self.unet, self.target, z_key, t_key, z, t, states, self.branch, step, cached)
        two = lambda x: torch.cat([x, x])  # noqa: E731
        out = _cached_prediction(self.unet, self.target, two(z_key), two(t_key), two(z), two(t),
                                 self.guided_context(states, g), self.branch, two(step), two(cached))
        return apply_guidance(out, g)

    def _eps(self, pred: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return predicted_x0_eps(pred.float(), z.float(), alpha, self.prediction_type)[1]

    # ------------------------------------------------------------------ losses
    def forward(self, x0: torch.Tensor, states: torch.Tensor, generator: torch.Generator):
        n = min(self.rollouts, len(x0))
        noise = torch.randn((n, *x0.shape[1:]), generator=generator).to(x0.device, x0.dtype)
        with torch.no_grad():
            path = self.rollout(noise, states[:n])
        if self.loss == "trajectory":
            loss = self._trajectory_loss(path, states[:n], generator)
        else:
            loss = self._step_loss(path, states, generator, len(x0))
        return loss, loss.detach(), torch.zeros((), device=loss.device)

    def _step_loss(self, path: torch.Tensor, states: torch.Tensor, generator: torch.Generator, batch: int) -> torch.Tensor:
        steps, n = self.target.num_inference_steps, path.shape[1]
        j = torch.randint(0, steps, (batch,), generator=generator)
        b = torch.arange(batch) % n  # every trajectory serves batch / n training points
        k = self.target.key_of(j)
        dev = path.device
        j, k, b = j.to(dev), k.to(dev), b.to(dev)
        z_j, z_k, cond = path[j, b], path[k, b], states[:n][b]
        t_j, t_k = self.timesteps[j], self.timesteps[k]
        with torch.no_grad():
            target = self._eps(self.teacher_output(z_j, t_j, cond, self.target.guidance_scale), z_j, self.alpha_t[j])
        pred = self._eps(self.student_cached(z_k, t_k, z_j, t_j, cond, j, j != k), z_j, self.alpha_t[j])
        per_sample = (pred - target).pow(2).flatten(1).mean(1)
        if self.loss == "step_weighted":
            per_sample = per_sample * self.step_weight[j]
        return per_sample.mean()

    def _ddim_step(self, pred: torch.Tensor, z: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """Diffusers' deterministic DDIM step ``i`` (differentiable: plain tensor arithmetic), after prior
        noise as the sampler adds it."""
        prior, t = self.target.prior_noise, self.timesteps[i]
        if prior.enabled and float(t) / self.scheduler.config.num_train_timesteps < prior.threshold:
            z = z + prior.alpha * noise
        return self.scheduler.step(pred, t, z, eta=0.0, return_dict=False)[0]

    def _trajectory_loss(self, path: torch.Tensor, states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        window = int(torch.randint(0, len(self.target.key_steps), (1,), generator=generator))
        return self.trajectory_loss(path, states, window)

    def trajectory_loss(self, path: torch.Tensor, states: torch.Tensor, window: int) -> torch.Tensor:
        """The ``trajectory`` loss from the key step of window ``window`` of the trajectories ``path``."""
        keys, w = self.target.key_steps, window
        bounds = [*keys, self.target.num_inference_steps]
        stop = bounds[-1] if self.horizon == 0 else bounds[min(w + self.horizon, len(keys))]
        start = keys[w]
        noise = path[0]
        z_student = z_teacher = path[start]
        g, batch = self.target.guidance_scale, len(states)
        for i in range(start, stop):
            t = self.timesteps[i].expand(batch)
            if i in keys:
                z_key, t_key, key = z_student, t, i
            step = torch.full((batch,), i, device=t.device)
            pred = checkpoint(self.student_cached, z_key, t_key, z_student, t, states, step, step != key,
                              use_reentrant=False)
            z_student = self._ddim_step(pred, z_student, i, noise)
            with torch.no_grad():
                z_teacher = self._ddim_step(self.teacher_output(z_teacher, t, states, g), z_teacher, i, noise)
        scale = self.alpha_next[stop - 1].sqrt()
        return ((z_student.float() - z_teacher.float()) / scale).pow(2).flatten(1).mean(1).mean()


# ---------------------------------------------------------------------- from validated options
def cache_target(opts: Any) -> CacheTarget:
    """The cached sampler validated ``opts`` train for (prior noise, at its default strength, for
    encoder caching only, as the evaluation samples it)."""
    c = opts.cache_training
    prior = PriorNoise(enabled=c.cache_prior_noise and c.cache_mode == "encoder")
    branch = c.cache_branch if c.cache_mode == "deepcache" else None
    return CacheTarget(c.cache_steps, c.cache_interval, branch, c.cache_guidance_scale, prior)


def training_flops_per_example(objective: CacheAwareObjective, data: Any, batch_size: int) -> float:
    """Training FLOPs of one optimizer step over ``batch_size`` (``torch.utils.flop_counter``, counted
    once at batch 1 and scaled): the student's rollouts (``rollouts`` per micro-batch), the original's
    target passes and the student's forward and backward; per training example of the batch."""
    from fcr.eval.profiling import count_training_flops

    gen = torch.Generator().manual_seed(0)
    x0, states = data.batch(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool), gen)
    device = next(objective.unet.parameters()).device
    x0, states = x0.to(device), states.to(device)
    rollouts, objective.rollouts = objective.rollouts, 1
    try:
        one = count_training_flops(lambda: objective(x0, states, gen)[0].backward())
        with torch.no_grad():
            rollout = count_training_flops(lambda: objective.rollout(torch.randn_like(x0), states))
    finally:
        objective.rollouts = rollouts
        objective.unet.zero_grad(set_to_none=True)
    n = min(rollouts, batch_size)
    if objective.loss == "trajectory":  # the rollouts are the training points
        return one * n / batch_size
    return (one - rollout) + rollout * n / batch_size


def cache_objective(opts: Any, setup: Any) -> tuple[CacheAwareObjective, dict[str, Any]]:
    """The objective of a cache-aware fine-tune of ``setup.unet`` (trainable parts set) and what
    ``cache_training.json`` records. A branch the UNet does not have fails naming ``cache_branch``."""
    import copy

    from fcr.backends.generate import sampling_scheduler
    from fcr.config import ConfigError

    c = opts.cache_training
    target = cache_target(opts)
    if target.deep_branch is not None:
        try:
            fcr_unet.deep_branch(setup.unet, target.deep_branch)
        except ValueError as err:
            raise ConfigError(f"parameter 'cache_branch': {err}") from err
    teacher = copy.deepcopy(setup.unet).requires_grad_(False).eval()
    n_train = trainable_parameters(setup.unet, target, c.cache_trainable, c.cache_lora_rank)
    objective = CacheAwareObjective(setup.unet, teacher, sampling_scheduler("ddim", setup.noise_scheduler), target,
                                    setup.empty_prompt_states(), loss=c.cache_loss, horizon=c.cache_horizon, rollouts=c.cache_rollouts)
    batch = opts.training.train_batch_size * opts.training.gradient_accumulation_steps
    record = {**target.record(), "loss": c.cache_loss, "horizon": c.cache_horizon, "rollouts": c.cache_rollouts,
              "trainable": c.cache_trainable, "lora_rank": c.cache_lora_rank if c.cache_trainable == "lora" else None,
              "trainable_parameters": n_train, "teacher": opts.backbone.model,
              "train_flops_per_example": training_flops_per_example(objective, setup.data, opts.training.train_batch_size),
              "train_batch_size": batch}
    return objective, record


def finish_cache_training(unet: Any, folder: Path, record: dict[str, Any]) -> None:
    """After training: LoRA adapters folded into ``unet/`` (a plain UNet folder), or the scale-shift
    taken off the UNet (saved again without it) into ``unet/cache_scale_shift.safetensors``; the
    record written."""
    if record["trainable"] == "lora":
        from fcr.train.consistency import merge_lora

        merge_lora(unet).save_pretrained(Path(folder) / "unet", safe_serialization=True)
    elif record["trainable"] == "scale_shift":
        correction = unet._modules.pop(SCALE_SHIFT_ATTR)
        unet.save_pretrained(Path(folder) / "unet", safe_serialization=True)
        correction.save(Path(folder) / "unet" / SCALE_SHIFT_FILE)
    (Path(folder) / CACHE_TRAINING_FILE).write_text(json.dumps(record, indent=2))
