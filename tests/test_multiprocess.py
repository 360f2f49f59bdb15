"""Data-parallel training through the real CLI: two CPU processes under torchrun form one gloo
group (one run, effective batch 2 x train_batch_size), and a launch that did not form a group is
refused instead of running independent copies that write the same folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fcr import __main__ as cli
from fcr.core.loss import FCRConfig
from fcr.backends.embedded.model import EmbeddedTrainData, prepare_embedded_data
from fcr.backends.models import build_embedded_unet, build_noise_scheduler
from fcr.train.loop import DistributedSetupError, TrainConfig, batch_indices, train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embedded_data")
    try:
        prepare_embedded_data(folder)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out: Path, data: Path) -> list[str]:
    """``fcr train`` on the smoke parameters (2 steps, batch 8 per process, a checkpoint every step)."""
    return ["train", "-f", "params/fashion_mnist.yaml", "-f", "params/smoke.yaml",
            "--set", f"output_dir={out}", "--set", f"data_dir={data}"]


def _launch_two(out: Path, data: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m fcr train ...``: the documented multi-process command."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "fcr", *_args(out, data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # launches 2 gloo processes, twice
def test_two_processes_resume_and_train_one_data_parallel_run(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 1 in this (single) process through the CLI, then the same run folder twice: one copy
    # resumed by two processes, the other by one process. Subprocess launches are what cost time.
    monkeypatch.chdir(REPO)
    assert cli.main([*_args(tmp_path / "two", data_dir), "--stop-after", "1"]) == 0
    run, alone = tmp_path / "two" / "smoke", tmp_path / "one" / "smoke"
    shutil.copytree(run, alone)
    launched = _launch_two(tmp_path / "two", data_dir)
    assert cli.main(_args(tmp_path / "one", data_dir)) == 0

    config = json.loads((run / "train_config.json").read_text())
    assert config["processes"] == 2 and config["distributed_type"] == "DistributedType.MULTI_CPU"
    # Gradients were all-reduced: both processes (each on its own shard) ended with the same weights.
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas["backend"] == "gloo" and len(replicas["param_checksums"]) == 2
    assert replicas["param_checksums"][0] == replicas["param_checksums"][1]
    # One run that resumed: the final weights once, one log row per step, one summary line.
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("unet")) == ["unet"]
    with (run / "train_log.csv").open() as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2]
    assert launched.stdout.count("finished at step 2") == 1
    # Step 2 saw 2 x 8 examples: not what one process (or two independent copies of it) computes.
    two = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    one = load_file(str(alone / "unet" / "diffusion_pytorch_model.safetensors"))
    assert two.keys() == one.keys()
    assert any(not torch.equal(two[k], one[k]) for k in two)
    assert not (alone / "replicas.json").exists()


def test_processes_draw_disjoint_shards_of_one_global_batch() -> None:
    shards = [batch_indices(100, 16, micro_step=3, seed=0, rank=r, local_batch=8) for r in range(2)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    single = batch_indices(100, 8, micro_step=3, seed=0, rank=0, local_batch=8)
    assert not torch.equal(single, shards[0])  # the global batch (and so the step) differs from one process


def _tiny_data(n: int = 16) -> EmbeddedTrainData:
    gen = torch.Generator().manual_seed(0)
    return EmbeddedTrainData(torch.rand(n, 1, 32, 32, generator=gen) * 2 - 1, torch.arange(n) % 10,
                             torch.randn(10, 4, 384, generator=gen), torch.zeros(4, 384))


def test_launch_without_a_process_group_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    single = Accelerator()  # this test process: one process, no group
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher would set it for two processes
    torch.manual_seed(0)
    with pytest.raises(DistributedSetupError, match="started 2 processes but accelerate sees 1"):
        train(build_embedded_unet("base"), build_noise_scheduler(), _tiny_data(),
              TrainConfig(train_batch_size=4, max_train_steps=1), FCRConfig(), tmp_path / "run",
              accelerator=single, progress=False)
    assert not (tmp_path / "run").exists()

    # The CLI refuses before writing anything (its process state is already the single-process one).
    code = cli.main(["train", "-f", str(REPO / "params/fashion_mnist.yaml"), "-f", str(REPO / "params/smoke.yaml"),
                     "--set", f"output_dir={tmp_path / 'cli'}", "--set", f"data_dir={tmp_path / 'data'}"])
    assert code == 3
    assert not (tmp_path / "cli").exists() and not (tmp_path / "data").exists()
