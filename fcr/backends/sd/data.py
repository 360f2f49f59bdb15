"""Stable Diffusion training data: readers of local files only (nothing is downloaded).

Image/caption folders, img2dataset output in its files/webdataset/parquet formats, LAION parquet,
webdataset tars and ArtBench-10; :func:`read_training_pairs` tells them apart. Evaluation prompts
are read by :mod:`fcr.backends.sd.prompts`.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRAIN_DATA_KINDS",
    "image_files",
    "img2dataset_command",
    "open_image",
    "read_image_caption_folder",
    "read_image_shards",
    "read_laion_parquet",
    "read_training_pairs",
    "read_webdataset_tar",
    "sample_subset",
    "sd_image_transform",
]

T = TypeVar("T")

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

TRAIN_DATA_KINDS = (
    "a folder of name.jpg + name.txt pairs, an img2dataset output folder (shard folders 00000/, "
    "webdataset *.tar or parquet shards), an ArtBench-10 root, a .parquet with image paths or bytes, "
    "or a webdataset .tar"
)


def open_image(source: str | Path | bytes):
    """RGB PIL image from a path or encoded bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return image.convert("RGB")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _caption_pairs(folder: Path) -> tuple[list[tuple[Path, str]], int]:
    """(image, caption) pairs of one folder and the number of images without a ``.txt`` beside them."""
    pairs: list[tuple[Path, str]] = []
    missing = 0
    for image in image_files(folder):
        text = image.with_suffix(".txt")
        if text.is_file():
            pairs.append((image, text.read_text(encoding="utf-8").strip()))
        else:
            missing += 1
    return pairs, missing


def read_image_caption_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) for every ``name.{jpg,jpeg,png,webp}`` with a ``name.txt`` beside it.

    Images without a caption file are skipped with a warning; an empty result raises.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected name.jpg|png + name.txt pairs)")
    pairs, missing = _caption_pairs(folder)
    if missing:
        warnings.warn(f"{folder}: {missing} images without a .txt caption skipped", stacklevel=2)
    if not pairs:
        raise FileNotFoundError(f"{folder}: no image/caption pairs (name.jpg|png + name.txt)")
    return pairs


_CAPTION_COLUMNS = ("text", "caption")
_IMAGE_COLUMNS = ("image_path", "path", "file_name", "filename", "image", "jpg", "png", "url")


def _pick_column(columns: Sequence[str], wanted: str | None, options: Sequence[str], what: str, path: Path) -> str:
    """Column named ``wanted`` (or the first of ``options``), matched case-insensitively."""
    lower = {c.lower(): c for c in columns}
    for name in [wanted] if wanted is not None else options:
        if name.lower() in lower:
            return lower[name.lower()]
    raise ValueError(f"{path}: no {what} column among {list(columns)} (looked for {wanted or list(options)})")


def img2dataset_command(
    url_list: str | Path,
    output_folder: str | Path,
    url_col: str = "URL",
    caption_col: str = "TEXT",
    image_size: int = 512,
) -> str:
    """The img2dataset command that downloads the URLs of ``url_list`` (a parquet or a folder of
    them) into ``output_folder`` as image+caption shard folders, resized and center-cropped to
    ``image_size`` as :func:`sd_image_transform` would. Only printed here, never run."""
    q = shlex.quote
    return (
        f"img2dataset --url_list {q(str(url_list))} --input_format parquet --url_col {q(url_col)} "
        f"--caption_col {q(caption_col)} --output_format files --output_folder {q(str(output_folder))} "
        f"--image_size {image_size} --resize_mode center_crop"
    )


def _refuse_urls(rows: Sequence[tuple[object, str]], url_list: Path, url_col: str, caption_col: str) -> None:
    """ValueError (with the img2dataset command for ``url_list``) if any row's image is a URL."""
    urls = [image for image, _ in rows if isinstance(image, str)]
    if not urls:
        return
    stem = url_list.name if url_list.is_dir() else url_list.stem
    command = img2dataset_command(url_list, url_list.with_name(f"{stem}_images"), url_col, caption_col)
    raise ValueError(
        f"{url_list}: column {url_col!r} holds image URLs ({len(urls)} of {len(rows)} rows, e.g. {urls[0]!r}), "
        "not images, and nothing is downloaded here. Fetch the images with img2dataset "
        f"(pip install img2dataset), then point at its output folder:\n  {command}\n"
        "(set --image_size to the training resolution, e.g. 768 for SD 2.1)"
    )


