"""The ablation grid (issue #31): its manifest block, the replicated contrasts with Holm per family,
the descriptive secondaries, the early-stopping selections, the best-step sensitivity and the
report's section with its forest plot.

Side files are built from seeded tensors to test code paths only (never results).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fcr import contract
from fcr.analysis.grid import early_stopping_selections, grid_contrasts, grid_secondary, grid_sensitivity, grid_tables
from fcr.contract import model_label
from fcr.eval.results import save_safetensors_atomic
from fcr.experiments.paired_fidelity import fidelity_table
from fcr.experiments.sweep import quality_stem
from fcr.grid_design import Grid, GridArm, best_of, parse_grid, split_variant
from fcr.manifest import ManifestError, Study, load_manifest
from fcr.train.checkpoint import write_step_log
from fcr.train.validation import VALIDATION_COLUMNS, EarlyStopping, write_selection

REPO = Path(__file__).resolve().parents[1]
N, D = 40, 6
CONFIGS = {"full": (1, 0.0), "FD-10": (10, 0.05), "FD-20": (20, 0.15)}

# Two replicates per arm; "good" caches far more faithfully than the control, "same" like it.
GRID = Grid(run="grid", control=("c0", "c1"),
            arms=(GridArm("alpha", "good", ("g0", "g1")), GridArm("alpha", "same", ("s0", "s1")),
                  GridArm("beta", "same too", ("t0", "t1"))),
            reference=GridArm("reference", "ref", ("r0", "r1")), best_run="grid_best", reference_run="main")
SCALES = {"c": 1.0, "g": 0.2, "s": 1.0, "t": 1.0, "r": 1.0}


def _write_sweep(out: Path, models: dict[str, float], seeds: tuple[int, ...] = (0,), origin: str | None = "base",
                 gen_seed: int = 0) -> pd.DataFrame:
    """A sweep folder: each model at full / FD-10 / FD-20, its cached images ``scale`` x the noise
    level away from its full images; ``origin`` sampled too (the original's full reference)."""
    gen = torch.Generator().manual_seed(gen_seed)
    save_safetensors_atomic({"features": torch.randn(300, D, generator=gen, dtype=torch.float64)},
                            out / "reference" / "ref.safetensors", {})
    rows = []
    everything = {**({origin: 1.0} if origin else {}), **models}
    for seed in seeds:
        prompts = [f"prompt {seed}-{i}" for i in range(N)]
        for model, scale in everything.items():
            full = torch.rand(N, 1, 8, 8, generator=gen) * 1.6 - 0.8
            feats = torch.randn(N, D, generator=gen, dtype=torch.float64)
            for config, (stride, level) in CONFIGS.items():
                img = full + torch.randn(full.shape, generator=gen) * level * scale
                correct = (torch.rand(N, generator=gen) < 0.8).double()
                save_safetensors_atomic(
                    {"images": ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8),
                     "features": feats + torch.randn(N, D, generator=gen, dtype=torch.float64) * level * scale,
                     "correct": correct},
                    out / "quality" / f"{quality_stem(model, config, seed)}.safetensors",
                    {"model": model, "config": config, "seed": str(seed), "prompts": json.dumps(prompts)})
                rows.append({"model": model, "config": config, "seed": seed, "stride": stride})
    quality = pd.DataFrame(rows)
    quality.to_csv(out / contract.QUALITY, index=False)
    fidelity_table(out, quality, {m: origin for m in models} if origin else {}, n_boot=20).to_csv(
        out / contract.FIDELITY, index=False)
    return quality


