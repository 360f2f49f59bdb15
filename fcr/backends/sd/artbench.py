"""ArtBench-10 (Liao et al. 2022) as SD training data: its image-folder split with captions built
from the style and, where the metadata CSV is present, the artist."""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from fcr.backends.sd.data import image_files

__all__ = ["ARTBENCH10_STYLES", "artist_name", "is_artbench10", "is_style_split", "read_artbench10"]


# ArtBench-10 (Liao et al. 2022, https://github.com/liaopeiyuan/artbench): style folder -> caption
# phrase with its article.
ARTBENCH10_STYLES: dict[str, str] = {
    "art_nouveau": "an art nouveau",
    "baroque": "a baroque",
    "expressionism": "an expressionist",
    "impressionism": "an impressionist",
    "post_impressionism": "a post-impressionist",
    "realism": "a realist",
    "renaissance": "a renaissance",
    "romanticism": "a romanticist",
    "surrealism": "a surrealist",
    "ukiyo_e": "a ukiyo-e",
}
ARTBENCH10_FOLDER = "artbench-10-imagefolder-split"
ARTBENCH10_CSV = "ArtBench-10.csv"
ARTBENCH10_SPLITS = ("train", "test")


def is_style_split(folder: Path) -> bool:
    """``folder`` holds ArtBench-10 style folders (and no other folders)."""
    if not folder.is_dir():
        return False
    names = [d.name for d in folder.iterdir() if d.is_dir()]
    return bool(names) and all(name in ARTBENCH10_STYLES for name in names)


def _artbench10_base(root: Path) -> Path | None:
    """The folder holding ArtBench-10's ``train/`` and ``test/``: ``root`` or its
    ``artbench-10-imagefolder-split`` child; None when neither has that layout."""
    for base in (root, root / ARTBENCH10_FOLDER):
        if any(is_style_split(base / split) for split in ARTBENCH10_SPLITS):
            return base
    return None


def is_artbench10(path: str | Path) -> bool:
    """Whether ``path`` is an ArtBench-10 root, i.e. :func:`read_artbench10` accepts it."""
    return _artbench10_base(Path(path)) is not None


def artist_name(slug: str) -> str:
    """``"albrecht-durer"`` -> ``"Albrecht Durer"`` (ArtBench/WikiArt artist slugs; ``a.y.`` -> ``A.Y.``)."""
    words = [w for w in re.split(r"[-_\s]+", slug.strip()) if w]
    return " ".join(re.sub(r"(^|\.)([a-z])", lambda m: m.group(1) + m.group(2).upper(), w) for w in words)


def _artbench10_artists(csv_path: Path) -> dict[tuple[str, str], str]:
    """(style, image file stem) -> artist name, from the ``name``/``file_name`` columns of the CSV."""
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"label", "artist"} <= columns or not {"name", "file_name"} & columns:
            raise ValueError(
                f"{csv_path}: expected ArtBench-10 metadata columns label, artist and name or file_name "
                f"(name,url,file_name,artist,split,label,...), got {sorted(columns)}"
            )
        artists: dict[tuple[str, str], str] = {}
        for row in reader:
            artist = artist_name(row["artist"] or "")
            for column in ("name", "file_name"):
                if artist and row.get(column):
                    artists[(row["label"].strip(), Path(row[column].strip()).stem)] = artist
    return artists


def read_artbench10(
    root: str | Path,
    split: Literal["train", "test"] = "train",
    metadata: str | Path | None = None,
    styles: Sequence[str] | None = None,
) -> list[tuple[Path, str]]:
    """(image path, caption) of ArtBench-10's ``{root}[/artbench-10-imagefolder-split]/{split}/<style>/*.jpg``.

    Captions are ``"a baroque painting by Albrecht Durer"`` with the artist from ``metadata``
    (default: ``ArtBench-10.csv`` in ``root``, the imagefolder folder or its parent), or
    ``"a baroque painting"`` without it (warned). ``styles`` restricts the style folders read.
    """
    root = Path(root)
    if split not in ARTBENCH10_SPLITS:
        raise ValueError(f"ArtBench-10 split must be 'train' or 'test', got {split!r}")
    base = _artbench10_base(root)
    if base is None:
        raise FileNotFoundError(
            f"{root}: not an ArtBench-10 folder: expected {root}/[{ARTBENCH10_FOLDER}/]{{train,test}}/<style>/*.jpg "
            f"with styles among {sorted(ARTBENCH10_STYLES)}"
        )
    split_dir = base / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no ArtBench-10 {split!r} split in {base}")
    chosen = sorted(d.name for d in split_dir.iterdir() if d.is_dir()) if styles is None else list(styles)
    unknown = [s for s in chosen if s not in ARTBENCH10_STYLES]
    if unknown:
        raise ValueError(f"unknown ArtBench-10 styles {unknown}; allowed: {sorted(ARTBENCH10_STYLES)}")
    if metadata is not None:
        csv_path: Path | None = Path(metadata)
        if not csv_path.is_file():
            raise FileNotFoundError(f"{csv_path}: no such ArtBench-10 metadata CSV")
    else:
        candidates = dict.fromkeys(folder / ARTBENCH10_CSV for folder in (root, base, base.parent))
        csv_path = next((c for c in candidates if c.is_file()), None)
        if csv_path is None:
            warnings.warn(
                f"{root}: no {ARTBENCH10_CSV} in {[str(c.parent) for c in candidates]}; "
                "captions name the style only, not the artist",
                stacklevel=2,
            )
    artists = _artbench10_artists(csv_path) if csv_path is not None else {}
    pairs: list[tuple[Path, str]] = []
    unmatched = 0
    for style in chosen:
        style_dir = split_dir / style
        if not style_dir.is_dir():
            raise FileNotFoundError(f"{style_dir}: no such ArtBench-10 style folder")
        for image in image_files(style_dir):
            artist = artists.get((style, image.stem))
            unmatched += artist is None
            by = f" by {artist}" if artist else ""
            pairs.append((image, f"{ARTBENCH10_STYLES[style]} painting{by}"))
    if csv_path is not None and unmatched:
        warnings.warn(
            f"{csv_path}: no artist for {unmatched} of {len(pairs)} images; their captions name the style only",
            stacklevel=2,
        )
    if not pairs:
        raise FileNotFoundError(f"{split_dir}: no images (*.jpg|png) in the style folders {chosen}")
    return pairs
