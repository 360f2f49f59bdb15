"""Where the repository lives, so notebooks started from any folder (nbval starts the kernel in
the notebook's folder, papermill in the caller's) resolve relative paths the same way; and how a
path is written into a result file so that the file means the same on every machine."""

from __future__ import annotations

import os
import re
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ABSOLUTE_PATH", "REPO_ROOT", "chdir_repo_root", "display_path", "portable", "portable_text"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# A path that names one machine: a home, a checkout, a temporary folder or an interpreter's prefix.
# System paths that every Debian machine has (/usr/share/datasets/...) are not machine-specific.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~<>-])(?:/(?:work|tmp|home|root|Users|mnt|private|var/folders|opt/conda)/"
                           r"|[A-Za-z]:\\\\?(?:Users|tmp)\\)")


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


def _prefixes(logs: bool) -> list[tuple[str, str]]:
    """(machine prefix, portable spelling), longest first so a nested prefix wins."""
    pairs = {str(REPO_ROOT) + "/": "", os.path.realpath(REPO_ROOT) + "/": ""}
    if logs:
        for name in ("purelib", "platlib", "stdlib"):
            path = sysconfig.get_paths().get(name)
            if path:
                pairs[path.rstrip("/") + "/"] = f"<python-{name}>/"
        pairs[sys.prefix.rstrip("/") + "/"] = "<python>/"
        pairs[Path.home().as_posix().rstrip("/") + "/"] = "~/"
        tmp = tempfile.gettempdir().rstrip("/") + "/"
        pairs[tmp] = "<tmp>/"
        pairs[os.path.realpath(tmp).rstrip("/") + "/"] = "<tmp>/"
    return sorted(((k, v) for k, v in pairs.items() if len(k) > 1), key=lambda kv: len(kv[0]), reverse=True)


def portable_text(text: str, logs: bool = False) -> str:
    """``text`` with this checkout's root dropped (its paths become relative to the repository, which
    every runner resolves them against): the same on every machine and still a usable path.
    ``logs=True`` (an executed notebook's output, never read back as data) also writes the
    interpreter's folders as ``<python...>/``, the home as ``~/`` and the temporary folder as ``<tmp>/``."""
    for prefix, replacement in _prefixes(logs):
        text = text.replace(prefix, replacement)
        bare = prefix.rstrip("/")  # the folder itself, e.g. a run's model_source that is the checkout
        text = re.sub(re.escape(bare) + r"(?=[\"'\s,)\]}]|$)", replacement.rstrip("/") or ".", text)
    return text


def portable(obj: Any) -> Any:
    """:func:`portable_text` applied to every string (and mapping key) inside ``obj``."""
    if isinstance(obj, str):
        return portable_text(obj)
    if isinstance(obj, Path):
        return portable_text(str(obj))
    if isinstance(obj, dict):
        return {portable(k): portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj
