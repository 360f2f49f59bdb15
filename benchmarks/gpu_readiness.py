"""GPU readiness: the first thing to run on a new CUDA machine, with or without internet.

Builds Stable Diffusion 1.5-sized models from configuration with *random* weights (UNet, VAE, CLIP
text encoder, a character-level CLIP tokenizer that needs no download) and random-weight metric
networks of the real sizes (open_clip ViT-L-14, an Inception-v3 trunk shaped like clean-fid's),
then runs the repository's own SD path through the pipeline runner, as a user's study would:
notebook 01 (data), notebook 02 (two FCR fine-tuning steps on real Fashion-MNIST images upscaled to
512 px) and notebook 03 (a sweep with full sampling, FD-5, FD-10 and DeepCache-5, cost timed at
batch 1 and 8). It checks that everything installs, fits and runs on the machine and records how
long each stage took. Quality numbers of random networks mean nothing: only timings are written.

    python benchmarks/gpu_readiness.py                      # CUDA, SD1.5 sizes (sized for 10 minutes; not yet timed on a GPU)
    python benchmarks/gpu_readiness.py --tiny --device cpu  # the same path with tiny models (CI)

Writes ``<out>.csv`` (stage, status, seconds), ``<out>_cost.csv`` (notebook 03's cost rows: time
per image at batch 1 and 8, FLOPs per image and peak memory per configuration) and ``<out>.env.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fcr import contract
from fcr.backends.embedded.data import TRAIN_TEMPLATES, caption, write_caption_folder
from fcr.backends.sd.model import SDComponents
from fcr.eval.profiling import SD15_UNET_CONFIG, environment_info

REPO = Path(__file__).resolve().parents[1]
# SD1.5's scheduler_config.json, VAE config.json and text encoder (CLIP ViT-L/14 text tower) config.json.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "clip_sample": False}
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                 cross_attention_dim=32, norm_num_groups=16)
TINY_VAE = dict(SD15_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=32)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def char_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over printable ASCII characters (no merges, no download), 77 tokens."""
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}  # SD's special-token ids
    for i, token in enumerate([chr(c) for c in range(33, 127)] + [chr(c) + "</w>" for c in range(33, 127)]):
        vocab[token] = i
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def random_sd_components(tiny: bool) -> SDComponents:
    """SD1.5-sized (or tiny) UNet, VAE and text encoder with random weights, seeded."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET_CONFIG))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    text = dict(TINY_TEXT if tiny else SD15_TEXT, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return SDComponents(unet.eval(), vae.eval(), CLIPTextModel(CLIPTextConfig(**text)).eval(), char_tokenizer(),
                        DDPMScheduler.from_config(SD15_SCHEDULER), dict(SD15_SCHEDULER))


class InceptionTrunk(torch.nn.Module):
    """Shaped like clean-fid's Inception TorchScript: ``layers`` maps (B, 3, 299, 299) images in
    [0, 255] to (B, 2048, 1, 1), ``forward(x, return_features=False)`` gives 1008 class
    probabilities. Full size: torchvision's Inception-v3 trunk (random weights, the real cost)."""

    def __init__(self, tiny: bool) -> None:
        super().__init__()
        if tiny:
            self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Conv2d(3, 2048, 4))
        else:
            from torchvision.models import inception_v3

            net = inception_v3(weights=None, aux_logits=False, init_weights=False)
            names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
            self.layers = torch.nn.Sequential(*[getattr(net, n) for n in names])
        self.head = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        features = self.layers((x - 128.0) / 128.0).flatten(1)
        return features if return_features else torch.softmax(self.head(features), dim=1)


