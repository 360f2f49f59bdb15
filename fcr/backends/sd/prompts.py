"""Evaluation prompt sources for Stable Diffusion: COCO and Flickr30k captions, ImageNet class
names and plain prompt lists (:func:`read_eval_prompts` tells them apart); local files only."""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from fcr.backends.sd.data import sample_subset

__all__ = [
    "EVAL_PROMPT_KINDS",
    "eval_prompt_kind",
    "imagenet_prompts",
    "read_coco_captions",
    "read_eval_prompts",
    "read_flickr30k_captions",
    "read_imagenet_classes",
    "read_prompt_list",
]

T = TypeVar("T")


def _captions_per_group(
    groups: Sequence[tuple[T, list[str]]], per_group: int | None, seed: int | None, source: Path
) -> list[tuple[T, str]]:
    """``per_group`` captions of each (key, captions) group (None: all), seeded or the first ones.

    One caption draws ``rng.integers`` per group (the historical COCO selection); more draw a
    permutation and cycle through it, warning when captions repeat.
    """
    if per_group is not None and (isinstance(per_group, bool) or not isinstance(per_group, int) or per_group < 1):
        raise ValueError(f"captions_per_image must be an integer >= 1 or None, got {per_group!r}")
    rng = np.random.default_rng(seed) if seed is not None else None
    pairs: list[tuple[T, str]] = []
    repeated = 0
    for key, captions in groups:
        if per_group == 1:
            pick = int(rng.integers(len(captions))) if rng is not None else 0
            pairs.append((key, captions[pick]))
            continue
        order = rng.permutation(len(captions)).tolist() if rng is not None else list(range(len(captions)))
        count = len(captions) if per_group is None else per_group
        pairs += [(key, captions[order[i % len(captions)]]) for i in range(count)]
        repeated += max(0, count - len(captions))
    if repeated:
        warnings.warn(
            f"{source}: captions_per_image={per_group} exceeds the captions some images have; "
            f"{repeated} of {len(pairs)} prompts repeat a caption of the same image",
            stacklevel=3,
        )
    return pairs


def _take(items: Sequence[T], n: int, seed: int | None, source: Path, what: str, hint: str = "") -> list[T]:
    """``n`` items (seeded subset, or the first ``n`` when ``seed`` is None); warns when fewer exist."""
    if len(items) < n:
        warnings.warn(
            f"{source}: {n} prompts asked but only {len(items)} available ({what}); all {len(items)} returned{hint}",
            stacklevel=3,
        )
    return list(items[:n]) if seed is None else sample_subset(items, n, seed)


def read_coco_captions(
    annotations_json: str | Path, n: int = 30_000, seed: int | None = 0, captions_per_image: int | None = 1
) -> list[tuple[int, str]]:
    """(image_id, caption) prompts of a COCO captions file (``annotations/captions_val2017.json``).

    ``captions_per_image`` captions of each image (None: all; COCO images have 5-7, more repeat
    them with a warning), then ``n`` of those pairs, seeded; with ``seed`` None the first captions
    by annotation id and the first ``n`` pairs by image id. Fewer than ``n`` warns and returns all:
    val2017 has 5,000 images (25,014 captions). The FID literature's "COCO 30K" usually samples
    30,000 captions from val2014's 40,504 images (``captions_val2014.json``, one per image).
    """
    path = Path(annotations_json)
    data = _read_json(path, "COCO captions file (annotations/captions_val2017.json)")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or "images" not in data or not all("caption" in a for a in annotations[:1]):
        raise ValueError(
            f"{path}: not a COCO captions file: expected 'images' and 'annotations' with 'caption' "
            "(captions_val2017.json; instances_*.json has no captions)"
        )
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in annotations:
        by_image.setdefault(int(ann["image_id"]), []).append((int(ann.get("id", 0)), " ".join(ann["caption"].split())))
    image_ids = sorted(int(img["id"]) for img in data["images"] if int(img["id"]) in by_image)
    groups = [(image_id, [c for _, c in sorted(by_image[image_id])]) for image_id in image_ids]
    pairs = _captions_per_group(groups, captions_per_image, seed, path)
    hint = ""
    if captions_per_image == 1 and groups:
        hint = (
            f"; set captions_per_image (e.g. {-(-n // len(groups))}; captions repeat beyond an image's 5-7) "
            "or use captions_val2014.json (40,504 images, the usual COCO 30K)"
        )
    return _take(pairs, n, seed, path, f"{len(groups)} images, captions_per_image={captions_per_image}", hint)


