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

from fcr.backends.embedded import data
from fcr.backends.sd import artbench
from fcr.backends.sd import data as sd_data
from fcr.backends.sd import prompts as prompt_sources
from fcr.backends.embedded.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_NOUNS,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    assign_captions,
    caption,
    captions_for,
    load_fashion_mnist,
    locate_fashion_mnist,
    prompt_table,
    read_idx,
    to_model_range,
    train_val_split,
)
from fcr.backends.sd.prompts import imagenet_prompts, read_coco_captions, read_flickr30k_captions
from fcr.backends.sd.data import (
    read_image_caption_folder,
    read_laion_parquet,
    read_webdataset_tar,
    sample_subset,
    sd_image_transform,
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


@needs_debian
def test_caption_folder_holds_the_real_images_with_their_class_captions(tmp_path: Path) -> None:
    folder = data.write_caption_folder(tmp_path / "images", 3, 40)
    images, labels = load_fashion_mnist("test", download=False)
    assert sorted(p.name for p in folder.iterdir()) == [f"0000{i}.{e}" for i in range(3) for e in ("png", "txt")]
    for i in range(3):
        image = Image.open(folder / f"0000{i}.png")
        assert image.size == (40, 40) and image.mode == "RGB"
        assert data.noun_phrase(int(labels[i])) in (folder / f"0000{i}.txt").read_text()
    # Upscaling a 28x28 image keeps its content: downscaled back, it is close to the original.
    back = np.asarray(Image.open(folder / "00000.png").convert("L").resize((28, 28), Image.BICUBIC), dtype=float)
    assert np.abs(back - images[0]).mean() < 0.1 * 255
    with pytest.raises(ValueError, match="n must lie"):
        data.write_caption_folder(tmp_path / "none", 0, 40)


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
    assert image == encoded and text == "red" and sd_data.open_image(image).size == (6, 4)
    pd.DataFrame({"URL": ["https://x/y.jpg"], "TEXT": ["u"]}).to_parquet(tmp_path / "url.parquet")
    with pytest.raises(ValueError, match="img2dataset --url_list"):
        read_laion_parquet(tmp_path / "url.parquet")  # nothing is downloaded: URLs are refused
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
    with pytest.warns(UserWarning, match=r"30000 prompts asked but only 3 available"):
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
    from fcr.backends.embedded.data import apply_style

    x = np.array([[[0, 64, 128, 255]]], dtype=np.uint8)
    y = apply_style(x, "high_contrast")
    assert y.dtype == np.uint8 and y.tolist() == [[[0, 128, 181, 255]]]
    assert apply_style(x, "none") is x
    with pytest.raises(ValueError, match="unknown style"):
        apply_style(x, "sepia")


# ----------------------------------------------------------------------------- SD data layouts
# Built in tmp_path with real Fashion-MNIST test images, in the layouts the public tools write.


@pytest.fixture(scope="module")
def fashion_images() -> list[tuple[bytes, str]]:
    """Six real Fashion-MNIST test images as (JPEG bytes, unique caption)."""
    try:
        images, labels = load_fashion_mnist("test", download=False)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available offline: {err}")
    out = []
    for i, (image, label) in enumerate(zip(images[:6], labels[:6])):
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), f"{caption(int(label), 'a photo of {}')}, item {i}"))
    return out


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _img2dataset_meta(path: Path, keys: list[str], captions: list[str]) -> None:
    """img2dataset's per-shard metadata parquet (URLs, no images) and stats file."""
    import pandas as pd

    urls = [f"https://example.com/{k}.jpg" for k in keys]
    pd.DataFrame({"url": urls, "caption": captions, "key": keys, "status": ["success"] * len(keys),
                  "error_message": [None] * len(keys)}).to_parquet(path)
    path.with_name(f"{path.stem}_stats.json").write_text(json.dumps({"count": len(keys)}))


