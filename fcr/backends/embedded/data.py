"""Fashion-MNIST with captions: the embedded default's data.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (idx files under
``/usr/share/datasets/fashion-mnist``) or from torchvision's download of the same files. The
validation split is carved from the official training set; the official test set is kept for
evaluation only. Captions are ``template.format(noun phrase)`` with disjoint training and held-out
template sets, so held-out prompts test generalisation to unseen wording.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_CACHE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NOUNS",
    "HELDOUT_TEMPLATES",
    "STYLES",
    "TRAIN_TEMPLATES",
    "apply_style",
    "assign_captions",
    "caption",
    "captions_for",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "noun_phrase",
    "prompt_table",
    "read_idx",
    "to_model_range",
    "train_val_split",
]

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


def write_caption_folder(folder: str | Path, n: int, resolution: int, split: Literal["train", "test"] = "test") -> Path:
    """The first ``n`` real Fashion-MNIST images of ``split`` as an SD-style caption folder: RGB PNGs upscaled
    (bicubic) to ``resolution`` with a ``.txt`` caption each (training templates in turn). Used to feed the SD
    code paths real images where no caption dataset can be downloaded."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist(split)
    if not 0 < n <= len(images):
        raise ValueError(f"n must lie in [1, {len(images)}], got {n}")
    for i, (image, label) in enumerate(zip(images[:n], labels[:n])):
        Image.fromarray(image).convert("RGB").resize((resolution, resolution), Image.BICUBIC).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption(int(label), TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)]))
    return folder
