"""Data: Fashion-MNIST with captions (embedded default) and the Stable Diffusion readers.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (idx files under
``/usr/share/datasets/fashion-mnist``) or from torchvision's download of the same files. The
validation split is carved from the official training set; the official test set is kept for
evaluation only. Captions are ``template.format(noun phrase)`` with disjoint training and held-out
template sets, so held-out prompts test generalisation to unseen wording.

The Stable Diffusion readers only parse local files and never download anything: training data
(image/caption folders, img2dataset output in its files/webdataset/parquet formats, LAION parquet,
webdataset tars, ArtBench-10; :func:`read_training_pairs` tells them apart) and evaluation prompts
(COCO and Flickr30k captions, ImageNet class names, prompt lists; :func:`read_eval_prompts`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shlex
import struct
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch

__all__ = [
    "ARTBENCH10_CSV",
    "ARTBENCH10_FOLDER",
    "ARTBENCH10_STYLES",
    "DEBIAN_FASHION_MNIST",
    "EVAL_PROMPT_KINDS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NOUNS",
    "HELDOUT_TEMPLATES",
    "IMAGE_EXTENSIONS",
    "TRAIN_DATA_KINDS",
    "TRAIN_TEMPLATES",
    "artist_name",
    "assign_captions",
    "caption",
    "captions_for",
    "eval_prompt_kind",
    "imagenet_prompts",
    "img2dataset_command",
    "is_artbench10",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "noun_phrase",
    "open_image",
    "prompt_table",
    "read_artbench10",
    "read_coco_captions",
    "read_eval_prompts",
    "read_flickr30k_captions",
    "read_idx",
    "read_image_caption_folder",
    "read_image_shards",
    "read_imagenet_classes",
    "read_laion_parquet",
    "read_prompt_list",
    "read_training_pairs",
    "read_webdataset_tar",
    "sample_subset",
    "sd_image_transform",
    "to_model_range",
    "train_val_split",
]

T = TypeVar("T")

# ----------------------------------------------------------------------------- Fashion-MNIST

# Official class names, in label order (https://github.com/zalandoresearch/fashion-mnist).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Caption-friendly nouns, same order.
FASHION_MNIST_NOUNS: tuple[str, ...] = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE = Path.home() / ".cache" / "fcr"
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# idx type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ format spec).
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzipped or raw, detected from its bytes) into a native-endian array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:  # BadGzipFile is an OSError; truncation is EOFError
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad idx magic number {raw[:4].hex()} (zero={zero}, type=0x{code:02x}, ndim={ndim})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx payload is {len(raw) - header} bytes but dims {dims} of {dtype} need {expected}"
            " (truncated or corrupt file)"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order


def _find_file(folder: Path, name: str) -> Path | None:
    """``name`` or its uncompressed twin (torchvision keeps both) inside ``folder``."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    return all(_find_file(folder, n) is not None for n in names)


def _torchvision_download(root: Path) -> Path:
    """Download both splits with torchvision; returns the folder holding the idx files."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(root=str(root), train=train, download=True)
    return root / "FashionMNIST" / "raw"


def locate_fashion_mnist(root: str | Path | None = None, download: bool = True) -> Path:
    """Folder holding the four Fashion-MNIST idx files.

    Looks in ``root`` (and torchvision's ``root/FashionMNIST/raw`` layout), then the Debian
    folder, then (``download=True``) downloads with torchvision into ``root`` or ``~/.cache/fcr``.
    """
    candidates: list[Path] = []
    if root is not None:
        candidates += [Path(root), Path(root) / "FashionMNIST" / "raw"]
    candidates += [DEBIAN_FASHION_MNIST, DEFAULT_CACHE / "FashionMNIST" / "raw"]
    for folder in candidates:
        if _has_fashion_mnist(folder):
            return folder
    problem = "download disabled"
    if download:
        target = Path(root) if root is not None else DEFAULT_CACHE
        try:
            folder = _torchvision_download(target)
            if _has_fashion_mnist(folder):
                return folder
            problem = f"torchvision's download left no idx files in {folder}"
        except Exception as err:  # any network/IO failure ends in the same advice below
            problem = f"torchvision download failed: {type(err).__name__}: {err}"
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found (searched {searched}; {problem}). Either install the "
        "Debian package as root: `apt-get install -y dataset-fashion-mnist` (files in "
        f"{DEBIAN_FASHION_MNIST}), or allow network access so torchvision.datasets.FashionMNIST"
        "(download=True) can fetch them."
    )


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the official ``train`` or ``test`` split."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = locate_fashion_mnist(root, download=download)
    image_name, label_name = FASHION_MNIST_FILES[split]
    image_path, label_path = _find_file(folder, image_name), _find_file(folder, label_name)
    assert image_path is not None and label_path is not None  # locate checked them
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_path}: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_path}: {labels.shape} labels for {len(images)} images")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: labels outside 0..9")
    return images, labels


STYLES: tuple[str, ...] = ("none", "high_contrast")


def apply_style(images_uint8: np.ndarray, style: str) -> np.ndarray:
    """A visual domain for the ``derivative`` model (it plays OpenJourney: SD fine-tuned on a style).

    ``high_contrast``: gamma 0.5 on intensities (``255·(p/255)^0.5``): dark garment texture turns
    bright and bold while shapes and the black background stay, so prompts keep their meaning.
    ``none`` returns the images unchanged.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; allowed: {list(STYLES)}")
    if style == "none":
        return images_uint8
    scaled = np.sqrt(images_uint8.astype(np.float32) / 255.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_model_range(images_uint8: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, size, size) in [-1, 1].

    28 -> 32 is done by zero-padding (2 px each side), not resizing: the Fashion-MNIST background
    is black (0), so padding adds background without interpolation blur and keeps pixels exact.
    Padding happens in uint8 space, so padded pixels are exactly -1.
    """
    x = torch.as_tensor(np.asarray(images_uint8))
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(f"expected uint8 (N, H, W), got {x.dtype} {tuple(x.shape)}")
    h, w = x.shape[1:]
    if size < h or size < w:
        raise ValueError(f"size {size} is smaller than the images ({h}x{w}); only padding is done")
    top, left = (size - h) // 2, (size - w) // 2
    padded = torch.zeros((x.shape[0], 1, size, size), dtype=torch.float32)
    padded[:, 0, top : top + h, left : left + w] = x.float()
    return padded / 127.5 - 1.0


def train_val_split(num_items: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train_idx, val_idx) from a seeded permutation of ``range(num_items)``.

    Carve validation from the official training set; the test set stays for evaluation only.
    """
    if not 0 <= val_size <= num_items:
        raise ValueError(f"val_size {val_size} not in [0, {num_items}]")
    perm = np.random.default_rng(seed).permutation(num_items)
    return np.sort(perm[val_size:]).astype(np.int64), np.sort(perm[:val_size]).astype(np.int64)


# ----------------------------------------------------------------------------- captions

# ``{}`` takes a noun phrase with its article ("a sneaker", "an ankle boot"), so every caption is
# grammatical whatever the noun (a fixed "a {}" would give "a ankle boot").
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a product photo of {}",
    "a black and white picture of {}",
    "{} on a plain background",
    "a grayscale photo of {}",
    "a low resolution photo of {}",
    "a catalog image of {}",
    "a centered photo of {}",
)
# Never used in training: prompts with unseen wording for held-out evaluation.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "an image showing {}",
    "a small picture of {}",
    "a monochrome shot of {}",
    "{}, photographed from the front",
)
assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES), "training and held-out templates overlap"


