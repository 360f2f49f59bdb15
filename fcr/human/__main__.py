"""Command line of the human preference kit.

    python -m fcr.human pairs -f params/human_embedded.yaml        # build the blinded pair set
    python -m fcr.human serve -f params/human_embedded.yaml        # lab rating app on 127.0.0.1:8765
    python -m fcr.human status -f params/human_embedded.yaml       # pairs, raters, ratings so far
    python -m fcr.human export-mturk -f params/human_embedded.yaml --out DIR --image-base-url URL
    python -m fcr.human import-mturk -f params/human_embedded.yaml --results CSV --export DIR

``pairs`` reads flat parameters (``human_*`` keys, validated like every notebook's); the analysis
is notebook ``07_human_preference``. Errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fcr.config import ConfigError, load_options, parse_sets


def _pairs(args: argparse.Namespace) -> int:
    from fcr.backends.checks import check_task
    from fcr.backends.embedded.data import FASHION_MNIST_CLASSES
    from fcr.human.pairs import PairSetSpec, build_pair_set

    opts = load_options(*args.params, overrides=parse_sets(args.set))
    check_task(opts, "human")
    spec = PairSetSpec.from_options(opts.human, opts.run.seed)
    categories = FASHION_MNIST_CLASSES if opts.run.setting == "embedded" else None
    manifest = build_pair_set(opts.human.human_sweep_dir, spec, opts.human.human_pair_dir, categories=categories)
    counts = manifest["kind"].value_counts().to_dict()
    print(f"pair set {opts.human.human_pair_dir}: {len(manifest)} pairs {counts}; A = {spec.a.name}, B = {spec.b.name}")
    return 0


def _locations(args: argparse.Namespace) -> None:
    """--pairs / --db, else the opts' human_pair_dir / human_ratings_db (defaults when no -f)."""
    opts = load_options(*args.params, overrides=parse_sets(args.set))
    args.pairs = args.pairs or opts.human.human_pair_dir
    if hasattr(args, "db"):
        args.db = args.db or opts.human.human_ratings_db


def _serve(args: argparse.Namespace) -> int:
    from fcr.human.app import serve

    _locations(args)
    serve(args.pairs, args.db, host=args.host, port=args.port, token=args.token or os.environ.get("FCR_RATING_TOKEN"),
          pairs_per_rater=args.pairs_per_rater)
    return 0


def _status(args: argparse.Namespace) -> int:
    from fcr.human.store import RatingStore

    _locations(args)
    print(json.dumps(dict(RatingStore(args.db, args.pairs).summary())))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fcr.human.crowd import export_mturk

    _locations(args)
    batch = export_mturk(args.pairs, args.out, args.image_base_url, pairs_per_hit=args.pairs_per_hit, seed=args.seed)
    print(f"wrote {len(batch)} HITs of {args.pairs_per_hit} pairs to {args.out} (batch_input.csv, task_template.html, "
          "hits.csv); upload the pair set's images/ to the image base URL")
    return 0


def _import(args: argparse.Namespace) -> int:
    from fcr.human.crowd import import_mturk
    from fcr.human.store import RatingStore

    _locations(args)
    report = import_mturk(args.results, args.export, RatingStore(args.db, args.pairs))
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.human", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairs", help="build the blinded pair set from a finished sweep")
    p.add_argument("-f", "--params", action="append", default=[], help="parameter YAML file (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    p.set_defaults(run=_pairs)
    def locations(p: argparse.ArgumentParser, db: bool = True) -> None:
        p.add_argument("-f", "--params", action="append", default=[], help="parameter YAML (human_pair_dir, human_ratings_db)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
        p.add_argument("--pairs", default=None, help="pair set folder (default: human_pair_dir)")
        if db:
            p.add_argument("--db", default=None, help="SQLite ratings file, created if missing (default: human_ratings_db)")

    p = sub.add_parser("serve", help="run the lab rating app")
    locations(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs --token)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="shared secret raters type in (or env FCR_RATING_TOKEN)")
    p.add_argument("--pairs-per-rater", type=int, default=0, help="pairs per rater (0 = all)")
    p.set_defaults(run=_serve)
    p = sub.add_parser("status", help="pairs, raters and ratings so far")
    locations(p)
    p.set_defaults(run=_status)
    p = sub.add_parser("export-mturk", help="write an MTurk batch (input CSV, HTML template, HIT map)")
    locations(p, db=False)
    p.add_argument("--out", required=True)
    p.add_argument("--image-base-url", required=True, help="public URL of the pair set's images/ folder")
    p.add_argument("--pairs-per-hit", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_export)
    p = sub.add_parser("import-mturk", help="import an MTurk results CSV into the ratings database")
    locations(p)
    p.add_argument("--results", required=True)
    p.add_argument("--export", required=True, help="the export folder of that batch (hits.csv)")
    p.set_defaults(run=_import)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
