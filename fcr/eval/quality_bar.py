"""The base models' quality bar: do generated images show the prompted class?

With plain 50-step DDIM and classifier-free guidance, the evaluation classifier
(:mod:`fcr.eval.classifier`) labels each generated image; class agreement is the share labelled as the
prompted class (per class too). ``python -m fcr.eval.quality_bar --model base`` writes
``quality.json`` and a class-by-class sample grid next to the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcr import plots
from fcr.backends.embedded import data
from fcr.backends.embedded.model import EmbeddedModel, embedded_prompt_set, prepare_embedded_data
from fcr.backends.generate import generate
from fcr.backends.models import build_noise_scheduler, load_embedded_unet, model_training_params, resolve_unet_dir
from fcr.eval.classifier import load_classifier, predict_proba
from fcr.eval.profiling import environment_info

__all__ = ["class_agreement", "main"]


def class_agreement(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    data_dir: str | Path,
    *,
    n: int = 500,
    seed: int = 0,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 50,
    scheduler_name: str = "ddim",
    batch_size: int = 100,
    templates: str = "train",
    classifier: torch.nn.Module | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], torch.Tensor, np.ndarray]:
    """(summary, images, prompted labels): accuracy of the classifier against the prompted class."""
    prompts = embedded_prompt_set(data_dir, n, seed, templates)
    result = generate(EmbeddedModel(unet, noise_scheduler), prompts, seed=seed, scheduler_name=scheduler_name,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                      progress=progress)
    probs = predict_proba(classifier or load_classifier(), result.images)
    predicted = probs.argmax(1).numpy()
    correct = predicted == prompts.labels
    per_class = {data.FASHION_MNIST_CLASSES[c]: float(correct[prompts.labels == c].mean()) for c in range(10)}
    summary = {
        "class_agreement": float(correct.mean()),
        "per_class": per_class,
        "mean_prompted_class_prob": float(probs[torch.arange(n), torch.as_tensor(prompts.labels)].mean()),
        "n": n, "seed": seed, "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
        "scheduler": scheduler_name, "templates": templates,
    }
    return summary, result.images, prompts.labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcr.eval.quality_bar", description=__doc__)
    parser.add_argument("--model", required=True, help="embedded model name or run folder")
    parser.add_argument("--data-dir", default="outputs/embedded/data")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="folder for quality.json and the grid (default: the model's run folder)")
    args = parser.parse_args(argv)

    unet_dir = resolve_unet_dir(args.model)
    trained = model_training_params(unet_dir) or {}
    sched = build_noise_scheduler(prediction_type=trained.get("prediction_type", "epsilon"))
    prepare_embedded_data(args.data_dir)
    start = time.perf_counter()
    summary, images, labels = class_agreement(load_embedded_unet(args.model), sched, args.data_dir, n=args.n, seed=args.seed,
                                              guidance_scale=args.guidance, num_inference_steps=args.steps)
    summary.update(model=args.model, unet_dir=str(unet_dir), wall_s=time.perf_counter() - start, environment=environment_info())
    out = Path(args.out) if args.out else unet_dir.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(summary, indent=2, default=str))
    picks = [int(np.flatnonzero(labels == c)[k]) for c in range(10) for k in range(8)]
    fig = plots.image_grid(images[picks], nrows=10, ncols=8, row_labels=data.FASHION_MNIST_CLASSES, scale=1.0)
    plots.save_figure(fig, out / "samples_by_class.png")
    print(json.dumps({k: summary[k] for k in ("class_agreement", "mean_prompted_class_prob", "n", "wall_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
