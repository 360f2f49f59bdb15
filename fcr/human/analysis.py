"""Analysis of A/B ratings: attention checks, win rate, sign test, agreement, consistency, power.

Documented rules (the notebook and README quote them):

- **Orientation.** Each rating is turned from left/right into A/B with the pair's recorded
  ``a_side``: side A is the set's first source (e.g. ``fcr:FD-10``), B the second (``base:FD-5``).
- **Attention exclusion.** The unit is the rating session: a lab rater, or one MTurk assignment.
  A unit's gold pass rate is the share of its gold pairs answered with the correct side (a tie
  fails). A unit below ``min_gold_pass`` is excluded entirely; a unit that saw no gold pair is
  kept and counted as unchecked.
- **Ties.** The sign test drops ties (the classic sign test); the tie rate is reported beside it.
- **Unit of the test.** Test pairs, each scored by the majority of its kept raters (A, B or a
  tie when they split evenly); with one rater per pair this is the per-rating test. The exact
  two-sided binomial test of P(A) = 0.5 over the decisive pairs, Wilson 95 % interval of the win
  rate of A.
- **Verdict.** "A preferred" / "B preferred" when the interval excludes 0.5 (then p < 0.05 too,
  up to the two methods' rounding); otherwise "not detectable at n = …", with the win rate this n
  detects with 80 % power. Without ratings the verdict row is n/a.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

__all__ = [
    "attention",
    "consistency",
    "detectable_win_rate",
    "fleiss_agreement",
    "oriented",
    "pairs_needed",
    "power_curve",
    "power_table",
    "preference",
    "preference_breakdown",
    "preference_verdict",
    "sign_test_power",
]


def oriented(ratings: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Ratings joined with their pairs, with ``winner`` in {"A", "B", "tie"} and ``unit`` (the
    attention unit: ``rater_id`` plus the MTurk assignment when there is one)."""
    if ratings.empty:
        cols = list(ratings.columns) + ["winner", "unit", "kind", "gold_answer", "repeat_of", "a_side", "category"]
        return pd.DataFrame(columns=cols)
    keep = ["pair_id", "kind", "category", "prompt", "a_side", "gold_answer", "repeat_of", "left_source", "right_source"]
    df = ratings.merge(manifest[keep], on="pair_id", how="left", validate="many_to_one")
    if df["kind"].isna().any():
        raise ValueError("ratings refer to pair ids missing from the manifest: wrong pair set?")
    a_left = df["a_side"] == "left"
    df["winner"] = np.where(df["choice"] == "tie", "tie",
                            np.where((df["choice"] == "left") == a_left, "A", "B"))
    assignment = df.get("assignment_id", pd.Series("", index=df.index)).fillna("")
    df["unit"] = np.where(assignment != "", df["rater_id"] + "/" + assignment, df["rater_id"])
    return df


def attention(df: pd.DataFrame, min_gold_pass: float = 0.75) -> pd.DataFrame:
    """Per attention unit: gold pairs seen and passed, pass rate, and whether the unit is excluded."""
    rows = []
    for unit, group in df.groupby("unit", sort=True):
        gold = group[group["kind"] == "gold"]
        passed = int((gold["choice"] == gold["gold_answer"]).sum())
        rate = passed / len(gold) if len(gold) else math.nan
        rows.append({"unit": unit, "rater_id": group["rater_id"].iloc[0], "ratings": len(group),
                     "gold_seen": len(gold), "gold_passed": passed, "gold_pass_rate": rate,
                     "excluded": bool(len(gold)) and rate < min_gold_pass})
    return pd.DataFrame(rows, columns=["unit", "rater_id", "ratings", "gold_seen", "gold_passed", "gold_pass_rate", "excluded"])


def _kept(df: pd.DataFrame, min_gold_pass: float) -> pd.DataFrame:
    att = attention(df, min_gold_pass)
    excluded = set(att.loc[att["excluded"], "unit"])
    return df[~df["unit"].isin(excluded)]


def _pair_majority(test: pd.DataFrame) -> pd.Series:
    def majority(w: pd.Series) -> str:
        a, b = int((w == "A").sum()), int((w == "B").sum())
        return "A" if a > b else "B" if b > a else "tie"

    return test.groupby("pair_id")["winner"].agg(majority)


