"""One resumable stage of the pipeline (:mod:`fcr.pipeline`): a notebook run or a callable, the
folder it leaves its outputs in, the fingerprint of its parameters, and :func:`run_task`, which
skips it when its marker (:mod:`fcr.markers`) is whole and runs it (again) otherwise."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fcr import contract
from fcr.config import load_yaml, merge, validate
from fcr.contract import model_label
from fcr.files import write_json_atomic
from fcr.markers import incomplete, make_portable, missing_outputs, read_marker, write_marker
from fcr.notebooks import NOTEBOOKS_DIR, notebook_parameters, run_notebook
from fcr.paths import REPO_ROOT

__all__ = ["ATTEMPTS", "DONE", "PipelineError", "Stage", "Task", "begin_attempt", "json_list", "rel_path",
           "root_independent", "run_task"]

DONE = contract.DONE_MARKER
# Start times of a stage's unfinished attempts; a resumed stage adds their durations to its own.
ATTEMPTS = contract.ATTEMPTS_RECORD


@dataclass
class Task:
    """One resumable stage: a notebook run (or a callable) and where it leaves its outputs."""

    name: str
    folder: Path
    params: list[Path]
    overrides: dict[str, Any]
    notebook: str | None = None
    action: Callable[[], None] | None = None
    root: Path | None = None  # the run's output folder; its spelling stays out of the fingerprint
    # The stopping rule's log and the model-list key it filters (a later-phase run), and the stages
    # whose results an action reads (their fingerprints enter its own).
    gate_log: Path | None = None
    gate_key: str | None = None
    inputs: tuple["Task", ...] = ()

    def effective_overrides(self) -> dict[str, Any]:
        """The overrides, with the candidates the stopping rule's log excludes (once written) dropped
        from the model list (:mod:`fcr.analysis.stopping_rule`)."""
        if self.gate_log is None or self.gate_key is None or self.gate_key not in self.overrides:
            return self.overrides
        from fcr.analysis.stopping_rule import excluded_models

        excluded = excluded_models(self.gate_log)
        return {**self.overrides, self.gate_key: [m for m in self.overrides[self.gate_key]
                                                  if model_label(str(m)) not in excluded]}

    def merged(self) -> dict[str, Any]:
        return merge(*(load_yaml(p) for p in self.params), self.effective_overrides())

    def fingerprint(self) -> str:
        """Hash of the parameters the stage uses (for a notebook: the keys it declares), so a size
        change for another notebook does not invalidate this stage. Paths under the run's output
        folder enter as ``<root>/...``: a committed run resumes from any checkout, whatever
        ``--root`` spells it (absolute, relative, another clone's path)."""
        params = self.merged()
        if self.notebook is not None:
            params = notebook_parameters(NOTEBOOKS_DIR / f"{self.notebook}.ipynb", params)
        text = json.dumps([params, [t.fingerprint() for t in self.inputs]] if self.inputs else params,
                          sort_keys=True, default=str)
        if self.root is not None:
            text = root_independent(text, self.root)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def root_independent(text: str, root: Path) -> str:
    """``text`` with every spelling of ``root`` the planner writes (absolute, resolved, relative to
    the repository) replaced by ``<root>``; longest first, so a relative spelling never matches
    inside an absolute one."""
    spellings = {str(root), str(root.resolve()), rel_path(root)}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling.rstrip("/") + "/", "<root>/")
    return text


@dataclass
class Stage:
    """What one task did."""

    name: str
    status: str
    output: str
    seconds: float


def rel_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _incomplete(task: Task) -> list[str]:
    """Why ``task`` must run (empty: it is complete). The report runs every time."""
    if task.name == "report":
        return ["the report is written on every run"]
    return incomplete(task.folder, task.fingerprint(), task.notebook)