def _models(suffix: str = "") -> dict[str, float]:
    return {f"{m}{suffix}": SCALES[m[0]] for m in GRID.fine_tunes}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """An output root with the grid sweep (seeds 0, 1), the best-step sweep (seed 0) and every
    grid fine-tune's selection record."""
    root = tmp_path_factory.mktemp("grid_root")
    _write_sweep(root / "exp" / "sweep" / "grid", _models(), seeds=(0, 1))
    # The reference arm in another run, which shares seeds 0 and 1 (same prompts) with the grid's.
    _write_sweep(root / "exp" / "sweep" / "main", {m: 1.0 for m in GRID.reference.models}, seeds=(0, 1, 2),
                 gen_seed=2)
    _write_sweep(root / "exp" / "sweep" / "grid_best", _models("@best"), seeds=(0,), origin=None, gen_seed=1)
    for k, model in enumerate(GRID.fine_tunes):
        run = root / "exp" / model
        run.mkdir(parents=True)
        stopping = EarlyStopping(window=2)
        for step, value in ((25, 20.0), (50, 21.0 + k), (75, 20.5 if k == 0 else 18.0)):
            stopping.update(step, value)
        write_step_log(run / contract.VALIDATION_LOG, stopping.rows, VALIDATION_COLUMNS)
        write_selection(run / contract.EARLY_STOPPING, stopping, "psnr_cached_to_full_db", 75, False)
    return root


STUDY = Study(strides=("FD-10", "FD-20"), n_boot=100)


def test_contrasts_holm_within_each_family_and_a_reference_row(root: Path) -> None:
    sweep = root / "exp" / "sweep" / "grid"
    table = grid_contrasts(sweep, pd.read_csv(sweep / contract.QUALITY), GRID, STUDY, root / "exp" / "sweep" / "main")
    assert list(dict.fromkeys(table["family"])) == ["grid: alpha", "grid: beta", "grid: reference"]
    m = table.groupby("family")["m_tests"].first()
    assert m["grid: alpha"] == 4 and m["grid: beta"] == 2 and m["grid: reference"] == 0  # arms x strides
    assert (table["n"] == 2 * N).all() and (table["n_runs"] == 2).all()
    good = table[table["contrast"] == "good vs λ=0 control"]
    assert (good["decision"] == "FCR better").all() and (good["lo"] > 0).all()
    same = table[table["contrast"] == "same vs λ=0 control"]
    assert (same["p_holm"] >= same["p"]).all()
    for _, r in same.iterrows():  # no effect was built in: either undetected or, rarely, a chance hit
        assert r["lo"] < 0.5 and r["decision"] != "FCR better" or r["p_holm"] < 0.05
    ref = table[table["family"] == "grid: reference"]
    assert ref["p_holm"].isna().all() and ref["decision"].str.startswith("reference").all()
    assert ref["estimate"].notna().all()
    # The reference arm pairs with the control on the seeds both runs sampled; other prompts never pair.
    assert (ref["n"] == 2 * N).all()
    other = root / "other_prompts"
    _write_sweep(other, {m: 1.0 for m in GRID.reference.models}, seeds=(0,), gen_seed=3)
    stem = quality_stem("r0", "FD-10", 0)
    (other / "quality" / f"{stem}.safetensors").unlink()
    save_safetensors_atomic({"images": torch.zeros(N, 1, 8, 8, dtype=torch.uint8), "features": torch.zeros(N, D),
                             "correct": torch.ones(N)}, other / "quality" / f"{stem}.safetensors",
                            {"model": "r0", "config": "FD-10", "seed": "0", "prompts": json.dumps(["x"] * N)})
    with pytest.raises(ValueError, match="other prompts"):
        grid_contrasts(sweep, pd.read_csv(sweep / contract.QUALITY), GRID, STUDY, other)
    # Each arm's estimate is the mean of its replicate pairs' (k-th arm run minus k-th control run).
    runs = [float(x) for x in good["run_estimates"].iloc[0].split("; ")]
    assert good["estimate"].iloc[0] == pytest.approx(sum(runs) / 2, rel=1e-3)


