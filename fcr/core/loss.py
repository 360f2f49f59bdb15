"""Feature Consistency Regularization (FCR) training loss.

``L_total = L_denoise + λ · E_{t,Δ} [ d(Enc(x_t, t), Enc(x_{t−Δ}, t−Δ)) ]``

with Δ ~ U{1..Δ_max} (in training timesteps, or in sampling steps of a DDIM-'leading' schedule),
t ~ U{Δ..T−1}, and by default the same ε for both noisy latents. ``x_{t−Δ}`` is the LESS noisy
latent. The denoising loss runs the UNet as ``encode`` at t followed by ``decode`` at t, so the
encoder features at t serve both terms (gradients flow through both feature sets); the only extra
cost of FCR is one encoder-only pass on ``x_{t−Δ}``, skipped entirely when λ = 0.

FCR-deep (``feature_group="deep"``) regularises what DeepCache reuses instead: the deep hidden
state entering the shallow up path at skip branch ``deep_branch`` (:func:`fcr.core.unet.deep_forward`);
the denoising pass at t then yields it, and ``x_{t−Δ}`` needs the UNet up to that state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from fcr.core import unet as fcr_unet
from fcr.core.unet import FEATURE_GROUPS, EncoderFeatures

__all__ = [
    "DEEP_GROUP",
    "DELTA_UNITS",
    "PREDICTION_TYPES",
    "FCRConfig",
    "LossParts",
    "delta_in_train_timesteps",
    "delta_unit",
    "fcr_training_loss",
    "feature_distance",
    "per_sample_feature_distance",
    "sample_timestep_pairs",
]

DELTA_UNITS = ("train", "sampling")
DEEP_GROUP = "deep"  # FCR-deep: the feature DeepCache reuses, not the encoder's
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class FCRConfig:
    """Hyper-parameters of the FCR loss.

    - ``lambda_fcr``: weight λ of the FCR term; 0 gives the plain denoising loss (the control).
    - ``delta_max``: Δ_max, in the units of ``delta_units``.
    - ``delta_units``: ``"train"`` (training timesteps) or ``"sampling"`` (sampling steps of a
      ``sampling_steps``-step DDIM 'leading' schedule: one step = ``T // sampling_steps`` training
      timesteps, so Δ_max = 10 at 50 steps and T = 1000 is 200 training timesteps).
    - ``feature_group``: which encoder features are regularised (see ``fcr.core.unet.feature_group_indices``),
      or ``"deep"``: DeepCache's reused deep hidden state at skip branch ``deep_branch`` (FCR-deep).
    - ``normalize``: use the scale-invariant distance (see :func:`feature_distance`); raw MSE can be
      lowered by shrinking feature magnitudes and compensating in the decoder.
    - ``shared_noise``: the same ε for x_t and x_{t−Δ}; False draws an independent ε'.
    - ``prediction_type``: ``None`` uses ``noise_scheduler.config.prediction_type``.
    """

    lambda_fcr: float = 0.0
    delta_max: int = 10
    delta_units: str = "train"
    sampling_steps: int = 50
    feature_group: str = "all"
    normalize: bool = False
    shared_noise: bool = True
    prediction_type: str | None = None
    deep_branch: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.lambda_fcr) or self.lambda_fcr < 0:
            raise ValueError(f"lambda_fcr must be a finite number >= 0, got {self.lambda_fcr!r}")
        if isinstance(self.delta_max, bool) or not isinstance(self.delta_max, int) or self.delta_max < 1:
            raise ValueError(f"delta_max must be an integer >= 1, got {self.delta_max!r}")
        if self.delta_units not in DELTA_UNITS:
            raise ValueError(f"delta_units must be one of {list(DELTA_UNITS)}, got {self.delta_units!r}")
        if isinstance(self.sampling_steps, bool) or not isinstance(self.sampling_steps, int) or self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be an integer >= 1, got {self.sampling_steps!r}")
        if self.feature_group not in (*FEATURE_GROUPS, DEEP_GROUP):
            raise ValueError(f"feature_group must be one of {[*FEATURE_GROUPS, DEEP_GROUP]}, got {self.feature_group!r}")
        if isinstance(self.deep_branch, bool) or not isinstance(self.deep_branch, int) or self.deep_branch < 0:
            raise ValueError(f"deep_branch must be an integer >= 0, got {self.deep_branch!r}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be None or one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )


def delta_unit(cfg: FCRConfig, num_train_timesteps: int) -> int:
    """Training timesteps per unit of Δ: 1, or ``T // sampling_steps`` (DDIM 'leading' step ratio)."""
    if cfg.delta_units == "train":
        return 1
    unit = num_train_timesteps // cfg.sampling_steps
    if unit < 1:
        raise ValueError(
            f"sampling_steps={cfg.sampling_steps} exceeds num_train_timesteps={num_train_timesteps}: "
            "a sampling step would be shorter than one training timestep"
        )
    return unit