def metric_weights(folder: Path, tiny: bool) -> dict[str, str]:
    """Random-weight CLIP (open_clip config + safetensors) and Inception files where the documented
    parameters (clip_model, clip_pretrained, fid_inception_dir) point, as on a machine offline."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = open_clip.get_model_config("ViT-L-14")
    if tiny:
        config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = folder / "readiness-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    clip = open_clip.create_model("readiness-clip", pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "clip.safetensors"))
    torch.jit.script(InceptionTrunk(tiny).eval()).save(str(folder / "inception-2015-12-05.pt"))
    return {"clip_model": str(path), "clip_pretrained": str(folder / "clip.safetensors"), "fid_inception_dir": str(folder)}


def overlay(args: argparse.Namespace, model: Path, work: Path) -> dict:
    resolution = 32 if args.tiny else 512
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"{caption(i % 10, TRAIN_TEMPLATES[i % 3])}\n" for i in range(args.prompts)))
    images = Path(args.train_images) if args.train_images else write_caption_folder(work / "train_images", 8, resolution)
    return {
        "model": str(model), "train_data": str(images), "eval_prompts": str(prompts), "fid_reference": str(images),
        **metric_weights(work / "metric_weights", args.tiny), "device": args.device, "resolution": resolution,
        "mixed_precision": "fp16" if args.device == "cuda" else "no", "prediction_type": "epsilon",
        "train_subset": 8, "train_batch_size": 2, "gradient_accumulation_steps": 1, "max_train_steps": 2,
        "checkpoint_every": 2, "log_every": 1, "num_inference_steps": args.steps, "strides": [1, 5, 10],
        "deep_cache_intervals": [5], "include_50ls": False, "dpm_reference_steps": 0, "num_eval_images": args.prompts,
        "eval_batch_size": min(8, args.prompts), "seeds": [0], "profile_batches": [1, 8], "profile_repeats": 2,
        "n_bootstrap": 10, "output_dir": str(work / "out"), "data_dir": str(work / "data"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny models (the code path on a CPU; CI)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts of the sweep (reduced from COCO-30k)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--train-images", default=None,
                        help="a folder of name.png/.jpg + name.txt pairs (at least 8) instead of Fashion-MNIST")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/gpu_readiness", help="prefix of the result files")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --tiny --device cpu for the code path)")
    work = Path(args.work or tempfile.mkdtemp(prefix="fcr-readiness-"))
    stages: list[dict] = []
    start = time.perf_counter()
    model = random_sd_components(args.tiny).save_pretrained(work / ("sd_tiny_random" if args.tiny else "sd15_random"))
    stages.append({"stage": "build random SD1.5-sized models" + (" (tiny)" if args.tiny else ""), "status": "ran",
                   "seconds": time.perf_counter() - start})
    try:
        params = overlay(args, model, work)
    except (FileNotFoundError, OSError) as err:  # no Fashion-MNIST: no Debian package and no download
        parser.error(f"Fashion-MNIST is not available here ({err}); pass --train-images with a caption folder")
    (work / "readiness.yaml").write_text(yaml.safe_dump(params))
    manifest = {"experiments": [{"experiment_id": "readiness", "settings": {"sd": {
        "params": [str(REPO / "params" / "sd15.yaml"), str(work / "readiness.yaml")],
        "finetunes": {"fcr": [str(REPO / "params" / "variations" / "fcr_lambda0.10_fd10.yaml"), str(work / "readiness.yaml")]},
        "notebooks": [{"notebook": "03_stride_sweep", "models": [str(model), "fcr"]}],
        "backbones": [{"original": str(model), "role": "SD1.5 sizes, random weights", "fcr_models": {0.1: "fcr"}}],
    }}}]}
    (work / "experiments.yaml").write_text(yaml.safe_dump(manifest))
    root = work / "pipeline"
    cmd = [sys.executable, "-m", "fcr.pipeline", "run", "--setting", "sd", "--root", str(root), "--manifest",
           str(work / "experiments.yaml"), "-f", str(work / "readiness.yaml"), "--no-report", "--reference", "none"]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), text=True, capture_output=True)
    (work / "pipeline.log").write_text(done.stdout + done.stderr)
    timing = json.loads((root / "report" / contract.PIPELINE_TIMING).read_text()) if done.returncode == 0 else {}
    stages += [{"stage": s["name"], "status": s["status"], "seconds": s["seconds"]} for s in timing.get("stages", [])]
    stages.append({"stage": "total", "status": "ok" if done.returncode == 0 else f"failed ({done.returncode})",
                   "seconds": time.perf_counter() - start})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(stages).to_csv(f"{out}.csv", index=False)
    Path(f"{out}.env.json").write_text(json.dumps({**environment_info(args.device), "tiny": args.tiny, "prompts": args.prompts,
                                                   "steps": args.steps, "weights": "random (cost only)"}, indent=2))
    if done.returncode != 0:
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        print(f"readiness: the pipeline failed; full log {work / 'pipeline.log'}", file=sys.stderr)
        return 1
    cost = next((root / "readiness").rglob(contract.COST))  # one row per configuration, a time per batch size
    pd.read_csv(cost).to_csv(f"{out}_cost.csv", index=False)
    print(pd.DataFrame(stages).to_string(index=False))
    print(f"readiness: ok in {stages[-1]['seconds']:.0f} s; results {out}.csv, {out}_cost.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