def test_secondary_endpoints_are_descriptive_arm_minus_control(root: Path) -> None:
    sweep = root / "exp" / "sweep" / "grid"
    quality = pd.read_csv(sweep / contract.QUALITY)
    from fcr.analysis.contrasts import fd_infinity_table

    fd_inf = fd_infinity_table(sweep, quality, sorted(set(quality["model"]) - {"base"}))
    table = grid_secondary(sweep, quality, GRID, STUDY, fd_inf)
    assert set(table["endpoint"]) == {"psnr_original_full", "accuracy", "fd_inf"}
    assert set(table["arm"]) == {"good", "same", "same too"}  # the reference arm is in another run
    row = table[(table["arm"] == "good") & (table["endpoint"] == "fd_inf") & (table["config"] == "FD-20")].iloc[0]
    fd = fd_inf[fd_inf["config"] == "FD-20"].set_index("model")["fd_inf"]
    assert row["estimate"] == pytest.approx(fd[["g0", "g1"]].mean() - fd[["c0", "c1"]].mean())
    acc = table[table["endpoint"] == "accuracy"]
    assert ((acc["lo"] <= acc["estimate"]) & (acc["estimate"] <= acc["hi"])).all()


def test_selections_read_each_fine_tunes_record(root: Path) -> None:
    table = early_stopping_selections(root, "exp", GRID)
    assert list(table["model"]) == list(GRID.fine_tunes)
    assert table.iloc[0]["arm"] == "λ=0 control" and table.iloc[0]["family"] == "control"
    # k = 0: checks 20, 21, 20.5 -> moving averages (window 2) 20, 20.5, 20.75: the last is best.
    assert table.iloc[0]["best_step"] == 75 and table.iloc[0]["last_average"] == pytest.approx(20.75)
    # k >= 1: 20, 21 + k, 18 -> the moving average peaks at step 50.
    assert (table.iloc[1:]["best_step"] == 50).all()


def test_sensitivity_pairs_best_weights_with_the_final_ones_on_the_same_pairs(root: Path) -> None:
    selections = early_stopping_selections(root, "exp", GRID)
    table = grid_sensitivity(root / "exp" / "sweep" / "grid_best", root / "exp" / "sweep" / "grid", GRID, STUDY,
                             selections)
    assert len(table) == 3 * 2 and (table["n"] == N).all()  # best sweep ran seed 0 only
    assert table.groupby("family")["m_tests"].first().to_dict() == {"grid: alpha": 4, "grid: beta": 2}
    assert ((table["change"] - (table["estimate"] - table["final_estimate"])).abs() < 1e-9).all()
    assert table[table["arm"] == "good"]["best_steps"].iloc[0] == "50; 50"


