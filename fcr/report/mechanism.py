"""The report's mechanism section: notebook 05's per-image regression of caching fidelity on the
encoder drift along the sampled trajectories, as written by the mechanistic run."""

from __future__ import annotations

from pathlib import Path

from fcr import contract
from fcr.analysis.rows import fmt3, read_json

__all__ = ["trajectory_section"]


def trajectory_section(folder: Path, title: str) -> list[str]:
    """Markdown lines of notebook 05's per-image regression of caching fidelity on the encoder drift
    along the sampled trajectories (:data:`fcr.contract.TRAJECTORY_REGRESSION`); empty when the run
    did not measure it."""
    path = Path(folder) / contract.TRAJECTORY_REGRESSION
    if not path.is_file():
        return []
    fit = read_json(path)
    mixed = fit.get("mixed", {})
    lines = [f"### {title}\n",
             f"Per image: {fit['endpoint']} to the model's own full sampling at FD-s against the encoder drift a stride-s "
             f"cache suffers along the image's own full-sampling trajectory ({fit['n_points']} points: "
             f"{fit['n_pairs']} prompt/noise pairs x {fit['n_models']} models x strides {fit['strides']}; "
             f"`{contract.TRAJECTORY_REGRESSION}`).\n",
             f"- drift alone (the seed's R² ≥ 0.6 criterion as written): R² = {fmt3(fit['as_written']['r2'])}, "
             f"slope {fmt3(fit['as_written']['slope'])}",
             f"- stride and model alone: R² = {fmt3(fit['partial']['r2_stride_model'])}; with drift "
             f"{fmt3(fit['partial']['r2_with_drift'])}; partial R² of drift {fmt3(fit['partial']['partial_r2_drift'])}"]
    if "slope" in mixed:
        lines.append(f"- mixed model (random intercept per prompt/noise pair): drift slope {fmt3(mixed['slope'])} "
                     f"[{fmt3(mixed['lo'])}, {fmt3(mixed['hi'])}], p = {fmt3(mixed['p'])}")
    else:
        lines.append(f"- mixed model: not fitted ({mixed.get('error', 'no result')})")
    return lines + [""]
