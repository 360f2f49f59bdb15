"""The seed's other domains on tiny models built in code (random weights: code paths only, never
results): SD in-painting (9-channel UNet) and depth-to-image (5-channel UNet) against diffusers' own
pipelines, with encoder caching, DeepCache and FCR fine-tuning; a latent video UNet
(``UNet3DConditionModel``) with its encoder/decoder split, cached sampling and the FCR loss."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_sd15_unet
from diffusers import (
    DDIMScheduler,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from equivalence import assert_float32_equivalent
from test_sd import RES, tiny_components

from fcr.backends.embedded.data import write_caption_folder
from fcr.backends.inpainting import random_masks
from fcr.backends.sd.domains import (
    DepthTrainData,
    InpaintingTrainData,
    check_domain_unet,
    depth_condition,
    image_latents,
    inpainting_condition,
)
from fcr.backends.sd.model import encode_prompts, load_train_items
from fcr.core.loss import FCRConfig, fcr_training_loss
from fcr.core.sampler import key_steps, sample
from fcr.core.unet import UnsupportedUNetError, decode, encode
from fcr.train.loop import TrainConfig, train

STEPS, GUIDANCE = 6, 3.0


def _domain_parts(in_channels: int):
    parts = tiny_components()
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**tiny_sd15_unet(RES // 8).config, "in_channels": in_channels}).eval()
    return parts, unet


def _images(n: int = 2) -> torch.Tensor:
    from fcr.backends.embedded.data import load_fashion_mnist

    pixels = torch.from_numpy(load_fashion_mnist("test")[0][:n]).float() / 127.5 - 1.0  # real images
    return torch.nn.functional.interpolate(pixels[:, None], size=(RES, RES), mode="bilinear").repeat(1, 3, 1, 1)


def _states(parts, prompts: list[str]):
    return (encode_prompts(parts.tokenizer, parts.text_encoder, prompts, torch.device("cpu")),
            encode_prompts(parts.tokenizer, parts.text_encoder, [""], torch.device("cpu")))


@torch.no_grad()
def test_inpainting_sampler_is_diffusers_inpaint_pipeline_and_caches() -> None:
    parts, unet = _domain_parts(9)
    images, prompts = _images(), ["a coat", "a sandal"]
    masks = random_masks([0, 1], RES, seed=3)
    condition = inpainting_condition(parts.vae, images, masks)
    assert condition.shape == (2, 5, RES // 8, RES // 8) and set(condition[:, 0].unique().tolist()) <= {0.0, 1.0}
    check_domain_unet(unet, "inpainting")
    noise = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = _states(parts, prompts)
    scheduler = DDIMScheduler.from_config(parts.scheduler_config)
    kw = dict(uncond_hidden_states=uncond, guidance_scale=GUIDANCE, num_inference_steps=STEPS, channel_condition=condition)
    ours = sample(unet, scheduler, noise, cond, **kw).latents

    pipe = StableDiffusionInpaintPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                          unet=unet, scheduler=DDIMScheduler.from_config(parts.scheduler_config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, image=images, mask_image=masks, masked_image_latents=condition[:, 1:],
                  latents=noise, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=RES, width=RES,
                  output_type="latent").images
    assert_float32_equivalent(ours, theirs)

    every = sample(unet, scheduler, noise, cond, key_steps=range(STEPS), **kw).latents  # FD-1: the same maths
    assert_float32_equivalent(every, ours)
    cached = sample(unet, scheduler, noise, cond, key_steps=key_steps(STEPS, "uniform", 2), **kw)
    deep = sample(unet, scheduler, noise, cond, key_steps=key_steps(STEPS, "uniform", 2), deep_cache_branch=0, **kw)
    assert cached.stats.encoder_passes == 3 and deep.stats.shallow_passes == 3
    assert not torch.equal(cached.latents, ours) and not torch.equal(deep.latents, ours)


@torch.no_grad()
def test_depth_to_image_sampler_is_diffusers_depth2img_pipeline() -> None:
    parts, unet = _domain_parts(5)
    images, prompts, strength = _images(), ["a coat", "a sandal"], 0.7
    depth = images[:, 0] + torch.linspace(0, 1, RES)[None, :, None]  # a depth map we hand the pipeline
    pipe = StableDiffusionDepth2ImgPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                            unet=unet, scheduler=DDIMScheduler.from_config(parts.scheduler_config),
                                            depth_estimator=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, image=images, depth_map=depth, strength=strength, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(5), output_type="latent").images

    gen = torch.Generator().manual_seed(5)  # the pipeline's draws in its order: posterior sample, then noise
    start = image_latents(parts.vae, images, gen)
    noise = randn_tensor(start.shape, generator=gen)
    cond, uncond = _states(parts, prompts)
    kw = dict(uncond_hidden_states=uncond, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
              channel_condition=depth_condition(depth, (RES // 8, RES // 8)), image_latents=start, strength=strength)
    scheduler = DDIMScheduler.from_config(parts.scheduler_config)
    ours = sample(unet, scheduler, noise, cond, **kw)
    assert ours.stats.unet_passes == int(STEPS * strength)
    assert_float32_equivalent(ours.latents, theirs)
    cached = sample(unet, scheduler, noise, cond, key_steps=[0, 2], **kw)  # key steps count from the first step run
    assert cached.stats.encoder_passes == 2 and cached.stats.decoder_steps == int(STEPS * strength)


def test_domain_inputs_refuse_bad_shapes_in_one_line() -> None:
    parts, unet = _domain_parts(9)
    images = _images()
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 16, 16\) does not fit images of shape \(2, 3, 32, 32\)"):
        inpainting_condition(parts.vae, images, torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match="depth2img needs a UNet with 5 input channels; this one has 9"):
        check_domain_unet(unet, "depth2img")
    with pytest.raises(ValueError, match="a depth map is constant"):
        depth_condition(torch.ones(1, RES, RES), (4, 4))
    with pytest.raises(ValueError, match="channel_condition has shape"):
        sample(unet, DDIMScheduler.from_config(parts.scheduler_config), torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32),
               num_inference_steps=2, channel_condition=torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="strength < 1 needs image_latents"):
        sample(unet, DDIMScheduler.from_config(parts.scheduler_config), torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32),
               num_inference_steps=2, strength=0.5)


def test_masks_depend_on_the_example_not_the_batch() -> None:
    both = random_masks([4, 9], 32, seed=0)
    assert torch.equal(random_masks([9], 32, seed=0)[0], both[1])
    frac = both.mean(dim=(1, 2, 3))
    assert bool(((frac >= 0.25**2 - 0.01) & (frac <= 0.6**2 + 0.01)).all())


@pytest.mark.slow
def test_inpainting_fcr_fine_tune_end_to_end(tmp_path: Path) -> None:
    parts, unet = _domain_parts(9)
    items = load_train_items(str(write_caption_folder(tmp_path / "images", 4, RES)))
    data = InpaintingTrainData(items, parts.vae, parts.tokenizer, parts.text_encoder, RES, mask_seed=1)
    x0, states, condition = data.batch(torch.tensor([0, 3]), torch.tensor([False, True]), torch.Generator().manual_seed(0))
    assert x0.shape == (2, 4, 4, 4) and states.shape[0] == 2 and condition.shape == (2, 5, 4, 4)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cfg = TrainConfig(train_batch_size=2, max_train_steps=2, checkpoint_every=2, log_every=1, learning_rate=1e-3)
    result = train(unet.train(), parts.noise_scheduler, data, cfg, FCRConfig(lambda_fcr=0.1, delta_max=2, sampling_steps=10),
                   tmp_path / "run", progress=False)
    log = pd.read_csv(result.log_path)
    assert result.last_step == 2 and list(log["step"]) == [1, 2] and bool((log["fcr"] > 0).all())
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert (result.unet_dir / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_depth_to_image_fcr_fine_tune_end_to_end(tmp_path: Path) -> None:
    parts, unet = _domain_parts(5)
    items = load_train_items(str(write_caption_folder(tmp_path / "images", 4, RES)))
    # A stand-in for the depth estimator (code path only): distance from the image's top edge plus brightness.
    depth_of = lambda pixels: pixels.mean(1) + torch.linspace(0, 1, pixels.shape[-2])[None, :, None]  # noqa: E731
    data = DepthTrainData(items, parts.vae, parts.tokenizer, parts.text_encoder, RES, depth_of=depth_of)
    x0, _, depth = data.batch(torch.tensor([1, 2]), torch.tensor([False, False]), torch.Generator().manual_seed(0))
    assert depth.shape == (2, 1, 4, 4) and float(depth.min()) == -1.0 and float(depth.max()) == 1.0
    cfg = TrainConfig(train_batch_size=2, max_train_steps=2, checkpoint_every=2, log_every=1, learning_rate=1e-3)
    result = train(unet.train(), parts.noise_scheduler, data, cfg, FCRConfig(lambda_fcr=0.1, delta_max=2, sampling_steps=10),
                   tmp_path / "run", progress=False)
    assert result.last_step == 2 and bool((pd.read_csv(result.log_path)["fcr"] > 0).all())


# ----------------------------------------------------------------------------- latent video UNet


def tiny_video_unet() -> UNet3DConditionModel:
    torch.manual_seed(0)
    return UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).eval()


@torch.no_grad()
def test_video_unet_split_is_its_forward_and_caches() -> None:
    unet = tiny_video_unet()
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 3, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    for t in (torch.tensor(500), torch.tensor([10, 900])):
        assert_float32_equivalent(decode(unet, encode(unet, x, t, ctx), t, ctx), unet(x, t, ctx).sample)
    features = encode(unet, x, torch.tensor(500), ctx)
    assert features.num_frames == 3 and features.batch_size == 2

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    kw = dict(uncond_hidden_states=torch.zeros(1, 5, 16), guidance_scale=GUIDANCE, num_inference_steps=STEPS)
    plain = sample(unet, scheduler, x, ctx, **kw).latents
    assert_float32_equivalent(sample(unet, scheduler, x, ctx, key_steps=range(STEPS), **kw).latents, plain)
    parallel = sample(unet, scheduler, x, ctx, key_steps=[0, 3], parallel=True, **kw)
    sequential = sample(unet, scheduler, x, ctx, key_steps=[0, 3], parallel=False, **kw)
    assert parallel.stats.decoder_passes == 2 and sequential.stats.decoder_passes == STEPS
    assert_float32_equivalent(parallel.latents, sequential.latents)
    assert not torch.equal(parallel.latents, plain)

    with pytest.raises(ValueError, match=r"a video UNet takes latents \(batch, channels, frames, height, width\); "
                                         r"got image-shaped latents \(2, 4, 8, 8\)"):
        sample(unet, scheduler, x[:, :, 0], ctx, **kw)
    with pytest.raises(UnsupportedUNetError, match="DeepCache's split is implemented for image UNets"):
        sample(unet, scheduler, x, ctx, key_steps=[0, 3], deep_cache_branch=0, **kw)


def test_fcr_loss_on_a_video_unet() -> None:
    unet = tiny_video_unet().train()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    x0, ctx = torch.randn(2, 4, 3, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    parts = fcr_training_loss(unet, scheduler, x0, ctx, FCRConfig(lambda_fcr=0.1, delta_max=2, sampling_steps=10),
                              torch.Generator().manual_seed(1))
    assert float(parts.fcr) > 0 and torch.equal(parts.total, parts.denoise + 0.1 * parts.fcr)
    parts.total.backward()
    assert unet.transformer_in.proj_in.weight.grad is not None
    assert unet.conv_out.weight.grad is not None and float(unet.conv_out.weight.grad.abs().sum()) > 0
