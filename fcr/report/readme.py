"""The README's generated results section: the block between two markers, replaced in place, with a
provenance header (commit(s) the run was made with, machine, date)."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fcr.analysis.rows import EXP1, EXP2, LAYOUT
from fcr.paths import REPO_ROOT, display_path

__all__ = ["README_END", "README_START", "RUN_INFO", "code_revision", "provenance_header", "update_readme"]

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _measurement_machine(root: Path) -> str | None:
    """The device recorded in the first cost result file of the run (where the timings were taken)."""
    import json

    for exp in (EXP1, EXP2):
        for path in sorted((root / exp / LAYOUT["sweep"]).rglob("cost/*.json")):
            env = json.loads(path.read_text()).get("environment") or {}
            if env:
                return (f"{env.get('device_name', '?')} ({env.get('device', '?')}, {env.get('cpu_count', '?')} CPUs, "
                        f"{env.get('torch_threads', '?')} torch threads, torch {env.get('torch_version', '?')})")
    return None


# What the main job writes: changes there do not make the code that produced a run "uncommitted".
RUN_OUTPUTS = ("outputs", "README.md")
RUN_INFO = "pipeline_run.json"


def code_revision(repo: str | Path | None = None) -> dict[str, Any]:
    """``commit`` (short hash, None outside git) and ``dirty`` (uncommitted changes to anything but
    what the main job writes, :data:`RUN_OUTPUTS`) of the checkout at ``repo``."""
    repo = Path(repo) if repo is not None else REPO_ROOT
    commit = _git(["rev-parse", "--short", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in RUN_OUTPUTS)], repo)
    return {"commit": commit, "dirty": bool(status)}


def provenance_header(root: str | Path, repo: str | Path | None = None) -> str:
    """Date, the git commit the run was made with (``<root>/pipeline_run.json``, written by the
    pipeline when it starts; else the checkout's commit now), this machine
    (:func:`fcr.machine.machine_summary`) and the run the numbers come from."""
    from fcr.machine import machine_summary

    run_info = Path(root) / RUN_INFO
    invocations = json.loads(run_info.read_text()).get("invocations", []) if run_info.is_file() else []
    if invocations:
        first, last = invocations[0], invocations[-1]
        commits = list(dict.fromkeys(str(i.get("commit")) for i in invocations))
        commit = "`, `".join(commits)
        flag = " with uncommitted code changes" if any(i.get("dirty") for i in invocations) else ""
        source = (f"the pipeline started {first.get('started', '?')}" if len(invocations) == 1 else
                  f"{len(invocations)} pipeline invocations, {first.get('started', '?')} to {last.get('started', '?')}")
    else:
        info = code_revision(repo)
        commit, source = info.get("commit") or "unknown (not a git checkout)", "when this report was made"
        flag = " with uncommitted code changes" if info.get("dirty") else ""
    machine = machine_summary()
    lines = [
        "## Results (generated)",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Git commit: `{commit}`{flag} ({source})",
        f"- Report generated on: {machine}",
    ]
    measured = _measurement_machine(Path(root))
    if measured:
        lines.append(f"- Timings measured on: {measured} (from the cost result files)")
    lines += ["", f"The numbers below were generated from the run in `{display_path(root)}` by `python -m fcr.pipeline report`; "
              "nothing in this section is typed by hand.", ""]
    return "\n".join(lines)


def update_readme(readme_path: str | Path, markdown: str, *, root: str | Path | None = None,
                  header: str | None = None) -> Path:
    """Replace the text between :data:`README_START` and :data:`README_END` in the README with a
    generated section: ``header`` (default :func:`provenance_header` of ``root``) then
    ``markdown``. The markers are appended at the end of the file when absent; everything outside
    them is kept byte for byte. Re-running with the same input gives the same file."""
    path = Path(readme_path)
    text = path.read_text() if path.is_file() else ""
    if header is None:
        header = provenance_header(root if root is not None else "outputs/embedded")
    block = f"{README_START}\n{header.rstrip()}\n\n{markdown.strip()}\n{README_END}"
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if text.count(README_START) != text.count(README_END) or text.count(README_START) > 1:
        raise ValueError(f"{path}: expected at most one {README_START} ... {README_END} pair; fix the markers by hand")
    if pattern.search(text):
        new = pattern.sub(lambda _: block, text, count=1)
    else:
        sep = "" if not text or text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        new = f"{text}{sep}{block}\n"
    path.write_text(new)
    return path
