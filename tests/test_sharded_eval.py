"""Sharded, resumable evaluation: the shard plan, moments merged over shards, a killed run that
resumes, and ``python -m fcr evaluate`` on a tiny SD pipeline built in code (random weights: code
paths only), whose per-image results are the same for one and for two gloo processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from sd_standins import local_metric_weights
from test_sd import RES, tiny_components

from fcr import __main__ as cli
from fcr.backends.embedded.data import TRAIN_TEMPLATES, caption, write_caption_folder
from fcr.backends.generate import generate
from fcr.config import ConfigError, load_options
from fcr.eval.metrics import feature_statistics, frechet_distance
from fcr.eval.results import StaleResultError
from fcr.eval.sd_evaluation import ReferenceSet, set_metrics
from fcr.eval.sharding import FeatureMoments, ShardingError, ShardPlan, gather_shards, run_shards, shard_file

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the plan and the files


@pytest.mark.parametrize("n, shards", [(10, 4), (7, 7), (100, 16), (5, 1)])
def test_shards_cover_every_image_once_and_processes_split_them_evenly(n: int, shards: int) -> None:
    plan = ShardPlan(n, shards)
    ranges = [plan.items(s) for s in range(shards)]
    assert [i for r in ranges for i in r] == list(range(n))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    for world in [w for w in (1, 2, 4, 8) if shards % w == 0]:
        mine = [plan.assigned(rank, world) for rank in range(world)]
        assert sorted(s for m in mine for s in m) == list(range(shards))
        assert len({len(m) for m in mine}) == 1


def test_a_process_count_that_does_not_divide_the_shards_is_refused() -> None:
    with pytest.raises(ShardingError, match="eval_shards=8 is not divisible by the 3 launched processes"):
        ShardPlan(100, 8).assigned(0, 3)
    with pytest.raises(ShardingError, match=r"eval_shards must lie in \[1, 4\]"):
        ShardPlan(4, 5)


def test_moments_merged_over_uneven_blocks_equal_the_whole_set() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(103, 6)) * rng.uniform(0.5, 3, size=6) + rng.normal(size=6)
    merged = FeatureMoments.merged(np.split(features, [1, 40, 41, 90]))
    mean, cov = feature_statistics(features)
    assert merged.count == 103
    # float64 sums of 103 values: round-off far below 1e-10 relative.
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.covariance, cov, rtol=1e-10, atol=1e-12)


def _measure_counting(calls: list[range], fail_at: int | None = None):
    def measure(items: range) -> dict[str, torch.Tensor]:
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        calls.append(items)
        idx = torch.tensor(list(items), dtype=torch.float32)
        return {"value": idx * 2, "pair": torch.stack([idx, -idx], dim=1)}

    return measure


def test_a_killed_run_resumes_from_its_finished_shards(tmp_path: Path) -> None:
    plan, key = ShardPlan(10, 5), {"config": "FD-5", "seed": 0}
    calls: list[range] = []
    with pytest.raises(KeyboardInterrupt):
        run_shards(plan, tmp_path, key, _measure_counting(calls, fail_at=2), range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    # A shard cut short by the kill (and a leftover temporary file) is computed again, not read.
    shard_file(tmp_path, 1).write_bytes(shard_file(tmp_path, 1).read_bytes()[:40])
    (tmp_path / ".shard_00002.safetensors.tmp").write_bytes(b"partial")
    calls.clear()
    assert run_shards(plan, tmp_path, key, _measure_counting(calls), range(5)) == 4
    assert [c.start for c in calls] == [2, 4, 6, 8]
    gathered = gather_shards(plan, tmp_path, key)
    assert torch.equal(gathered["value"], torch.arange(10, dtype=torch.float32) * 2)
    assert gathered["pair"].shape == (10, 2)
    assert run_shards(plan, tmp_path, key, _measure_counting(calls), range(5)) == 0
    with pytest.raises(StaleResultError, match="other parameters"):
        run_shards(plan, tmp_path, {**key, "seed": 1}, _measure_counting(calls), range(5))


def test_gather_names_unfinished_shards(tmp_path: Path) -> None:
    plan, key = ShardPlan(6, 3), {"k": 1}
    run_shards(plan, tmp_path, key, _measure_counting([]), [0, 2])
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] are not finished"):
        gather_shards(plan, tmp_path, key)


def test_set_metrics_merge_fid_statistics_over_shards() -> None:
    rng = np.random.default_rng(1)
    gen, ref = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(50, 8))
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(40, 1008))), dim=1)
    text = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(40, 4))), dim=1)
    per_image = {"inception": torch.from_numpy(gen), "inception_probs": probs, "clip_text": text,
                 "clip_score": torch.from_numpy(rng.uniform(20, 30, size=40))}
    ref_mean, ref_cov = feature_statistics(ref)
    caption_text = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 4))), dim=1)
    reference = ReferenceSet(ref_mean, ref_cov, torch.from_numpy(ref), caption_text, 50)
    out = set_metrics(per_image, reference, shard_sizes=[13, 13, 14], n_bootstrap=20, seed=0)
    assert out["fid"] == pytest.approx(frechet_distance(*feature_statistics(gen), ref_mean, ref_cov), rel=1e-9)
    assert out["n_images"] == 40 and out["inception_score"] >= 1.0
    assert out["clip_score_lo"] <= out["clip_score"] <= out["clip_score_hi"]
    for name in ("precision", "recall", "conditional_precision", "conditional_recall"):
        assert 0.0 <= out[name] <= 1.0, name
    moments_only = set_metrics(per_image, ReferenceSet(ref_mean, ref_cov), shard_sizes=[40], n_bootstrap=20, seed=0)
    assert np.isnan(moments_only["precision"]) and moments_only["fid"] == pytest.approx(out["fid"], rel=1e-9)
    prompts_only = set_metrics(per_image, None, shard_sizes=[40], n_bootstrap=20, seed=0)  # a bare prompt list
    assert np.isnan(prompts_only["fid"]) and prompts_only["inception_score"] == out["inception_score"]


def test_a_shard_of_a_prompt_set_samples_the_images_of_the_whole_set() -> None:
    parts = tiny_components()
    prompts = ["a coat", "a bag", "a sandal", "a shirt", "a boot"]
    kw = dict(seed=4, num_inference_steps=3, guidance_scale=2.0, batch_size=1)
    whole = generate(parts, prompts, **kw).images
    shard = generate(parts, prompts[2:4], first_index=2, **kw).images
    assert torch.equal(shard, whole[2:4])


# ----------------------------------------------------------------------------- python -m fcr evaluate


def _evaluation_params(tmp_path: Path) -> Path:
    model = tiny_components().save_pretrained(tmp_path / "tiny_sd")
    reference = write_caption_folder(tmp_path / "reference", 8, RES)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{caption(i % 10, TRAIN_TEMPLATES[i % 3])}\n" for i in range(6)))
    params = {
        "setting": "sd", "model": str(model), "sweep_models": [str(model)], "eval_prompts": str(prompts),
        "fid_reference": str(reference), **local_metric_weights(tmp_path / "metric_weights"),
        "device": "cpu", "resolution": RES, "mixed_precision": "no", "num_inference_steps": 4, "strides": [1, 2],
        "include_50ls": False, "dpm_reference_steps": 0, "num_eval_images": 6, "eval_batch_size": 2,
        "eval_shards": 4, "seeds": [0], "n_bootstrap": 10, "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "tiny_eval.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(params: Path, run_name: str, processes: int) -> subprocess.CompletedProcess:
    """``python -m fcr evaluate`` in one process, or under ``torchrun`` in ``processes``."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd = [sys.executable, *launcher, "-m", "fcr", "evaluate", "-f", str(params), "--set", f"run_name={run_name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three subprocess evaluations of a tiny SD pipeline, one of them with 2 gloo processes
def test_two_processes_give_the_per_image_results_of_one(tmp_path: Path) -> None:
    params = _evaluation_params(tmp_path)
    one, two = _run(params, "one", 1), _run(params, "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("configurations x seeds, 2 process(es)") == 1  # process 0 reports, once
    out = tmp_path / "out"
    shards = sorted(p.relative_to(out / "one") for p in (out / "one" / "evaluation" / "shards").rglob("*.safetensors"))
    assert len(shards) == 2 * 4  # full and FD-2, 4 shards each
    for rel in shards:  # the same shards, computed by different processes: the same images, bit for bit
        a, b = load_file(str(out / "one" / rel)), load_file(str(out / "two" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    import pandas as pd

    qa, qb = (pd.read_csv(out / name / "evaluation" / "quality.csv").set_index("config") for name in ("one", "two"))
    for column in ("fid", "inception_score", "clip_score", "precision", "conditional_precision"):
        assert qa[column].to_dict() == qb[column].to_dict(), column
    assert set(qb["processes"]) == {2} and qa["fid"].notna().all() and qa["conditional_recall"].notna().all()

    # A run killed after some shards resumes: delete one finished shard and the results; only that
    # shard is sampled again and the table comes back the same.
    (out / "two" / shards[0]).unlink()
    for result in (out / "two" / "evaluation" / "quality").glob("*"):
        result.unlink()
    again = _run(params, "two", 1)
    assert again.returncode == 0, again.stderr[-3000:]
    qc = pd.read_csv(out / "two" / "evaluation" / "quality.csv").set_index("config")
    assert qc["fid"].to_dict() == qa["fid"].to_dict()


def test_evaluate_refuses_a_process_count_that_does_not_divide_the_shards(tmp_path: Path, monkeypatch) -> None:
    from fcr.experiments.sharded_eval import evaluate_sharded
    from fcr.experiments.sweep import model_labels

    params = _evaluation_params(tmp_path)
    opts = load_options(params, overrides={"run_name": "bad"})
    with pytest.raises(ConfigError, match="parameter 'eval_shards'.*not divisible by the 3 launched processes"):
        evaluate_sharded(opts, model_labels(opts.sweep.sweep_models), rank=0, world=3, progress=False)
    assert not (tmp_path / "out" / "bad" / "evaluation" / "shards").exists()


def test_evaluate_is_for_stable_diffusion(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert cli.main(["evaluate", "-f", "params/fashion_mnist.yaml", "-f", "params/smoke.yaml"]) == 2
    assert "the embedded setting has no 'evaluate' task" in capsys.readouterr().err


# ----------------------------------------------------------------------------- protocols


def _coco_files(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    """A COCO-format captions file over n real Fashion-MNIST test images saved as JPEGs of odd sizes."""
    import json

    from PIL import Image

    from fcr.backends.embedded.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    folder = tmp_path / "val2017"
    folder.mkdir()
    entries, annotations = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        Image.fromarray(images[i]).convert("RGB").resize((40 + 4 * i, 30)).save(folder / name)
        entries.append({"id": 100 + i, "file_name": name})
        for j in range(2):
            annotations.append({"id": 10 * i + j, "image_id": 100 + i,
                                "caption": caption(int(labels[i]), TRAIN_TEMPLATES[j]) + "\n"})
    captions = tmp_path / "captions_val2017.json"
    captions.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return captions, folder


def test_coco_protocol_writes_prompts_and_captioned_reference_images_in_one_order(tmp_path: Path) -> None:
    from PIL import Image

    from fcr.backends.sd.protocols import main as protocols_main

    captions, images = _coco_files(tmp_path)
    out = tmp_path / "coco"
    assert protocols_main(["--captions", str(captions), "--images", str(images), "--out", str(out), "--n", "4",
                           "--resolution", "16"]) == 0
    prompts = (out / "prompts.txt").read_text().splitlines()
    written = sorted((out / "images").glob("*.png"))
    assert len(prompts) == len(written) == 4
    for k, path in enumerate(written):
        assert Image.open(path).size == (16, 16)
        assert path.with_suffix(".txt").read_text().strip() == prompts[k]  # the caption of that very image
    first = written[0].stat().st_mtime_ns
    assert protocols_main(["--captions", str(captions), "--images", str(images), "--out", str(out), "--n", "4",
                           "--resolution", "16"]) == 0
    assert written[0].stat().st_mtime_ns == first  # resumed: kept, not rewritten
    assert protocols_main(["--captions", str(captions), "--images", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


@pytest.mark.parametrize("protocol", ["coco30k", "coco5k", "prompt_list"])
def test_protocol_parameter_files_validate_on_every_backbone(protocol: str, tmp_path: Path) -> None:
    params = load_options(REPO / "params" / "sd15.yaml", REPO / "params" / "eval" / f"{protocol}.yaml")
    assert params.evaluation.eval_shards <= params.evaluation.num_eval_images
    plan = ShardPlan(params.evaluation.num_eval_images, params.evaluation.eval_shards)
    for processes in (1, 2, 4, 8, 16):  # the usual GPU counts share the shards evenly
        assert len(plan.assigned(processes - 1, processes)) == plan.num_shards // processes


def test_bad_prompt_files_fail_with_one_line(tmp_path: Path) -> None:
    from fcr.backends.checks import check_task

    model = tiny_components().save_pretrained(tmp_path / "tiny_sd")
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("")
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    opts = load_options(REPO / "params" / "sd15.yaml", REPO / "params" / "eval" / "prompt_list.yaml", overrides={
        "model": str(model), "sweep_models": [str(model)], "resolution": RES, "num_eval_images": 2, "eval_shards": 2})
    from fcr.backends.sd.params import sd_eval_prompts

    with pytest.raises(ConfigError, match=r"parameter 'eval_prompts': .*empty\.txt: empty"):
        sd_eval_prompts(opts.with_flat(eval_prompts=str(empty)), 2, 0)
    with pytest.raises(ConfigError, match=r"parameter 'eval_prompts': .*not UTF-8 text \(byte 0xe9 at offset 3\)"):
        sd_eval_prompts(opts.with_flat(eval_prompts=str(latin)), 2, 0)
    with pytest.raises(ConfigError, match="parameter 'fid_reference': 'no-such-stats' is neither a folder"):
        check_task(opts.with_flat(eval_prompts=str(latin), fid_reference="no-such-stats"), "evaluate")