def preference(df: pd.DataFrame, *, min_gold_pass: float = 0.75, alpha: float = 0.05) -> dict[str, Any]:
    """Win rate of A over B on the kept test pairs (see the module doc for the rules)."""
    kept = _kept(df, min_gold_pass)
    test = kept[kept["kind"] == "test"]
    winners = _pair_majority(test) if len(test) else pd.Series(dtype=str)
    wins_a, wins_b = int((winners == "A").sum()), int((winners == "B").sum())
    ties = int((winners == "tie").sum())
    decisive = wins_a + wins_b
    out: dict[str, Any] = {"ratings": len(df), "ratings_kept": len(kept), "test_ratings": len(test),
                           "pairs": len(winners), "wins_a": wins_a, "wins_b": wins_b, "ties": ties,
                           "tie_rate": ties / len(winners) if len(winners) else math.nan}
    if decisive:
        lo, hi = proportion_confint(wins_a, decisive, alpha=alpha, method="wilson")
        out.update(win_rate_a=wins_a / decisive, win_rate_lo=float(lo), win_rate_hi=float(hi),
                   p_value=float(sps.binomtest(wins_a, decisive, 0.5, alternative="two-sided").pvalue),
                   detectable_win_rate=detectable_win_rate(decisive, alpha=alpha))
    else:
        out.update(win_rate_a=math.nan, win_rate_lo=math.nan, win_rate_hi=math.nan, p_value=math.nan,
                   detectable_win_rate=math.nan)
    return out


def preference_breakdown(df: pd.DataFrame, by: str, *, min_gold_pass: float = 0.75) -> pd.DataFrame:
    """:func:`preference` per value of ``by`` (``rater_id`` or ``category``)."""
    kept = _kept(df, min_gold_pass)
    rows = []
    for value, group in kept[kept["kind"] == "test"].groupby(by, sort=True):
        res = preference(group, min_gold_pass=0.0)  # kept test ratings already
        rows.append({by: value, **{k: res[k] for k in ("pairs", "wins_a", "wins_b", "ties", "win_rate_a",
                                                         "win_rate_lo", "win_rate_hi", "p_value")}})
    return pd.DataFrame(rows)


def fleiss_agreement(df: pd.DataFrame, *, min_gold_pass: float = 0.75) -> dict[str, Any]:
    """Fleiss' kappa over test pairs rated by at least two kept raters, on A / B / tie. Fleiss needs
    the same number of ratings per pair: each pair contributes its first ``m`` ratings (in the
    order stored), ``m`` the smallest count among those pairs."""
    kept = _kept(df, min_gold_pass)
    test = kept[kept["kind"] == "test"]
    counts = test.groupby("pair_id").size()
    multi = counts[counts >= 2]
    if len(multi) < 2:
        return {"kappa": math.nan, "pairs": int(len(multi)), "raters_per_pair": 0}
    m = int(multi.min())
    sub = test[test["pair_id"].isin(multi.index)]
    sub = sub.sort_values("rating_id") if "rating_id" in sub else sub
    table = np.array([g["winner"].head(m).map({"A": 0, "B": 1, "tie": 2}).to_numpy()
                      for _, g in sub.groupby("pair_id")])
    counts_table, _ = aggregate_raters(table, n_cat=3)
    return {"kappa": float(fleiss_kappa(counts_table, method="fleiss")), "pairs": int(len(multi)), "raters_per_pair": m}


def consistency(df: pd.DataFrame) -> dict[str, Any]:
    """Share of repeat pairs (sides swapped) a rater judged like the original (same A/B winner)."""
    repeats = df[df["kind"] == "repeat"]
    firsts = df.set_index(["rater_id", "pair_id"])["winner"]
    same = []
    for _, row in repeats.iterrows():
        key = (row["rater_id"], row["repeat_of"])
        if key in firsts.index:
            same.append(firsts.loc[key] == row["winner"])
    n = len(same)
    return {"repeat_pairs": n, "consistent": int(sum(same)), "consistency": sum(same) / n if n else math.nan}


def sign_test_power(n: int, win_rate: float, alpha: float = 0.05) -> float:
    """Power of the exact two-sided sign test on ``n`` decisive pairs when P(A) = ``win_rate``.
    Under P = 0.5 the distribution is symmetric, so the two-sided p-value of ``k`` is twice its
    smaller tail (what ``scipy.stats.binomtest`` computes)."""
    if n < 1:
        return 0.0
    k = np.arange(n + 1)
    pvals = np.minimum(1.0, 2.0 * np.minimum(sps.binom.cdf(k, n, 0.5), sps.binom.sf(k - 1, n, 0.5)))
    return float(sps.binom.pmf(k[pvals <= alpha], n, win_rate).sum())


