"""``python -m fcr.pipeline verify``: are the committed results whole and honest about their origin?

- The powered study (a resumable profile): every stage that has a marker has its fingerprint equal
  to the parameters the pipeline would run it with today, and every file its marker lists is
  present, unchanged, readable and committed (a file that ``.gitignore`` keeps out would be missing
  on a fresh clone). Stages without a marker or files are pending (listed, not a problem).
- Committed snapshots (the pilot, the demo reference): every committed file is readable.
- Every committed text file under ``outputs/`` and ``models/``: no absolute path of one machine.

One line per problem; exit status 2 when there is any.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from fcr import contract
from fcr.files import TEXT_SUFFIXES, problem
from fcr.markers import incomplete, read_marker
from fcr.paths import ABSOLUTE_PATH, REPO_ROOT

__all__ = ["COMMITTED", "Committed", "absolute_paths", "verify"]

@dataclass(frozen=True)
class Committed:
    """A committed result folder: a resumable pipeline profile or a snapshot of tables."""

    name: str
    root: Path
    profile: str | None = None  # fcr.pipeline.PROFILES key when the folder is a resumable run


COMMITTED = (
    Committed("study", REPO_ROOT / "outputs" / "study", profile="study"),
    Committed("pilot", REPO_ROOT / "outputs" / "pilot"),
    Committed("demo reference", REPO_ROOT / "outputs" / "reference" / "demo"),
    Committed("demo reproductions", REPO_ROOT / "outputs" / "reference" / "reproductions"),
    Committed("in-painting demo", REPO_ROOT / "outputs" / "inpainting_demo"),
    Committed("in-painting replication", REPO_ROOT / "outputs" / "inpainting_replication"),
)


def tracked_files(folder: Path, repo: Path = REPO_ROOT) -> list[Path] | None:
    """Files of ``folder`` that git tracks, or None outside a git checkout (then nothing can be said
    about what a fresh clone holds)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", str(folder)], cwd=repo, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [repo / p for p in out.decode().split("\0") if p]


def _rel(path: Path, repo: Path) -> str:
    try:
        return path.resolve().relative_to(repo.resolve()).as_posix()
    except ValueError:
        return str(path)


def absolute_paths(files: list[Path], repo: Path = REPO_ROOT) -> list[str]:
    """One line per text file that holds an absolute path of one machine (its first such spot)."""
    lines = []
    for path in files:
        if path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        match = ABSOLUTE_PATH.search(text)
        if match:
            line_no = text.count("\n", 0, match.start()) + 1
            snippet = text[match.start():match.start() + 60].split("\n")[0].split('"')[0]
            lines.append(f"{_rel(path, repo)}:{line_no}: absolute machine path {snippet!r}")
    return lines


def _resumable_unit(folder: Path, first: str) -> bool:
    """Whether a stage's sub-folder is a unit a multi-session stage resumes from: its per-cell results,
    or a distillation round that finished (its record is written last)."""
    if first in contract.CELL_FOLDERS:
        return True
    return bool(contract.ROUND_FOLDER.fullmatch(first)) and (folder / first / contract.DISTILLATION_FILE).is_file()


def _profile_problems(entry: Committed, repo: Path, tracked: set[Path] | None) -> tuple[list[str], list[str]]:
    from fcr.pipeline import PROFILES, plan

    profile = PROFILES[entry.profile]
    tasks = plan("embedded", entry.root, manifest=profile["manifest"], bench=profile["bench"])
    problems: list[str] = []
    pending: list[str] = []
    for task in tasks:
        where = _rel(task.folder, repo)
        marker = read_marker(task.folder)
        files = [p for p in task.folder.rglob("*") if p.is_file() and (tracked is None or p.resolve() in tracked)
                 ] if task.folder.is_dir() else []
        if marker is None and task.name != "report" and not files:
            pending.append(f"{where}: {task.name} has not run (pending)")
            continue
        cells = [p for p in files if _resumable_unit(task.folder, p.relative_to(task.folder).parts[0])]
        if marker is None and task.name != "report" and len(cells) == len(files):
            pending.append(f"{where}: {task.name} in progress ({len(cells)} per-cell result files committed; "
                           "it resumes from them)")
            continue
        reasons = incomplete(task.folder, None if task.name == "report" else task.fingerprint(),
                             task.notebook)
        problems += [f"{where}: {reason}" for reason in reasons]
        marker = marker or {}
        if tracked is not None:
            untracked = [rel for rel in marker.get("files", {}) if (task.folder / rel).resolve() not in tracked]
            problems += [f"{where}/{rel}: listed by the stage's marker but not committed (ignored by .gitignore?)"
                         for rel in untracked]
    return problems, pending


def verify(entries: tuple[Committed, ...] = COMMITTED, repo: Path = REPO_ROOT) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` for the committed result folders ``entries``."""
    problems: list[str] = []
    notes: list[str] = []
    for entry in entries:
        if not entry.root.is_dir():
            problems.append(f"{_rel(entry.root, repo)}: the committed {entry.name} folder is missing")
            continue
        files = tracked_files(entry.root, repo)
        tracked = {p.resolve() for p in files} if files is not None else None
        if entry.profile is not None:
            found, pending = _profile_problems(entry, repo, tracked)
            problems += found
            notes += pending
        else:
            for path in files if files is not None else sorted(p for p in entry.root.rglob("*") if p.is_file()):
                why = problem(path)
                if why:
                    problems.append(f"{_rel(path, repo)}: {why}")
    everything = [*(tracked_files(repo / "outputs", repo) or []), *(tracked_files(repo / "models", repo) or [])]
    problems += absolute_paths(everything, repo)
    return problems, notes


def main() -> int:
    problems, notes = verify()
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(line)
    names = ", ".join(e.name for e in COMMITTED)
    if problems:
        print(f"verify: {len(problems)} problem(s) in the committed results ({names})")
        return 2
    print(f"verify: the committed results are whole ({names}; {contract.DONE_MARKER} inventories, "
          "fingerprints, readable files, no machine paths)")
    return 0
