"""Success criteria of the research strategy (seed section 5), evaluated on a pipeline run's files.

:func:`evaluate_criteria` reads the result files of a run under ``root`` (``outputs/embedded``)
and returns one row per criterion and scope: the measured value next to the threshold and
``passed`` (True / False, or None when an input is missing or cannot measure the criterion; the
note then names the missing file and the notebook or stage that writes it). Nothing is estimated
when a file is missing.

Embedded equivalents of the seed's metrics: the Fréchet distance of the ``fashioncnn`` classifier
features (``fd_fashioncnn``) plays FID, and the accuracy of the prompted class (``class_accuracy``,
classifier agreement with the prompt) plays CLIPScore. An SD run's summary with ``fid`` /
``clip_score`` columns is read the same way.

Row kinds: ``criterion`` rows make the verdict (``overall`` is their three-valued AND),
``part`` rows are the pieces a criterion row combines, ``context`` rows are shown for reading only.

Expected layout (params/experiments.yaml, whose ``backbones`` say which models and runs the verdict
reads; folder names in :data:`LAYOUT`, file and column names in :mod:`fcr.contract`). ``<kind>/<run>/`` with run ``main``; a results folder directly in
``<kind>/`` is accepted too (:func:`result_dir`)::

    <root>/exp-1-main-ablation/<variation>/    fine-tune run folders (train_config.json, params.yaml, train_log.csv)
    <root>/exp-1-main-ablation/sweep/main/     notebook 03: summary.csv, cost.csv, cost_table.csv, paired_tests.csv
    <root>/exp-1-main-ablation/mechanistic/main/   notebook 05: variance_reduction.csv, regression.json
    <root>/exp-2-generalisation-robustness/<variation>/, sweep/main/, mechanistic/main/   the same for exp-2
    <root>/exp-2-generalisation-robustness/robustness/main/criterion.csv   notebook 04
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fcr import contract
from fcr.contract import COLUMNS, PRODUCERS
from fcr.eval import training_cost
from fcr.manifest import Backbone, backbones_of

__all__ = [
    "LAYOUT",
    "SD_PRETRAINING",
    "THRESHOLDS",
    "VERDICT_COLUMNS",
    "InputError",
    "result_dir",
    "all_of",
    "evaluate_criteria",
    "lookup_column",
    "read_table",
    "robustness_rows",
    "sd_gpu_cost_rows",
]

# ----------------------------------------------------------------------------- configuration

THRESHOLDS: dict[str, float] = {
    "fd_increase_pct": 5.0,  # a: ΔFD ≤ +5 % vs FD-5 of the original model
    "accuracy_change_pct": -2.0,  # a: Δ class accuracy ≥ −2 % (relative)
    "speedup": 1.4,  # b: ≥ 1.4× vs FD-5
    "memory_increase_pct": 2.0,  # b: ≤ 2 % extra peak memory
    "variance_reduction_pct": 30.0,  # e: encoder-feature variance reduced by ≥ 30 %
    "r2": 0.6,  # e: R² ≥ 0.6
    "overhead_pct": 3.0,  # f: fine-tune compute ≤ 3 % of pre-training compute
}

EXP1 = "exp-1-main-ablation"
EXP2 = "exp-2-generalisation-robustness"

# Sub-folders of an experiment folder and which stage writes them (for the missing-file notes).
LAYOUT: dict[str, str] = {"sweep": "sweep", "robustness": "robustness", "mechanistic": "mechanistic", "run": "main"}
VERDICT_COLUMNS = ["criterion", "scope", "kind", "measured", "value", "threshold", "passed", "note"]

# Published pre-training compute of Stable Diffusion v1, as stated by its model card (section
# "Environmental Impact", "Stable Diffusion v1 Estimated Emissions"; the same text is in the cards of
# CompVis/stable-diffusion-v1-4 and runwayml/stable-diffusion-v1-5 on Hugging Face).
SD_PRETRAINING: dict[str, Any] = {
    "hardware": "A100 PCIe 40GB",
    "gpu_hours": 150_000.0,
    "source": "Stable Diffusion v1 model card (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5), "
    "'Environmental Impact': Hardware Type A100 PCIe 40GB, Hours used 150000",
}


class InputError(RuntimeError):
    """A result file, column or row the verdict needs is missing (the message names it)."""


# ----------------------------------------------------------------------------- readers


def _producer(path: Path) -> str:
    return PRODUCERS.get(path.name, "the pipeline stage that writes it")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV result table; a missing file raises :class:`InputError` naming the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing {path}: it is written by {_producer(path)}")
    return pd.read_csv(path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"missing {path}: it is written by {_producer(path)}")
    return json.loads(path.read_text())


def lookup_column(df: pd.DataFrame | Mapping[str, Any], table: str, logical: str, path: str | Path,
                  required: bool = True) -> str | None:
    """The actual column of ``df`` for ``logical`` (see :data:`COLUMNS`); raises :class:`InputError`
    naming the file and the missing column when ``required``, else returns None."""
    names = COLUMNS[table][logical]
    present = list(df.columns) if isinstance(df, pd.DataFrame) else list(df)
    for name in names:
        if name in present:
            return name
    if required:
        raise InputError(f"{path}: no column for {logical!r} (expected one of {list(names)}; present: {present})")
    return None


def _summary_value(summary: pd.DataFrame, path: Path, model: str, config: str, logical: str) -> float:
    col = lookup_column(summary, "summary", logical, path)
    mcol, ccol = lookup_column(summary, "summary", "model", path), lookup_column(summary, "summary", "config", path)
    rows = summary[(summary[mcol].astype(str) == model) & (summary[ccol].astype(str) == config)]
    if rows.empty:
        raise InputError(f"{path}: no row for model {model!r} at config {config!r} (notebook 03 did not sweep it)")
    value = float(rows[col].iloc[0])
    if not math.isfinite(value):
        raise InputError(f"{path}: {col} of {model!r} at {config!r} is not a number")
    return value


# ----------------------------------------------------------------------------- small helpers


def all_of(values: Iterable[bool | None]) -> bool | None:
    """Three-valued AND: False if any is False, else None if any is None (or there are none), else True."""
    vals = list(values)
    if any(v is False for v in vals):
        return False
    if not vals or any(v is None for v in vals):
        return None
    return True


def _count(verdicts: Sequence[bool | None], what: str = "") -> str:
    """``'2 pass, 1 FAIL, 1 n/a of 4 <what>'`` (zero counts left out)."""
    n_pass = sum(v is True for v in verdicts)
    n_fail = sum(v is False for v in verdicts)
    n_na = len(verdicts) - n_pass - n_fail
    parts = [f"{n_pass} pass"] + ([f"{n_fail} FAIL"] if n_fail else []) + ([f"{n_na} n/a"] if n_na else [])
    return f"{', '.join(parts)} of {len(verdicts)}" + (f" {what}" if what else "")


def _g(x: float | None) -> str:
    """3 significant digits (``n/a`` for None / nan)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{x:+.3g} %"


def _row(criterion: str, scope: str, measured: str, threshold: str, passed: bool | None, note: str = "",
         kind: str = "criterion", value: float | None = None) -> dict[str, Any]:
    return {"criterion": criterion, "scope": scope, "kind": kind, "measured": measured,
            "value": float("nan") if value is None else float(value), "threshold": threshold,
            "passed": passed, "note": note}


def _bool_or_none(x: Any) -> bool | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, str):
        low = x.strip().lower()
        return True if low == "true" else False if low == "false" else None
    return bool(x)


def result_dir(root: str | Path, experiment: str, kind: str, run: str | None = None) -> Path:
    """Results folder of a notebook kind (``sweep``, ``robustness``, ``mechanistic``) in an experiment:
    ``<root>/<experiment>/<kind>/<run>/`` (run ``main`` by default) when it exists, else
    ``<root>/<experiment>/<kind>/`` when that holds result files itself, else the expected
    ``<kind>/<run>/`` (so a missing-file message names where the pipeline writes)."""
    base = Path(root) / experiment / LAYOUT.get(kind, kind)
    with_run = base / (run or LAYOUT["run"])
    if with_run.is_dir():
        return with_run
    if base.is_dir() and any(p.suffix in (".csv", ".json") for p in base.iterdir()):
        return base
    return with_run


def _sweep_dir(root: Path, backbone: Backbone) -> Path:
    return result_dir(root, backbone.experiment, "sweep", backbone.sweep_run)


def _scope(b: Backbone) -> str:
    return f"{b.name} ({b.role})"


# ----------------------------------------------------------------------------- a. quality


A_NAME = "a. quality preservation (stride 10)"
QUALITY_NOTE = (
    "Embedded equivalents: FD of the fashioncnn classifier features plays FID, accuracy of the prompted "
    "class (classifier agreement with the prompt) plays CLIPScore. Changes are relative to FD-5 of the "
    "original model, on means over seeds (summary.csv)."
)


def _quality_delta(summary: pd.DataFrame, path: Path, model: str, config: str, ref_model: str,
                   ref_config: str) -> dict[str, float]:
    fd = _summary_value(summary, path, model, config, "fd")
    acc = _summary_value(summary, path, model, config, "accuracy")
    fd_ref = _summary_value(summary, path, ref_model, ref_config, "fd")
    acc_ref = _summary_value(summary, path, ref_model, ref_config, "accuracy")
    if fd_ref == 0 or acc_ref == 0:
        raise InputError(f"{path}: FD-5 reference of {ref_model!r} is zero; a relative change is undefined")
    return {"fd": fd, "acc": acc, "fd_ref": fd_ref, "acc_ref": acc_ref,
            "d_fd": 100.0 * (fd - fd_ref) / abs(fd_ref), "d_acc": 100.0 * (acc - acc_ref) / abs(acc_ref)}