def _parquet_rows(
    path: Path, image_column: str | None = None, caption_column: str | None = None, base_dir: str | Path | None = None
) -> tuple[list[tuple[Path | bytes | str, str]], str, str]:
    """(rows with URLs left as strings, image column, caption column) of one parquet file."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such parquet file")
    frame = pd.read_parquet(path)
    cap_col = _pick_column(list(frame.columns), caption_column, _CAPTION_COLUMNS, "caption", path)
    img_col = _pick_column(list(frame.columns), image_column, _IMAGE_COLUMNS, "image", path)
    lower = {c.lower() for c in frame.columns}
    if img_col.lower() == "url" and {"key", "status"} <= lower:
        images = next((s for s in (path.with_suffix(""), path.with_suffix(".tar")) if s.exists()), None)
        if images is not None:  # img2dataset's per-shard metadata, written beside the shard
            raise ValueError(
                f"{path}: img2dataset's metadata of shard {images.name} (URLs only); "
                f"point at the whole output folder {path.parent} instead"
            )
    base = Path(base_dir) if base_dir is not None else path.parent
    rows: list[tuple[Path | bytes | str, str]] = []
    for image, text in zip(frame[img_col].tolist(), frame[cap_col].tolist()):
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if _is_missing(image) or _is_missing(text):
            continue
        if isinstance(image, (bytes, bytearray, memoryview)):
            rows.append((bytes(image), str(text)))
        elif isinstance(image, str) and "://" in image:
            rows.append((image, str(text)))
        else:
            rows.append((base / str(image), str(text)))
    return rows, img_col, cap_col


def read_laion_parquet(
    path: str | Path,
    image_column: str | None = None,
    caption_column: str | None = None,
    base_dir: str | Path | None = None,
) -> list[tuple[Path | bytes, str]]:
    """(image, caption) rows of a LAION-style parquet.

    The caption column is ``TEXT`` or ``caption`` (any case) unless named. The image column
    (auto: image_path, path, file_name, filename, image, jpg, png, URL) may hold relative paths
    (resolved against ``base_dir``, default the parquet's folder) or encoded bytes (also the
    ``{"bytes": ...}`` structs of Hugging Face image columns). Rows lacking either value are
    dropped. URLs (a LAION metadata parquet) raise ValueError with the img2dataset command that
    downloads them: this reader never downloads.
    """
    path = Path(path)
    rows, img_col, cap_col = _parquet_rows(path, image_column, caption_column, base_dir)
    _refuse_urls(rows, path, img_col, cap_col)
    return [(image, text) for image, text in rows if not isinstance(image, str)]


def _is_missing(value: object) -> bool:
    """None, NaN or pd.NA: how pandas may hand back an empty parquet cell."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or type(value).__name__ == "NAType"


