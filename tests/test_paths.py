"""Paths shown to a README reader: relative to the checkout they lie in."""

from __future__ import annotations

from pathlib import Path

from fcr.paths import REPO_ROOT, display_path


def test_display_path_is_relative_to_the_checkout_holding_it(tmp_path: Path) -> None:
    assert display_path(REPO_ROOT / "outputs" / "study" / "report") == "outputs/study/report"
    other = tmp_path / "clone"  # another checkout: the code ran from a worktree, the outputs live here
    (other / "fcr").mkdir(parents=True)
    (other / "pyproject.toml").write_text("")
    (other / "fcr" / "paths.py").write_text("")
    assert display_path(other / "outputs" / "study") == "outputs/study"
    outside = tmp_path / "elsewhere" / "run"  # no checkout above it: shown as given
    assert display_path(outside) == str(outside)


def test_portable_text_writes_machine_paths_the_same_everywhere(tmp_path: Path) -> None:
    import tempfile

    from fcr.paths import ABSOLUTE_PATH, portable, portable_text

    model = f"{REPO_ROOT}/outputs/study/exp-1-main-ablation/fcr_lambda0.10_fd10"
    assert portable_text(model) == "outputs/study/exp-1-main-ablation/fcr_lambda0.10_fd10"
    assert portable_text(f'"{REPO_ROOT}"') == '"."'  # the checkout itself
    scratch = Path(tempfile.gettempdir()) / "run" / "x.csv"
    # A path outside the checkout stays usable (it may be read back, e.g. an SD base model folder);
    # only logs (executed notebooks) lose it.
    assert portable_text(str(scratch)) == str(scratch)
    assert portable_text(str(scratch), logs=True) == "<tmp>/run/x.csv"
    assert portable({"model_source": model, "list": [str(scratch)], "n": 3}) == {
        "model_source": "outputs/study/exp-1-main-ablation/fcr_lambda0.10_fd10", "list": [str(scratch)], "n": 3}
    # What verify flags: machine paths, not portable spellings or system paths every Debian has.
    for text in ("/work/main/outputs", "x,/tmp/snap/outputs", "/home/me/fcr", "C:\\Users\\me"):
        assert ABSOLUTE_PATH.search(text), text
    for text in ("<tmp>/run", "outputs/study", "~/.cache", "/usr/share/datasets/fashion-mnist", "a/tmp/b"):
        assert ABSOLUTE_PATH.search(text) is None, text
