"""FLOP bounds of DeepCache next to Faster Diffusion's encoder caching (issue #13, item 3).

For the embedded ``base`` / ``base-v`` UNets (1x32x32, 16 tokens) and the public SD1.5 (512 px) /
SD2.1 (768 px) UNet architectures, all on the meta device (no weights, no compute): FLOPs of one
full UNet pass, of the encoder (FD's share) and of DeepCache's shallow path at skip branches 0-3 (those the UNet has)
(``fcr.eval.profiling.deep_cache_flops``), counted with ``torch.utils.flop_counter``. Per sampling
configuration of 50 steps (guidance doubles every pass alike, so ratios do not depend on it): the
FLOPs relative to plain sampling and the FLOP speed-up over FD-5 (the seed's criterion b asks
>= 1.4x at equal quality and <= 2 % extra memory). FLOPs only: wall time and quality are measured
elsewhere.

    python benchmarks/bench_deep_cache_flops.py [--out benchmarks/results/deep_cache_flops]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from fcr.core.sampler import key_steps
from fcr.eval.profiling import (
    SD15_UNET_CONFIG,
    SD21_UNET_CONFIG,
    SD_TEXT_SEQ_LEN,
    deep_cache_flops,
    deep_cache_flops_ratio,
    environment_info,
    sampling_flops_ratio,
    sd_unet_on_meta,
    unet_flops,
)
from fcr.backends.models import embedded_unet_config

STEPS = 50


def _architectures():
    for name in ("base", "base-v"):
        with torch.device("meta"):
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel(**embedded_unet_config(name, 32)).eval()
        yield f"embedded {name}", unet, (1, 32, 32), 16
    for name, config, px in (("SD1.5", SD15_UNET_CONFIG, 512), ("SD2.1", SD21_UNET_CONFIG, 768)):
        size = config["sample_size"]
        yield f"{name} ({px} px)", sd_unet_on_meta(config), (config["in_channels"], size, size), SD_TEXT_SEQ_LEN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/deep_cache_flops")
    args = parser.parse_args()
    rows = []
    for arch, unet, shape, seq_len in _architectures():
        share = unet_flops(unet, shape, seq_len)["encoder_share"]
        fd5 = sampling_flops_ratio(share, STEPS, key_steps(STEPS, "uniform", 5))
        configs = [("plain", None, None, 1.0)]
        configs += [(f"FD-{s}", "encoder", None, sampling_flops_ratio(share, STEPS, key_steps(STEPS, "uniform", s)))
                    for s in (5, 10, 20)]
        for branch in (0, 1, 2, 3):  # DeepCacheSDHelper's cache_branch_id: block id // 3, layer id % 3
            try:
                shallow = deep_cache_flops(unet, shape, seq_len, branch)["shallow_share"]
            except ValueError:  # e.g. embedded up blocks have 2 resnets: no layer 2
                continue
            configs += [(f"DeepCache-{n} (branch {branch})", "deep", branch,
                         deep_cache_flops_ratio(shallow, STEPS, key_steps(STEPS, "uniform", n))) for n in (2, 3, 5, 10)]
        for name, cache, branch, ratio in configs:
            rows.append({"architecture": arch, "config": name, "cache": cache or "none", "branch": branch,
                         "steps": STEPS, "flops_vs_plain": ratio, "flop_speedup_vs_fd5": fd5 / ratio,
                         "encoder_share": share})
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".env.json").write_text(json.dumps(environment_info("cpu"), indent=1, default=str))
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
