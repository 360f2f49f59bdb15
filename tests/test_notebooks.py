"""The papermill runner: parameters are validated before anything is written, and each notebook
receives the keys it declares (unknown keys still reach it, so its own validation names them)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill as pm
import pytest

from fcr.config import ConfigError
from fcr.notebooks import list_notebooks, prepare

REPO = Path(__file__).resolve().parents[1]


def test_numbered_notebooks_exist_and_declare_parameters() -> None:
    names = [p.name for p in list_notebooks()]
    assert names[:2] == ["01_data_prep.ipynb", "02_finetune.ipynb"]
    for nb in list_notebooks():
        declared = pm.inspect_notebook(str(nb))
        assert "setting" in declared and "seed" in declared, nb.name


def test_bad_parameters_fail_before_anything_is_written(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-4\n")
    out = tmp_path / "prepared"
    with pytest.raises(ConfigError, match="learning_rate"):
        prepare([REPO / "params" / "smoke.yaml", bad], out)
    assert not out.exists()


def test_prepare_injects_only_declared_keys(tmp_path: Path) -> None:
    written = prepare([REPO / "params" / "fashion_mnist.yaml", REPO / "params" / "smoke.yaml"], tmp_path)
    nb01 = nbformat.read(written[0], as_version=4)
    injected = next(c for c in nb01.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "data_dir = " in injected.source
    assert "lambda_fcr" not in injected.source  # a fine-tuning key is not pushed into the data notebook
    nb02 = nbformat.read(written[1], as_version=4)
    injected = next(c for c in nb02.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "lambda_fcr = 0.1" in injected.source and 'model = "scratch"' in injected.source


def test_finetune_notebook_declares_every_parameter_the_finetune_reads() -> None:
    """papermill injects only declared keys: an undeclared training key would silently keep its
    default (this once dropped weight_decay and lr_warmup_steps from the experiment overlays)."""
    import dataclasses
    import re

    from fcr.config import SCHEMA
    from fcr.train.finetune import FINETUNE_KEYS
    from fcr.train.loop import TrainConfig

    source = "".join((REPO / "fcr" / name).read_text() for name in ("train/finetune.py", "train/loop.py", "backends/sd/model.py"))
    read = set(re.findall(r'opts\.[a-z]+\.([a-z_0-9]+)', source)) | set(re.findall(r'opts\.value\("([a-z_0-9]+)"', source))
    read |= {f.name for f in dataclasses.fields(TrainConfig)}
    missing_from_list = sorted(k for k in read if k in SCHEMA and k not in FINETUNE_KEYS)
    assert not missing_from_list, missing_from_list
    declared = set(pm.inspect_notebook(str(REPO / "notebooks" / "02_finetune.ipynb")))
    assert not sorted(set(FINETUNE_KEYS) - declared), sorted(set(FINETUNE_KEYS) - declared)


def test_parameter_cells_are_generated_from_the_schema() -> None:
    """Every notebook's parameters cell is what ``python -m fcr.notebooks parameters`` writes: the
    keys it declares at their schema defaults, and papermill parses every line (a line it cannot
    parse would silently not be injectable)."""
    import json

    from fcr.notebooks import list_notebooks, parameters_cell

    for path in list_notebooks():
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        source = "".join(cell["source"])
        declared = list(pm.inspect_notebook(str(path)))
        assert source == parameters_cell(declared), f"{path.name}: regenerate with python -m fcr.notebooks parameters"
        assert len(declared) == len(source.splitlines()), f"{path.name}: papermill skips a line of the parameters cell"


def test_distillation_notebook_declares_every_parameter_the_distillation_reads() -> None:
    """Notebook 02b reads the fine-tune's keys (model, data, training loop, FCR term) except the
    checkpoint selection, which distillation does not run, plus the distillation options."""
    import dataclasses
    import re

    from fcr.config import SCHEMA
    from fcr.options import CacheTrainingOptions, DistillationOptions
    from fcr.train.finetune import FINETUNE_KEYS

    source = (REPO / "fcr" / "train" / "distillation.py").read_text()
    read = {k for k in re.findall(r'opts\.[a-z]+\.([a-z_0-9]+)', source) if k in SCHEMA}
    # checkpoint selection and cache-aware fine-tuning are fine-tune options a distillation never reads
    selection = ({k for k in FINETUNE_KEYS if k.startswith("validate")} | {"early_stopping_patience"}
                 | {f.name for f in dataclasses.fields(CacheTrainingOptions)})
    wanted = (set(FINETUNE_KEYS) - selection) | {f.name for f in dataclasses.fields(DistillationOptions)} | read
    declared = set(pm.inspect_notebook(str(REPO / "notebooks" / "02b_distillation.ipynb")))
    assert not sorted(wanted - declared), sorted(wanted - declared)
