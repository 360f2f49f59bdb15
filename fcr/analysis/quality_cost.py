"""Criteria a (quality preserved at stride 10) and b (speed-up and memory vs FD-5), and the
SD-scale cost context rows of criterion b."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fcr import contract
from fcr.analysis.rows import (
    THRESHOLDS,
    InputError,
    all_of,
    backbone_scope,
    fmt3,
    fmt_pct,
    lookup_column,
    read_table,
    summary_value,
    sweep_dir,
    verdict_row,
)
from fcr.manifest import Backbone

__all__ = [
    "A_NAME",
    "B_NAME",
    "QUALITY_NOTE",
    "QUALITY_THRESHOLD",
    "criterion_a",
    "criterion_b",
    "sd_gpu_cost_rows",
]

# ----------------------------------------------------------------------------- a. quality


A_NAME = "a. quality preservation (stride 10)"
QUALITY_NOTE = (
    "Embedded equivalents: FD of the fashioncnn classifier features plays FID, accuracy of the prompted "
    "class (classifier agreement with the prompt) plays CLIPScore. Changes are relative to FD-5 of the "
    "original model, on means over seeds (summary.csv)."
)


def _quality_delta(summary: pd.DataFrame, path: Path, model: str, config: str, ref_model: str,
                   ref_config: str) -> dict[str, float]:
    fd = summary_value(summary, path, model, config, "fd")
    acc = summary_value(summary, path, model, config, "accuracy")
    fd_ref = summary_value(summary, path, ref_model, ref_config, "fd")
    acc_ref = summary_value(summary, path, ref_model, ref_config, "accuracy")
    if fd_ref == 0 or acc_ref == 0:
        raise InputError(f"{path}: FD-5 reference of {ref_model!r} is zero; a relative change is undefined")
    return {"fd": fd, "acc": acc, "fd_ref": fd_ref, "acc_ref": acc_ref,
            "d_fd": 100.0 * (fd - fd_ref) / abs(fd_ref), "d_acc": 100.0 * (acc - acc_ref) / abs(acc_ref)}


def _quality_passed(d: Mapping[str, float]) -> bool:
    return d["d_fd"] <= THRESHOLDS["fd_increase_pct"] and d["d_acc"] >= THRESHOLDS["accuracy_change_pct"]


def _quality_measured(d: Mapping[str, float], fd_name: str, acc_name: str) -> str:
    return (f"ΔFD {fmt_pct(d['d_fd'])} ({fd_name} {fmt3(d['fd'])} vs {fmt3(d['fd_ref'])}); "
            f"Δacc {fmt_pct(d['d_acc'])} ({acc_name} {fmt3(d['acc'])} vs {fmt3(d['acc_ref'])})")


QUALITY_THRESHOLD = "ΔFD ≤ +5 % and Δ class accuracy ≥ −2 % vs FD-5 of the original model"


STUDY_THRESHOLD = ("ΔFD ≤ +5 % and Δ class accuracy ≥ −2 % vs FD-5 of the original model, shown by the "
                   "pre-registered one-sided non-inferiority tests (Holm)")


def _criterion_a_from_study(
    b: Backbone, contrasts: pd.DataFrame, stride_config: str, safe: pd.DataFrame | None = None
) -> tuple[list[dict], str | None, bool | None] | None:
    """Criterion a from the study's secondary family: passed when both margins are shown
    (non-inferior), failed when either is shown violated (inferior), n/a when the design cannot
    decide; None when the study has no such rows for ``b`` at ``stride_config``."""
    rows = contrasts[(contrasts["backbone"] == b.name) & (contrasts["family"] == "secondary")
                     & (contrasts["config"] == stride_config)]
    if rows.empty:
        return None
    model = str(rows["model"].iloc[0])
    if rows["model"].nunique() > 1:  # no selection run: the verdict cannot pick a λ on the reported data
        return ([verdict_row(A_NAME, backbone_scope(b), "n/a", STUDY_THRESHOLD, None,
                             "No λ selected on a separate selection run: every FCR model was tested, none is the "
                             "verdict's (choosing one on the reported data is what the study forbids).")], None, None)
    by = rows.set_index("endpoint")
    decisions = [str(d) for d in by["decision"]]
    passed = (False if any(d == "inferior" for d in decisions)
              else True if all(d == "non-inferior" for d in decisions) else None)
    parts = []
    for endpoint, label in (("fd_increase_pct", "ΔFD"), ("alignment_change_pct", "Δacc")):
        if endpoint in by.index:
            r = by.loc[endpoint]
            parts.append(f"{label} {fmt_pct(float(r['estimate']))} [{fmt_pct(float(r['lo']))}, "
                         f"{fmt_pct(float(r['hi']))}]: {r['decision']}")
    n, m = int(rows["n"].iloc[0]), int(rows["m_tests"].iloc[0])
    note = (f"{rows['contrast'].iloc[0]} ({model}) at {stride_config}, paired over n = {n} images, Holm over "
            f"{m} secondary tests (contrasts.csv). "
            + QUALITY_NOTE.replace("on means over seeds (summary.csv)", "paired per image"))
    value = float(by.loc["fd_increase_pct", "estimate"]) if "fd_increase_pct" in by.index else None
    out = [verdict_row(A_NAME, backbone_scope(b), "; ".join(parts), STUDY_THRESHOLD, passed, note, value=value)]
    return out + _stride_context_rows(b, safe, stride_config), model, passed


def _stride_context_rows(b: Backbone, safe: pd.DataFrame | None, stride_config: str) -> list[dict]:
    """Context rows beside a study's criterion a: the original model's (and the control's) own
    ``stride_config`` against its own FD-5, the same paired non-inferiority test
    (:func:`fcr.analysis.contrasts.safe_strides`, Holm within the model's strides)."""
    if safe is None or safe.empty or not stride_config.startswith("FD-") or not stride_config[3:].isdigit():
        return []
    stride = int(stride_config[3:])
    rows = []
    for what, model in (("original model, plain FD caching", b.name), ("λ = 0 control", b.control)):
        hit = safe[(safe["model"] == model) & (safe["stride"] == stride)] if model else safe.iloc[0:0]
        if hit.empty:
            continue
        r = hit.iloc[0]
        measured = (f"ΔFD {fmt_pct(float(r['fd_increase_pct']))} [{fmt_pct(float(r['fd_increase_pct_lo']))}, "
                    f"{fmt_pct(float(r['fd_increase_pct_hi']))}]; Δacc {fmt_pct(float(r['alignment_change_pct']))} "
                    f"[{fmt_pct(float(r['alignment_change_pct_lo']))}, {fmt_pct(float(r['alignment_change_pct_hi']))}]"
                    f": {'non-inferior' if bool(r['non_inferior']) else 'not shown non-inferior'}")
        rows.append(verdict_row(A_NAME, f"{backbone_scope(b)}: {what} ({model}) at {stride_config}", measured,
                                "vs the model's own FD-5 (safe_strides.csv)", True if bool(r["non_inferior"]) else None,
                                f"Context only (not part of the verdict): the same margins for the model without FCR, "
                                f"paired over n = {int(r['n'])} images, Holm p = {float(r['p_holm']):.3g} over the "
                                "model's strides.", kind="context"))
    return rows


def criterion_a(
    root: Path, b: Backbone, stride_config: str, ref_config: str, contrasts: pd.DataFrame | None = None,
    safe: pd.DataFrame | None = None,
) -> tuple[list[dict], str | None, bool | None]:
    """Rows of criterion a for one backbone, the selected FCR model label and its verdict. With the
    study's ``contrasts`` (:mod:`fcr.report.study`) the verdict is the pre-registered
    non-inferiority test of the λ selected on the selection run; without, the point estimates of
    ``summary.csv`` with the best λ of the reported data (as before the study existed)."""
    if contrasts is not None and not contrasts.empty:
        from_study = _criterion_a_from_study(b, contrasts, stride_config, safe)
        if from_study is not None:
            return from_study
    path = sweep_dir(root, b) / contract.SUMMARY
    scope = backbone_scope(b)
    try:
        summary = read_table(path)
        fd_name = lookup_column(summary, "summary", "fd", path)
        acc_name = lookup_column(summary, "summary", "accuracy", path)
        candidates = {}
        for lam, model in b.fcr_models.items():
            try:
                candidates[lam] = (model, summary_value(summary, path, model, stride_config, "fd"))
            except InputError:
                continue
        if not candidates:
            raise InputError(f"{path}: none of the FCR models {list(b.fcr_models.values())} has a {stride_config} row "
                             "(their fine-tunes or notebook 03 over them have not run)")
        best_lam, (best, _) = min(candidates.items(), key=lambda kv: kv[1][1])
        d = _quality_delta(summary, path, best, stride_config, b.name, ref_config)
    except InputError as exc:
        return [verdict_row(A_NAME, scope, "n/a", QUALITY_THRESHOLD, None, str(exc))], None, None
    missing = sorted(set(b.fcr_models) - set(candidates))
    rule = (f"Best λ chosen by the lowest {fd_name} at {stride_config} among λ ∈ "
            f"{sorted(b.fcr_models)}: λ = {best_lam:g} ({best}).")
    if missing:
        rule += f" Not in summary.csv (not run): λ = {', '.join(f'{m:g}' for m in missing)}."
    passed = _quality_passed(d)
    rows = [verdict_row(A_NAME, scope, _quality_measured(d, fd_name, acc_name), QUALITY_THRESHOLD, passed,
                 f"{rule} {QUALITY_NOTE}", value=d["d_fd"])]
    context = [("λ = 0 control", b.control)] if b.control else []
    context.append(("original model, plain FD caching", b.name))
    for what, model in context:
        try:
            dc = _quality_delta(summary, path, model, stride_config, b.name, ref_config)
            rows.append(verdict_row(A_NAME, f"{scope}: {what} ({model}) at {stride_config}",
                             _quality_measured(dc, fd_name, acc_name), QUALITY_THRESHOLD, _quality_passed(dc),
                             "Context only (not part of the verdict): the same test without FCR.",
                             kind="context", value=dc["d_fd"]))
        except InputError as exc:
            rows.append(verdict_row(A_NAME, f"{scope}: {what} ({model}) at {stride_config}", "n/a", QUALITY_THRESHOLD,
                             None, f"Context only. {exc}", kind="context"))
    return rows, best, passed


# ----------------------------------------------------------------------------- b. speed and memory


B_NAME = "b. speed-up vs FD-5"


def _architecture(summary_path: Path, models: Sequence[str]) -> str:
    summary = read_table(summary_path)
    col = lookup_column(summary, "summary", "architecture", summary_path)
    mcol = lookup_column(summary, "summary", "model", summary_path)
    for model in models:
        rows = summary[summary[mcol].astype(str) == model]
        if not rows.empty:
            return str(rows[col].iloc[0])
    raise InputError(f"{summary_path}: none of the models {list(models)} is in it")


def _cost_row(df: pd.DataFrame, table: str, path: Path, arch: str, config: str) -> pd.Series:
    acol = lookup_column(df, table, "architecture", path)
    ccol = lookup_column(df, table, "config", path)
    rows = df[(df[acol].astype(str) == arch) & (df[ccol].astype(str) == config)]
    if rows.empty:
        raise InputError(f"{path}: no row for architecture {arch!r} at config {config!r}")
    return rows.iloc[0]


def criterion_b(root: Path, b: Backbone, fcr_model: str | None, quality_passed: bool | None,
                 stride_config: str, ref_config: str) -> tuple[list[dict], bool | None]:
    sweep = sweep_dir(root, b)
    scope = backbone_scope(b)
    speed_thr = f"≥ {THRESHOLDS['speedup']:g}× vs {ref_config} (every timed batch size)"
    rows: list[dict] = []

    # Wall time per timed batch size (cost.csv).
    try:
        arch = _architecture(sweep / contract.SUMMARY, [m for m in (fcr_model, b.name) if m])
    except InputError as exc:
        arch, arch_error = None, str(exc)
    time_pass: bool | None = None
    device = "unknown device"
    cost = None
    if arch is None:
        rows.append(verdict_row(f"{B_NAME} (wall time)", scope, "n/a", speed_thr, None, arch_error, kind="part"))
    else:
        try:
            cost = read_table(sweep / contract.COST)
            dcol = lookup_column(cost, "cost", "device", sweep / contract.COST, required=False)
            r10 = _cost_row(cost, "cost", sweep / contract.COST, arch, stride_config)
            r5 = _cost_row(cost, "cost", sweep / contract.COST, arch, ref_config)
            device = str(r10[dcol]) if dcol else device
            tcols = sorted((c for c in cost.columns if c.startswith("time_per_image_s_bs")), key=lambda c: int(c[19:]))
            if not tcols:
                raise InputError(f"{sweep / 'cost.csv'}: no time_per_image_s_bs<b> columns")
            speed = {int(c[19:]): float(r5[c]) / float(r10[c]) for c in tcols}
            measured = ", ".join(f"batch {k}: {fmt3(v)}×" for k, v in speed.items())
            time_pass = all(v >= THRESHOLDS["speedup"] for v in speed.values())
            note = (f"Measured wall time per image of {stride_config} vs {ref_config} on architecture {arch} "
                    f"(cost depends on the architecture, not the weights), device {device}; medians of timed repeats "
                    "(fcr.experiments.sweep.evaluate_cost). The seed times on an A100; these timings are from the device named.")
            rows.append(verdict_row(f"{B_NAME} (wall time)", scope, measured, speed_thr, time_pass, note, kind="part",
                             value=min(speed.values())))
        except InputError as exc:
            rows.append(verdict_row(f"{B_NAME} (wall time)", scope, "n/a", speed_thr, None, str(exc), kind="part"))

    # FLOPs and the analytic bound (cost_table.csv): shown next to the wall time.
    bound_note = ""
    if arch is not None:
        path = sweep / contract.COST_TABLE
        try:
            table = read_table(path)
            row = _cost_row(table, "cost_table", path, arch, stride_config)
            fl = float(row[lookup_column(table, "cost_table", "flops_speedup", path)])
            bound = float(row[lookup_column(table, "cost_table", "bound_speedup", path)])
            flops_pass = fl >= THRESHOLDS["speedup"]
            note = ("FLOPs per image counted with torch.utils.flop_counter over one sampling call; bound = the "
                    "analytic ratio from the UNet's measured encoder share. Context: the criterion is on real time.")
            if bound < THRESHOLDS["speedup"]:
                bound_note = (f"Encoder caching alone cannot reach {THRESHOLDS['speedup']:g}× here: the FLOP bound of "
                              f"{stride_config} vs {ref_config} is {fmt3(bound)}×, so a {THRESHOLDS['speedup']:g}× FLOP "
                              "speed-up fails by construction whatever FCR does; a larger wall-time gain can only come "
                              "from better hardware use (parallel decoding), not from fewer operations.")
                note = f"{bound_note} {note}"
            rows.append(verdict_row(f"{B_NAME} (FLOPs)", scope, f"{fmt3(fl)}× counted, bound {fmt3(bound)}×", speed_thr,
                             flops_pass, note, kind="context", value=fl))
        except InputError as exc:
            rows.append(verdict_row(f"{B_NAME} (FLOPs)", scope, "n/a", speed_thr, None, str(exc), kind="context"))

    # Peak memory of FD-10 vs FD-5.
    mem_thr = f"≤ +{THRESHOLDS['memory_increase_pct']:g} % peak memory vs {ref_config}"
    mem_pass: bool | None = None
    if arch is not None and cost is not None:
        path = sweep / contract.COST
        try:
            mcol = lookup_column(cost, "cost", "peak_memory", path)
            m10 = float(_cost_row(cost, "cost", path, arch, stride_config)[mcol])
            m5 = float(_cost_row(cost, "cost", path, arch, ref_config)[mcol])
            inc = 100.0 * (m10 / m5 - 1.0)
            measured = f"{fmt_pct(inc)} ({fmt3(m10 / 2**20)} vs {fmt3(m5 / 2**20)} MiB)"
            if device.startswith("cuda"):
                mem_pass = inc <= THRESHOLDS["memory_increase_pct"]
                note = "Peak allocated GPU memory (torch.cuda.max_memory_allocated) at the largest timed batch."
            else:
                note = (f"Not measurable on device {device}: the CPU figure is the process-wide RSS high-water mark "
                        "(fcr.eval.profiling.peak_memory), which never decreases and cannot separate configurations timed "
                        "in one process; the seed's criterion is on GPU memory (VRAM).")
            rows.append(verdict_row(f"{B_NAME} (peak memory)", scope, measured, mem_thr, mem_pass, note, kind="part",
                             value=inc))
        except InputError as exc:
            rows.append(verdict_row(f"{B_NAME} (peak memory)", scope, "n/a", mem_thr, None, str(exc), kind="part"))
    else:
        rows.append(verdict_row(f"{B_NAME} (peak memory)", scope, "n/a", mem_thr, None,
                         "cost.csv or the architecture is unavailable (see the wall-time row)", kind="part"))

    passed = all_of([time_pass, mem_pass, quality_passed])
    parts = {"wall time": time_pass, "memory": mem_pass, "equal quality (criterion a)": quality_passed}
    summary = "; ".join(f"{k}: {'pass' if v else 'n/a' if v is None else 'FAIL'}" for k, v in parts.items())
    note = ("Real-time speed-up at equal quality with ≤ 2 % extra memory: AND of the wall-time row, the memory row "
            "and criterion a of this backbone.")
    if bound_note:
        note += " " + bound_note
    threshold = (f"≥ {THRESHOLDS['speedup']:g}× wall time, ≤ +{THRESHOLDS['memory_increase_pct']:g} % memory, "
                 "a passed")
    rows.insert(0, verdict_row(B_NAME, scope, summary, threshold, passed, note))
    return rows, passed


def sd_gpu_cost_rows(path: str | Path, stride_config: str = "FD-10", ref_config: str = "FD-5") -> list[dict]:
    """Context rows for criterion b at Stable Diffusion scale from ``benchmarks/bench_sd_gpu.py``'s CSV
    (SD1.5/SD2.1 UNet architectures with random weights on a GPU: cost only, no quality): per model,
    batch and decoding mode, the wall-time speed-up of ``stride_config`` over ``ref_config`` and its
    extra peak allocated memory. A missing file gives one n/a row naming it."""
    path = Path(path)
    speed_thr = (f"≥ {THRESHOLDS['speedup']:g}× and ≤ +{THRESHOLDS['memory_increase_pct']:g} % memory "
                 f"vs {ref_config}")
    name = f"{B_NAME} (SD scale, GPU, cost only)"
    if not path.is_file():
        return [verdict_row(name, "SD1.5 / SD2.1 architectures", "n/a", speed_thr, None,
                     f"missing {path}: written by benchmarks/bench_sd_gpu.py on a CUDA machine", kind="context")]
    df = pd.read_csv(path)
    rows = []
    for (model, batch), group in df.groupby(["model", "batch"], sort=False):
        by_config = group.set_index("config")
        parts, ok = [], []
        for mode in ("par", "seq"):
            c10, c5 = f"{stride_config}-{mode}", f"{ref_config}-{mode}"
            if c10 not in by_config.index or c5 not in by_config.index:
                continue
            speed = float(by_config.loc[c5, "time_median_s"]) / float(by_config.loc[c10, "time_median_s"])
            mem = 100.0 * (float(by_config.loc[c10, "peak_mem_mib"]) / float(by_config.loc[c5, "peak_mem_mib"]) - 1)
            parts.append(f"{'parallel' if mode == 'par' else 'sequential'} decoding: {fmt3(speed)}×, {fmt_pct(mem)} memory")
            ok.append(speed >= THRESHOLDS["speedup"] and mem <= THRESHOLDS["memory_increase_pct"])
        if not parts:
            continue
        device = str(group["device"].iloc[0]) if "device" in group else "GPU"
        short = str(model).split(" ")[0]
        rows.append(verdict_row(name, f"{short} architecture, batch {batch}", "; ".join(parts), speed_thr, any(ok),
                         f"{path}: {device}, fp16, 50 DDIM steps with guidance, random weights (time and memory "
                         "do not depend on them), CUDA-event medians and torch.cuda.max_memory_allocated. Passed if "
                         "either decoding mode meets both bounds. Parallel decoding batches a key interval's decoder "
                         "calls: fewer, larger launches (faster where the GPU is launch-bound) at memory growing "
                         "with the stride; sequential decoding keeps FD-5's memory.", kind="context"))
    return rows
