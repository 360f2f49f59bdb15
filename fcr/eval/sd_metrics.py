"""Stable Diffusion metrics: open_clip CLIPScore and clean-fid's Inception features and FID, on PIL
images or folders (the set-level formulas are :mod:`fcr.eval.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # heavy / optional imports only for type checkers
    from PIL.Image import Image as PILImage

__all__ = ["ClipBundle", "cache_reference_statistics", "clean_fid_inception", "clip_embeddings", "clip_score",
           "clip_score_from_embeddings", "load_clip", "sd_fid", "sd_folder_features"]


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


ClipBundle = tuple[Any, Callable[[Any], torch.Tensor], Callable[[list[str]], torch.Tensor]]


def load_clip(model_name: str, pretrained: str | None, device: torch.device) -> ClipBundle:
    """(model, eval preprocess, tokenizer) from open_clip; ``pretrained=None`` means random weights.

    ``model_name``: an open_clip name or a local model-config ``.json`` (its stem becomes the name);
    ``pretrained``: a tag (weights downloaded on first use) or a local checkpoint file. Call once and pass the result as
    ``clip=`` to :func:`clip_score` when scoring many image sets.
    """
    import open_clip

    if model_name.endswith(".json"):  # a local model config (machines without internet, tests)
        open_clip.add_model_config(model_name)
        model_name = Path(model_name).stem
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def clip_embeddings(
    images: Sequence[PILImage],
    prompts: Sequence[str],
    model_name: str = "ViT-L-14",
    pretrained: str | None = "openai",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    clip: ClipBundle | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normalised CLIP image and text embeddings ``(N, D)`` (float32, CPU) of image/prompt pairs.

    ``clip`` injects a ``(model, preprocess, tokenizer)`` triple, else :func:`load_clip` loads
    ``model_name`` / ``pretrained`` from open_clip.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = _default_device(device)
    model, preprocess, tokenizer = clip if clip is not None else load_clip(model_name, pretrained, dev)
    img_parts: list[torch.Tensor] = []
    txt_parts: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(im.convert("RGB")) for im in images[i : i + batch_size]]).to(dev)
            tokens = tokenizer(list(prompts[i : i + batch_size])).to(dev)
            # Normalise in float32: half-precision models would otherwise lose cosine accuracy.
            img_parts.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
            txt_parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    if not img_parts:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(img_parts), torch.cat(txt_parts)


def clip_score_from_embeddings(image: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """Per-pair CLIPScore ``max(100 * cos, 0)`` of unit-normalised embeddings, shape ``(N,)``."""
    if image.numel() == 0:
        return np.empty(0)
    return (100.0 * (image * text).sum(dim=-1)).clamp(min=0.0).double().numpy()


def clip_score(
    images: Sequence[PILImage],
    prompts: Sequence[str],
    model_name: str = "ViT-L-14",
    pretrained: str | None = "openai",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    clip: ClipBundle | None = None,
) -> np.ndarray:
    """Per-image CLIPScore ``max(100 * cos(E_img(image), E_txt(prompt)), 0)``, shape ``(N,)``.

    Same scale as torchmetrics' CLIPScore (Hessel et al. 2021 use 2.5 instead of 100).
    ``clip`` injects a ``(model, preprocess, tokenizer)`` triple, else :func:`load_clip` loads
    ``model_name`` / ``pretrained`` from open_clip.
    """
    return clip_score_from_embeddings(*clip_embeddings(images, prompts, model_name, pretrained, device, batch_size, clip))


# ----------------------------------------------------------------------------- Stable Diffusion: clean-fid


def sd_folder_features(
    folder: str | Path,
    mode: str = "clean",
    num_workers: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """``(N, 2048)`` clean-fid Inception features of every image in ``folder``.

    For KID / precision-recall / bootstrap CIs on SD images with the functions above.
    ``feature_extractor`` replaces the Inception network (it receives ``(B, 3, 299, 299)``
    float images in [0, 255] after clean-fid's resize).
    """
    from cleanfid import fid

    dev = _default_device(device)
    model = feature_extractor if feature_extractor is not None else fid.build_feature_extractor(mode, dev)
    return fid.get_folder_features(
        str(folder), model, num_workers=num_workers, batch_size=batch_size, device=dev, mode=mode, verbose=False
    )


def clean_fid_inception(inception_dir: str | Path, mode: str = "clean", device: str | torch.device = "cpu"):
    """clean-fid's Inception feature extractor from a local ``inception_dir/inception-2015-12-05.pt``
    (the TorchScript file clean-fid otherwise downloads), for machines without internet."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(inception_dir) / "inception-2015-12-05.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: copy clean-fid's inception-2015-12-05.pt there")
    if mode not in ("clean", "legacy_tensorflow"):
        raise ValueError(f"a local Inception file serves modes 'clean' and 'legacy_tensorflow', not {mode!r}")
    model = InceptionV3W(str(inception_dir), download=False, resize_inside=mode == "legacy_tensorflow")
    return model.to(device).eval()


def sd_fid(
    gen_dir: str | Path,
    ref_dir: str | Path | None = None,
    ref_stats_name: str | None = None,
    mode: str = "clean",
    num_workers: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    verbose: bool = False,
    inception_dir: str | Path | None = None,
) -> float:
    """clean-fid FID of the images in ``gen_dir`` against a folder or cached custom statistics.

    Give exactly one of ``ref_dir`` and ``ref_stats_name`` (made by
    :func:`cache_reference_statistics` with the same ``mode``). ``feature_extractor`` is
    clean-fid's ``custom_feat_extractor``; else ``inception_dir`` (a folder with clean-fid's
    ``inception-2015-12-05.pt``, see :func:`clean_fid_inception`); else clean-fid's own download.
    """
    from cleanfid import fid

    if (ref_dir is None) == (ref_stats_name is None):
        raise ValueError("give exactly one of ref_dir and ref_stats_name")
    if feature_extractor is None and inception_dir:
        feature_extractor = clean_fid_inception(inception_dir, mode, _default_device(device))
    if ref_stats_name is not None:
        ref_stats_name = ref_stats_name.lower()  # as in cache_reference_statistics
    common: dict[str, Any] = dict(
        mode=mode,
        num_workers=num_workers,
        batch_size=batch_size,
        device=_default_device(device),
        custom_feat_extractor=feature_extractor,
        verbose=verbose,
        use_dataparallel=False,
    )
    if ref_dir is not None:
        return float(fid.compute_fid(str(gen_dir), str(ref_dir), **common))
    # Without this check clean-fid would try to download a file of that name from its server.
    if not fid.test_stats_exists(ref_stats_name, mode):
        raise FileNotFoundError(f"no clean-fid custom statistics {ref_stats_name!r} for mode {mode!r}")
    return float(
        fid.compute_fid(str(gen_dir), dataset_name=ref_stats_name, dataset_res="na", dataset_split="custom", **common)
    )


def cache_reference_statistics(
    ref_dir: str | Path,
    name: str,
    mode: str = "clean",
    num: int | None = None,
    num_workers: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> None:
    """Store clean-fid custom Inception statistics of ``ref_dir`` under ``name``.

    Thin wrapper of ``cleanfid.fid.make_custom_stats`` (files live in clean-fid's package
    ``stats/`` folder, as clean-fid expects). ``overwrite`` removes existing stats of that name
    first; otherwise an existing name is an error. ``name`` is lower-cased: clean-fid writes
    lower-case file names but its existence check does not lower-case.
    """
    from cleanfid import fid

    name = name.lower()
    if fid.test_stats_exists(name, mode):
        if not overwrite:
            raise FileExistsError(f"clean-fid statistics {name!r} ({mode}) exist; pass overwrite=True")
        fid.remove_custom_stats(name, mode)
    fid.make_custom_stats(
        name,
        str(ref_dir),
        num=num,
        mode=mode,
        num_workers=num_workers,
        batch_size=batch_size,
        device=_default_device(device),
        verbose=verbose,
    )
