"""Blinded A/B pair sets from a finished sweep.

A pair shows the images two configurations made from the SAME prompt and initial noise (the sweep
samples every configuration of every model with the same prompts and z_T per seed), left/right
drawn at random and recorded. File names are keyed hashes, so a rater cannot read the
configuration from them. Two kinds of control pairs are mixed in at documented rates:

- **repeat** pairs show an earlier test pair again with the sides swapped (rater consistency);
- **gold** pairs are attention checks with one side clearly wrong. ``gold="mismatched_prompt"``
  pairs an image with the same configuration's image of a prompt of another class (the wrong
  garment for the prompt shown); ``gold="<model>:<config>"`` pairs it with another configuration
  that is clearly broken (e.g. a much larger stride). The correct side is recorded.

The manifest ``pairs.csv`` lists every pair with the SHA-256 of each image file; ``pair_set.json``
records how the set was made. :func:`verify_pair_set` re-hashes the files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from safetensors import safe_open

from fcr.options import HumanOptions

__all__ = [
    "CHOICES",
    "PAIR_COLUMNS",
    "ImageSource",
    "PairSetSpec",
    "build_pair_set",
    "load_pairs",
    "pair_images",
    "parse_source",
    "verify_pair_set",
]

CHOICES = ("left", "right", "tie")
PAIR_COLUMNS = (
    "pair_id", "kind", "prompt", "category", "seed", "index", "left_source", "right_source",
    "left_image", "right_image", "left_sha256", "right_sha256", "a_side", "gold_answer", "repeat_of",
)
MANIFEST = "pairs.csv"
META = "pair_set.json"
IMAGE_DIR = "images"


@dataclass(frozen=True)
class ImageSource:
    """One model x configuration of a sweep run folder (``<sweep_dir>/quality/<model>__<config>__seed<s>``)."""

    model: str
    config: str

    @property
    def name(self) -> str:
        return f"{self.model}:{self.config}"

    def stem(self, seed: int) -> str:
        return f"{self.model.replace('/', '_')}__{self.config}__seed{seed}"


def parse_source(spec: str) -> ImageSource:
    """``"<model>:<config>"`` (e.g. ``"base:FD-5"``) as an :class:`ImageSource`."""
    model, sep, config = spec.rpartition(":")
    if not sep or not model or not config:
        raise ValueError(f"an image source is '<model>:<config>' (e.g. 'base:FD-5'), got {spec!r}")
    return ImageSource(model, config)


@dataclass(frozen=True)
class PairSetSpec:
    """How a pair set is drawn: ``a`` vs ``b`` on ``n_pairs`` prompt/noise pairs of ``seeds``;
    ``repeat_rate`` and ``gold_rate`` are fractions of ``n_pairs`` added on top (rounded)."""

    a: ImageSource
    b: ImageSource
    n_pairs: int
    seeds: tuple[int, ...]
    repeat_rate: float = 0.1
    gold_rate: float = 0.1
    gold: str = "mismatched_prompt"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        for name in ("repeat_rate", "gold_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.a == self.b:
            raise ValueError(f"the two sides must differ, got {self.a.name} twice")

    @classmethod
    def from_options(cls, human: HumanOptions, seed: int) -> PairSetSpec:
        """The pair set the human options describe, drawn with the run's ``seed``."""
        return cls(a=parse_source(human.human_a), b=parse_source(human.human_b), n_pairs=human.human_pairs,
                   seeds=tuple(human.human_seeds), repeat_rate=human.human_repeat_rate,
                   gold_rate=human.human_gold_rate, gold=human.human_gold, seed=seed)


@dataclass
class _Sample:
    images: np.ndarray  # (n, H, W) or (n, H, W, 3) uint8
    prompts: list[str]
    labels: np.ndarray | None


