"""Evaluation protocols of Stable Diffusion made from local MS-COCO files: the prompts and the FID
reference images of COCO-30k (the seed's: 30,000 captions of val2014, one per image) or COCO-5k
(val2017), in the same order, so ``params/eval/coco30k.yaml`` / ``coco5k.yaml`` only name them.

    python -m fcr.backends.sd.protocols --captions annotations/captions_val2014.json \\
        --images val2014 --n 30000 --resolution 512 --out outputs/sd/data/coco30k

writes ``out/prompts.txt`` (one caption per line), ``out/images/NNNNNN.png`` (the captioned image,
centre-cropped to a square and resized to ``resolution`` with bicubic filtering, as the FID
literature's COCO protocols do) with ``NNNNNN.txt`` beside it (its caption: what the
prompt-conditional precision/recall reads) and ``out/protocol.json``. Images already written are
kept, so an interrupted run resumes. Reference Inception features are computed once per reference
folder and cached (:func:`fcr.eval.sd_evaluation.reference_set`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from fcr.backends.sd.data import open_image
from fcr.backends.sd.prompts import _read_json, read_coco_captions

__all__ = ["center_square", "prepare_coco_reference"]


def center_square(image, resolution: int):
    """``image`` centre-cropped to a square and resized to ``resolution`` pixels (bicubic)."""
    from PIL import Image

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)


def prepare_coco_reference(captions_json: str | Path, images_dir: str | Path, out_dir: str | Path, n: int,
                           seed: int = 0, resolution: int = 512, progress: bool = True) -> Path:
    """Write the prompts and reference images of a COCO protocol (see the module docstring); returns
    ``out_dir``. ``n`` images of ``captions_json``, one seeded caption each, a seeded subset."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    captions_json, images_dir, out = Path(captions_json), Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such folder (expected COCO's val2014/ or val2017/ images)")
    pairs = read_coco_captions(captions_json, n, seed, captions_per_image=1)
    data = _read_json(captions_json, "COCO captions file")
    file_names = {int(image["id"]): image["file_name"] for image in data["images"]}  # type: ignore[index]
    missing = [file_names[i] for i, _ in pairs if not (images_dir / file_names[i]).is_file()]
    if missing:
        raise FileNotFoundError(f"{images_dir}: {len(missing)} of the {len(pairs)} captioned images are missing, "
                                f"e.g. {missing[0]}: give the images folder of {captions_json.name}")
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (image_id, caption) in enumerate(tqdm(pairs, disable=not progress, desc="COCO reference")):
        target = folder / f"{k:06d}.png"
        if not target.is_file():
            tmp = folder / f".{k:06d}.png.tmp"
            center_square(open_image(images_dir / file_names[image_id]), resolution).save(tmp, format="PNG")
            tmp.replace(target)
        target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    (out / "prompts.txt").write_text("".join(f"{caption}\n" for _, caption in pairs), encoding="utf-8")
    (out / "protocol.json").write_text(json.dumps({
        "captions": captions_json.name, "images": len(pairs), "seed": seed, "resolution": resolution,
        "image_ids": [image_id for image_id, _ in pairs],
    }, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.backends.sd.protocols", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True, help="COCO captions_val2014.json or captions_val2017.json")
    parser.add_argument("--images", required=True, help="the matching images folder (val2014/ or val2017/)")
    parser.add_argument("--out", required=True, help="output folder (prompts.txt, images/)")
    parser.add_argument("--n", type=int, default=30_000, help="images (and prompts) of the protocol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)
    try:
        out = prepare_coco_reference(args.captions, args.images, args.out, args.n, args.seed, args.resolution)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{out}: prompts.txt and images/ ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