def pairs_needed(win_rate: float, *, alpha: float = 0.05, power: float = 0.8, max_n: int = 20000) -> int:
    """Smallest number of decisive pairs whose exact sign test reaches ``power`` at ``win_rate``
    and keeps it for the next 10 sizes (the exact test's power saw-tooths in n)."""
    if not 0.0 < win_rate < 1.0 or win_rate == 0.5:
        raise ValueError(f"win_rate must lie in (0, 1) and differ from 0.5, got {win_rate}")
    # Start below the normal approximation and scan upwards.
    z = sps.norm.ppf(1 - alpha / 2) * 0.5 + sps.norm.ppf(power) * math.sqrt(win_rate * (1 - win_rate))
    start = max(1, int((z / abs(win_rate - 0.5)) ** 2 * 0.8))
    powers: dict[int, float] = {}
    for n in range(start, max_n + 1):
        if all(powers.setdefault(m, sign_test_power(m, win_rate, alpha)) >= power for m in range(n, n + 10)):
            return n
    raise ValueError(f"more than {max_n} pairs needed for win rate {win_rate}")


def detectable_win_rate(n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Win rate of A (above 0.5) that ``n`` decisive pairs detect with ``power`` (normal approximation)."""
    if n < 1:
        return math.nan
    za, zb = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    lo, hi = 0.5, 1.0
    for _ in range(60):  # bisection on |p - 0.5| * sqrt(n) = za * 0.5 + zb * sqrt(p (1 - p))
        p = (lo + hi) / 2
        if abs(p - 0.5) * math.sqrt(n) >= za * 0.5 + zb * math.sqrt(p * (1 - p)):
            hi = p
        else:
            lo = p
    return hi


def preference_verdict(result: Mapping[str, Any] | None, a: str, b: str) -> dict[str, Any]:
    """The seed's "human preference, significance @ 95 % CI" row: n/a without ratings."""
    row = {"criterion": "human preference (A/B, significance @ 95 % CI)", "scope": f"{a} vs {b}",
           "measured": "win rate of A over decisive test pairs", "threshold": "95 % Wilson interval excludes 0.5"}
    if not result or not result.get("pairs"):
        return {**row, "value": math.nan, "passed": None, "note": "n/a: no ratings yet"}
    p, lo, hi, n = result["win_rate_a"], result["win_rate_lo"], result["win_rate_hi"], result["wins_a"] + result["wins_b"]
    if n and lo > 0.5:
        word = f"{a} preferred"
    elif n and hi < 0.5:
        word = f"{b} preferred"
    else:
        word = (f"not detectable at n = {n} decisive pairs (detects a win rate of "
                f"{result['detectable_win_rate']:.2f} with 80 % power)") if n else "n/a: only ties"
    note = (f"{word}; win rate {p:.3f} [{lo:.3f}, {hi:.3f}], exact sign test p = {result['p_value']:.3g}, "
            f"{result['ties']} tied pairs, {result['ratings_kept']} of {result['ratings']} ratings kept") if n else word
    return {**row, "value": p, "passed": (lo > 0.5 or hi < 0.5) if n else None, "note": note}


def power_table(win_rates: list[float], *, alpha: float = 0.05, power: float = 0.8) -> pd.DataFrame:
    """Decisive pairs the exact sign test needs per win rate of A (and the normal approximation)."""
    rows = []
    for p in win_rates:
        normal = ((sps.norm.ppf(1 - alpha / 2) * 0.5 + sps.norm.ppf(power) * math.sqrt(p * (1 - p))) / abs(p - 0.5)) ** 2
        rows.append({"win_rate_a": p, "alpha": alpha, "power": power, "pairs_needed": pairs_needed(p, alpha=alpha, power=power),
                     "pairs_needed_normal": math.ceil(normal)})
    return pd.DataFrame(rows)


def power_curve(win_rates: list[float], n_values: list[int], *, alpha: float = 0.05) -> pd.DataFrame:
    """Power of the exact sign test at each number of decisive pairs, per win rate (long format)."""
    return pd.DataFrame([{"win_rate_a": p, "pairs": n, "power": sign_test_power(n, p, alpha)}
                         for p in win_rates for n in n_values])