def _read_sample(sweep_dir: Path, source: ImageSource, seed: int) -> _Sample:
    """The images a sweep wrote for ``source`` at ``seed``: the embedded side file's uint8 tensor, or
    the SD image folder (``images/<stem>/NNNNNN.png``) with the prompts from the result JSON."""
    side = sweep_dir / "quality" / f"{source.stem(seed)}.safetensors"
    folder = sweep_dir / "images" / source.stem(seed)
    if side.is_file():
        with safe_open(str(side), "pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            prompts = json.loads(meta.get("prompts", "[]"))
            if "images" in keys:
                images = f.get_tensor("images").numpy()
                labels = f.get_tensor("labels").numpy() if "labels" in keys else None
                images = images[:, 0] if images.shape[1] == 1 else np.moveaxis(images, 1, -1)
                return _Sample(images.astype(np.uint8), prompts, labels)
    if folder.is_dir():
        files = sorted(folder.glob("*.png"))
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
        if not side.is_file():
            raise FileNotFoundError(f"{side} (the prompts of {folder}) not found")
        return _Sample(images, prompts, None)
    raise FileNotFoundError(
        f"no images of {source.name} at seed {seed} in {sweep_dir} (looked for {side.name} with 'images' and "
        f"images/{source.stem(seed)}/): run notebook 03 with these models and configurations first"
    )


def _blind_name(key: bytes, source: ImageSource, seed: int, index: int) -> str:
    digest = hmac.new(key, f"{source.name}|{seed}|{index}".encode(), hashlib.sha256).hexdigest()
    return f"{digest[:20]}.png"


def _write_png(image: np.ndarray, path: Path) -> str:
    """Write ``image`` losslessly and return the SHA-256 of the file's bytes."""
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_pair_set(sweep_dir: str | Path, spec: PairSetSpec, out_dir: str | Path,
                   categories: Sequence[str] | None = None) -> pd.DataFrame:
    """Draw the pair set of ``spec`` from ``sweep_dir`` into ``out_dir`` (``images/``, ``pairs.csv``,
    ``pair_set.json``) and return the manifest. Deterministic for ``spec.seed``; refuses an
    ``out_dir`` that already holds another set. ``categories[label]`` names a prompt's category
    (embedded: the Fashion-MNIST class); without labels the category is the prompt itself."""
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    if (out_dir / MANIFEST).exists():  # made before: the same spec reuses it, another one is refused
        stored = json.loads((out_dir / META).read_text()).get("spec") if (out_dir / META).is_file() else None
        if stored == _spec_record(spec) and not verify_pair_set(out_dir):
            return load_pairs(out_dir)
        raise FileExistsError(f"{out_dir} already holds another pair set (or its images changed): choose a new "
                              "folder (ratings refer to its pair ids)")
    rng = random.Random(spec.seed)
    key = rng.randbytes(32)  # keys the blinded names; not stored
    gold_source = None if spec.gold == "mismatched_prompt" else parse_source(spec.gold)

    samples: dict[tuple[str, int], _Sample] = {}
    pool: list[tuple[int, int]] = []
    for seed in spec.seeds:
        for source in (spec.a, spec.b) + ((gold_source,) if gold_source else ()):
            samples[source.name, seed] = _read_sample(sweep_dir, source, seed)
        a, b = samples[spec.a.name, seed], samples[spec.b.name, seed]
        if a.prompts != b.prompts or len(a.images) != len(b.images):
            raise ValueError(f"{spec.a.name} and {spec.b.name} at seed {seed} did not sample the same prompts: "
                             "a pair must share prompt and initial noise")
        pool += [(seed, i) for i in range(len(a.images))]
    n_repeat = round(spec.repeat_rate * spec.n_pairs)
    n_gold = round(spec.gold_rate * spec.n_pairs)
    if spec.n_pairs + n_gold > len(pool):
        raise ValueError(f"n_pairs + gold pairs = {spec.n_pairs + n_gold} exceeds the {len(pool)} prompt/noise pairs "
                         f"of seeds {list(spec.seeds)}")
    drawn = rng.sample(pool, spec.n_pairs + n_gold)
    test_items, gold_items = drawn[:spec.n_pairs], drawn[spec.n_pairs:]

    images_dir = out_dir / IMAGE_DIR
    images_dir.mkdir(parents=True, exist_ok=True)

    def image(source: ImageSource, seed: int, index: int) -> tuple[str, str]:
        name = _blind_name(key, source, seed, index)
        return name, _write_png(samples[source.name, seed].images[index], images_dir / name)

    def category(sample: _Sample, index: int) -> str:
        if sample.labels is not None and categories is not None:
            return str(categories[int(sample.labels[index])])
        return sample.prompts[index] if sample.prompts else ""

    rows: list[dict[str, Any]] = []

    def add(kind: str, seed: int, index: int, first: ImageSource, second: ImageSource, a_side: str,
            first_index: int | None = None, second_index: int | None = None, gold_answer: str = "",
            repeat_of: str = "") -> None:
        sample = samples[spec.a.name, seed]
        left, right = (first, second) if a_side == "left" else (second, first)
        li, ri = (first_index, second_index) if a_side == "left" else (second_index, first_index)
        left_name, left_hash = image(left, seed, index if li is None else li)
        right_name, right_hash = image(right, seed, index if ri is None else ri)
        rows.append({
            "pair_id": f"p{len(rows) + 1:05d}", "kind": kind, "prompt": sample.prompts[index] if sample.prompts else "",
            "category": category(sample, index), "seed": seed, "index": index,
            "left_source": left.name, "right_source": right.name, "left_image": left_name, "right_image": right_name,
            "left_sha256": left_hash, "right_sha256": right_hash, "a_side": a_side, "gold_answer": gold_answer,
            "repeat_of": repeat_of,
        })

    for seed, index in test_items:
        add("test", seed, index, spec.a, spec.b, rng.choice(("left", "right")))
    tests = list(rows)
    for original in rng.sample(tests, min(n_repeat, len(tests))):  # same two images, sides swapped
        swapped = "right" if original["a_side"] == "left" else "left"
        add("repeat", original["seed"], original["index"], spec.a, spec.b, swapped, repeat_of=original["pair_id"])
    for seed, index in gold_items:
        good_side = rng.choice(("left", "right"))
        if gold_source is not None:
            add("gold", seed, index, spec.a, gold_source, good_side, gold_answer=good_side)
            continue
        sample = samples[spec.a.name, seed]
        other = _mismatched_index(sample, index, rng)
        add("gold", seed, index, spec.a, spec.a, good_side, first_index=index, second_index=other, gold_answer=good_side)
    # A random order, numbered after shuffling: neither position nor id tells a control pair.
    rng.shuffle(rows)
    new_ids = {row["pair_id"]: f"p{i + 1:05d}" for i, row in enumerate(rows)}
    for row in rows:
        row["pair_id"] = new_ids[row["pair_id"]]
        row["repeat_of"] = new_ids.get(row["repeat_of"], "")
    manifest = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    manifest.to_csv(out_dir / MANIFEST, index=False)
    meta = {
        "sweep_dir": str(sweep_dir), "a": spec.a.name, "b": spec.b.name, "n_pairs": spec.n_pairs,
        "seeds": list(spec.seeds), "repeat_rate": spec.repeat_rate, "gold_rate": spec.gold_rate, "gold": spec.gold,
        "seed": spec.seed, "counts": manifest["kind"].value_counts().to_dict(),
        "spec": _spec_record(spec),
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2, default=str))
    return manifest