def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a {what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err}); expected a {what}") from err


def read_flickr30k_captions(path: str | Path) -> list[tuple[str, int, str]]:
    """(image name, caption number, caption) from Flickr30k's ``results.csv`` or token file.

    CSV: header ``image_name| comment_number| comment``, ``|``-separated rows. Token file:
    ``img.jpg#0<TAB>caption``. Malformed lines (the public CSV has one) are skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected Flickr30k's results.csv or results_20130124.token)")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty Flickr30k captions file")
    rows: list[tuple[str, int, str]] = []
    bad = 0
    if "|" in lines[0] and "image_name" in lines[0].lower():
        for line in lines[1:]:
            parts = [p.strip() for p in line.split("|", 2)]
            if len(parts) == 3 and parts[1].isdigit() and parts[2]:
                rows.append((parts[0], int(parts[1]), parts[2]))
            else:
                bad += 1
    else:
        for line in lines:
            ref, tab, text = line.partition("\t")
            name, hash_, number = ref.partition("#")
            if tab and hash_ and number.strip().isdigit() and text.strip():
                rows.append((name.strip(), int(number), text.strip()))
            else:
                bad += 1
    if bad:
        warnings.warn(f"{path}: {bad} malformed lines skipped", stacklevel=2)
    return rows


def imagenet_prompts(class_names: Sequence[str], template: str = "a photo of a {}") -> list[str]:
    """One prompt per class; a ``"tench, Tinca tinca"`` style name uses its first synonym."""
    return [template.format(name.split(",")[0].strip()) for name in class_names]


_SYNSET_LINE = re.compile(r"^n\d{8}\s+(\S.*)$")
_DICT_LINE = re.compile(r"""^\{?\s*\d+\s*:\s*(['"])(.*)\1\s*,?\s*\}?$""")


def read_imagenet_classes(path: str | Path) -> list[str]:
    """ImageNet class names, in file order, from a class-name file (one class per line, e.g.
    ``imagenet_classes.txt``; also ``0: 'tench, Tinca tinca',`` dict lines) or a synset mapping
    (``LOC_synset_mapping.txt`` / ``synset_words.txt``: ``n01440764 tench, Tinca tinca``)."""
    lines = _text_lines(Path(path), "ImageNet class-name file (imagenet_classes.txt or LOC_synset_mapping.txt)")
    names = []
    for line in lines:
        synset, entry = _SYNSET_LINE.match(line), _DICT_LINE.match(line)
        names.append(synset.group(1).strip() if synset else entry.group(2).strip() if entry else line)
    return names


def _text_lines(path: Path, what: str, comments: bool = False) -> list[str]:
    """Stripped non-empty lines (``#`` comment lines dropped when ``comments``); errors name ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a {what})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                         f"save the {what} as UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not (comments and ln.startswith("#"))]
    if not lines:
        raise ValueError(f"{path}: empty; expected a {what}")
    return lines


_PROMPT_COLUMNS = ("prompt", "prompts", "caption", "captions", "text")


def read_prompt_list(path: str | Path) -> list[str]:
    """Prompts of a ``.txt`` (one per line, ``#`` lines are comments) or ``.tsv``/``.csv`` file (the
    column headed prompt/prompts/caption/captions/text, as in PartiPrompts.tsv or DrawBench's CSV;
    without such a header the last column of every row, e.g. ``label<TAB>prompt``)."""
    path = Path(path)
    lines = _text_lines(path, "prompt list (.txt, .tsv or .csv)", comments=True)
    if path.suffix.lower() not in (".tsv", ".csv"):
        return lines
    rows = [r for r in csv.reader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ",") if r]
    header = [cell.strip().lower() for cell in rows[0]]
    column = next((header.index(c) for c in _PROMPT_COLUMNS if c in header), None)
    if column is not None:
        rows = rows[1:]
    if column is not None:
        prompts = [r[column].strip() if column < len(r) else "" for r in rows]
    else:
        prompts = [r[-1].strip() for r in rows]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts in the {'header' if column is not None else 'last'} column")
    return prompts


EVAL_PROMPT_KINDS: tuple[str, ...] = ("coco", "flickr30k", "imagenet", "prompts")


def eval_prompt_kind(path: str | Path) -> str:
    """Which of :data:`EVAL_PROMPT_KINDS` ``path`` holds: ``.json`` -> coco; a Flickr30k header
    (``image_name| ...``) or token line (``img.jpg#0<TAB>...``) -> flickr30k; synset lines
    (``n01440764 tench``) or a name containing imagenet/synset -> imagenet; other ``.txt``/``.tsv``/``.csv``
    -> prompts."""
    path = Path(path)
    expected = (
        "expected a COCO captions .json, Flickr30k results.csv / .token, an ImageNet class file "
        "(imagenet_classes.txt, LOC_synset_mapping.txt) or a .txt/.tsv/.csv prompt list"
    )
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist ({expected})")
    if not path.is_file():
        raise ValueError(f"{path}: a folder, not a file ({expected})")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "coco"
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    if suffix == ".token" or ("|" in first and "image_name" in first.lower()) or re.match(r"^[^\t#]+#\d+\t", first):
        return "flickr30k"
    if _SYNSET_LINE.match(first) or "imagenet" in path.name.lower() or "synset" in path.name.lower():
        return "imagenet"
    if suffix in (".txt", ".tsv", ".csv"):
        return "prompts"
    raise ValueError(f"{path}: unknown prompt source ({expected})")


def read_eval_prompts(
    source: str | Path,
    n: int,
    seed: int | None = 0,
    kind: str = "auto",
    captions_per_image: int | None = 1,
    template: str = "a photo of a {}",
) -> list[str]:
    """``n`` evaluation prompts from ``source``, whose ``kind`` is detected (:func:`eval_prompt_kind`) unless given.

    coco / flickr30k: ``captions_per_image`` captions per image, then a seeded subset of ``n``
    (fewer available: warning, all returned). imagenet: ``template`` per class, every class
    ``n // classes`` times plus a seeded subset of classes for the rest. prompts: a seeded subset
    of ``n`` lines (fewer: warning, all). ``seed`` None takes the first ones instead.
    """
    path = Path(source).expanduser()
    if kind == "auto":
        kind = eval_prompt_kind(path)
    if kind not in EVAL_PROMPT_KINDS:
        raise ValueError(f"prompt source kind must be 'auto' or one of {list(EVAL_PROMPT_KINDS)}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of prompts must be an integer >= 1, got {n!r}")
    if kind == "coco":
        return [c for _, c in read_coco_captions(path, n, seed, captions_per_image)]
    if kind == "flickr30k":
        by_image: dict[str, list[tuple[int, str]]] = {}
        for image, number, text in read_flickr30k_captions(path):
            by_image.setdefault(image, []).append((number, text))
        groups = [(image, [t for _, t in sorted(caps)]) for image, caps in by_image.items()]
        pairs = _captions_per_group(groups, captions_per_image, seed, path)
        what = f"{len(groups)} images, captions_per_image={captions_per_image}"
        return [c for _, c in _take(pairs, n, seed, path, what)]
    if kind == "imagenet":
        prompts = imagenet_prompts(read_imagenet_classes(path), template)
        full, rest = divmod(n, len(prompts))
        return prompts * full + (prompts[:rest] if seed is None else sample_subset(prompts, rest, seed))
    return _take(read_prompt_list(path), n, seed, path, "lines")