def test_img2dataset_files_layout(tmp_path: Path, fashion_images) -> None:
    out = tmp_path / "laion_out"
    expected = []
    for shard_id, items in ((0, fashion_images[:3]), (1, fashion_images[3:5])):
        shard = out / f"{shard_id:05d}"
        shard.mkdir(parents=True)
        keys = [f"{shard_id * 10000 + i:09d}" for i in range(len(items))]
        for key, (jpg, text) in zip(keys, items):
            (shard / f"{key}.jpg").write_bytes(jpg)
            (shard / f"{key}.txt").write_text(text)
            (shard / f"{key}.json").write_text(json.dumps({"key": key, "caption": text}))
            expected.append((shard / f"{key}.jpg", text))
        _img2dataset_meta(out / f"{shard_id:05d}.parquet", keys, [t for _, t in items])
    (out / "00001" / "000010002.jpg").write_bytes(fashion_images[5][0])  # no caption file: skipped
    with pytest.warns(UserWarning, match="1 images without a .txt caption"):
        assert sd_data.read_image_shards(out) == expected
    with pytest.warns(UserWarning, match="1 images without"):
        assert sd_data.read_training_pairs(out) == expected
    assert sd_data.open_image(expected[0][0]).size == (28, 28)
    # A plain image+caption folder still reads as before.
    assert sd_data.read_training_pairs(out / "00000") == expected[:3]


def test_img2dataset_webdataset_layout(tmp_path: Path, fashion_images) -> None:
    out = tmp_path / "wds"
    out.mkdir()
    expected = []
    for shard_id, items in ((0, fashion_images[:3]), (1, fashion_images[3:])):
        members: dict[str, bytes] = {}
        keys = [f"{shard_id * 10000 + i:09d}" for i in range(len(items))]
        for key, (jpg, text) in zip(keys, items):
            members |= {f"{key}.jpg": jpg, f"{key}.txt": text.encode(), f"{key}.json": b"{}"}
            expected.append((jpg, text))
        _write_tar(out / f"{shard_id:05d}.tar", members)
        _img2dataset_meta(out / f"{shard_id:05d}.parquet", keys, [t for _, t in items])
    assert sd_data.read_image_shards(out) == expected
    assert sd_data.read_training_pairs(out) == expected
    assert sd_data.read_training_pairs(out / "00001.tar") == expected[3:]


def test_img2dataset_parquet_layout(tmp_path: Path, fashion_images) -> None:
    import pandas as pd

    out = tmp_path / "pq"
    out.mkdir()
    expected = []
    for shard_id, items in ((0, fashion_images[:3]), (1, fashion_images[3:])):
        keys = [f"{shard_id * 10000 + i:09d}" for i in range(len(items) + 1)]
        jpgs = [jpg for jpg, _ in items] + [None]  # the last URL failed to download
        texts = [text for _, text in items] + ["a failed download"]
        pd.DataFrame({
            "key": keys, "caption": texts, "url": [f"https://example.com/{k}.jpg" for k in keys], "jpg": jpgs,
            "status": ["success"] * len(items) + ["failed_to_download"], "width": [28] * len(items) + [None],
        }).to_parquet(out / f"{shard_id:05d}.parquet")
        (out / f"{shard_id:05d}_stats.json").write_text("{}")
        expected += [(jpg, text) for jpg, text in items]
    assert sd_data.read_image_shards(out) == expected
    assert sd_data.read_training_pairs(out) == expected


