"""Checkpoint selection on a held-out mini-validation set (the seed's "selection criteria: best-val,
last, early stopping").

Every ``validate_every`` optimizer steps the model being fine-tuned samples a small validation
prompt set twice, with full sampling and with its cached configuration (FD-``validate_stride``),
from initial noises of a seed that no evaluation uses. The metric is the study's primary endpoint
measured there: the mean PSNR of the cached images to the full ones. Its moving average over the
last ``validate_window`` checks picks the best step, whose weights are kept in ``unet_best/``;
with ``early_stopping_patience`` > 0 training ends after that many checks without a new best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fcr.backends.generate import SamplingModel, generate
from fcr.core.sampler import key_steps
from fcr.files import write_json_atomic
from fcr.eval.fidelity import pixel_fidelity

__all__ = ["VALIDATION_COLUMNS", "CachedFidelityValidator", "EarlyStopping", "Selection", "Validator", "write_selection"]

# (the UNet being trained) -> the validation metric, higher is better.
Validator = Callable[[torch.nn.Module], float]

VALIDATION_COLUMNS = ["step", "value", "moving_average", "best_step"]


class CachedFidelityValidator:
    """Mean PSNR (dB) of FD-``stride`` sampling to full sampling of the same model, prompts and noise.

    ``wrap`` turns the UNet into a :class:`fcr.backends.generate.SamplingModel` (the setting's
    adapter: :class:`fcr.backends.embedded.model.EmbeddedModel` or the SD one); ``prompts`` are
    what that adapter reads. The UNet is sampled in eval mode without gradients and left in the
    mode it was in.
    """

    def __init__(self, wrap: Callable[[torch.nn.Module], SamplingModel], prompts: Any, *, seed: int, stride: int,
                 num_inference_steps: int, guidance_scale: float, batch_size: int) -> None:
        if stride < 2 or stride > num_inference_steps:
            raise ValueError(f"validation stride must lie in [2, {num_inference_steps}], got {stride}")
        self.wrap, self.prompts, self.seed = wrap, prompts, seed
        self.steps, self.guidance_scale, self.batch_size = num_inference_steps, guidance_scale, batch_size
        self.key_steps = key_steps(num_inference_steps, stride=stride)

    def __call__(self, unet: torch.nn.Module) -> float:
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                model = self.wrap(unet)
                common = dict(seed=self.seed, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                              batch_size=self.batch_size)
                full = generate(model, self.prompts, **common).images
                cached = generate(model, self.prompts, key_steps=self.key_steps, **common).images
        finally:
            unet.train(was_training)
        return float(pixel_fidelity(cached.float(), full.float())["psnr"].mean())


@dataclass
class Selection:
    """Where the selection stands: one row per check (step, value, moving average, best step so far),
    the best moving average and its step, and the checks since it."""

    window: int
    patience: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_average: float = -math.inf
    checks_since_best: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "rows"} | {"checks": len(self.rows)}


class EarlyStopping:
    """The moving average of the validation metric over the last ``window`` checks; a new best moving
    average marks its step best (the caller then saves the weights). ``patience`` > 0: :meth:`should_stop`
    after that many checks without a new best (0: train to the end, keeping the best weights)."""

    def __init__(self, window: int, patience: int = 0) -> None:
        if window < 1 or patience < 0:
            raise ValueError(f"window must be >= 1 and patience >= 0, got {window}, {patience}")
        self.state = Selection(window, patience)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per check, :data:`VALIDATION_COLUMNS` (what ``validation.csv`` holds)."""
        return self.state.rows

    def update(self, step: int, value: float) -> bool:
        """Record the check at ``step``; True when its moving average is a new best."""
        s = self.state
        recent = [r["value"] for r in s.rows[-(s.window - 1):]] if s.window > 1 else []
        values = [*recent, float(value)]
        average = sum(values) / len(values)
        improved = math.isfinite(average) and average > s.best_average
        if improved:
            s.best_step, s.best_average, s.checks_since_best = step, average, 0
        else:
            s.checks_since_best += 1
        s.rows.append({"step": step, "value": float(value), "moving_average": average, "best_step": s.best_step})
        return improved

    def should_stop(self) -> bool:
        return self.state.patience > 0 and self.state.checks_since_best >= self.state.patience

    def replay(self, rows: Sequence[dict[str, str]]) -> None:
        """Rebuild the state from a resumed run's log rows (the weights of its best step are on disk)."""
        for row in rows:
            self.update(int(row["step"]), float(row["value"]))


def write_selection(path: Path, stopping: EarlyStopping, metric: str, last_step: int, stopped_early: bool) -> None:
    """``early_stopping.json``: the chosen step, its moving average, the checks, the last step trained."""
    write_json_atomic(path, {"metric": metric, **stopping.state.as_dict(), "last_step": last_step,
                             "stopped_early": stopped_early})