def _spec_record(spec: PairSetSpec) -> dict[str, Any]:
    record = asdict(spec)
    record.update(a=spec.a.name, b=spec.b.name, seeds=list(spec.seeds))
    return json.loads(json.dumps(record))


def _mismatched_index(sample: _Sample, index: int, rng: random.Random) -> int:
    """Another image of the same sample whose prompt differs (embedded: another class)."""
    if sample.labels is not None:
        options = [j for j in range(len(sample.images)) if sample.labels[j] != sample.labels[index]]
    else:
        options = [j for j in range(len(sample.images)) if sample.prompts[j] != sample.prompts[index]]
    if not options:
        raise ValueError("a mismatched-prompt gold pair needs another prompt in the same seed")
    return rng.choice(options)


def load_pairs(pair_dir: str | Path) -> pd.DataFrame:
    """The manifest of a pair set (strings kept as strings)."""
    path = Path(pair_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the pair set first (python -m fcr.human pairs ...)")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def verify_pair_set(pair_dir: str | Path) -> list[str]:
    """Image files whose SHA-256 does not match the manifest (empty when the set is intact)."""
    pair_dir = Path(pair_dir)
    bad = []
    for _, row in load_pairs(pair_dir).iterrows():
        for side in ("left", "right"):
            path = pair_dir / IMAGE_DIR / row[f"{side}_image"]
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != row[f"{side}_sha256"]:
                bad.append(row[f"{side}_image"])
    return sorted(set(bad))


def pair_images(pair_dir: str | Path, manifest: pd.DataFrame) -> np.ndarray:
    """The images of ``manifest``'s pairs as uint8 arrays, left then right of each pair (for a grid)."""
    folder = Path(pair_dir) / IMAGE_DIR
    images = [np.asarray(Image.open(folder / row[f"{side}_image"])) for _, row in manifest.iterrows()
              for side in ("left", "right")]
    return np.stack(images)
