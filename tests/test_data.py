"""Fashion-MNIST reading, captions and the Stable Diffusion readers (on tiny files in real formats)."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcr import data
from fcr.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_NOUNS,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    assign_captions,
    caption,
    captions_for,
    imagenet_prompts,
    load_fashion_mnist,
    locate_fashion_mnist,
    prompt_table,
    read_coco_captions,
    read_flickr30k_captions,
    read_idx,
    read_image_caption_folder,
    read_laion_parquet,
    read_webdataset_tar,
    sample_subset,
    sd_image_transform,
    to_model_range,
    train_val_split,
)

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian Fashion-MNIST absent from {DEBIAN} (apt-get install -y dataset-fashion-mnist)",
)


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format (type code 0x08)."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _png_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_class_names() -> None:
    assert len(FASHION_MNIST_CLASSES) == len(FASHION_MNIST_NOUNS) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


@needs_debian
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_load_debian_fashion_mnist(split: str, count: int) -> None:
    images, labels = load_fashion_mnist(split, download=False)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [count // 10] * 10  # Fashion-MNIST is balanced


def test_read_idx_roundtrip_raw_and_gzip(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(array))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)
    big_endian = np.array([1, -2, 70000], dtype=">i4")
    raw = struct.pack(">HBB", 0, 0x0C, 1) + struct.pack(">I", 3) + big_endian.tobytes()
    (tmp_path / "b").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), [1, -2, 70000])


def test_read_idx_truncated_and_corrupt(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated-idx3-ubyte"):
        read_idx(truncated)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(cut_gzip)
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)


def test_locate_prefers_root_in_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.full((2, 28, 28), 7, dtype=np.uint8)
    labels = np.array([3, 9], dtype=np.uint8)
    for split, (img_name, lab_name) in data.FASHION_MNIST_FILES.items():
        (raw / img_name.removesuffix(".gz")).write_bytes(_idx_bytes(images))  # uncompressed twin
        (raw / lab_name).write_bytes(gzip.compress(_idx_bytes(labels)))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    assert locate_fashion_mnist(tmp_path, download=False) == raw
    x, y = load_fashion_mnist("test", root=tmp_path, download=False)
    assert x.shape == (2, 28, 28) and y.tolist() == [3, 9] and y.dtype == np.int64


def test_locate_error_names_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(root: Path) -> Path:
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "no-cache")
    monkeypatch.setattr(data, "_torchvision_download", no_network)
    with pytest.raises(FileNotFoundError) as info:
        locate_fashion_mnist(tmp_path / "empty", download=True)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "network" in message and "torchvision" in message
    with pytest.raises(FileNotFoundError, match="download disabled"):
        locate_fashion_mnist(None, download=False)


def test_to_model_range_pads_and_scales() -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0] = 255
    images[1, 0, 0] = 51
    x = to_model_range(images)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    # 2 px of background (-1) on each side, the image untouched inside.
    assert torch.all(x[0, 0, :2] == -1) and torch.all(x[0, 0, -2:] == -1)
    assert torch.all(x[0, 0, :, :2] == -1) and torch.all(x[0, 0, :, -2:] == -1)
    assert torch.all(x[0, 0, 2:30, 2:30] == 1)
    assert x[1, 0, 2, 2].item() == pytest.approx(51 / 127.5 - 1)
    assert to_model_range(images, size=28).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError):
        to_model_range(images, size=16)
    with pytest.raises(ValueError):
        to_model_range(images.astype(np.float32))


def test_train_val_split_deterministic_disjoint() -> None:
    train, val = train_val_split(1000, 100, seed=3)
    again_train, again_val = train_val_split(1000, 100, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(range(1000))
    assert not np.array_equal(val, train_val_split(1000, 100, seed=4)[1])
    with pytest.raises(ValueError):
        train_val_split(10, 11, seed=0)


# ----------------------------------------------------------------------------- captions


def test_templates_disjoint_and_captions() -> None:
    assert len(TRAIN_TEMPLATES) >= 8 and len(HELDOUT_TEMPLATES) >= 4
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    train_texts = {text for _, _, text in prompt_table(TRAIN_TEMPLATES)}
    heldout_texts = {text for _, _, text in prompt_table(HELDOUT_TEMPLATES)}
    assert not train_texts & heldout_texts
    assert caption(9, "a photo of {}") == "a photo of an ankle boot"
    assert caption(1, "a photo of {}") == "a photo of a pair of trousers"
    table = prompt_table(HELDOUT_TEMPLATES)
    assert len(table) == 10 * len(HELDOUT_TEMPLATES) and table[0][:2] == (0, 0)


def test_assign_captions_deterministic() -> None:
    labels = np.arange(500) % 10
    idx = assign_captions(labels, len(TRAIN_TEMPLATES), seed=0)
    np.testing.assert_array_equal(idx, assign_captions(labels, len(TRAIN_TEMPLATES), seed=0))
    assert idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < len(TRAIN_TEMPLATES)
    assert len(set(idx.tolist())) == len(TRAIN_TEMPLATES)
    texts = captions_for(labels[:2], idx[:2], TRAIN_TEMPLATES)
    assert texts[0] == caption(0, TRAIN_TEMPLATES[idx[0]])


# ----------------------------------------------------------------------------- SD readers


def test_read_image_caption_folder(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(_png_bytes())
    (tmp_path / "b.txt").write_text("a red square\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a black square")
    (tmp_path / "orphan.png").write_bytes(_png_bytes())
    with pytest.warns(UserWarning, match="1 images"):
        pairs = read_image_caption_folder(tmp_path)
    assert [(p.name, c) for p, c in pairs] == [("a.jpg", "a black square"), ("b.png", "a red square")]


def test_read_laion_parquet(tmp_path: Path) -> None:
    import pandas as pd

    pytest.importorskip("pyarrow", reason="pandas needs pyarrow to read/write parquet")
    frame = pd.DataFrame(
        {"image_path": ["img/0.png", "img/1.png", None], "TEXT": ["a cat", None, "a dog"], "other": [1, 2, 3]}
    )
    frame.to_parquet(tmp_path / "part.parquet")
    rows = read_laion_parquet(tmp_path / "part.parquet")
    assert rows == [(tmp_path / "img/0.png", "a cat")]
    encoded = _png_bytes()
    pd.DataFrame({"jpg": [encoded], "Caption": ["red"]}).to_parquet(tmp_path / "bytes.parquet")
    ((image, text),) = read_laion_parquet(tmp_path / "bytes.parquet")
    assert image == encoded and text == "red" and data.open_image(image).size == (6, 4)
    pd.DataFrame({"URL": ["https://x/y.jpg"], "TEXT": ["u"]}).to_parquet(tmp_path / "url.parquet")
    assert read_laion_parquet(tmp_path / "url.parquet") == [("https://x/y.jpg", "u")]
    with pytest.raises(ValueError, match="caption"):
        read_laion_parquet(tmp_path / "url.parquet", caption_column="alt")


def test_read_webdataset_tar(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    members = {
        "000000001.jpg": _png_bytes(),  # content type does not matter to the reader
        "000000001.txt": b"first caption",
        "000000001.json": b"{}",
        "000000002.png": _png_bytes((0, 255, 0)),
        "000000002.txt": b"second\n",
        "000000003.txt": b"no image",
    }
    with tarfile.open(shard, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    samples = read_webdataset_tar(shard)
    assert [(k, c) for k, _, c in samples] == [("000000001", "first caption"), ("000000002", "second")]
    assert samples[1][1] == members["000000002.png"]


def test_sample_subset() -> None:
    items = list(range(100))
    sub = sample_subset(items, 10, seed=1)
    assert sub == sample_subset(items, 10, seed=1) and sub == sorted(sub) and len(set(sub)) == 10
    assert sub != sample_subset(items, 10, seed=2)
    assert sample_subset(items, 500, seed=0) == items


def test_read_coco_captions(tmp_path: Path) -> None:
    annotations = {
        "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285}, {"id": 632}, {"id": 999}],
        "annotations": [
            {"image_id": 285, "id": 2, "caption": "A big bear. \n"},
            {"image_id": 139, "id": 5, "caption": "A living room."},
            {"image_id": 139, "id": 1, "caption": "A room with  chairs."},
            {"image_id": 632, "id": 9, "caption": "A bedroom."},
        ],
        "licenses": [],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(annotations))
    first = read_coco_captions(path, n=30000, seed=None)
    assert first == [(139, "A room with chairs."), (285, "A big bear."), (632, "A bedroom.")]
    seeded = read_coco_captions(path, n=2, seed=0)
    assert seeded == read_coco_captions(path, n=2, seed=0) and len(seeded) == 2
    assert all(cap in {c for _, c in first} | {"A living room."} for _, cap in seeded)


def test_read_flickr30k_both_formats(tmp_path: Path) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair .\n"
        "1000092795.jpg| 1| Two young , White males are outside .\n"
        "2199200615.jpg| 4 A dog runs .\n"  # the public CSV's malformed row
    )
    with pytest.warns(UserWarning, match="1 malformed"):
        rows = read_flickr30k_captions(csv)
    assert rows == [
        ("1000092795.jpg", 0, "Two young guys with shaggy hair ."),
        ("1000092795.jpg", 1, "Two young , White males are outside ."),
    ]
    token = tmp_path / "results_20130124.token"
    token.write_text("1000092795.jpg#0\tTwo young guys .\n1000092795.jpg#1\tTwo males .\n")
    assert read_flickr30k_captions(token) == [
        ("1000092795.jpg", 0, "Two young guys ."),
        ("1000092795.jpg", 1, "Two males ."),
    ]


def test_imagenet_prompts() -> None:
    assert imagenet_prompts(["tench, Tinca tinca", "goldfish"]) == ["a photo of a tench", "a photo of a goldfish"]
    assert imagenet_prompts(["goldfish"], "a {} in water") == ["a goldfish in water"]


def test_sd_image_transform() -> None:
    image = Image.new("L", (40, 20), 255)
    image.paste(0, (0, 0, 20, 20))  # left half black, right half white
    out = sd_image_transform(16, train=False)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert out[:, :, 0].mean() < 0 < out[:, :, -1].mean()  # center crop kept both halves, no flip
    torch.manual_seed(0)
    flips = [sd_image_transform(16, train=True)(image)[0, 0, 0].item() > 0 for _ in range(20)]
    assert any(flips) and not all(flips)


def test_high_contrast_style_is_a_monotone_brightening() -> None:
    from fcr.data import apply_style

    x = np.array([[[0, 64, 128, 255]]], dtype=np.uint8)
    y = apply_style(x, "high_contrast")
    assert y.dtype == np.uint8 and y.tolist() == [[[0, 128, 181, 255]]]
    assert apply_style(x, "none") is x
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(x, "sepia")
