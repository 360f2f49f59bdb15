"""GPU cost of encoder caching at Stable Diffusion scale: time and peak memory per configuration.

The public SD1.5 (512 px, 4x64x64 latents) and SD2.1 (768 px, 4x96x96) UNet architectures are
built with *random* weights (none can be downloaded here) and random-normal text conditioning:
time and memory do not depend on either, so these rows measure cost only, never quality.
Sampling: ``fcr.core.sampler.sample`` with DDIM (SD's scheduler config), 50 steps, classifier-free
guidance (UNet batch 2B), fp16. Configurations: plain, FD-1 (every step a key step: the cost of
the split itself), FD-5/10/20 with parallel and sequential decoding. Times: CUDA events,
configurations interleaved round by round, median; peak memory: ``torch.cuda.max_memory_allocated``
of one sampling call (weights included). Each finished (model, batch) block is appended to the
CSV at once, so a run stopped by its time limit keeps what it measured.

    python benchmarks/bench_sd_gpu.py --out benchmarks/results/bench_sd_gpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from diffusers import UNet2DConditionModel

from fcr.core import sampler
from fcr.eval.profiling import SD15_UNET_CONFIG, SD21_UNET_CONFIG, SD_TEXT_SEQ_LEN, Timer, environment_info, peak_memory

# SD v1/v2 scheduler_config.json values that matter for sampling (scaled-linear betas, 1000 steps).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
GUIDANCE = 7.5
MODELS = {"SD1.5": SD15_UNET_CONFIG, "SD2.1": SD21_UNET_CONFIG}


def configs(steps: int, strides: list[int]) -> list[tuple[str, list[int] | None, bool]]:
    out: list[tuple[str, list[int] | None, bool]] = [("plain", None, True)]
    out.append(("FD-1", sampler.key_steps(steps, "uniform", 1), False))
    for s in strides:
        for parallel in (True, False):
            out.append((f"FD-{s}-{'par' if parallel else 'seq'}", sampler.key_steps(steps, "uniform", s), parallel))
    return out


def bench_model(name: str, batch: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    cfg = dict(MODELS[name])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).to(device, torch.float16).eval()
    scheduler = sampler.build_scheduler("ddim", **SD_SCHEDULER)
    size = cfg["sample_size"]
    gen = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn(batch, cfg["in_channels"], size, size, generator=gen).to(device, torch.float16)
    width = cfg["cross_attention_dim"]
    cond = torch.randn(batch, SD_TEXT_SEQ_LEN, width, generator=gen).to(device, torch.float16)
    uncond = torch.randn(1, SD_TEXT_SEQ_LEN, width, generator=gen).to(device, torch.float16)
    runs = configs(args.steps, args.strides)

    def call(keys: list[int] | None, parallel: bool, steps: int = args.steps):
        return lambda: sampler.sample(unet, scheduler, noise, cond, uncond_hidden_states=uncond,
                                      guidance_scale=GUIDANCE, num_inference_steps=steps,
                                      key_steps=keys, parallel=parallel)

    with torch.inference_mode():
        for label, keys, parallel in runs:  # warm-up: kernels, cuDNN autotuning, allocator
            call(None if keys is None else sampler.key_steps(5, "uniform", 2), parallel, 5)()
        times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
        for rnd in range(args.repeats):
            for label, keys, parallel in runs:
                with Timer(device) as t:
                    call(keys, parallel)()
                times[label].append(t.elapsed_s)
            print(f"  {name} b={batch} round {rnd}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
                  file=sys.stderr)
        peaks = {label: peak_memory(call(keys, parallel), device) for label, keys, parallel in runs}
        # Numerical check on this device: FD-1 must reproduce plain sampling (fp16 round-off only).
        plain = call(None, True)().latents.float()
        fd1 = call(sampler.key_steps(args.steps, "uniform", 1), False)().latents.float()
        fd1_max_abs_diff = float((plain - fd1).abs().max())
    unet = None  # free its GPU memory before the next model (the closures above are not called again)
    torch.cuda.empty_cache()
    plain_t = float(pd.Series(times["plain"]).median())
    fd5 = {k: float(pd.Series(v).median()) for k, v in times.items() if k.startswith("FD-5")}
    fd5_best = min(fd5.values()) if fd5 else float("nan")
    fd5_peak = min(peaks[k] for k in fd5) if fd5 else float("nan")
    rows = []
    for label, keys, parallel in runs:
        t = pd.Series(times[label])
        rows.append(dict(
            model=f"{name} UNet architecture (random weights, fp16)", device=torch.cuda.get_device_name(device),
            latent=f"{cfg['in_channels']}x{size}x{size}", batch=batch, steps=args.steps, guidance=GUIDANCE,
            config=label, parallel=parallel if keys is not None else None,
            num_key_steps=args.steps if keys is None else len(keys),
            time_median_s=float(t.median()), time_min_s=float(t.min()), repeats=len(t),
            time_per_image_s=float(t.median()) / batch, speedup_vs_plain=plain_t / float(t.median()),
            speedup_vs_best_fd5=fd5_best / float(t.median()),
            peak_mem_mib=peaks[label] / 2**20, peak_mem_vs_fd5=peaks[label] / fd5_peak,
            fd1_vs_plain_max_abs_diff=fd1_max_abs_diff, weights="random (cost only)",
        ))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["SD1.5", "SD2.1"], choices=sorted(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strides", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/bench_sd_gpu")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sd_gpu needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    env = {**environment_info(device), "args": vars(args), "started": started}
    out.with_suffix(".env.json").write_text(json.dumps(env, indent=2, default=str) + "\n")
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for batch in args.batches:
            rows += bench_model(name, batch, args, device)
            pd.DataFrame(rows).to_csv(out.with_suffix(".csv"), index=False)  # keep what is measured
            cols = ["model", "batch", "config", "time_per_image_s", "speedup_vs_best_fd5", "peak_mem_mib",
                    "peak_mem_vs_fd5"]
            print(pd.DataFrame(rows[-len(configs(args.steps, args.strides)):])[cols].to_string(index=False), flush=True)
    print(f"wrote {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