def noun_phrase(label: int) -> str:
    """Caption noun of ``label`` with its indefinite article."""
    noun = FASHION_MNIST_NOUNS[int(label)]
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def caption(label: int, template: str) -> str:
    """Caption of class ``label`` with ``template``."""
    return template.format(noun_phrase(label))


def prompt_table(templates: Sequence[str]) -> list[tuple[int, int, str]]:
    """Every (label, template_index, text), label-major."""
    labels = range(len(FASHION_MNIST_NOUNS))
    return [(label, t, caption(label, templ)) for label in labels for t, templ in enumerate(templates)]


def assign_captions(labels: np.ndarray, num_templates: int, seed: int) -> np.ndarray:
    """A seeded random template index (int64) per image: deterministic across runs."""
    if num_templates <= 0:
        raise ValueError("num_templates must be positive")
    return np.random.default_rng(seed).integers(0, num_templates, size=len(labels), dtype=np.int64)


def captions_for(labels: np.ndarray, template_indices: np.ndarray, templates: Sequence[str]) -> list[str]:
    """Caption text per image from its label and assigned template index."""
    if len(labels) != len(template_indices):
        raise ValueError("labels and template_indices differ in length")
    return [caption(int(lab), templates[int(t)]) for lab, t in zip(labels, template_indices)]


# ----------------------------------------------------------------------------- SD readers

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


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _caption_pairs(folder: Path) -> tuple[list[tuple[Path, str]], int]:
    """(image, caption) pairs of one folder and the number of images without a ``.txt`` beside them."""
    pairs: list[tuple[Path, str]] = []
    missing = 0
    for image in _image_files(folder):
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
_ARTBENCH10_SPLITS = ("train", "test")


def _is_style_split(folder: Path) -> bool:
    """``folder`` holds ArtBench-10 style folders (and no other folders)."""
    if not folder.is_dir():
        return False
    names = [d.name for d in folder.iterdir() if d.is_dir()]
    return bool(names) and all(name in ARTBENCH10_STYLES for name in names)


def _artbench10_base(root: Path) -> Path | None:
    """The folder holding ArtBench-10's ``train/`` and ``test/``: ``root`` or its
    ``artbench-10-imagefolder-split`` child; None when neither has that layout."""
    for base in (root, root / ARTBENCH10_FOLDER):
        if any(_is_style_split(base / split) for split in _ARTBENCH10_SPLITS):
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
    if split not in _ARTBENCH10_SPLITS:
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
        for image in _image_files(style_dir):
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
    if is_artbench10(path):
        return list(read_artbench10(path, "train"))
    if path.name in _ARTBENCH10_SPLITS and _is_style_split(path):
        return list(read_artbench10(path.parent, path.name))  # type: ignore[arg-type]
    if path.parent.name in _ARTBENCH10_SPLITS and _is_style_split(path.parent):
        return list(read_artbench10(path.parent.parent, path.parent.name, styles=[path.name]))  # type: ignore[arg-type]
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return list(read_image_caption_folder(path))
    return read_image_shards(path)


def sample_subset(items: Sequence[T], n: int = 50_000, seed: int = 0) -> list[T]:
    """Seeded subset of ``n`` items in their original order (all items when ``n >= len``)."""
    if n >= len(items):
        return list(items)
    chosen = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[int(i)] for i in chosen]


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
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
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