def test_url_only_parquet_refused_with_img2dataset_command(tmp_path: Path) -> None:
    import pandas as pd

    meta = pd.DataFrame({"URL": ["https://example.com/a.jpg", "https://example.com/b.jpg"],
                         "TEXT": ["a cat", "a dog"], "similarity": [0.3, 0.4]})
    meta.to_parquet(tmp_path / "laion.parquet")
    command = (
        f"img2dataset --url_list {tmp_path}/laion.parquet --input_format parquet --url_col URL --caption_col TEXT "
        f"--output_format files --output_folder {tmp_path}/laion_images --image_size 512 --resize_mode center_crop"
    )
    for read in (read_laion_parquet, sd_data.read_training_pairs):
        with pytest.raises(ValueError) as info:
            read(tmp_path / "laion.parquet")
        assert command in str(info.value) and "2 of 2 rows" in str(info.value)
    assert sd_data.img2dataset_command(tmp_path / "laion.parquet", tmp_path / "laion_images") == command
    # A folder of metadata shards: the command downloads the whole folder.
    folder = tmp_path / "laion-aesthetics"
    folder.mkdir()
    for i in range(2):
        meta.rename(columns={"URL": "url", "TEXT": "caption"}).to_parquet(folder / f"part-{i:05d}.parquet")
    with pytest.raises(ValueError) as info:
        sd_data.read_training_pairs(folder)
    assert (f"img2dataset --url_list {folder} --input_format parquet --url_col url --caption_col caption "
            f"--output_format files --output_folder {tmp_path}/laion-aesthetics_images") in str(info.value)
    # img2dataset's own metadata parquet beside its shard folder points at the output folder instead.
    (tmp_path / "out" / "00000").mkdir(parents=True)
    _img2dataset_meta(tmp_path / "out" / "00000.parquet", ["000000000"], ["a cat"])
    with pytest.raises(ValueError, match=f"point at the whole output folder {tmp_path}/out"):
        read_laion_parquet(tmp_path / "out" / "00000.parquet")


