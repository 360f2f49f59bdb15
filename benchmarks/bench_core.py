"""Core cost benchmark: plain vs encoder-cached (Faster Diffusion) sampling.

Part 1 (``embedded``, on the machine it runs on): the embedded ``base`` UNet (1x32x32, 16 tokens
of width 384) with *random* weights and *random-normal* conditioning -- cost does not depend on
weights or on the conditioning values, so these rows measure cost only, never quality. 50 DDIM
steps with classifier-free guidance (scale 4, UNet batch 2B). For each batch size: plain sampling,
cached sampling with every step a key step (stride 1: the overhead of the encoder/decoder split),
uniform strides 5/10/20 and Faster Diffusion's '50ls' key steps, each with parallel and sequential
decoding. Wall time (median of repeats, configurations interleaved round by round so a change of
machine load hits all of them alike), FLOPs of a whole sampling call counted with
``FlopCounterMode`` (at batch 1, reported per image; FLOPs are linear in the batch) and the
analytic bound ``1 - (n - |K|)/n * encoder_share``.

Part 2 (``sd-meta``): FLOPs of the public SD1.5 (512 px) and SD2.1 (768 px) UNet architectures,
counted on the meta device (no weights), per image for 50 steps with guidance: plain, FD-5,
FD-10, FD-20 and '50ls'.

Writes ``<out>.csv`` and ``<out>.env.json`` (environment info) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fcr.core import sampler
from fcr.eval.profiling import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SD_TEXT_SEQ_LEN,
    Timer,
    count_flops,
    environment_info,
    peak_memory,
    sampling_flops,
    sampling_flops_ratio,
    sd_unet_on_meta,
    unet_flops,
)
from fcr.backends.generate import sampling_scheduler
from fcr.backends.models import MINILM_HIDDEN_SIZE, build_embedded_unet, build_noise_scheduler

EMBEDDED_SEQ_LEN = 16
EMBEDDED_SHAPE = (1, 32, 32)
GUIDANCE = 4.0
COST_ONLY = "random (cost only)"


@dataclass(frozen=True)
class Config:
    """One sampling configuration: ``keys=None`` is plain sampling."""

    label: str
    schedule: str
    stride: int | None
    keys: tuple[int, ...] | None
    parallel: bool | None


def sampling_configs(steps: int, strides: list[int], with_50ls: bool) -> list[Config]:
    configs = [Config("plain", "plain", None, None, None)]
    # Stride 1: every segment has one step, so parallel and sequential decoding coincide.
    configs.append(Config("FD-1", "uniform", 1, tuple(sampler.key_steps(steps, "uniform", 1)), False))
    schedules = [(f"FD-{s}", "uniform", s, tuple(sampler.key_steps(steps, "uniform", s))) for s in strides]
    if with_50ls:
        schedules.append(("50ls", "50ls", None, tuple(sampler.key_steps(steps, "50ls"))))
    for label, schedule, stride, keys in schedules:
        for parallel in (True, False):
            configs.append(Config(f"{label}-{'par' if parallel else 'seq'}", schedule, stride, keys, parallel))
    return configs


def _run_fn(unet, scheduler, batch: int, steps: int, cfg: Config, device: torch.device):
    gen = torch.Generator("cpu").manual_seed(0)
    # Random conditioning of the right shape: cost measurement only.
    noise = torch.randn(batch, *EMBEDDED_SHAPE, generator=gen).to(device)
    cond = torch.randn(batch, EMBEDDED_SEQ_LEN, MINILM_HIDDEN_SIZE, generator=gen).to(device)
    uncond = torch.randn(1, EMBEDDED_SEQ_LEN, MINILM_HIDDEN_SIZE, generator=gen).to(device)

    def run() -> torch.Tensor:
        return sampler.sample(
            unet,
            scheduler,
            noise,
            cond,
            uncond_hidden_states=uncond,
            guidance_scale=GUIDANCE,
            num_inference_steps=steps,
            key_steps=None if cfg.keys is None else list(cfg.keys),
            parallel=True if cfg.parallel is None else cfg.parallel,
        ).latents

    return run


def bench_embedded(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    unet = build_embedded_unet("base").to(device).eval()  # random weights: cost only
    # The embedded models' own training schedule, configured for sampling as SD's pipelines are.
    scheduler = sampling_scheduler("ddim", build_noise_scheduler())
    per_pass = unet_flops(unet, EMBEDDED_SHAPE, EMBEDDED_SEQ_LEN, batch=1)
    configs = sampling_configs(args.steps, args.strides, not args.no_50ls)

    # FLOPs of a whole sampling call at batch 1 (linear in the batch, so per image at any batch).
    flops: dict[str, int] = {}
    for cfg in configs:
        flops[cfg.label] = count_flops(_run_fn(unet, scheduler, 1, args.steps, cfg, device))
        print(f"  flops {cfg.label:>12}: {flops[cfg.label] / 1e9:8.2f} GFLOP/image", file=sys.stderr)

    rows = []
    for batch in args.batches:
        fns = {cfg.label: _run_fn(unet, scheduler, batch, args.steps, cfg, device) for cfg in configs}
        # Warm-up: one short plain and one short cached call (allocator, kernels, thread pool).
        for cfg in configs[:2]:
            _run_fn(unet, scheduler, batch, min(args.steps, 5), Config("w", "w", 1, (0,), False) if cfg.keys else cfg,
                    device)()
        times: dict[str, list[float]] = {cfg.label: [] for cfg in configs}
        # Process CPU time (all threads) next to wall time: less sensitive to other processes
        # competing for the cores, though not immune (cache, thread-barrier waits).
        cpu_times: dict[str, list[float]] = {cfg.label: [] for cfg in configs}
        spent: dict[str, float] = {cfg.label: 0.0 for cfg in configs}
        for rnd in range(args.repeats):
            # Interleaved rounds; a configuration stops repeating once it used its time budget.
            for cfg in configs:
                if rnd > 0 and spent[cfg.label] > args.budget_s:
                    continue
                cpu0 = time.process_time()
                with Timer(device) as t:
                    fns[cfg.label]()
                cpu_times[cfg.label].append(time.process_time() - cpu0)
                times[cfg.label].append(t.elapsed_s)
                spent[cfg.label] += t.elapsed_s
                print(f"  b={batch} round {rnd} {cfg.label:>12}: {t.elapsed_s:7.2f} s", file=sys.stderr)
        peak: dict[str, float] = {}
        if device.type == "cuda":
            peak = {cfg.label: peak_memory(fns[cfg.label], device) for cfg in configs}
        plain_median = float(pd.Series(times["plain"]).median())
        plain_cpu = float(pd.Series(cpu_times["plain"]).median())
        for cfg in configs:
            ts = pd.Series(times[cfg.label])
            rows.append(
                dict(
                    section="embedded",
                    model="embedded base (random weights)",
                    device=str(device),
                    image="x".join(map(str, EMBEDDED_SHAPE)),
                    seq_len=EMBEDDED_SEQ_LEN,
                    batch=batch,
                    steps=args.steps,
                    guidance=GUIDANCE,
                    config=cfg.label,
                    schedule=cfg.schedule,
                    stride=cfg.stride,
                    parallel=cfg.parallel,
                    num_key_steps=args.steps if cfg.keys is None else len(cfg.keys),
                    unet_gflops_full=per_pass["full"] / 1e9,
                    unet_gflops_encoder=per_pass["encoder"] / 1e9,
                    unet_gflops_decoder=per_pass["decoder"] / 1e9,
                    encoder_share=per_pass["encoder_share"],
                    gflops_per_image=flops[cfg.label] / 1e9,
                    flops_ratio_measured=flops[cfg.label] / flops["plain"],
                    flops_ratio_analytic=sampling_flops_ratio(per_pass["encoder_share"], args.steps, cfg.keys),
                    time_median_s=float(ts.median()),
                    time_min_s=float(ts.min()),
                    time_repeats=len(ts),
                    time_per_image_s=float(ts.median()) / batch,
                    speedup_vs_plain=plain_median / float(ts.median()),
                    cpu_time_median_s=float(pd.Series(cpu_times[cfg.label]).median()),
                    cpu_speedup_vs_plain=plain_cpu / float(pd.Series(cpu_times[cfg.label]).median()),
                    peak_mem_mb=peak.get(cfg.label, float("nan")) / 2**20,  # CUDA only
                    weights=COST_ONLY,
                    conditioning="random normal (cost only)",
                )
            )
    return rows


def bench_sd_meta(steps: int) -> list[dict[str, Any]]:
    rows = []
    schedules = [("plain", "plain", None, None)]
    schedules += [(f"FD-{s}", "uniform", s, sampler.key_steps(steps, "uniform", s)) for s in (5, 10, 20)]
    schedules.append(("50ls", "50ls", None, sampler.key_steps(steps, "50ls")))
    for name, config, px in (("SD1.5", SD15_UNET_CONFIG, 512), ("SD2.1", SD21_UNET_CONFIG, 768)):
        unet = sd_unet_on_meta(config)
        size = config["sample_size"]
        f = unet_flops(unet, (config["in_channels"], size, size), SD_TEXT_SEQ_LEN, batch=1)
        plain = sampling_flops(f, steps, None, guidance=True)
        for label, schedule, stride, keys in schedules:
            total = sampling_flops(f, steps, keys, guidance=True)
            rows.append(
                dict(
                    section="sd-meta",
                    model=f"{name} UNet architecture (meta device, no weights)",
                    device="meta",
                    image=f"4x{size}x{size} ({px} px)",
                    seq_len=SD_TEXT_SEQ_LEN,
                    batch=1,
                    steps=steps,
                    guidance=GUIDANCE,
                    config=label,
                    schedule=schedule,
                    stride=stride,
                    num_key_steps=steps if keys is None else len(keys),
                    unet_gflops_full=f["full"] / 1e9,
                    unet_gflops_encoder=f["encoder"] / 1e9,
                    unet_gflops_decoder=f["decoder"] / 1e9,
                    encoder_share=f["encoder_share"],
                    gflops_per_image=total / 1e9,
                    flops_ratio_measured=total / plain,  # from per-pass counts: k*full + (n-k)*decoder
                    flops_ratio_analytic=sampling_flops_ratio(f["encoder_share"], steps, keys),
                    weights="none (meta)",
                    conditioning="shape only (meta)",
                )
            )
    return rows


def _table(df: pd.DataFrame) -> str:
    cols = [
        "section", "model", "batch", "config", "num_key_steps", "encoder_share", "gflops_per_image",
        "flops_ratio_measured", "flops_ratio_analytic", "time_median_s", "time_repeats",
        "time_per_image_s", "speedup_vs_plain", "cpu_time_median_s", "cpu_speedup_vs_plain",
    ]
    out = df[[c for c in cols if c in df.columns]].copy()
    out["model"] = out["model"].str.split(" ").str[0]
    return out.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: batch 1, 10 steps, 1 repeat")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strides", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--no-50ls", action="store_true", help="skip the '50ls' key steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (configs interleaved)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="a config stops repeating once its timed runs took this long (>= 1 repeat)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/bench_core",
                        help="output path without extension (.csv and .env.json are written)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.steps, args.repeats, args.strides = [1], 10, 1, [5]
        args.no_50ls = True
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    env = environment_info(device)
    started = time.time()
    rows = [] if args.skip_embedded else bench_embedded(args, device)
    rows += bench_sd_meta(50)
    env["load_average_end"] = environment_info(device)["load_average"]
    env["wall_s"] = time.time() - started
    env["args"] = vars(args)
    env["notes"] = (
        "Embedded rows: random UNet weights and random-normal conditioning (cost only; timing and "
        "FLOPs do not depend on them). FLOPs: FlopCounterMode (matmul/conv/attention, 2 per MAC), "
        "counted at batch 1 per image. Times: wall clock per sampling call of the whole batch, "
        "median over rounds; the CPU was shared with other processes (see load_average)."
    )

    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps({k: env[k] for k in ("device_name", "torch_threads", "torch_version", "load_average",
                                          "load_average_end")}))
    print(_table(df))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.env.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
