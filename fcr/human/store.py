"""SQLite store of A/B ratings: one database per pair set.

WAL journal with ``synchronous=FULL``, one ``BEGIN IMMEDIATE`` transaction per rating, and a
``UNIQUE (rater_id, pair_id)`` constraint: a rating is stored exactly once, a repeated submission
of the same choice is answered as a duplicate and changes nothing, another choice for an already
rated pair is refused. A committed rating survives the server being killed (``SIGKILL``) at any
point. Each lab rater gets a set of pairs (all pairs, or ``pairs_per_rater`` of the least-rated
ones, each repeat pair travelling with its original) in a rater-specific random order, so a rater
who comes back resumes at the first unrated pair of their own order.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from fcr.human.pairs import CHOICES, MANIFEST, load_pairs

__all__ = ["RATER_ID_PATTERN", "RatingError", "RatingStore", "Recorded"]

RATER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY, kind TEXT NOT NULL, prompt TEXT NOT NULL,
    left_image TEXT NOT NULL, right_image TEXT NOT NULL, gold_answer TEXT NOT NULL, repeat_of TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    rater_id TEXT PRIMARY KEY, source TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    rater_id TEXT NOT NULL REFERENCES raters(rater_id), pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
    position INTEGER NOT NULL, PRIMARY KEY (rater_id, pair_id));
CREATE TABLE IF NOT EXISTS ratings (
    rating_id INTEGER PRIMARY KEY AUTOINCREMENT,
    rater_id TEXT NOT NULL REFERENCES raters(rater_id),
    pair_id TEXT NOT NULL REFERENCES pairs(pair_id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    source TEXT NOT NULL, hit_id TEXT NOT NULL DEFAULT '', assignment_id TEXT NOT NULL DEFAULT '',
    response_ms INTEGER, created_at TEXT NOT NULL,
    UNIQUE (rater_id, pair_id));
"""