def test_grid_tables_and_report_section(root: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from fcr.manifest import Backbone
    from fcr.report.grid import grid_section

    b = Backbone("base", "role", "exp", control="c0", study=STUDY, grid=GRID)
    tables = grid_tables(root, [b])
    assert tables is not None and not tables.notes
    assert len(tables.contrasts) == 3 * 2 + 2 and len(tables.sensitivity) == 6
    assert grid_tables(root, [replace(b, grid=None)]) is None
    for name, table in ((contract.GRID_SELECTIONS, tables.selections), (contract.GRID_SECONDARY, tables.secondary),
                        (contract.GRID_SENSITIVITY, tables.sensitivity)):
        table.to_csv(tmp_path / name, index=False)
    lines, figures = grid_section(tmp_path, tables.contrasts)
    text = "\n".join(lines)
    assert "6 tests in 2 families" in text and "good vs λ=0 control" in text and "Sensitivity" in text
    assert figures == [tmp_path / "figures" / contract.GRID_FOREST] and figures[0].stat().st_size > 0
    # Not run yet: the selections exist, the sweep does not.
    empty = tmp_path / "no_sweep"
    (empty / "exp").mkdir(parents=True)
    pending = grid_tables(empty, [b])
    assert pending.contrasts.empty and "has not run" in pending.notes[0]


def test_best_step_weights_have_their_own_label_and_source() -> None:
    from fcr.pipeline import _model_source

    assert split_variant("grid_control@best") == ("grid_control", "best") and best_of("x") == "x@best"
    assert model_label("outputs/study/exp/grid_control/unet_best") == "grid_control@best"
    assert model_label("outputs/study/exp/grid_control") == "grid_control"
    finetuned = {"grid_control": "outputs/study/exp/grid_control"}
    assert _model_source("grid_control@best", finetuned) == "outputs/study/exp/grid_control/unet_best"
    assert _model_source("grid_control", finetuned) == "outputs/study/exp/grid_control"
    assert _model_source("base", finetuned) == "base"


def test_a_sweep_loads_best_step_weights_under_their_label(tmp_path: Path) -> None:
    """What notebook 03 does with ``<run>/unet_best``: its label, its folder, its origin."""
    from diffusers import UNet2DConditionModel

    from fcr.backends.models import model_training_params, resolve_unet_dir
    from fcr.experiments.sweep import model_labels

    run = tmp_path / "grid_control"
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    for sub in ("unet", contract.BEST_UNET):
        unet.save_pretrained(run / sub, safe_serialization=True)
    (run / contract.RUN_PARAMS).write_text("model: base\n")
    labels = model_labels([str(run), str(run / contract.BEST_UNET)])
    assert list(labels) == ["grid_control", "grid_control@best"]
    assert resolve_unet_dir(labels["grid_control@best"]) == (run / contract.BEST_UNET).resolve()
    assert resolve_unet_dir(labels["grid_control"]) == (run / "unet").resolve()
    assert model_training_params(resolve_unet_dir(labels["grid_control@best"]))["model"] == "base"


def test_manifest_grid_is_parsed_and_validated() -> None:
    study = REPO / "params" / "study" / "experiments.yaml"
    grid = load_manifest(study, REPO)["exp-1-main-ablation"].settings["embedded"].backbones[0].grid
    assert grid is not None and grid.run == "grid" and grid.best_run == "grid_best"
    assert {k: len(v) for k, v in grid.families.items()} == {"lambda": 2, "delta_max": 2, "blocks": 3,
                                                             "formulation": 2}
    assert len(grid.fine_tunes) == 30 and all(len(a.models) == 3 for a in grid.arms)
    # Holm's m per family as params/study/grid.yaml pre-registers it (arms x 2 strides): 18 tests in all.
    assert sum(2 * len(v) for v in grid.families.values()) == 18
    runs = {"grid": ["c0", "c1", "a0", "a1"], "best": ["c0@best", "c1@best", "a0@best"]}
    good = {"run": "grid", "control": ["c0", "c1"], "families": {"f": {"a": ["a0", "a1"]}}}
    assert parse_grid(good, "g", runs).arms[0].models == ("a0", "a1")
    assert parse_grid(None, "g", runs) is None
    for bad, match in (({**good, "extra": 1}, "unknown keys"),
                       ({**good, "families": {"f": {"a": ["a0"]}}}, "1 training runs, the control 2"),
                       ({**good, "run": "nope"}, "no 03_stride_sweep run named 'nope'"),
                       ({**good, "control": ["c0", "zz"]}, r"does not sample \['zz'\]"),
                       ({**good, "best_run": "best"}, r"'best' does not sample \['a1@best'\]"),
                       ({**good, "families": {"f": {}}}, "at least one arm"),
                       ({**good, "reference": {"x": ["a0", "a1"], "y": ["a0", "a1"]}}, "expected one"),
                       ({**good, "reference_run": "grid"}, "there is none"),
                       ({**good, "reference": {"x": ["a0", "a1"]}, "reference_run": "best"},
                        r"'best' does not sample \['a0', 'a1'\]")):
        with pytest.raises(ManifestError, match=match):
            parse_grid(bad, "g", runs)