def _quality_passed(d: Mapping[str, float]) -> bool:
    return d["d_fd"] <= THRESHOLDS["fd_increase_pct"] and d["d_acc"] >= THRESHOLDS["accuracy_change_pct"]


def _quality_measured(d: Mapping[str, float], fd_name: str, acc_name: str) -> str:
    return (f"ΔFD {_pct(d['d_fd'])} ({fd_name} {_g(d['fd'])} vs {_g(d['fd_ref'])}); "
            f"Δacc {_pct(d['d_acc'])} ({acc_name} {_g(d['acc'])} vs {_g(d['acc_ref'])})")


QUALITY_THRESHOLD = "ΔFD ≤ +5 % and Δ class accuracy ≥ −2 % vs FD-5 of the original model"


def _criterion_a(
    root: Path, b: Backbone, stride_config: str, ref_config: str
) -> tuple[list[dict], str | None, bool | None]:
    """Rows of criterion a for one backbone, the selected FCR model label and its verdict."""
    path = _sweep_dir(root, b) / contract.SUMMARY
    scope = _scope(b)
    try:
        summary = read_table(path)
        fd_name = lookup_column(summary, "summary", "fd", path)
        acc_name = lookup_column(summary, "summary", "accuracy", path)
        candidates = {}
        for lam, model in b.fcr_models.items():
            try:
                candidates[lam] = (model, _summary_value(summary, path, model, stride_config, "fd"))
            except InputError:
                continue
        if not candidates:
            raise InputError(f"{path}: none of the FCR models {list(b.fcr_models.values())} has a {stride_config} row "
                             "(their fine-tunes or notebook 03 over them have not run)")
        best_lam, (best, _) = min(candidates.items(), key=lambda kv: kv[1][1])
        d = _quality_delta(summary, path, best, stride_config, b.name, ref_config)
    except InputError as exc:
        return [_row(A_NAME, scope, "n/a", QUALITY_THRESHOLD, None, str(exc))], None, None
    missing = sorted(set(b.fcr_models) - set(candidates))
    rule = (f"Best λ chosen by the lowest {fd_name} at {stride_config} among λ ∈ "
            f"{sorted(b.fcr_models)}: λ = {best_lam:g} ({best}).")
    if missing:
        rule += f" Not in summary.csv (not run): λ = {', '.join(f'{m:g}' for m in missing)}."
    passed = _quality_passed(d)
    rows = [_row(A_NAME, scope, _quality_measured(d, fd_name, acc_name), QUALITY_THRESHOLD, passed,
                 f"{rule} {QUALITY_NOTE}", value=d["d_fd"])]
    context = [("λ = 0 control", b.control)] if b.control else []
    context.append(("original model, plain FD caching", b.name))
    for what, model in context:
        try:
            dc = _quality_delta(summary, path, model, stride_config, b.name, ref_config)
            rows.append(_row(A_NAME, f"{scope}: {what} ({model}) at {stride_config}",
                             _quality_measured(dc, fd_name, acc_name), QUALITY_THRESHOLD, _quality_passed(dc),
                             "Context only (not part of the verdict): the same test without FCR.",
                             kind="context", value=dc["d_fd"]))
        except InputError as exc:
            rows.append(_row(A_NAME, f"{scope}: {what} ({model}) at {stride_config}", "n/a", QUALITY_THRESHOLD,
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


def _criterion_b(root: Path, b: Backbone, fcr_model: str | None, quality_passed: bool | None,
                 stride_config: str, ref_config: str) -> tuple[list[dict], bool | None]:
    sweep = _sweep_dir(root, b)
    scope = _scope(b)
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
        rows.append(_row(f"{B_NAME} (wall time)", scope, "n/a", speed_thr, None, arch_error, kind="part"))
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
            measured = ", ".join(f"batch {k}: {_g(v)}×" for k, v in speed.items())
            time_pass = all(v >= THRESHOLDS["speedup"] for v in speed.values())
            note = (f"Measured wall time per image of {stride_config} vs {ref_config} on architecture {arch} "
                    f"(cost depends on the architecture, not the weights), device {device}; medians of timed repeats "
                    "(fcr.experiments.sweep.evaluate_cost). The seed times on an A100; these timings are from the device named.")
            rows.append(_row(f"{B_NAME} (wall time)", scope, measured, speed_thr, time_pass, note, kind="part",
                             value=min(speed.values())))
        except InputError as exc:
            rows.append(_row(f"{B_NAME} (wall time)", scope, "n/a", speed_thr, None, str(exc), kind="part"))

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
                              f"{stride_config} vs {ref_config} is {_g(bound)}×, so a {THRESHOLDS['speedup']:g}× FLOP "
                              "speed-up fails by construction whatever FCR does; a larger wall-time gain can only come "
                              "from better hardware use (parallel decoding), not from fewer operations.")
                note = f"{bound_note} {note}"
            rows.append(_row(f"{B_NAME} (FLOPs)", scope, f"{_g(fl)}× counted, bound {_g(bound)}×", speed_thr,
                             flops_pass, note, kind="context", value=fl))
        except InputError as exc:
            rows.append(_row(f"{B_NAME} (FLOPs)", scope, "n/a", speed_thr, None, str(exc), kind="context"))

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
            measured = f"{_pct(inc)} ({_g(m10 / 2**20)} vs {_g(m5 / 2**20)} MiB)"
            if device.startswith("cuda"):
                mem_pass = inc <= THRESHOLDS["memory_increase_pct"]
                note = "Peak allocated GPU memory (torch.cuda.max_memory_allocated) at the largest timed batch."
            else:
                note = (f"Not measurable on device {device}: the CPU figure is the process-wide RSS high-water mark "
                        "(fcr.eval.profiling.peak_memory), which never decreases and cannot separate configurations timed "
                        "in one process; the seed's criterion is on GPU memory (VRAM).")
            rows.append(_row(f"{B_NAME} (peak memory)", scope, measured, mem_thr, mem_pass, note, kind="part",
                             value=inc))
        except InputError as exc:
            rows.append(_row(f"{B_NAME} (peak memory)", scope, "n/a", mem_thr, None, str(exc), kind="part"))
    else:
        rows.append(_row(f"{B_NAME} (peak memory)", scope, "n/a", mem_thr, None,
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
    rows.insert(0, _row(B_NAME, scope, summary, threshold, passed, note))
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
        return [_row(name, "SD1.5 / SD2.1 architectures", "n/a", speed_thr, None,
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
            parts.append(f"{'parallel' if mode == 'par' else 'sequential'} decoding: {_g(speed)}×, {_pct(mem)} memory")
            ok.append(speed >= THRESHOLDS["speedup"] and mem <= THRESHOLDS["memory_increase_pct"])
        if not parts:
            continue
        device = str(group["device"].iloc[0]) if "device" in group else "GPU"
        short = str(model).split(" ")[0]
        rows.append(_row(name, f"{short} architecture, batch {batch}", "; ".join(parts), speed_thr, any(ok),
                         f"{path}: {device}, fp16, 50 DDIM steps with guidance, random weights (time and memory "
                         "do not depend on them), CUDA-event medians and torch.cuda.max_memory_allocated. Passed if "
                         "either decoding mode meets both bounds. Parallel decoding batches a key interval's decoder "
                         "calls: fewer, larger launches (faster where the GPU is launch-bound) at memory growing "
                         "with the stride; sequential decoding keeps FD-5's memory.", kind="context"))
    return rows


# ----------------------------------------------------------------------------- c. robustness

C_NAME = "c. robustness"
C_THRESHOLD = "quality drop with FCR ≤ drop of the original model, every stress and metric"


def _read_tables(folders: Sequence[Path], name: str) -> tuple[pd.DataFrame, str]:
    """``name`` from every folder that has it, concatenated, and a description of where it came from;
    :class:`InputError` naming every expected path when none has it."""
    paths = [Path(f) / name for f in folders]
    present = [p for p in paths if p.is_file()]
    if not present:
        where = " and ".join(map(str, paths)) or name
        raise InputError(f"missing {where}: written by {PRODUCERS.get(name, 'the pipeline')}")
    frames = [pd.read_csv(p) for p in present]
    return pd.concat(frames, ignore_index=True), " + ".join(map(str, present))


def robustness_rows(robustness_dirs: Sequence[str | Path], backbones: Sequence[Backbone]) -> list[dict]:
    """Criterion c's rows (verdict columns) for the notebook-04 result folders given: the main
    job's for the verdict, or e.g. a supplementary run with more seeds."""
    try:
        df, path = _read_tables([Path(d) for d in robustness_dirs], contract.CRITERION)
        ocol = lookup_column(df, "criterion", "original_model", path)
        fcol = lookup_column(df, "criterion", "fcr_model", path)
        scol = lookup_column(df, "criterion", "stress", path)
        mcol = lookup_column(df, "criterion", "metric", path, required=False)
        pcol = lookup_column(df, "criterion", "passed", path, required=False)
        d_f = lookup_column(df, "criterion", "drop_fcr", path, required=pcol is None)
        d_o = lookup_column(df, "criterion", "drop_original", path, required=pcol is None)
    except InputError as exc:
        return [_row(C_NAME, "all backbones", "n/a", C_THRESHOLD, None, str(exc))]
    if df.empty:
        return [_row(C_NAME, "all backbones", "n/a", C_THRESHOLD, None, f"{path} has no rows")]
    df = df[df[scol].astype(str) != "none"]  # the unstressed reference has no drop
    rows, verdicts = [], []
    known = {b.name: b for b in backbones}
    for original, group in df.groupby(ocol, sort=False):
        if pcol is not None:
            flags = [_bool_or_none(v) for v in group[pcol]]
            source = f"'{pcol}' column of criterion.csv"
        else:
            flags = [bool(f <= o) if math.isfinite(f) and math.isfinite(o) else None
                     for f, o in zip(group[d_f].astype(float), group[d_o].astype(float))]
            source = "drop_fcr ≤ drop_original"
        ok = all_of(flags)
        verdicts.append(ok)
        n_pass = sum(v is True for v in flags)
        measured = _count(flags, "stress × metric pairs")
        margin = (group[d_f].astype(float) - group[d_o].astype(float)) if d_f and d_o else pd.Series(dtype=float)
        if margin.notna().any():
            worst = group.loc[margin.idxmax()]
            measured += (f"; worst: {worst[scol]}" + (f" / {worst[mcol]}" if mcol else "")
                         + f" drop {_g(float(worst[d_f]))} (FCR) vs {_g(float(worst[d_o]))} (original)")
        ccol = lookup_column(group, "criterion", "config", path, required=False)
        failing = [f"{r[scol]}" + (f"/{r[mcol]}" if mcol else "") + (f" at {r[ccol]}" if ccol else "")
                   for (_, r), v in zip(group.iterrows(), flags) if v is False]
        note = f"Pass/fail from the {source}; FCR model(s): {', '.join(sorted(set(map(str, group[fcol]))))}."
        if failing:
            note += f" Failing: {', '.join(failing)}."
        scope = _scope(known[original]) if original in known else str(original)
        rows.append(_row(C_NAME, scope, measured, C_THRESHOLD, ok, note, kind="part", value=n_pass / len(flags)))
    absent = [b.name for b in backbones if b.name not in set(df[ocol].astype(str))]
    note = "AND over the backbones in criterion.csv (notebook 04)."
    if absent:
        note += f" Not stress-tested (no rows): {', '.join(absent)}."
    rows.insert(0, _row(C_NAME, "all stress-tested backbones", _count(verdicts, "backbones"),
                        C_THRESHOLD, all_of(verdicts), note))
    return rows


# ----------------------------------------------------------------------------- e. mechanistic

E_NAME = "e. mechanistic"
# The variance reduction that counts: all regularised features, Δ in sampling steps (the gaps FD caching skips).
PREFERRED_FEATURE_GROUP = "all"
PREFERRED_UNITS = "sampling"


def _regression_row(path: Path, r2_thr: str, rows: list[dict]) -> bool | None:
    """Append the regression part row of one notebook 05 run (``regression.json``); return its verdict."""
    scope = f"variance vs quality difference ({path.parent})"
    try:
        reg = _read_json(path)
        if lookup_column(reg, "regression", "r2", path, required=False) is None and "status" in reg:
            raise InputError(f"{path}: the primary regression was not fitted (status: {reg['status']})")
        r2 = float(reg[lookup_column(reg, "regression", "r2", path)])
        slope = float(reg[lookup_column(reg, "regression", "slope", path)])
        lo_c = lookup_column(reg, "regression", "slope_lo", path, required=False)
        hi_c = lookup_column(reg, "regression", "slope_hi", path, required=False)
        n_c = lookup_column(reg, "regression", "n", path, required=False)
        ok = bool(r2 >= THRESHOLDS["r2"] and slope > 0)
        measured = f"R² {_g(r2)}, slope {_g(slope)}"
        if lo_c and hi_c and reg[lo_c] is not None and reg[hi_c] is not None:
            measured += f" [{_g(float(reg[lo_c]))}, {_g(float(reg[hi_c]))}]"
        if n_c and reg[n_c] is not None:
            measured += f", n = {int(float(reg[n_c]))}"
        note = ("OLS of the quality difference on the encoder-feature variance (notebook 05). A positive slope is "
                "required too: a strong negative relation would contradict the mechanism.")
        own = reg.get("criterion")
        if isinstance(own, Mapping) and "passed" in own:
            note += (f" Notebook 05's own criterion (some fine-tuned model reduces the variance enough): "
                     f"passed = {own['passed']}.")
        rows.append(_row(f"{E_NAME}: regression", scope, measured, r2_thr, ok, note, kind="part", value=r2))
        return ok
    except InputError as exc:
        rows.append(_row(f"{E_NAME}: regression", scope, "n/a", r2_thr, None, str(exc), kind="part"))
    except (TypeError, ValueError) as exc:
        rows.append(_row(f"{E_NAME}: regression", scope, "n/a", r2_thr, None, f"{path}: unreadable value ({exc})",
                         kind="part"))
    return None


def _criterion_e(mechanistic_dirs: Sequence[Path], selected: Sequence[str]) -> list[dict]:
    rows: list[dict] = []
    var_thr = f"variance reduction ≥ {THRESHOLDS['variance_reduction_pct']:g} %"
    var_verdicts: list[bool | None] = []
    missing = [Path(d) / contract.VARIANCE_REDUCTION for d in mechanistic_dirs
               if not (Path(d) / contract.VARIANCE_REDUCTION).is_file()]
    try:
        df, path = _read_tables(mechanistic_dirs, contract.VARIANCE_REDUCTION)
        mcol = lookup_column(df, "variance_reduction", "model", path)
        rcol = lookup_column(df, "variance_reduction", "reduction_pct", path)
        gcol = lookup_column(df, "variance_reduction", "feature_group", path, required=False)
        ucol = lookup_column(df, "variance_reduction", "units", path, required=False)
        if df.empty:
            raise InputError(f"{path} has no rows")
        chosen = [m for m in dict.fromkeys(df[mcol].astype(str)) if m in set(selected)]
        if not chosen:  # no best-λ model known (criterion a not measurable): every FCR model (λ > 0) counts
            fcr_rows = df[df["lambda_fcr"].astype(float) > 0] if "lambda_fcr" in df.columns else df
            chosen = list(dict.fromkeys(fcr_rows[mcol].astype(str)))
        verdict_models = chosen
        for model, group in df.groupby(df[mcol].astype(str), sort=False):
            if gcol is not None and (group[gcol].astype(str) == PREFERRED_FEATURE_GROUP).any():
                group = group[group[gcol].astype(str) == PREFERRED_FEATURE_GROUP]
            if ucol is not None and (group[ucol].astype(str) == PREFERRED_UNITS).any():
                group = group[group[ucol].astype(str) == PREFERRED_UNITS]
            values = group[rcol].astype(float)
            worst = float(values.min())
            ok = bool(math.isfinite(worst) and worst >= THRESHOLDS["variance_reduction_pct"])
            parts = [f"{_g(float(v))} %" + (f" ({r[ucol]})" if ucol else "")
                     for v, (_, r) in zip(values, group.iterrows())]
            kind = "part" if model in verdict_models else "context"
            if kind == "part":
                var_verdicts.append(ok)
            group_txt = ", ".join([f"feature group {group[gcol].iloc[0]}" if gcol else "all feature groups",
                                   f"Δ in {group[ucol].iloc[0]} units" if ucol else "all units"])
            rows.append(_row(f"{E_NAME}: variance reduction", model, ", ".join(parts), var_thr, ok,
                             f"Encoder-feature variance of the FCR model vs its original ({group_txt}; the smallest "
                             f"reduction counts), column '{rcol}' of variance_reduction.csv.",
                             kind=kind, value=worst))
        for miss in missing:  # some experiments have the table, others not: the gap is not measurable
            var_verdicts.append(None)
            rows.append(_row(f"{E_NAME}: variance reduction", f"models of {miss.parent}", "n/a", var_thr, None,
                             f"missing {miss}: written by {_producer(miss)}", kind="part"))
    except InputError as exc:
        var_verdicts.append(None)
        rows.append(_row(f"{E_NAME}: variance reduction", "FCR models", "n/a", var_thr, None, str(exc), kind="part"))

    r2_thr = f"R² ≥ {THRESHOLDS['r2']:g} with a positive slope"
    r2_verdicts = [_regression_row(Path(d) / contract.REGRESSION, r2_thr, rows) for d in mechanistic_dirs]
    r2_ok = all_of(r2_verdicts)
    ok = all_of([*var_verdicts, r2_ok])
    rows.insert(0, _row(E_NAME, "selected FCR models",
                        f"variance: {_count(var_verdicts, 'models')}; R²: {_count(r2_verdicts, 'regressions')}",
                        f"{var_thr} and {r2_thr}", ok,
                        "Models in the verdict: the best-λ model of each backbone (criterion a) found in "
                        "variance_reduction.csv, else every FCR model (λ > 0) in it; every regression of notebook "
                        "05 (one per experiment)."))
    return rows


# ----------------------------------------------------------------------------- f. training overhead

F_NAME = "f. training overhead"

def _pretraining(model: str, models_dir: Path, flops_fn: Callable[[str, bool], float],
                 depth: int = 0) -> tuple[float, list[str]]:
    """Pre-training FLOPs of an embedded model, its ancestors' included (a derivative model is a fine-tune)."""
    if depth > 5:
        raise InputError(f"model lineage of {model!r} is deeper than 5 levels (a cycle?)")
    run = training_cost.run_compute(models_dir / model)
    per_image = flops_fn(run.architecture, run.lambda_fcr > 0)
    total = run.images * per_image
    parts = [f"{model}: {run.steps} steps × {run.images_per_step} images × {_g(per_image / 1e9)} GFLOP "
             f"(λ={run.lambda_fcr:g}, {run.steps_source})"]
    if run.parent is not None:
        parent_total, parent_parts = _pretraining(run.parent, models_dir, flops_fn, depth + 1)
        total += parent_total
        parts += parent_parts
    return total, parts


def _criterion_f(root: Path, backbones: Sequence[Backbone], selected: Sequence[str], models_dir: Path,
                 flops_fn: Callable[[str, bool], float], sd_finetune_gpu_hours: float | None) -> list[dict]:
    thr = f"fine-tune compute ≤ {THRESHOLDS['overhead_pct']:g} % of pre-training compute"
    rows, verdicts = [], []
    for b in backbones:
        for lam, label in b.fcr_models.items():
            kind = "part" if label in selected or not selected else "context"
            scope = f"{label} (from {b.name})"
            try:
                run = training_cost.run_compute(root / b.experiment / label)
                ft_img = flops_fn(run.architecture, run.lambda_fcr > 0)
                ft = run.images * ft_img
                pre, lineage = _pretraining(b.name, models_dir, flops_fn)
                pct = training_cost.overhead_percent(ft, pre)
                ok = pct <= THRESHOLDS["overhead_pct"]
                measured = f"{_g(pct)} % ({_g(ft / 1e15)} PFLOP vs {_g(pre / 1e15)} PFLOP)"
                note = (f"Fine-tune: {run.steps} steps ({run.steps_source}) × {run.images_per_step} images × "
                        f"{_g(ft_img / 1e9)} GFLOP per image of a λ={run.lambda_fcr:g} training step. Pre-training: "
                        f"{'; '.join(lineage)}. "
                        "FLOPs per image counted with torch.utils.flop_counter on one forward + backward "
                        "(fcr.eval.training_cost.training_step_flops).")
            except (InputError, training_cost.TrainingRunError, FileNotFoundError) as exc:
                ok, measured, note, pct = None, "n/a", str(exc), None
            if kind == "part":
                verdicts.append(ok)
            rows.append(_row(F_NAME, scope, measured, thr, ok, note, kind=kind, value=pct))
    rows.insert(0, _row(F_NAME, "selected FCR runs (embedded)", _count(verdicts, "runs"),
                        thr, all_of(verdicts), "AND over the best-λ run of each backbone (criterion a)."))
    # Stable Diffusion: the published pre-training figure; the SD fine-tune is not run here.
    budget = SD_PRETRAINING["gpu_hours"] * THRESHOLDS["overhead_pct"] / 100.0
    sd_thr = f"≤ {budget:,.0f} {SD_PRETRAINING['hardware']} GPU-hours ({thr})"
    if sd_finetune_gpu_hours is None:
        rows.append(_row(F_NAME, "SD1.5 (published pre-training compute)", "n/a", sd_thr, None,
                         f"Not measurable here: no SD fine-tune ran on this machine (no SD weights can be loaded). "
                         f"Denominator: {SD_PRETRAINING['gpu_hours']:,.0f} GPU-hours, {SD_PRETRAINING['source']}. "
                         "Note: the seed's plan of ≤ 40 GPU-hours per variation (fine-tune + evaluation) is a plan, "
                         "not a measurement.", kind="context"))
    else:
        pct = 100.0 * sd_finetune_gpu_hours / SD_PRETRAINING["gpu_hours"]
        rows.append(_row(F_NAME, "SD1.5 (published pre-training compute)",
                         f"{_g(pct)} % ({_g(sd_finetune_gpu_hours)} GPU-hours)", sd_thr,
                         pct <= THRESHOLDS["overhead_pct"],
                         f"GPU-hours of the SD fine-tune as given; denominator {SD_PRETRAINING['source']}. "
                         "GPU-hours of different GPU types are not the same compute.", kind="context", value=pct))
    return rows


# ----------------------------------------------------------------------------- entry point


def evaluate_criteria(
    root: str | Path,
    *,
    setting: str = "embedded",
    backbones: Sequence[Backbone] | None = None,
    models_dir: str | Path | None = None,
    robustness_dirs: Sequence[str | Path] | None = None,
    mechanistic_dirs: Sequence[str | Path] | None = None,
    stride_config: str = "FD-10",
    reference_config: str = "FD-5",
    train_flops_per_image: Callable[[str, bool], float] | None = None,
    sd_finetune_gpu_hours: float | None = None,
    sd_gpu_cost: str | Path | None = None,
) -> pd.DataFrame:
    """Evaluate the seed's success criteria a–f on the run under ``root``.

    Returns a table with :data:`VERDICT_COLUMNS`: ``criterion``, ``scope`` (backbone, model or
    experiment), ``kind`` (criterion / part / context), ``measured`` (readable), ``value`` (the
    key number), ``threshold``, ``passed`` (True / False / None when not measurable) and ``note``.
    The last row, ``overall``, is the three-valued AND of all ``criterion`` rows.

    ``backbones``: default those of ``setting`` in ``params/experiments.yaml``.
    ``models_dir``: the original models' folders (pre-training logs for f; default ``models/``).
    ``robustness_dirs`` / ``mechanistic_dirs``: notebook 04 / 05 result folders (default: the
    backbones' notebook-04 runs; the mechanistic folders of every experiment of ``backbones``).
    ``train_flops_per_image(architecture, fcr)``: FLOPs per image of a training step (default:
    counted with :func:`fcr.eval.training_cost.training_step_flops` on the embedded architecture, once per pair).
    ``sd_finetune_gpu_hours``: GPU-hours of an SD FCR fine-tune, if one was run elsewhere.
    ``sd_gpu_cost``: ``benchmarks/bench_sd_gpu.py``'s CSV: adds criterion-b context rows at SD scale.
    """
    from fcr.settings.models import MODELS_DIR

    root = Path(root)
    backbones = backbones_of(setting) if backbones is None else backbones
    models_dir = Path(models_dir) if models_dir is not None else MODELS_DIR
    experiments = list(dict.fromkeys(b.experiment for b in backbones))
    if robustness_dirs is None:
        robustness_dirs = list(dict.fromkeys(result_dir(root, b.experiment, "robustness", b.robustness_run)
                                             for b in backbones if b.robustness_run is not None))
    if mechanistic_dirs is None:
        mechanistic_dirs = [result_dir(root, e, "mechanistic") for e in experiments]
    robustness_dirs = [Path(d) for d in robustness_dirs]
    mechanistic_dirs = [Path(d) for d in mechanistic_dirs]
    flops_fn = train_flops_per_image or training_cost.embedded_flops_per_image()

    rows: list[dict] = []
    selected: list[str] = []
    per_backbone: dict[str, tuple[bool | None, bool | None]] = {}
    for b in backbones:
        a_rows, best, a_ok = _criterion_a(root, b, stride_config, reference_config)
        b_rows, b_ok = _criterion_b(root, b, best, a_ok, stride_config, reference_config)
        rows += a_rows + b_rows
        if best:
            selected.append(best)
        per_backbone[b.name] = (a_ok, b_ok)
    if sd_gpu_cost is not None:
        rows += sd_gpu_cost_rows(sd_gpu_cost, stride_config, reference_config)
    rows += robustness_rows(robustness_dirs, backbones)

    def word(v: bool | None) -> str:
        return "pass" if v else "n/a" if v is None else "FAIL"

    d_ok = all_of(v for pair in per_backbone.values() for v in pair)
    rows.append(_row("d. generalization", "all backbones",
                     "; ".join(f"{n}: a {word(a)}, b {word(bb)}" for n, (a, bb) in per_backbone.items()),
                     "every backbone passes a and b", d_ok,
                     "Backbones and the roles they play: "
                     + ", ".join(f"{b.name} = {b.role}" for b in backbones) + "."))
    rows += _criterion_e(mechanistic_dirs, selected)
    rows += _criterion_f(root, backbones, selected, models_dir, flops_fn, sd_finetune_gpu_hours)

    table = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    verdict_rows = table[table["kind"] == "criterion"]
    overall = all_of(verdict_rows["passed"].tolist())
    failing = verdict_rows[verdict_rows["passed"] == False]  # noqa: E712  (None must not match)
    unmeasured = verdict_rows[verdict_rows["passed"].isna()]
    note = "Three-valued AND of every criterion row (seed: all must hold to claim a win)."
    if len(failing):
        note += " Failing: " + "; ".join(f"{r.criterion} [{r.scope}]" for r in failing.itertuples()) + "."
    if len(unmeasured):
        note += " Not measurable: " + "; ".join(f"{r.criterion} [{r.scope}]" for r in unmeasured.itertuples()) + "."
    measured = _count(verdict_rows["passed"].tolist(), "criterion rows")
    overall_row = pd.DataFrame([_row("overall", "all criteria", measured, "all of a–f", overall, note)],
                               columns=VERDICT_COLUMNS)
    table = pd.concat([table, overall_row], ignore_index=True)
    table["passed"] = table["passed"].astype(object).where(table["passed"].notna(), None)
    return table
