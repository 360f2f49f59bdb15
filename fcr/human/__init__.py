"""Human A/B preference study kit (the seed's phase 5).

- :mod:`fcr.human.pairs`: blinded pair sets from two configurations of a finished sweep (same
  prompt and initial noise), with repeated and gold (attention-check) pairs and image hashes.
- :mod:`fcr.human.store`: the SQLite rating store (WAL, one transaction per rating, one rating per
  rater and pair).
- :mod:`fcr.human.app`: the lab rating web app (Flask, served by waitress on localhost).
- :mod:`fcr.human.crowd`: MTurk batch export and results import into the same store.
- :mod:`fcr.human.analysis`: win rate, sign test, agreement, attention checks, power.

Nothing here invents a rating: every number the analysis reports comes from the store.
"""
