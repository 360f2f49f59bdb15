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