def json_list(path: Path, key: str) -> list[Any]:
    """The list under ``key`` of a small JSON record the pipeline keeps; empty when the file is
    missing or unreadable (a record cut short by a kill must not stop the next run)."""
    try:
        value = json.loads(path.read_text()).get(key, [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return list(value) if isinstance(value, list) else []


def _last_write(folder: Path, since: float) -> float:
    """Latest modification time of anything under ``folder`` (``since`` when nothing is newer)."""
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file() and p.name != ATTEMPTS]
    return max([since, *times])


def begin_attempt(folder: Path) -> tuple[float, int]:
    """Record that a stage starts (again) and return the wall time and number of its earlier,
    unfinished attempts. An attempt killed without warning (SIGKILL, power loss) leaves only its
    start time; at the next start it is closed with the last write under ``folder``, so its
    duration is a lower bound, exact up to the time since its last file."""
    path = folder / ATTEMPTS
    try:
        attempts = [{k: float(v) for k, v in a.items()} for a in json_list(path, "attempts")]
    except (TypeError, ValueError, AttributeError):  # a hand-edited or truncated record
        attempts = []
    if attempts and "seconds" not in attempts[-1]:
        attempts[-1]["seconds"] = _last_write(folder, attempts[-1]["started"]) - attempts[-1]["started"]
    earlier = sum(a.get("seconds", 0.0) for a in attempts), len(attempts)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"attempts": [*attempts, {"started": time.time()}]})
    return earlier


def run_task(task: Task, *, rerun: bool = False) -> Stage:
    """Run one task unless it is complete (:func:`fcr.markers.incomplete`); a stage with a marker
    but missing or damaged files says which and runs again (per-cell results that are whole are
    kept by the runners). ``rerun``: run it even when complete (its tables and figures are rebuilt
    from the kept per-cell results, e.g. after a change to a plot)."""
    reasons = _incomplete(task)
    # A rerun of a complete stage keeps its recorded time: what it took to compute the results
    # (the rerun mostly reads the kept per-cell files) is the figure a reader of stage times wants.
    kept = read_marker(task.folder) if rerun and not reasons else None
    reasons = reasons or (["rerun requested"] if rerun else [])
    if not reasons:
        return Stage(task.name, "skipped (already complete)", rel_path(task.folder), 0.0)
    if (task.folder / DONE).exists() and task.name != "report":
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        print(f"   not complete: {reasons[0]}{more}; running it again", flush=True)
    earlier_s, earlier_n = begin_attempt(task.folder)
    start = time.perf_counter()
    if task.notebook is not None:
        validate(task.merged())  # a bad parameter fails here, before the notebook writes anything
        output = task.folder / f"{task.notebook}.ipynb"
        try:
            run_notebook(NOTEBOOKS_DIR / f"{task.notebook}.ipynb", output, task.params, task.effective_overrides())
        except Exception as exc:
            raise PipelineError(f"stage {task.name!r} failed; the executed notebook is {output}\n{exc}") from exc
    else:
        task.action()
    seconds = time.perf_counter() - start
    task.folder.mkdir(parents=True, exist_ok=True)
    missing = missing_outputs(task.folder, task.notebook)
    if missing:
        raise PipelineError(f"stage {task.name!r} finished without writing {missing} (fcr.contract.STAGE_OUTPUTS)")
    make_portable(task.folder)  # results mean the same on every machine (no checkout or temp paths)
    # "seconds": the stage's whole wall time, earlier interrupted attempts included (estimated from
    # their files, see begin_attempt); "seconds_last_attempt": the run that finished.
    record = {"seconds": seconds + earlier_s, "seconds_last_attempt": seconds, "attempts": earlier_n + 1}
    if kept is not None:
        record = {**{k: v for k, v in kept.items() if k in ("seconds", "seconds_last_attempt", "attempts")},
                  "rerun_seconds": seconds}
    write_marker(task.folder, task.fingerprint(), record)
    (task.folder / ATTEMPTS).unlink(missing_ok=True)
    return Stage(task.name, "ran" if not earlier_n else f"ran (resumed; {earlier_n} earlier attempt(s))",
                 rel_path(task.folder), seconds)


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and its executed notebook."""