def read_webdataset_tar(path: str | Path) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) for each sample of a webdataset shard.

    Members are grouped by key (file name up to its first dot, webdataset's convention);
    samples lacking an image (jpg/jpeg/png/webp) or a ``txt`` caption are skipped.
    """
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot:
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            key = f"{folder}/{stem}" if folder else stem
            samples.setdefault(key, {})[ext.lower()] = handle.read()
    out: list[tuple[str, bytes, str]] = []
    for key, parts in samples.items():
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image is not None and "txt" in parts:
            out.append((key, image, parts["txt"].decode("utf-8").strip()))
    return out


def read_image_shards(folder: str | Path) -> list[tuple[Path | bytes, str]]:
    """(image, caption) pairs of an img2dataset output folder, in shard order, for each ``--output_format``:

    ``files``: shard folders ``00000/`` of ``000000000.jpg`` + ``000000000.txt`` (the ``.json`` files
    and the ``00000.parquet`` metadata beside the folders are ignored); ``webdataset``: ``00000.tar``
    shards; ``parquet``: ``00000.parquet`` shards with image bytes (``jpg``) and ``caption``. A folder
    of URL-only parquets (LAION metadata) raises ValueError with the img2dataset command that fetches it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected img2dataset output)")
    entries = sorted(folder.iterdir())
    shards = [d for d in entries if d.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.iterdir())]
    if shards:
        pairs: list[tuple[Path | bytes, str]] = []
        missing = 0
        for shard in shards:
            found, skipped = _caption_pairs(shard)
            pairs += found
            missing += skipped
        if missing:
            warnings.warn(f"{folder}: {missing} images without a .txt caption skipped", stacklevel=2)
        if not pairs:
            raise FileNotFoundError(
                f"{folder}: the shard folders hold images but no name.txt captions "
                "(img2dataset writes them when given --caption_col)"
            )
        return pairs
    tars = [p for p in entries if p.is_file() and p.suffix.lower() == ".tar"]
    if tars:
        return [(image, text) for tar in tars for _, image, text in read_webdataset_tar(tar)]
    parquets = [p for p in entries if p.is_file() and p.suffix.lower() == ".parquet"]
    if not parquets:
        raise FileNotFoundError(
            f"{folder}: no training data found: expected name.jpg + name.txt pairs, "
            "img2dataset shard folders (00000/000000000.jpg + .txt), webdataset shards (*.tar), "
            "parquet shards (*.parquet) or an ArtBench-10 layout (train/<style>/*.jpg)"
        )
    rows: list[tuple[Path | bytes, str]] = []
    for parquet in parquets:
        shard_rows, img_col, cap_col = _parquet_rows(parquet)
        _refuse_urls(shard_rows, folder, img_col, cap_col)  # the command fetches the whole folder
        rows += [(image, text) for image, text in shard_rows if not isinstance(image, str)]
    return rows


def read_training_pairs(path: str | Path) -> list[tuple[Path | bytes, str]]:
    """(image path or bytes, caption) of SD training data, whichever of these ``path`` is:

    a ``.parquet`` (:func:`read_laion_parquet`; URL-only ones refused) or a webdataset ``.tar``; an
    ArtBench-10 root (its train split), one of its split folders or style folders; a folder of
    ``name.jpg`` + ``name.txt`` pairs; an img2dataset output folder (:func:`read_image_shards`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist (expected {TRAIN_DATA_KINDS})")
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return list(read_laion_parquet(path))
        if path.suffix.lower() == ".tar":
            return [(image, text) for _, image, text in read_webdataset_tar(path)]
        raise ValueError(f"{path}: a file that is neither a .parquet nor a .tar (expected {TRAIN_DATA_KINDS})")
    from fcr.backends.sd.artbench import ARTBENCH10_SPLITS, is_artbench10, is_style_split, read_artbench10

    if is_artbench10(path):
        return list(read_artbench10(path, "train"))
    if path.name in ARTBENCH10_SPLITS and is_style_split(path):
        return list(read_artbench10(path.parent, path.name))  # type: ignore[arg-type]
    if path.parent.name in ARTBENCH10_SPLITS and is_style_split(path.parent):
        return list(read_artbench10(path.parent.parent, path.parent.name, styles=[path.name]))  # type: ignore[arg-type]
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return list(read_image_caption_folder(path))
    return read_image_shards(path)


def subset_indices(n_items: int, n: int = 50_000, seed: int = 0) -> np.ndarray:
    """Sorted indices of the seeded subset of ``n`` of ``n_items`` items (all when ``n >= n_items``)."""
    if n >= n_items:
        return np.arange(n_items)
    return np.sort(np.random.default_rng(seed).choice(n_items, size=n, replace=False))


def sample_subset(items: Sequence[T], n: int = 50_000, seed: int = 0) -> list[T]:
    """Seeded subset of ``n`` items in their original order (all items when ``n >= len``)."""
    return [items[int(i)] for i in subset_indices(len(items), n, seed)]


def sd_image_transform(resolution: int = 512, train: bool = True):
    """PIL image -> float32 (3, res, res) in [-1, 1]: RGB, resize shorter side, center crop,
    horizontal flip (p=0.5) when ``train``, as diffusers' text-to-image training script."""
    from torchvision.transforms import v2

    steps = [
        v2.Lambda(_to_rgb),
        v2.Resize(resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(resolution),
    ]
    if train:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


def _to_rgb(image):
    """Module-level (picklable for DataLoader workers) RGB conversion."""
    return image.convert("RGB") if hasattr(image, "convert") else image
