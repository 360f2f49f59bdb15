"""Where the repository lives, so notebooks started from any folder (nbval starts the kernel in
the notebook's folder, papermill in the caller's) resolve relative paths the same way."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "chdir_repo_root", "display_path"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def chdir_repo_root() -> Path:
    """Make the repository root the working directory (paths in params are relative to it)."""
    os.chdir(REPO_ROOT)
    return REPO_ROOT


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (what a reader of the README can
    open), else as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)