def test_read_training_pairs_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.*does not exist"):
        sd_data.read_training_pairs(tmp_path / "nothing")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="notes.csv: a file that is neither a .parquet nor a .tar"):
        sd_data.read_training_pairs(tmp_path / "notes.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="img2dataset shard folders"):
        sd_data.read_training_pairs(tmp_path / "empty")


def _artbench(base: Path, files: dict[str, bytes]) -> None:
    for name, payload in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(payload)


ARTBENCH_CSV_HEADER = "name,url,file_name,artist,split,label,cv_fold,is_public_domain,length\n"


def test_read_artbench10_with_csv(tmp_path: Path, fashion_images) -> None:
    root = tmp_path / "ArtBench-10"
    base = root / "artbench-10-imagefolder-split"
    jpg = [j for j, _ in fashion_images]
    _artbench(base, {
        "train/baroque/rembrandt_the-night-watch-1642.jpg": jpg[0],
        "train/baroque/unlisted.jpg": jpg[1],
        "train/renaissance/albrecht-durer_melencolia-i-1514.jpg": jpg[2],
        "train/ukiyo_e/katsushika-hokusai_the-great-wave.jpg": jpg[3],
        "test/baroque/rembrandt_self-portrait-1660.jpg": jpg[4],
    })
    rows = [
        ("rembrandt_the-night-watch-1642.jpg", "rembrandt", "train", "baroque"),
        ("albrecht-durer_melencolia-i-1514.jpg", "albrecht-durer", "train", "renaissance"),
        ("katsushika-hokusai_the-great-wave.jpg", "katsushika-hokusai", "train", "ukiyo_e"),
        ("rembrandt_self-portrait-1660.jpg", "rembrandt", "test", "baroque"),
    ]
    (root / "ArtBench-10.csv").write_text(ARTBENCH_CSV_HEADER + "".join(
        f"{name},https://uploads.wikiart.org/{name},{name},{artist},{split},{label},1,True,256\n"
        for name, artist, split, label in rows))
    train = [
        (base / "train/baroque/rembrandt_the-night-watch-1642.jpg", "a baroque painting by Rembrandt"),
        (base / "train/baroque/unlisted.jpg", "a baroque painting"),
        (base / "train/renaissance/albrecht-durer_melencolia-i-1514.jpg", "a renaissance painting by Albrecht Durer"),
        (base / "train/ukiyo_e/katsushika-hokusai_the-great-wave.jpg", "a ukiyo-e painting by Katsushika Hokusai"),
    ]
    with pytest.warns(UserWarning, match="no artist for 1 of 4 images"):
        assert artbench.read_artbench10(root) == train
    with pytest.warns(UserWarning, match="no artist for 1 of 4"):
        assert sd_data.read_training_pairs(root) == train  # detected; the train split
    with pytest.warns(UserWarning, match="no artist for 1 of 4"):
        assert sd_data.read_training_pairs(base / "train") == train
    assert sd_data.read_training_pairs(base / "train" / "ukiyo_e") == train[3:]
    # The imagefolder itself as root: the CSV is found in its parent.
    assert artbench.read_artbench10(base, "test") == [
        (base / "test/baroque/rembrandt_self-portrait-1660.jpg", "a baroque painting by Rembrandt")]
    assert artbench.is_artbench10(root) and artbench.is_artbench10(base) and not artbench.is_artbench10(base / "train")
    assert artbench.artist_name("albrecht-durer") == "Albrecht Durer"
    assert artbench.artist_name("a.y.-jackson") == "A.Y. Jackson"


def test_read_artbench10_without_csv_and_errors(tmp_path: Path, fashion_images) -> None:
    base = tmp_path / "artbench-10-imagefolder-split"
    _artbench(base, {
        "train/impressionism/claude-monet_water-lilies.jpg": fashion_images[0][0],
        "train/post_impressionism/paul-cezanne_card-players.jpg": fashion_images[1][0],
    })
    expected = [
        (base / "train/impressionism/claude-monet_water-lilies.jpg", "an impressionist painting"),
        (base / "train/post_impressionism/paul-cezanne_card-players.jpg", "a post-impressionist painting"),
    ]
    with pytest.warns(UserWarning, match="no ArtBench-10.csv"):
        assert artbench.read_artbench10(base) == expected
    with pytest.warns(UserWarning, match="no ArtBench-10.csv"):
        assert artbench.read_artbench10(tmp_path, styles=["post_impressionism"]) == expected[1:]
    with pytest.raises(FileNotFoundError, match="not an ArtBench-10 folder"):
        artbench.read_artbench10(base / "train")
    with pytest.raises(FileNotFoundError, match="no ArtBench-10 'test' split"):
        artbench.read_artbench10(base, "test")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        artbench.read_artbench10(base, "val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown ArtBench-10 styles \\['cubism'\\]"):
        artbench.read_artbench10(base, styles=["cubism"])
    (tmp_path / "wrong.csv").write_text("image,style\n")
    with pytest.raises(ValueError, match="wrong.csv: expected ArtBench-10 metadata columns"):
        artbench.read_artbench10(base, metadata=tmp_path / "wrong.csv")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        artbench.read_artbench10(base, metadata=tmp_path / "absent.csv")


def _coco_file(path: Path, captions_per_image: list[int]) -> Path:
    """A COCO captions file: image i has captions_per_image[i] captions, annotation ids shuffled."""
    images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg"} for i in range(len(captions_per_image))]
    annotations = [{"image_id": 100 + i, "id": 1000 * (j + 1) + i, "caption": f"image {i} caption {j}."}
                   for i, count in enumerate(captions_per_image) for j in range(count)]
    np.random.default_rng(5).shuffle(annotations)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "licenses": []}))
    return path


