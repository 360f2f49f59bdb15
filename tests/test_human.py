"""The human preference kit: pair sets, the rating store, the app's refusals, the MTurk round trip
and the analysis rules. Pair sets are drawn from the committed study sweep (real sampled images);
every rating here is written by the test itself and only checks code paths."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from fcr.human import analysis
from fcr.human.crowd import BATCH_INPUT, HITS, TEMPLATE, export_mturk, import_mturk
from fcr.human.pairs import PairSetSpec, build_pair_set, load_pairs, parse_source, verify_pair_set
from fcr.human.store import RatingError, RatingStore
from fcr.paths import REPO_ROOT
from fcr.backends.embedded.data import FASHION_MNIST_CLASSES

STUDY_SWEEP = REPO_ROOT / "outputs/study/exp-1-main-ablation/sweep/main"
A, B = "fcr_lambda0.10_fd10:FD-10", "base:FD-5"


def small_spec(**kw) -> PairSetSpec:
    base = dict(a=parse_source(A), b=parse_source(B), n_pairs=24, seeds=(0, 1), repeat_rate=0.25, gold_rate=0.25, seed=3)
    return PairSetSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "set"
    build_pair_set(STUDY_SWEEP, small_spec(), out, categories=FASHION_MNIST_CLASSES)
    return out


def fresh_copy(pair_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "set"
    shutil.copytree(pair_dir, target)
    return target


# ----------------------------------------------------------------------------- pair sets


def test_pair_set_pairs_same_prompt_and_noise_and_records_every_image(pair_dir, tmp_path):
    m = load_pairs(pair_dir)
    assert m["kind"].value_counts().to_dict() == {"test": 24, "repeat": 6, "gold": 6}
    assert list(m["pair_id"]) == [f"p{i:05d}" for i in range(1, len(m) + 1)]
    test = m[m["kind"] == "test"]
    # Every test pair is A vs B with the side of A recorded; both sides appear.
    assert set(test["a_side"]) == {"left", "right"}
    for _, row in test.iterrows():
        sources = {row["left_source"], row["right_source"]}
        assert sources == {A, B}
        assert (row["left_source"] == A) == (row["a_side"] == "left")
    # Same prompt and noise: the images come from the same (seed, index) of both sources.
    from safetensors import safe_open

    row = test.iloc[0]
    with safe_open(str(STUDY_SWEEP / "quality" / f"base__FD-5__seed{row['seed']}.safetensors"), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    assert row["prompt"] == prompts[int(row["index"])]
    # Repeats show the same two images with the sides swapped.
    by_id = m.set_index("pair_id")
    for _, rep in m[m["kind"] == "repeat"].iterrows():
        orig = by_id.loc[rep["repeat_of"]]
        assert orig["kind"] == "test"
        assert (rep["left_image"], rep["right_image"]) == (orig["right_image"], orig["left_image"])
    # Gold pairs: one side another class than the prompt; the correct side recorded.
    gold = m[m["kind"] == "gold"]
    assert set(gold["gold_answer"]) <= {"left", "right"} and len(gold)
    assert verify_pair_set(pair_dir) == []
    # Blinded names carry no configuration.
    assert not any("FD" in n or "base" in n for n in pd.concat([m["left_image"], m["right_image"]]))


def test_pair_set_is_deterministic_reused_and_guarded(pair_dir, tmp_path):
    again = build_pair_set(STUDY_SWEEP, small_spec(), tmp_path / "again", categories=FASHION_MNIST_CLASSES)
    assert again.equals(load_pairs(pair_dir).astype(again.dtypes.to_dict()))
    same = build_pair_set(STUDY_SWEEP, small_spec(), tmp_path / "again", categories=FASHION_MNIST_CLASSES)
    assert len(same) == len(again)  # the same spec reuses the folder
    with pytest.raises(FileExistsError):
        build_pair_set(STUDY_SWEEP, small_spec(seed=4), tmp_path / "again")
    victim = tmp_path / "again" / "images" / again["left_image"].iloc[0]
    victim.write_bytes(victim.read_bytes() + b"x")
    assert verify_pair_set(tmp_path / "again") == [again["left_image"].iloc[0]]
    with pytest.raises(FileExistsError):  # a tampered set is never silently reused
        build_pair_set(STUDY_SWEEP, small_spec(), tmp_path / "again")


def test_pair_set_refuses_impossible_specs(tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        build_pair_set(STUDY_SWEEP, small_spec(n_pairs=128, seeds=(0,)), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no images"):
        build_pair_set(STUDY_SWEEP, small_spec(b=parse_source("base:FD-99")), tmp_path / "y")
    with pytest.raises(ValueError, match="must differ"):
        small_spec(b=parse_source(A))
    with pytest.raises(ValueError, match="<model>:<config>"):
        parse_source("base")


# ----------------------------------------------------------------------------- store


def test_store_records_once_and_refuses_bad_ratings_without_changing_anything(pair_dir, tmp_path):
    store = RatingStore(tmp_path / "r.sqlite", pair_dir)
    assert store.ensure_rater("r1", pairs_per_rater=10) is True
    assert store.ensure_rater("r1", pairs_per_rater=10) is False
    first = store.next_pair("r1")
    assert store.record("r1", first["pair_id"], "left", response_ms=900).duplicate is False
    assert store.record("r1", first["pair_id"], "left").duplicate is True  # idempotent
    outside = next(pid for pid in load_pairs(pair_dir)["pair_id"]
                   if pid not in {r[0] for r in store._query("SELECT pair_id FROM assignments WHERE rater_id='r1'")})
    bad = [
        (("r1", first["pair_id"], "right"), 409),  # a rating is final
        (("r1", "p99999", "left"), 404),
        (("r1", outside, "left"), 403),
        (("r1", first["pair_id"], "LEFT"), 400),
        (("nobody", first["pair_id"], "left"), 403),
        (("bad id!", first["pair_id"], "left"), 400),
    ]
    for args, status in bad:
        with pytest.raises(RatingError) as exc:
            store.record(*args)
        assert exc.value.status == status, args
    with pytest.raises(RatingError):
        store.record("r1", store.next_pair("r1")["pair_id"], "left", response_ms=-5)
    ratings = store.ratings()
    assert len(ratings) == 1 and ratings["choice"].tolist() == ["left"]
    assert store.progress("r1") == (1, 10 + _repeats_in_set(store, "r1"))
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _repeats_in_set(store: RatingStore, rater: str) -> int:
    return store._query("SELECT COUNT(*) FROM assignments a JOIN pairs p USING (pair_id) "
                        "WHERE a.rater_id = ? AND p.repeat_of != ''", (rater,))[0][0]


def test_store_balances_raters_and_keeps_repeats_with_originals(pair_dir, tmp_path):
    store = RatingStore(tmp_path / "r.sqlite", pair_dir)
    manifest = load_pairs(pair_dir).set_index("pair_id")
    primaries = int((manifest["repeat_of"] == "").sum())
    for r in ("a", "b", "c"):
        store.ensure_rater(r, pairs_per_rater=primaries // 3)
    rows = store._query("SELECT rater_id, pair_id FROM assignments")
    sets: dict[str, set[str]] = {}
    for rater, pid in rows:
        sets.setdefault(rater, set()).add(pid)
    firsts = [{p for p in s if manifest.loc[p, "repeat_of"] == ""} for s in sets.values()]
    assert all(len(f) == primaries // 3 for f in firsts)
    assert not (firsts[0] & firsts[1]) and not (firsts[1] & firsts[2])  # least-assigned first
    for s in sets.values():
        for pid in s:
            if manifest.loc[pid, "repeat_of"]:
                assert manifest.loc[pid, "repeat_of"] in s


def test_store_refuses_a_database_of_another_pair_set(pair_dir, tmp_path):
    RatingStore(tmp_path / "r.sqlite", pair_dir)
    other = tmp_path / "other"
    build_pair_set(STUDY_SWEEP, small_spec(seed=9), other)
    with pytest.raises(RatingError, match="another pair set"):
        RatingStore(tmp_path / "r.sqlite", other)


# ----------------------------------------------------------------------------- app (test client)


def test_app_rejects_bad_requests_and_serves_only_the_pair_set(pair_dir, tmp_path):
    from fcr.human.app import create_app

    app = create_app(pair_dir, tmp_path / "r.sqlite", token="s3cret")
    client = app.test_client()
    assert client.get("/api/next").status_code == 401
    name = load_pairs(pair_dir)["left_image"].iloc[0]
    assert client.get(f"/img/{name}").status_code == 401  # no session, no images
    r = client.post("/start", data={"rater_id": "r1", "token": "wrong"})
    assert "wrong+access+token" in r.headers["Location"]
    assert client.post("/start", data={"rater_id": "../x", "token": "s3cret"}).headers["Location"].startswith("/?error=")
    assert client.post("/start", data={"rater_id": "r1", "token": "s3cret"}).headers["Location"] == "/rate"
    nxt = client.get("/api/next").get_json()
    pid = nxt["pair"]["pair_id"]
    assert client.get(nxt["pair"]["left"]).status_code == 200
    for path in ("/img/../pairs.csv", "/img/..%2Fpairs.csv", "/img/%2e%2e/%2e%2e/etc/passwd", "/img//etc/passwd",
                 "/img/images/" + name, "/img/pairs.csv"):
        assert client.get(path, follow_redirects=True).status_code == 404, path  # (werkzeug merges // first)
    bad_posts = [
        ("not json", 400), (json.dumps([pid, "left"]), 400), (json.dumps({"pair_id": pid}), 400),
        (json.dumps({"pair_id": pid, "choice": "left", "extra": 1}), 400),
        (json.dumps({"pair_id": "p99999", "choice": "left"}), 404),
        (json.dumps({"pair_id": pid, "choice": "left", "response_ms": "fast"}), 400),
        (json.dumps({"pair_id": pid, "choice": "x" * 5000}), 413),
    ]
    for body, status in bad_posts:
        r = client.post("/api/rate", data=body, content_type="application/json")
        assert r.status_code == status, (body[:40], r.status_code)
        assert "error" in r.get_json()
    assert RatingStore(tmp_path / "r.sqlite", pair_dir).count() == 0  # nothing stored by any of them
    ok = client.post("/api/rate", json={"pair_id": pid, "choice": "tie", "response_ms": 1200})
    assert ok.get_json()["status"] == "recorded"
    assert client.post("/api/rate", json={"pair_id": pid, "choice": "tie"}).get_json()["status"] == "duplicate"
    assert client.post("/api/rate", json={"pair_id": pid, "choice": "left"}).status_code == 409
    assert RatingStore(tmp_path / "r.sqlite", pair_dir).count() == 1


def test_serve_refuses_an_exposed_address_without_a_token(pair_dir, tmp_path):
    from fcr.human.app import is_loopback, serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(ValueError, match="token"):
        serve(pair_dir, tmp_path / "r.sqlite", host="0.0.0.0")


# ----------------------------------------------------------------------------- MTurk


MTURK_HEADER = ["HITId", "HITTypeId", "Title", "Description", "Keywords", "Reward", "CreationTime", "MaxAssignments",
                "RequesterAnnotation", "AssignmentDurationInSeconds", "AutoApprovalDelayInSeconds", "Expiration",
                "NumberOfSimilarHITs", "LifetimeInSeconds", "AssignmentId", "WorkerId", "AssignmentStatus",
                "AcceptTime", "SubmitTime", "AutoApprovalTime", "ApprovalTime", "RejectionTime", "RequesterFeedback",
                "WorkTimeInSeconds", "LifetimeApprovalRate", "Last30DaysApprovalRate", "Last7DaysApprovalRate"]


def write_results(path: Path, batch: pd.DataFrame, answers: list[dict]) -> None:
    """An MTurk results CSV in MTurk's column layout: one row per (HIT, worker) in ``answers``."""
    inputs = [f"Input.{c}" for c in batch.columns]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MTURK_HEADER + inputs + ["Answer.taskAnswers", "Approve", "Reject"])
        for n, a in enumerate(answers):
            row = batch[batch["hit_key"] == a["hit_key"]].iloc[0] if a["hit_key"] in set(batch["hit_key"]) else None
            values = {c: (row[c] if row is not None else "") for c in batch.columns}
            values.update(a.get("inputs", {}))
            if row is None:
                values["hit_key"] = a["hit_key"]
            base = {k: "" for k in MTURK_HEADER}
            base.update(HITId=f"HIT{a['hit_key']}", AssignmentId=f"ASG{n:04d}", WorkerId=a["worker"],
                        AssignmentStatus=a.get("status", "Submitted"), WorkTimeInSeconds="120")
            writer.writerow([base[k] for k in MTURK_HEADER] + [values[c] for c in batch.columns]
                            + [json.dumps([a["answers"]]), "", ""])


