"""Throughput of the sharded evaluation (``python -m fcr evaluate``) with 1 and with 2 processes.

A tiny SD-architecture pipeline with random weights (``gpu_readiness.random_sd_components(tiny=True)``),
real Fashion-MNIST images as the FID reference, tiny random metric networks: this measures the code
path's scaling on the machine (sampling, shard files, the gather), not Stable Diffusion's cost and no
quality. Each process runs with one torch thread, so 2 processes on 2 cores is the comparison that
matters; the wall time of the whole command (start-up and gather included) is recorded, median of
``--repeats`` runs interleaved 1, 2, 1, 2, ...

    python benchmarks/bench_sharded_eval.py --out benchmarks/results/bench_sharded_eval_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_readiness import metric_weights, random_sd_components, write_images  # noqa: E402

from fcr.backends.embedded.data import TRAIN_TEMPLATES, caption  # noqa: E402
from fcr.eval.profiling import environment_info  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(params: Path, processes: int, out: Path) -> float:
    """Wall seconds of one whole evaluation into an empty ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *launcher, "-m", "fcr", "evaluate", "-f", str(params), "--set",
                           f"output_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"evaluation with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="prompts per configuration")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/bench_sharded_eval_cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fcr-bench-eval-"))
    model = random_sd_components(tiny=True).save_pretrained(work / "tiny_sd")
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"{caption(i % 10, TRAIN_TEMPLATES[i % 3])}\n" for i in range(args.images)))
    strides = [1, 5]
    params = {"setting": "sd", "model": str(model), "sweep_models": [str(model)], "eval_prompts": str(prompts),
              "fid_reference": str(write_images(work / "reference", 16, 32)), **metric_weights(work / "metrics", tiny=True),
              "device": "cpu", "resolution": 32, "mixed_precision": "no", "num_inference_steps": 10, "strides": strides,
              "include_50ls": False, "dpm_reference_steps": 0, "num_eval_images": args.images, "eval_batch_size": 2,
              "eval_shards": 8, "seeds": [0], "n_bootstrap": 10, "run_name": "bench", "data_dir": str(work / "data")}
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    times: dict[int, list[float]] = {1: [], 2: []}
    run_once(path, 1, work / "warmup")  # the FID reference statistics are cached in data_dir: not timed
    for _ in range(args.repeats):
        for processes in (1, 2):
            times[processes].append(run_once(path, processes, work / f"out{processes}"))
    images = args.images * len(strides)
    rows = [{"processes": p, "images": images, "wall_s_median": statistics.median(t), "wall_s_all": json.dumps(t),
             "images_per_s": images / statistics.median(t)} for p, t in times.items()]
    for row in rows:
        row["speedup_vs_1"] = rows[0]["wall_s_median"] / row["wall_s_median"]
        row["weights"] = "random tiny SD architecture (code-path cost only)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(f"{out}.csv", index=False)
    Path(f"{out}.env.json").write_text(json.dumps(environment_info("cpu"), indent=2))
    print(pd.DataFrame(rows).to_string(index=False))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