def _coco_before(path: Path, n: int, seed: int | None) -> list[tuple[int, str]]:
    """read_coco_captions as it was before captions_per_image (one caption per image)."""
    loaded = json.loads(path.read_text())
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in loaded["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append((int(ann.get("id", 0)), " ".join(ann["caption"].split())))
    image_ids = sorted(int(img["id"]) for img in loaded["images"] if int(img["id"]) in by_image)
    rng = np.random.default_rng(seed) if seed is not None else None
    pairs = []
    for image_id in image_ids:
        captions = [c for _, c in sorted(by_image[image_id])]
        pairs.append((image_id, captions[int(rng.integers(len(captions))) if rng is not None else 0]))
    return pairs[:n] if seed is None else sample_subset(pairs, n, seed)


def test_coco_default_unchanged_and_shortfall_warns(tmp_path: Path) -> None:
    path = _coco_file(tmp_path / "captions_val2017.json", [5, 6, 5, 7, 5, 5, 6, 5, 5, 5, 5, 5])
    for seed in (None, 0, 1, 7):
        assert read_coco_captions(path, n=8, seed=seed) == _coco_before(path, 8, seed)
        with pytest.warns(UserWarning) as record:
            assert read_coco_captions(path, n=30000, seed=seed) == _coco_before(path, 30000, seed)
        (message,) = [str(w.message) for w in record]
        assert message.startswith(f"{path}: 30000 prompts asked but only 12 available")
        assert "captions_per_image" in message and "captions_val2014.json" in message


def test_coco_captions_per_image(tmp_path: Path) -> None:
    path = _coco_file(tmp_path / "captions_val2017.json", [5, 6, 5])
    with pytest.warns(UserWarning, match=r"captions_per_image=6 .* 2 of 18 prompts repeat"):
        pairs = read_coco_captions(path, n=18, seed=None, captions_per_image=6)
    assert pairs == (
        [(100, f"image 0 caption {j}.") for j in (0, 1, 2, 3, 4, 0)]
        + [(101, f"image 1 caption {j}.") for j in range(6)]
        + [(102, f"image 2 caption {j}.") for j in (0, 1, 2, 3, 4, 0)]
    )
    every = read_coco_captions(path, n=16, seed=None, captions_per_image=None)
    assert len(every) == 16 and len(set(every)) == 16
    seeded = read_coco_captions(path, n=6, seed=3, captions_per_image=2)
    assert seeded == read_coco_captions(path, n=6, seed=3, captions_per_image=2)
    assert sorted(i for i, _ in seeded) == [100, 100, 101, 101, 102, 102] and len(set(seeded)) == 6
    with pytest.warns(UserWarning, match="10 prompts asked but only 6 available"):
        read_coco_captions(path, n=10, seed=0, captions_per_image=2)
    with pytest.raises(ValueError, match="captions_per_image must be"):
        read_coco_captions(path, n=3, captions_per_image=0)


def test_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json: no such file"):
        read_coco_captions(tmp_path / "absent.json")
    (tmp_path / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco_captions(tmp_path / "instances_val2017.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not JSON"):
        read_coco_captions(tmp_path / "broken.json")


def test_read_eval_prompts_dispatch(tmp_path: Path) -> None:
    coco = _coco_file(tmp_path / "captions_val2017.json", [5, 5])
    assert prompt_sources.read_eval_prompts(coco, 2, seed=None) == ["image 0 caption 0.", "image 1 caption 0."]
    assert prompt_sources.read_eval_prompts(coco, 2, seed=0) == [c for _, c in read_coco_captions(coco, 2, 0)]
    flickr_csv = tmp_path / "results.csv"
    flickr_csv.write_text("image_name| comment_number| comment\n1000092795.jpg| 1| Two males .\n"
                          "1000092795.jpg| 0| Two young guys .\n10002456.jpg| 0| Workers look down .\n")
    assert prompt_sources.read_eval_prompts(flickr_csv, 2, seed=None) == ["Two young guys .", "Workers look down ."]
    flickr_token = tmp_path / "results_20130124.token"
    flickr_token.write_text("1000092795.jpg#0\tTwo young guys .\n1000092795.jpg#1\tTwo males .\n"
                            "10002456.jpg#0\tWorkers look down .\n")
    assert prompt_sources.read_eval_prompts(flickr_token, 3, seed=None, captions_per_image=None) == [
        "Two young guys .", "Two males .", "Workers look down ."]
    classes = tmp_path / "imagenet_classes.txt"
    classes.write_text("tench, Tinca tinca\ngoldfish, Carassius auratus\ngreat white shark\n")
    three = ["a photo of a tench", "a photo of a goldfish", "a photo of a great white shark"]
    assert prompt_sources.read_eval_prompts(classes, 3, seed=0) == three
    assert prompt_sources.read_eval_prompts(classes, 7, seed=None) == three * 2 + three[:1]
    balanced = prompt_sources.read_eval_prompts(classes, 8, seed=1)
    assert balanced[:6] == three * 2 and len(set(balanced[6:])) == 2 and set(balanced[6:]) <= set(three)
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert prompt_sources.read_eval_prompts(synsets, 2, seed=None, template="a {} in a pond") == [
        "a tench in a pond", "a goldfish in a pond"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na red car\n\na blue bird\n")
    with pytest.warns(UserWarning, match="5 prompts asked but only 2 available"):
        assert prompt_sources.read_eval_prompts(prompts, 5, seed=0) == ["a red car", "a blue bird"]
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na cat on a mat\tAnimals\tBasic\t\n")
    assert prompt_sources.read_eval_prompts(parti, 2, seed=None) == ["bond", "a cat on a mat"]
    headerless = tmp_path / "ood.tsv"
    headerless.write_text("# label<TAB>prompt\nCoat\ta coat in the rain\nBag\ta leather bag\n")
    assert prompt_sources.read_eval_prompts(headerless, 2, seed=None) == ["a coat in the rain", "a leather bag"]
    many = tmp_path / "many.txt"
    many.write_text("".join(f"prompt {i}\n" for i in range(10)))
    assert prompt_sources.read_eval_prompts(many, 3, seed=1) == sample_subset([f"prompt {i}" for i in range(10)], 3, 1)
    kinds = {p.name: prompt_sources.eval_prompt_kind(p) for p in (coco, flickr_csv, flickr_token, classes, synsets, prompts,
                                                         parti)}
    assert kinds == {"captions_val2017.json": "coco", "results.csv": "flickr30k",
                     "results_20130124.token": "flickr30k", "imagenet_classes.txt": "imagenet",
                     "LOC_synset_mapping.txt": "imagenet", "prompts.txt": "prompts", "PartiPrompts.tsv": "prompts"}
    assert prompt_sources.read_eval_prompts(many, 2, seed=None, kind="imagenet") == ["a photo of a prompt 0",
                                                                          "a photo of a prompt 1"]


def test_read_eval_prompts_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json: does not exist .*COCO captions"):
        prompt_sources.read_eval_prompts(tmp_path / "absent.json", 10, 0)
    with pytest.raises(ValueError, match="a folder, not a file"):
        prompt_sources.read_eval_prompts(tmp_path, 10, 0)
    (tmp_path / "prompts.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="prompts.bin: unknown prompt source"):
        prompt_sources.read_eval_prompts(tmp_path / "prompts.bin", 10, 0)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt: empty"):
        prompt_sources.read_eval_prompts(tmp_path / "empty.txt", 10, 0)
    with pytest.raises(ValueError, match="kind must be 'auto' or one of"):
        prompt_sources.read_eval_prompts(tmp_path / "empty.txt", 10, 0, kind="laion")
    (tmp_path / "ok.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="number of prompts must be an integer >= 1"):
        prompt_sources.read_eval_prompts(tmp_path / "ok.txt", 0, 0)


def test_read_imagenet_classes_formats(tmp_path: Path) -> None:
    path = tmp_path / "imagenet1000_clsidx_to_labels.txt"
    path.write_text("{0: 'tench, Tinca tinca',\n 1: 'goldfish, Carassius auratus',\n 2: \"great white shark\"}\n")
    assert prompt_sources.read_imagenet_classes(path) == ["tench, Tinca tinca", "goldfish, Carassius auratus",
                                                "great white shark"]
