"""Crowd rating on Amazon Mechanical Turk: batch export and results import.

Export: every HIT bundles ``pairs_per_hit`` pairs of the set (a repeat pair in the same HIT as its
original, so one worker sees both; gold pairs spread one per HIT first, so every HIT carries an
attention check while gold pairs last). ``batch_input.csv`` has one row per HIT with the columns
``hit_key, pair_id_k, prompt_k, left_url_k, right_url_k`` (k = 1..pairs_per_hit, empty when a
HIT is short); ``task_template.html`` is the HIT layout (crowd HTML elements, radio inputs named
``choice_k``); ``hits.csv`` maps every HIT key to its pair ids for the import. Images are served
from ``image_base_url`` (a bucket or web folder holding the pair set's ``images/``).

Import: MTurk's results CSV (``HITId, AssignmentId, WorkerId, AssignmentStatus, ... Input.*,
Answer.taskAnswers``; older layouts with ``Answer.choice_k`` columns are read too). Every answer
is checked against ``hits.csv`` and stored in the same SQLite schema as lab ratings, rater
``mturk:<WorkerId>``, with the HIT and assignment ids. The importer skips and reports: rejected
assignments, unknown HIT keys, pair ids that are not in their HIT, unknown pair ids, malformed
answers and a worker's second rating of a pair (first one kept). Attention is not decided here:
:func:`fcr.human.analysis.attention` applies the documented exclusion rule per assignment.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fcr.human.pairs import CHOICES, load_pairs
from fcr.human.store import RatingError, RatingStore

__all__ = ["ImportReport", "export_mturk", "import_mturk", "mturk_template"]

BATCH_INPUT = "batch_input.csv"
TEMPLATE = "task_template.html"
HITS = "hits.csv"


def _group_into_hits(manifest: pd.DataFrame, pairs_per_hit: int, rng: random.Random) -> list[list[str]]:
    repeats: dict[str, list[str]] = {}
    for pid, repeat_of in zip(manifest["pair_id"], manifest["repeat_of"]):
        if repeat_of:
            repeats.setdefault(repeat_of, []).append(pid)
    gold = [pid for pid, kind in zip(manifest["pair_id"], manifest["kind"]) if kind == "gold"]
    units = [[pid] + repeats.get(pid, []) for pid, kind in zip(manifest["pair_id"], manifest["kind"]) if kind == "test"]
    if any(len(u) > pairs_per_hit for u in units):
        raise ValueError(f"pairs_per_hit={pairs_per_hit} cannot hold a pair with its repeats")
    rng.shuffle(units)
    units.sort(key=len, reverse=True)  # pairs with repeats first, so single pairs fill the gaps
    n_hits = max(1, math.ceil(len(manifest) / pairs_per_hit))
    hits: list[list[str]] = [[] for _ in range(n_hits)]
    for i, pid in enumerate(gold):
        hits[i % n_hits].append(pid)
    for unit in units:  # first fit into the emptiest HIT with room; open a new HIT when none has
        room = [h for h in hits if len(h) + len(unit) <= pairs_per_hit]
        target = min(room, key=len) if room else None
        if target is None:
            target = []
            hits.append(target)
        target.extend(unit)
    for h in hits:
        rng.shuffle(h)
    return [h for h in hits if h]


def mturk_template(pairs_per_hit: int) -> str:
    """The HIT layout for ``pairs_per_hit`` pairs (MTurk substitutes the ``${...}`` placeholders)."""
    blocks = []
    for k in range(1, pairs_per_hit + 1):
        blocks.append(f"""
  <section class="pair" data-pair="${{pair_id_{k}}}">
    <p class="prompt">Which is the better image of: <b>${{prompt_{k}}}</b>?</p>
    <div class="images">
      <figure><img src="${{left_url_{k}}}" alt="left image"><figcaption>Left</figcaption></figure>
      <figure><img src="${{right_url_{k}}}" alt="right image"><figcaption>Right</figcaption></figure>
    </div>
    <p class="choices">
      <label><input type="radio" name="choice_{k}" value="left" required> Left is better</label>
      <label><input type="radio" name="choice_{k}" value="tie"> Equally good</label>
      <label><input type="radio" name="choice_{k}" value="right"> Right is better</label>
    </p>
  </section>""")
    return f"""<script src="https://assets.crowd.aws/crowd-html-elements.js"></script>