def delta_in_train_timesteps(cfg: FCRConfig, num_train_timesteps: int) -> int:
    """Δ_max in training timesteps; raises ValueError if no t in [Δ, T−1] could exist (Δ_max ≥ T)."""
    max_delta = cfg.delta_max * delta_unit(cfg, num_train_timesteps)
    if max_delta >= num_train_timesteps:
        raise ValueError(
            f"delta_max={cfg.delta_max} ({cfg.delta_units} units) is {max_delta} training timesteps, "
            f"which must be < num_train_timesteps={num_train_timesteps}"
        )
    return max_delta


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_timestep_pairs(
    batch_size: int,
    num_train_timesteps: int,
    cfg: FCRConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(t, delta)`` (int64, training timesteps) with ``0 <= t − delta`` and ``t <= T−1``.

    ``delta = k · unit`` with k ~ U{1..delta_max}; then t ~ U{delta..T−1} given delta. The marginal
    of t is therefore not uniform (small t are rarer). The draw does NOT depend on ``lambda_fcr``:
    a λ = 0 control trains on exactly the same t distribution (and, with the same generator state,
    the same t values) as the FCR runs. Draws happen on the generator's device (CPU if None).
    """
    unit = delta_unit(cfg, num_train_timesteps)
    delta_in_train_timesteps(cfg, num_train_timesteps)  # validates Δ_max < T
    dev = _gen_device(generator)
    k = torch.randint(1, cfg.delta_max + 1, (batch_size,), generator=generator, device=dev)
    delta = k * unit
    # Exact integer uniform on {delta..T-1}: floor(u * n) with n = T - delta choices.
    u = torch.rand((batch_size,), generator=generator, device=dev, dtype=torch.float64)
    n = num_train_timesteps - delta
    t = delta + torch.minimum((u * n).long(), n - 1)
    target = torch.device(device) if device is not None else dev
    return t.to(target), delta.to(target)


def feature_distance(
    a: EncoderFeatures,
    b: EncoderFeatures,
    indices: Sequence[int],
    normalize: bool,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Scalar distance between two feature sets over the tensors ``indices`` of ``.tensors()``.

    With ``F_i`` the selected tensors (K of them) and ``N`` the batch size:

    - raw: ``(1/K) Σ_i mean((a_i − b_i)²)``, the mean taken over all elements of the tensor;
    - normalised: ``(1/K) Σ_i (1/N) Σ_n ‖a_in − b_in‖² / (½(‖a_in‖² + ‖b_in‖²) + eps)``, norms over
      all elements of sample n of tensor i; invariant to scaling both feature sets by one constant.

    Computed in float32 so half-precision features do not overflow the sums.
    """
    terms = []
    for x, y in _selected_pairs(a, b, indices):
        if normalize:
            diff = (x - y).pow(2).flatten(1).sum(1)
            scale = 0.5 * (x.pow(2).flatten(1).sum(1) + y.pow(2).flatten(1).sum(1)) + eps
            terms.append((diff / scale).mean())
        else:
            terms.append((x - y).pow(2).mean())
    return torch.stack(terms).mean()


def per_sample_feature_distance(
    a: EncoderFeatures, b: EncoderFeatures, indices: Sequence[int], normalize: bool, eps: float = 1e-8
) -> torch.Tensor:
    """(N,) distances: :func:`feature_distance` of each sample alone (their mean is the batch's FCR
    term), computed for the whole batch at once."""
    terms = []
    for x, y in _selected_pairs(a, b, indices):
        diff = (x - y).pow(2).flatten(1)
        if normalize:
            scale = 0.5 * (x.pow(2).flatten(1).sum(1) + y.pow(2).flatten(1).sum(1)) + eps
            terms.append(diff.sum(1) / scale)
        else:
            terms.append(diff.mean(1))
    return torch.stack(terms).mean(0)


def _selected_pairs(a: EncoderFeatures, b: EncoderFeatures, indices: Sequence[int]):
    """The float32 tensor pairs ``indices`` of two feature sets, checked to match in shape."""
    if len(indices) == 0:
        raise ValueError("feature_distance needs at least one feature index")
    ta, tb = a.tensors(), b.tensors()
    for i in indices:
        x, y = ta[i].float(), tb[i].float()
        if x.shape != y.shape:
            raise ValueError(f"feature tensor {i} has shapes {tuple(x.shape)} and {tuple(y.shape)}")
        yield x, y


@dataclass
class LossParts:
    """The loss and its parts; ``timesteps``/``deltas`` are the per-sample draws (training timesteps)."""

    total: torch.Tensor
    denoise: torch.Tensor
    fcr: torch.Tensor
    timesteps: torch.Tensor
    deltas: torch.Tensor

    def log_dict(self) -> dict[str, float]:
        """Detached scalars for logging."""
        return {
            "loss": float(self.total.detach()),
            "loss_denoise": float(self.denoise.detach()),
            "loss_fcr": float(self.fcr.detach()),
            "timestep_mean": float(self.timesteps.float().mean()),
            "delta_mean": float(self.deltas.float().mean()),
        }


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device so a CPU generator is deterministic for a GPU batch too.
    z = torch.randn(like.shape, generator=generator, device=_gen_device(generator), dtype=like.dtype)
    return z.to(like.device)


def _resolve_prediction_type(cfg: FCRConfig, noise_scheduler: Any) -> str:
    pred = cfg.prediction_type or noise_scheduler.config.prediction_type
    if pred not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {pred!r} (from the noise scheduler's config) is not supported; "
            f"allowed: {list(PREDICTION_TYPES)}"
        )
    return pred


def fcr_training_loss(
    unet: UNet2DConditionModel,
    noise_scheduler: Any,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    cfg: FCRConfig,
    generator: torch.Generator | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    channel_condition: torch.Tensor | None = None,
) -> LossParts:
    """Denoising loss plus λ · FCR on one batch of clean latents ``x0``.

    Random draws, in this order, from ``generator``: ``sample_timestep_pairs``, then ε, then ε'
    (only if ``shared_noise`` is False). They do not depend on λ, so a λ = 0 control sees the same
    draws. ``x_t = add_noise(x0, ε, t)``, ``x_{t−Δ} = add_noise(x0, ε or ε', t−Δ)``; denoise is the
    mean squared error of the UNet's prediction at t against ε (or ``get_velocity(x0, ε, t)`` for
    v-prediction); FCR is :func:`feature_distance` over ``cfg.feature_group``. With λ = 0 the
    encoder pass on ``x_{t−Δ}`` is skipped, ``fcr`` is a zero tensor and ``total is denoise``.
    ``channel_condition`` (batch of ``x0``): channels the UNet reads beside the noisy latent (an
    in-painting UNet's mask and masked-image latents, depth-to-image's depth), the same at t and t−Δ.
    """
    kw = dict(unet_kwargs or {})

    def net_input(x: torch.Tensor) -> torch.Tensor:
        return x if channel_condition is None else torch.cat([x, channel_condition.to(x.dtype)], dim=1)

    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    prediction_type = _resolve_prediction_type(cfg, noise_scheduler)

    batch = x0.shape[0]
    t, delta = sample_timestep_pairs(batch, num_train_timesteps, cfg, generator, device=x0.device)
    noise = _randn(x0, generator)
    noise_prev = noise if cfg.shared_noise else _randn(x0, generator)

    x_t = noise_scheduler.add_noise(x0, noise, t)
    deep = cfg.feature_group == DEEP_GROUP
    if deep:
        branch = fcr_unet.deep_branch(unet, cfg.deep_branch)
        pred, deep_t = fcr_unet.deep_forward(unet, net_input(x_t), t, encoder_hidden_states, branch, **kw)
    else:
        feats_t = fcr_unet.encode(unet, net_input(x_t), t, encoder_hidden_states, **kw)
        pred = fcr_unet.decode(unet, feats_t, t, encoder_hidden_states, **kw)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    denoise = F.mse_loss(pred.float(), target.float(), reduction="mean")

    if cfg.lambda_fcr == 0:
        fcr = torch.zeros((), device=denoise.device, dtype=denoise.dtype)
        return LossParts(total=denoise, denoise=denoise, fcr=fcr, timesteps=t, deltas=delta)

    t_prev = t - delta
    x_prev = noise_scheduler.add_noise(x0, noise_prev, t_prev)
    if deep:
        deep_prev = fcr_unet.deep_hidden(unet, net_input(x_prev), t_prev, encoder_hidden_states, branch, **kw)
        # One tensor: the distance of a single-tensor feature set (the raw or normalised form alike).
        as_features = (lambda x: EncoderFeatures(skips=(), mid=x, forward_upsample_size=False))
        fcr = feature_distance(as_features(deep_t), as_features(deep_prev), [0], cfg.normalize)
    else:
        feats_prev = fcr_unet.encode(unet, net_input(x_prev), t_prev, encoder_hidden_states, **kw)
        indices = fcr_unet.feature_group_indices(unet, cfg.feature_group)
        fcr = feature_distance(feats_t, feats_prev, indices, cfg.normalize)
    return LossParts(total=denoise + cfg.lambda_fcr * fcr, denoise=denoise, fcr=fcr, timesteps=t, deltas=delta)
