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
    """``path`` relative to the checkout of this repository it lies in (what a reader of the README
    can open): this one, or another clone (code run from a worktree, outputs written to the main
    checkout); else as given."""
    resolved = Path(path).resolve()
    for checkout in (REPO_ROOT, *(p for p in resolved.parents if _is_checkout(p))):
        if resolved.is_relative_to(checkout):
            return resolved.relative_to(checkout).as_posix()
    return str(path)


def _is_checkout(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / "fcr" / "paths.py").is_file()