def test_mturk_round_trip_preserves_every_rating_and_flags_bad_rows(pair_dir, tmp_path):
    export = tmp_path / "mturk"
    batch = export_mturk(pair_dir, export, "https://example.org/pairs/images", pairs_per_hit=6)
    manifest = load_pairs(pair_dir).set_index("pair_id")
    assert (export / BATCH_INPUT).is_file() and (export / HITS).is_file()
    template = (export / TEMPLATE).read_text()
    assert "<crowd-form" in template and "${left_url_6}" in template and 'name="choice_6"' in template
    hits = pd.read_csv(export / HITS, dtype=str)
    assert sorted(hits["pair_id"]) == sorted(manifest.index)  # every pair in exactly one HIT
    assert len(batch) == math.ceil(len(manifest) / 6)
    for _, group in hits.groupby("hit_key"):
        ids = set(group["pair_id"])
        for pid in ids:  # a repeat travels with its original
            if manifest.loc[pid, "repeat_of"]:
                assert manifest.loc[pid, "repeat_of"] in ids
    assert all(group["pair_id"].map(manifest["kind"]).eq("gold").any() for _, group in hits.groupby("hit_key"))

    # Two workers answer every HIT (W1 answers gold correctly, W2 picks 'left' everywhere); plus bad rows.
    answers, expected = [], {}
    for _, row in batch.iterrows():
        for worker in ("W1", "W2"):
            ans = {}
            for k in range(1, 7):
                pid = row[f"pair_id_{k}"]
                if not pid:
                    continue
                if worker == "W1":
                    choice = manifest.loc[pid, "gold_answer"] or ("right" if k % 2 else "tie")
                    ans[f"choice_{k}"] = choice
                else:
                    choice = "left"
                    ans[f"choice_{k}.left"], ans[f"choice_{k}.right"], ans[f"choice_{k}.tie"] = True, False, False
                expected[(f"mturk:{worker}", pid)] = choice
            answers.append({"hit_key": row["hit_key"], "worker": worker, "answers": ans})
    first_hit = batch.iloc[0]
    answers += [
        {"hit_key": first_hit["hit_key"], "worker": "W1", "answers": answers[0]["answers"]},  # resubmitted: duplicate
        {"hit_key": "h99999", "worker": "W3", "answers": {"choice_1": "left"}},  # unknown HIT
        {"hit_key": first_hit["hit_key"], "worker": "W4", "answers": {"choice_1": "left"}, "status": "Rejected"},
        {"hit_key": first_hit["hit_key"], "worker": "W5", "answers": {"choice_1": "sideways"},
         "inputs": {f"pair_id_{k}": "" for k in range(2, 7)}},  # malformed answer
        {"hit_key": first_hit["hit_key"], "worker": "W6", "answers": {"choice_1": "left"},
         "inputs": {"pair_id_1": "p99999", **{f"pair_id_{k}": "" for k in range(2, 7)}}},  # unknown pair id
    ]
    results = tmp_path / "Batch_results.csv"
    write_results(results, batch, answers)
    store = RatingStore(tmp_path / "r.sqlite", pair_dir)
    report = import_mturk(results, export, store)
    assert report.ratings_imported == len(expected) == 2 * len(manifest)
    assert report.duplicates == int((batch.iloc[0][[f"pair_id_{k}" for k in range(1, 7)]] != "").sum())
    assert report.unknown_hits == ["h99999"] and len(report.rejected_assignments) == 1
    assert len(report.malformed) == 1 and report.unknown_pairs == ["p99999"]
    w2_hits = {a for a in report.gold_failed_assignments}
    assert len(w2_hits) == sum(1 for _, g in hits.groupby("hit_key")
                               if any(manifest.loc[p, "gold_answer"] != "left" for p in g["pair_id"]
                                      if manifest.loc[p, "kind"] == "gold"))
    stored = store.ratings()
    assert {(r, p): c for r, p, c in zip(stored["rater_id"], stored["pair_id"], stored["choice"])} == expected
    assert (stored["source"] == "mturk").all() and stored["assignment_id"].str.startswith("ASG").all()
    again = import_mturk(results, export, store)  # importing the same file twice changes nothing
    assert again.ratings_imported == 0 and store.count() == len(expected)

    # The attention rule excludes W2's assignments that failed a gold pair, and only those.
    df = analysis.oriented(store.ratings(), load_pairs(pair_dir))
    att = analysis.attention(df, min_gold_pass=0.75)
    assert set(att.loc[att["excluded"], "unit"].str.split("/").str[1]) == set(report.gold_failed_assignments)
    assert not att.loc[att["rater_id"] == "mturk:W1", "excluded"].any()