class RatingError(ValueError):
    """A rating that cannot be stored; ``status`` is the HTTP status the app answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Recorded:
    """Outcome of :meth:`RatingStore.record`: ``duplicate`` when the same choice was stored before."""

    pair_id: str
    choice: str
    duplicate: bool


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _manifest_digest(pair_dir: Path) -> str:
    return hashlib.sha256((pair_dir / MANIFEST).read_bytes()).hexdigest()


def check_rater_id(rater_id: Any) -> str:
    if not isinstance(rater_id, str) or not RATER_ID_PATTERN.match(rater_id):
        raise RatingError("a rater id is 1-64 letters, digits or . _ : -", 400)
    return rater_id


class RatingStore:
    """The ratings of one pair set (``pair_dir``) in the SQLite file ``db_path``.

    Opening a database made for another pair set (its manifest's SHA-256 differs) raises: pair ids
    are only meaningful within their set. Every method opens its own connection, so one store
    serves a multi-threaded web server.
    """

    def __init__(self, db_path: str | Path, pair_dir: str | Path):
        self.db_path = Path(db_path)
        self.pair_dir = Path(pair_dir)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        digest = _manifest_digest(self.pair_dir)
        db = self._connect()
        try:
            db.executescript(_SCHEMA)  # outside a transaction: executescript commits first
        finally:
            db.close()
        with self._transaction() as db:
            stored = db.execute("SELECT value FROM meta WHERE key = 'manifest_sha256'").fetchone()
            if stored is None:
                manifest = load_pairs(self.pair_dir)
                db.executemany(
                    "INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    manifest[["pair_id", "kind", "prompt", "left_image", "right_image", "gold_answer", "repeat_of"]]
                    .itertuples(index=False, name=None),
                )
                db.execute("INSERT INTO meta VALUES ('manifest_sha256', ?)", (digest,))
                db.execute("INSERT INTO meta VALUES ('session_secret', ?)", (secrets.token_hex(32),))
            elif stored[0] != digest:
                raise RatingError(f"{self.db_path} holds ratings of another pair set (manifest SHA-256 {stored[0][:12]}…, "
                                  f"{self.pair_dir / MANIFEST} is {digest[:12]}…): use a new database file", 409)

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, isolation_level=None, timeout=30.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        db = self._connect()
        try:
            return db.execute(sql, tuple(args)).fetchall()
        finally:
            db.close()

    # ------------------------------------------------------------------ pairs and raters

    @property
    def session_secret(self) -> str:
        """Key of the app's signed session cookies, kept in the database so sessions survive a restart."""
        return self._query("SELECT value FROM meta WHERE key = 'session_secret'")[0][0]

    def pair(self, pair_id: str) -> dict[str, str] | None:
        rows = self._query("SELECT pair_id, kind, prompt, left_image, right_image FROM pairs WHERE pair_id = ?", (pair_id,))
        return dict(zip(("pair_id", "kind", "prompt", "left_image", "right_image"), rows[0])) if rows else None

    def image_names(self) -> set[str]:
        """Every image file name of the pair set: the only files the app serves."""
        rows = self._query("SELECT left_image, right_image FROM pairs")
        return {name for row in rows for name in row}

    def ensure_rater(self, rater_id: str, *, source: str = "lab", pairs_per_rater: int = 0) -> bool:
        """Create ``rater_id`` with its pair set and order if new; ``True`` when created."""
        check_rater_id(rater_id)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM raters WHERE rater_id = ?", (rater_id,)).fetchone():
                return False
            db.execute("INSERT INTO raters VALUES (?, ?, ?)", (rater_id, source, _now()))
            if source == "lab":
                chosen = self._choose_pairs(db, rater_id, pairs_per_rater)
                db.executemany("INSERT INTO assignments VALUES (?, ?, ?)",
                               [(rater_id, pid, pos) for pos, pid in enumerate(chosen)])
            return True

    @staticmethod
    def _choose_pairs(db: sqlite3.Connection, rater_id: str, pairs_per_rater: int) -> list[str]:
        rng = random.Random(hashlib.sha256(rater_id.encode()).digest())
        rows = db.execute(
            "SELECT p.pair_id, p.repeat_of, COUNT(a.rater_id) FROM pairs p LEFT JOIN assignments a USING (pair_id) "
            "GROUP BY p.pair_id"
        ).fetchall()
        repeats: dict[str, list[str]] = {}
        for pid, repeat_of, _ in rows:
            if repeat_of:
                repeats.setdefault(repeat_of, []).append(pid)
        primaries = [(count, rng.random(), pid) for pid, repeat_of, count in rows if not repeat_of]
        primaries.sort()  # least-assigned first, random among equals: balanced coverage over raters
        if pairs_per_rater > 0:
            primaries = primaries[:pairs_per_rater]
        chosen = [pid for _, _, pid in primaries]
        chosen += [r for pid in chosen for r in repeats.get(pid, [])]
        rng.shuffle(chosen)
        return chosen

    # ------------------------------------------------------------------ ratings

    def record(self, rater_id: str, pair_id: Any, choice: Any, *, response_ms: Any = None, source: str = "lab",
               hit_id: str = "", assignment_id: str = "") -> Recorded:
        """Store one rating in one transaction. Raises :class:`RatingError` (and stores nothing) for
        an unknown pair, a pair outside a lab rater's set, a choice outside left/right/tie or
        another choice for an already rated pair; the same choice again is a duplicate."""
        check_rater_id(rater_id)
        if not isinstance(pair_id, str) or not pair_id:
            raise RatingError("pair_id must be a non-empty string", 400)
        if choice not in CHOICES:
            raise RatingError(f"choice must be one of {list(CHOICES)}, got {choice!r}", 400)
        if response_ms is not None and (isinstance(response_ms, bool) or not isinstance(response_ms, int) or response_ms < 0):
            raise RatingError("response_ms must be a non-negative integer", 400)
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone():
                raise RatingError(f"unknown pair id {pair_id!r}", 404)
            rater = db.execute("SELECT source FROM raters WHERE rater_id = ?", (rater_id,)).fetchone()
            if rater is None:
                raise RatingError(f"unknown rater {rater_id!r}", 403)
            if rater[0] == "lab" and not db.execute(
                    "SELECT 1 FROM assignments WHERE rater_id = ? AND pair_id = ?", (rater_id, pair_id)).fetchone():
                raise RatingError(f"pair {pair_id!r} is not in rater {rater_id!r}'s set", 403)
            cur = db.execute(
                "INSERT INTO ratings (rater_id, pair_id, choice, source, hit_id, assignment_id, response_ms, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rater_id, pair_id) DO NOTHING",
                (rater_id, pair_id, choice, source, hit_id, assignment_id, response_ms, _now()),
            )
            if cur.rowcount == 1:
                return Recorded(pair_id, choice, duplicate=False)
            stored = db.execute("SELECT choice FROM ratings WHERE rater_id = ? AND pair_id = ?",
                                (rater_id, pair_id)).fetchone()[0]
        if stored != choice:
            raise RatingError(f"pair {pair_id!r} was already rated {stored!r} by {rater_id!r}; a rating is final", 409)
        return Recorded(pair_id, choice, duplicate=True)

    def next_pair(self, rater_id: str) -> dict[str, str] | None:
        """The first pair of the rater's order without a rating (``None`` when all are rated)."""
        rows = self._query(
            "SELECT a.pair_id FROM assignments a LEFT JOIN ratings r ON r.rater_id = a.rater_id AND r.pair_id = a.pair_id "
            "WHERE a.rater_id = ? AND r.rating_id IS NULL ORDER BY a.position LIMIT 1", (rater_id,))
        return self.pair(rows[0][0]) if rows else None

    def progress(self, rater_id: str) -> tuple[int, int]:
        """``(rated, assigned)`` of a lab rater."""
        done = self._query("SELECT COUNT(*) FROM ratings r JOIN assignments a USING (rater_id, pair_id) "
                           "WHERE r.rater_id = ?", (rater_id,))[0][0]
        total = self._query("SELECT COUNT(*) FROM assignments WHERE rater_id = ?", (rater_id,))[0][0]
        return done, total

    def ratings(self) -> pd.DataFrame:
        """Every stored rating, oldest first."""
        db = self._connect()
        try:
            return pd.read_sql_query("SELECT * FROM ratings ORDER BY rating_id", db)
        finally:
            db.close()

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM ratings")[0][0]

    def summary(self) -> Mapping[str, int]:
        """Counts for logs and reports: raters, ratings, pairs."""
        return {
            "pairs": self._query("SELECT COUNT(*) FROM pairs")[0][0],
            "raters": self._query("SELECT COUNT(*) FROM raters")[0][0],
            "ratings": self.count(),
        }