<style>
  .pair {{ border-bottom: 1px solid #ccc; padding: 1rem 0; }}
  .images {{ display: flex; gap: 2rem; }}
  .images img {{ width: 16rem; height: 16rem; object-fit: contain; image-rendering: pixelated; background: #000; }}
</style>
<crowd-form answer-format="flatten-objects">
  <crowd-instructions link-text="View instructions" link-type="button">
    <short-summary><p>Each question shows two images made for the same text. Pick the better image of that
      text, or say they are equally good.</p></short-summary>
    <detailed-instructions><p>Judge each pair on its own. Some pairs are checks with one clearly wrong
      image; answering them at random leads to rejection.</p></detailed-instructions>
  </crowd-instructions>
{''.join(blocks)}
</crowd-form>
<script>
  // A short HIT leaves its last slots empty: hide them and drop their required inputs.
  for (const s of document.querySelectorAll("section.pair")) {{
    if (!s.dataset.pair) {{ s.style.display = "none"; for (const i of s.querySelectorAll("input")) i.required = false; }}
  }}
</script>
"""


def export_mturk(pair_dir: str | Path, out_dir: str | Path, image_base_url: str, *, pairs_per_hit: int = 10,
                 seed: int = 0) -> pd.DataFrame:
    """Write ``batch_input.csv``, ``task_template.html`` and ``hits.csv`` for the pair set; returns the batch."""
    if pairs_per_hit < 1:
        raise ValueError(f"pairs_per_hit must be >= 1, got {pairs_per_hit}")
    if not image_base_url.startswith(("https://", "http://")):
        raise ValueError(f"image_base_url must be an http(s) URL workers can open, got {image_base_url!r}")
    manifest = load_pairs(pair_dir).set_index("pair_id", drop=False)
    hits = _group_into_hits(manifest.reset_index(drop=True), pairs_per_hit, random.Random(seed))
    base = image_base_url.rstrip("/")
    rows, hit_rows = [], []
    for h, pair_ids in enumerate(hits):
        hit_key = f"h{h + 1:05d}"
        row: dict[str, str] = {"hit_key": hit_key}
        for k in range(1, pairs_per_hit + 1):
            pid = pair_ids[k - 1] if k <= len(pair_ids) else ""
            pair = manifest.loc[pid] if pid else None
            row[f"pair_id_{k}"] = pid
            row[f"prompt_{k}"] = pair["prompt"] if pid else ""
            row[f"left_url_{k}"] = f"{base}/{pair['left_image']}" if pid else ""
            row[f"right_url_{k}"] = f"{base}/{pair['right_image']}" if pid else ""
        rows.append(row)
        hit_rows += [{"hit_key": hit_key, "slot": k, "pair_id": pid} for k, pid in enumerate(pair_ids, 1)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = pd.DataFrame(rows)
    batch.to_csv(out_dir / BATCH_INPUT, index=False, quoting=csv.QUOTE_MINIMAL)
    pd.DataFrame(hit_rows).to_csv(out_dir / HITS, index=False)
    (out_dir / TEMPLATE).write_text(mturk_template(pairs_per_hit))
    return batch


@dataclass
class ImportReport:
    """What :func:`import_mturk` did with each results row and answer."""

    assignments_read: int = 0
    ratings_imported: int = 0
    duplicates: int = 0
    rejected_assignments: list[str] = field(default_factory=list)
    unknown_hits: list[str] = field(default_factory=list)
    pair_not_in_hit: list[tuple[str, str]] = field(default_factory=list)
    unknown_pairs: list[str] = field(default_factory=list)
    malformed: list[tuple[str, str]] = field(default_factory=list)
    conflicting_duplicates: list[tuple[str, str]] = field(default_factory=list)
    gold_failed_assignments: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, list) else len(v)) for k, v in self.__dict__.items()}


def _answers(row: dict[str, str], n_slots: int) -> dict[int, Any]:
    """The answer of each slot: from ``Answer.taskAnswers`` (JSON; a value may be the choice or
    ``{"left": true, ...}``) or from ``Answer.choice_k`` columns."""
    found: dict[int, Any] = {}
    raw = row.get("Answer.taskAnswers", "")
    if raw:
        data = json.loads(raw)
        data = data[0] if isinstance(data, list) and data else data
        if not isinstance(data, dict):
            raise ValueError("Answer.taskAnswers is not a JSON object")
        for k in range(1, n_slots + 1):
            if f"choice_{k}" in data:
                found[k] = data[f"choice_{k}"]
            else:  # flatten-objects: "choice_k.left": true
                flags = [c for c in CHOICES if data.get(f"choice_{k}.{c}") in (True, "true")]
                if flags:
                    found[k] = flags[0] if len(flags) == 1 else flags
    for k in range(1, n_slots + 1):
        if f"Answer.choice_{k}" in row and k not in found and row[f"Answer.choice_{k}"] != "":
            found[k] = row[f"Answer.choice_{k}"]
    return found


def _as_choice(value: Any) -> str:
    if isinstance(value, dict):
        picked = [c for c, on in value.items() if on in (True, "true")]
        value = picked[0] if len(picked) == 1 else None
    if value not in CHOICES:
        raise ValueError(f"not one of {list(CHOICES)}: {value!r}")
    return value


def import_mturk(results_csv: str | Path, export_dir: str | Path, store: RatingStore) -> ImportReport:
    """Import MTurk's results CSV of the batch in ``export_dir`` into ``store``; see the module doc."""
    hits = pd.read_csv(Path(export_dir) / HITS, dtype=str, keep_default_na=False)
    slots = {(h, int(s)): pid for h, s, pid in zip(hits["hit_key"], hits["slot"], hits["pair_id"])}
    hit_pairs: dict[str, set[str]] = {}
    for (h, _), pid in slots.items():
        hit_pairs.setdefault(h, set()).add(pid)
    n_slots = max((s for _, s in slots), default=0)
    manifest = load_pairs(store.pair_dir).set_index("pair_id")
    report = ImportReport()
    with Path(results_csv).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"AssignmentId", "WorkerId", "HITId", "Input.hit_key"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{results_csv} is not an MTurk results CSV of this batch: missing columns {sorted(missing)}")
        for row in reader:
            report.assignments_read += 1
            assignment, worker, hit_key = row["AssignmentId"], row["WorkerId"], row["Input.hit_key"]
            if row.get("AssignmentStatus", "") == "Rejected":
                report.rejected_assignments.append(assignment)
                continue
            if hit_key not in hit_pairs:
                report.unknown_hits.append(hit_key)
                continue
            try:
                answers = _answers(row, n_slots)
            except (ValueError, json.JSONDecodeError) as exc:
                report.malformed.append((assignment, str(exc)))
                continue
            rater = f"mturk:{worker}"
            try:
                store.ensure_rater(rater, source="mturk")
            except RatingError as exc:
                report.malformed.append((assignment, str(exc)))
                continue
            gold_failed = False
            for k in range(1, n_slots + 1):
                pid = row.get(f"Input.pair_id_{k}", "")
                if not pid:
                    continue
                if pid not in manifest.index:
                    report.unknown_pairs.append(pid)
                    continue
                if slots.get((hit_key, k)) != pid:
                    report.pair_not_in_hit.append((hit_key, pid))
                    continue
                try:
                    choice = _as_choice(answers.get(k))
                except ValueError as exc:
                    report.malformed.append((assignment, f"slot {k}: {exc}"))
                    continue
                try:
                    recorded = store.record(rater, pid, choice, source="mturk", hit_id=row["HITId"],
                                            assignment_id=assignment)
                except RatingError as exc:
                    if exc.status == 409:
                        report.conflicting_duplicates.append((rater, pid))
                        continue
                    raise
                if recorded.duplicate:
                    report.duplicates += 1
                else:
                    report.ratings_imported += 1
                gold = manifest.loc[pid, "gold_answer"]
                if manifest.loc[pid, "kind"] == "gold" and choice != gold:
                    gold_failed = True
            if gold_failed:
                report.gold_failed_assignments.append(assignment)
    return report