def test_mturk_import_refuses_a_file_that_is_not_a_results_csv(pair_dir, tmp_path):
    export = tmp_path / "mturk"
    export_mturk(pair_dir, export, "https://example.org/i")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        import_mturk(tmp_path / "x.csv", export, RatingStore(tmp_path / "r.sqlite", pair_dir))
    with pytest.raises(ValueError, match="http"):
        export_mturk(pair_dir, tmp_path / "m2", "file:///etc")


# ----------------------------------------------------------------------------- analysis rules


def test_sign_test_power_and_sample_size_agree_with_scipy_and_the_normal_approximation():
    from scipy import stats

    n, p = 60, 0.7
    rejects = [k for k in range(n + 1) if stats.binomtest(k, n, 0.5).pvalue <= 0.05]
    assert math.isclose(analysis.sign_test_power(n, p), sum(stats.binom.pmf(k, n, p) for k in rejects), rel_tol=1e-9)
    need = analysis.pairs_needed(0.6)
    assert analysis.sign_test_power(need, 0.6) >= 0.8 > analysis.sign_test_power(need - 30, 0.6)
    normal = ((1.959964 * 0.5 + 0.841621 * math.sqrt(0.24)) / 0.1) ** 2
    assert abs(need - normal) / normal < 0.1
    assert analysis.pairs_needed(0.4) == need  # symmetric around 0.5
    assert 0.5 < analysis.detectable_win_rate(1000) < analysis.detectable_win_rate(100) < 1.0


def test_verdict_is_na_without_ratings():
    row = analysis.preference_verdict(None, A, B)
    assert row["passed"] is None and "no ratings" in row["note"]


def test_cli_validates_before_writing_and_builds_from_params(tmp_path, capsys):
    from fcr.human.__main__ import main

    out = tmp_path / "cli_pairs"
    sets = ["--set", f"human_pair_dir={out}", "--set", "human_pairs=6", "--set", "human_seeds=[0]"]
    assert main(["pairs", *sets, "--set", "human_a=no-config"]) == 2
    assert main(["pairs", *sets, "--set", "human_gold_rate=1e-1"]) == 2  # YAML 1.1: a string
    assert main(["pairs", *sets, "--set", f"human_b={A}"]) == 2  # both sides the same
    assert "human_b" in capsys.readouterr().err and not out.exists()
    assert main(["pairs", *sets]) == 0 and len(load_pairs(out)) == 6 + 1 + 1
    assert main(["status", "--pairs", str(out), "--db", str(tmp_path / "r.sqlite")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"pairs": 8, "raters": 0, "ratings": 0}
