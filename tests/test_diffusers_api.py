"""Tests of fcr.diffusers_cache: encoder caching through a stock diffusers StableDiffusionPipeline.

Tiny SD-like pipelines (random weights, 32 px, 4x4 latents) are built in code, saved with
``save_pretrained`` and loaded back with ``StableDiffusionPipeline.from_pretrained``: SD1.5-like
(epsilon) and SD2.1-like (v_prediction). References come from the stock pipeline and from
:func:`fcr.core.sampler.sample`.

Tolerance: the cached pipeline runs the encoder/decoder split (and, with ``parallel``, batched
decoders) where the stock pipeline runs ``unet.forward``; those are different float32 computations
that may sum in another order, so they agree to rounding, not bit for bit on every machine (here
they happen to be equal). They are compared with the project's one float32-equivalence tolerance
(``tests/equivalence.py``: 1e-5 of the largest magnitude, ~84 float32 eps), while every real change
tested here (stride 3 instead of 1, prior noise on/off, another conditioning) moves the latents by
more than 1e-4 relative L2 (``rel_l2``), most by more than 1e-2. The same computation twice (same
seed; disabled vs never enabled; fcr.core.sampler vs the stock pipeline, the same calls in the same
order) is compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_sd15_unet, tiny_sd21_unet
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from equivalence import assert_float32_equivalent
from PIL import Image
from test_sd import SD15_SCHEDULER_CONFIG, tiny_components, tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel

import fcr.diffusers_cache as fc
from fcr.core.sampler import PriorNoise, build_scheduler, key_steps, sample
from fcr.core.unet import UnsupportedUNetError
from fcr.backends.models import ModelNotFoundError

RES = 32
STEPS = 8
PROMPT = "a red coat"
CONFIGS = {
    "sd15": dict(SD15_SCHEDULER_CONFIG),
    "sd21": {**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"},
}
SCHEDULERS = ["ddim", "dpmsolver++"]


def equivalent(actual, expected, what: object) -> None:
    """assert_float32_equivalent, saying which case failed."""
    try:
        assert_float32_equivalent(torch.as_tensor(actual), torch.as_tensor(expected))
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    return float((actual - expected).norm() / expected.norm())


def _text_encoder(hidden_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tiny_tokenizer()), hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def _save_pipe(kind: str, folder) -> None:
    with torch.random.fork_rng(devices=[]):  # tiny_components seeds the global generator
        _build_pipe(kind).save_pretrained(folder)


def _build_pipe(kind: str) -> StableDiffusionPipeline:
    parts = tiny_components(seed=0)
    unet, text_encoder = parts.unet, parts.text_encoder
    if kind == "sd21":  # linear projections, per-block head dims, cross-attention dim 48
        unet, text_encoder = tiny_sd21_unet(sample_size=RES // 8).eval(), _text_encoder(48)
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=unet,
                                   scheduler=build_scheduler("ddim", **CONFIGS[kind]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _load_pipe(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in CONFIGS:
        out[kind] = tmp_path_factory.mktemp(f"pipe_{kind}")
        _save_pipe(kind, out[kind])
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: _load_pipe(folder) for kind, folder in folders.items()}


@pytest.fixture
def pipe_of(pipes):
    """``pipe_of(kind, scheduler_name)``: the shared pipeline with a fresh scheduler; caching is
    disabled again after the test."""
    used = []

    def get(kind: str, scheduler_name: str = "ddim") -> StableDiffusionPipeline:
        pipe = pipes[kind]
        fc.disable_encoder_cache(pipe)
        pipe.scheduler = build_scheduler(scheduler_name, **CONFIGS[kind])
        used.append(pipe)
        return pipe

    yield get
    for pipe in used:
        fc.disable_encoder_cache(pipe)


def z_T(pipe, batch: int = 1, seed: int = 0) -> torch.Tensor:
    shape = (batch, pipe.unet.config.in_channels, RES // 8, RES // 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def call(pipe, noise: torch.Tensor | None = None, *, steps: int = STEPS, guidance: float = 3.0, seed: int = 0,
         output_type: str = "latent", **kwargs):
    """One pipeline call with seeded noise (``latents=noise`` when given)."""
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
                generator=torch.Generator().manual_seed(seed), latents=noise, output_type=output_type,
                **kwargs).images


def reference(pipe, scheduler_name: str, kind: str, noise: torch.Tensor, *, steps: int = STEPS,
              guidance: float = 3.0, **kwargs) -> torch.Tensor:
    """fcr.core.sampler.sample with the pipeline's UNet and text states, a fresh scheduler and z_T."""
    assert fc.encoder_cache_settings(pipe) is None  # the plain UNet forward
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, guidance > 1)
    return sample(pipe.unet, build_scheduler(scheduler_name, **CONFIGS[kind]), noise, cond,
                  uncond_hidden_states=uncond, guidance_scale=guidance, num_inference_steps=steps,
                  **kwargs).latents


# ---------------------------------------------------------------- 1. parity at stride 1


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_stride1_matches_stock_pipeline(pipe_of, kind, scheduler_name):
    pipe = pipe_of(kind, scheduler_name)
    stock = {out: call(pipe, output_type=out) for out in ("latent", "np")}
    fc.enable_encoder_cache(pipe, stride=1)
    for out in ("latent", "np"):
        equivalent(call(pipe, output_type=out), stock[out], out)
    assert fc.encoder_cache_stats(pipe).encoder_steps == list(range(STEPS))
    fc.enable_encoder_cache(pipe, stride=3)  # the test can fail: caching does change the result
    assert rel_l2(call(pipe), stock["latent"]) > 1e-3
    assert fc.encoder_cache_stats(pipe).encoder_steps == [0, 3, 6]


# ---------------------------------------------------------------- 2. fcr.core.sampler == stock pipeline


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_sampler_matches_stock_pipeline(pipe_of, kind, scheduler_name):
    # The same UNet calls, guidance and scheduler steps in the same order: bit-identical here
    # (a different machine could only differ by float32 rounding).
    pipe = pipe_of(kind, scheduler_name)
    noise = z_T(pipe, seed=3)
    for guidance in (3.0, 1.0):
        expected = call(pipe, noise, guidance=guidance)
        assert torch.equal(reference(pipe, scheduler_name, kind, noise, guidance=guidance), expected), guidance


# ---------------------------------------------------------------- 3. cached pipe == cached fcr.core.sampler


SETTINGS = [  # (enable_encoder_cache kwargs, steps, guidance)
    (dict(stride=3), STEPS, 3.0),
    (dict(stride=2, parallel=True), STEPS, 3.0),
    (dict(key_steps=[0, 1, 2, 5]), STEPS, 3.0),
    (dict(key_steps="50ls", parallel=True), 11, 3.0),  # 50ls scaled to 11 steps: [0, 1, 2, 3, 6, 8]
    (dict(stride=3, prior_noise=True), STEPS, 3.0),
    (dict(key_steps=[0, 4], parallel=True, prior_noise=PriorNoise(True, alpha=0.05, threshold=0.7)), STEPS, 3.0),
    (dict(stride=4), 11, 1.0),  # no classifier-free guidance
]


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_cached_pipeline_matches_sampler(pipe_of, kind, scheduler_name):
    pipe = pipe_of(kind, scheduler_name)
    noise = z_T(pipe, seed=5)
    expected = []
    for settings, steps, guidance in SETTINGS:
        schedule = settings.get("key_steps", "uniform")
        keys = key_steps(steps, schedule, settings.get("stride", 1))
        prior = settings.get("prior_noise", False)
        prior = prior if isinstance(prior, PriorNoise) else PriorNoise(enabled=prior)
        expected.append(reference(pipe, scheduler_name, kind, noise, steps=steps, guidance=guidance,
                                  key_steps=keys, parallel=settings.get("parallel", False), prior_noise=prior))
    no_prior = reference(pipe, scheduler_name, kind, noise, key_steps=key_steps(STEPS, "uniform", 3), parallel=False)
    assert rel_l2(expected[4], no_prior) > 1e-4  # prior noise does change the result
    assert key_steps(11, "50ls") == [0, 1, 2, 3, 6, 8]
    # One enabled pipeline, settings replaced and step counts changed from call to call.
    for (settings, steps, guidance), want in zip(SETTINGS, expected):
        fc.enable_encoder_cache(pipe, **settings)
        got = call(pipe, noise, steps=steps, guidance=guidance)
        equivalent(got, want, settings)
        stats = fc.encoder_cache_stats(pipe)
        assert stats.num_steps == steps and stats.encoder_steps == stats.key_steps
        if settings.get("parallel"):
            assert len(stats.decoder_batch_sizes) == len(stats.key_steps)  # one decoder call per key step


# ---------------------------------------------------------------- 4. state, disabling, pipeline options


def test_no_state_between_calls_and_disable(pipe_of, folders):
    pipe = pipe_of("sd15", "dpmsolver++")
    fc.enable_encoder_cache(pipe, stride=3, parallel=True, prior_noise=True)
    first = call(pipe, seed=7)
    other_steps = call(pipe, seed=7, steps=5)  # another step count in between
    assert other_steps.shape == first.shape and fc.encoder_cache_stats(pipe).key_steps == [0, 3]
    assert torch.equal(call(pipe, seed=7), first)
    # A scheduler swapped in after enabling gets the prior-noise hook; the old one is restored.
    old, pipe.scheduler = pipe.scheduler, build_scheduler("dpmsolver++", **CONFIGS["sd15"])
    assert torch.equal(call(pipe, seed=7), first)
    assert "step" not in old.__dict__ and "step" in pipe.scheduler.__dict__
    images = call(pipe, seed=7, output_type="np")
    assert np.array_equal(call(pipe, seed=7, output_type="np"), images)

    # Enabling twice replaces the settings without wrapping the wrapper.
    fc.enable_encoder_cache(pipe, key_steps=[0, 2])
    assert getattr(pipe.unet.forward.__wrapped__, "_fcr_encoder_cache", None) is None
    assert "step" not in pipe.scheduler.__dict__  # prior noise off: the scheduler is not wrapped
    assert fc.encoder_cache_settings(pipe).schedule == (0, 2)

    fc.disable_encoder_cache(pipe)
    fc.disable_encoder_cache(pipe)  # no-op
    assert "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__
    assert fc.encoder_cache_settings(pipe) is None and not hasattr(pipe, "_fcr_encoder_cache")
    never = _load_pipe(folders["sd15"])
    never.scheduler = build_scheduler("dpmsolver++", **CONFIGS["sd15"])
    assert torch.equal(call(pipe, seed=7), call(never, seed=7))
    assert np.array_equal(call(pipe, seed=7, output_type="np"), call(never, seed=7, output_type="np"))


def test_negative_prompt_images_per_prompt_and_callbacks(pipe_of):
    pipe = pipe_of("sd15")
    options = dict(negative_prompt=["blurry", "dark"], num_images_per_prompt=2, guidance_scale=4.0,
                   num_inference_steps=6, height=RES, width=RES)

    def run(**kwargs):
        return pipe([PROMPT, "a bag"], generator=torch.Generator().manual_seed(2), **options, **kwargs).images

    stock, stock_np = run(output_type="latent"), run(output_type="np")
    fc.enable_encoder_cache(pipe, stride=1)
    assert stock.shape == (4, 4, RES // 8, RES // 8) and stock_np.shape == (4, RES, RES, 3)
    assert_float32_equivalent(run(output_type="latent"), stock)
    equivalent(run(output_type="np"), stock_np, "np")

    # Callbacks see every step; one that changes prompt_embeds at step 0 is honoured by the parallel
    # decoders precomputed at the key step (they are recomputed), so parallel == sequential.
    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append(i)
        if i == 0:
            return {"prompt_embeds": tensors["prompt_embeds"] * 1.5}
        return {}

    with_callback = {}
    for parallel in (False, True):
        fc.enable_encoder_cache(pipe, stride=3, parallel=parallel)
        with_callback[parallel] = run(output_type="latent", callback_on_step_end=callback,
                                      callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        assert seen == list(range(6))
        seen.clear()
    plain = run(output_type="latent")
    assert_float32_equivalent(with_callback[True], with_callback[False])
    assert rel_l2(with_callback[True], plain) > 1e-3


def test_image_to_image_shares_the_cache(pipe_of):
    # Image-to-image starts later in the schedule: the first step it runs is a key step.
    pipe = pipe_of("sd15")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8))

    def run():
        return img2img(PROMPT, image=image, strength=0.6, num_inference_steps=10, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(1), output_type="latent").images

    stock = run()
    fc.enable_encoder_cache(pipe, stride=1)
    assert_float32_equivalent(run(), stock)
    fc.enable_encoder_cache(pipe, stride=3)
    run()
    assert fc.encoder_cache_stats(pipe).encoder_steps == [4, 6, 9]  # steps 4..9 run; keys 0, 3, 6, 9


# ---------------------------------------------------------------- 5. load_fcr_unet


def _save_unet(unet, folder) -> None:
    unet.save_pretrained(folder, safe_serialization=True)


def _seeded(builder, seed: int, **kwargs):
    """A tiny UNet with deterministic weights, leaving torch's global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(**kwargs).eval()


def test_load_fcr_unet(pipe_of, tmp_path):
    pipe = pipe_of("sd15")
    original = pipe.unet
    fine_tuned = _seeded(tiny_sd15_unet, 11, sample_size=RES // 8)
    _save_unet(fine_tuned, tmp_path / "run" / "unet")
    fc.enable_encoder_cache(pipe, stride=2)
    try:
        assert fc.load_fcr_unet(pipe, tmp_path / "run") is pipe
        assert pipe.unet is not original and "forward" not in original.__dict__  # old UNet unwrapped
        saved = fine_tuned.state_dict()
        loaded = pipe.unet.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert pipe.unet.device == original.device and pipe.unet.dtype == original.dtype
        assert fc.encoder_cache_settings(pipe).stride == 2 and "forward" in pipe.unet.__dict__  # still cached
        call(pipe)
        assert fc.encoder_cache_stats(pipe).encoder_steps == [0, 2, 4, 6]

        # A UNet folder itself; unet_ema/ is preferred in a run folder (as fcr's evaluation does).
        fc.load_fcr_unet(pipe, tmp_path / "run" / "unet")
        _save_unet(original, tmp_path / "run" / "unet_ema")
        fc.load_fcr_unet(pipe, tmp_path / "run")
        assert torch.equal(pipe.unet.conv_in.weight, original.conv_in.weight)
        fc.load_fcr_unet(pipe, tmp_path / "run", subfolder="unet")
        assert torch.equal(pipe.unet.conv_in.weight, fine_tuned.conv_in.weight)

        # Mismatched configs name the field and leave the pipeline as it was.
        before = pipe.unet
        _save_unet(_seeded(tiny_sd21_unet, 12, sample_size=RES // 8), tmp_path / "sd21" / "unet")
        with pytest.raises(ValueError, match="cross_attention_dim"):
            fc.load_fcr_unet(pipe, tmp_path / "sd21")
        _save_unet(_seeded(tiny_sd15_unet, 13, sample_size=8), tmp_path / "big")
        with pytest.raises(ValueError, match="sample_size"):
            fc.load_fcr_unet(pipe, tmp_path / "big")
        with pytest.raises(ModelNotFoundError, match="no_such_run"):
            fc.load_fcr_unet(pipe, tmp_path / "no_such_run")
        assert pipe.unet is before
    finally:
        fc.disable_encoder_cache(pipe)
        pipe.unet = original  # the module-scoped pipeline is shared with other tests
    fc.load_fcr_unet(pipe, tmp_path / "run" / "unet")  # caching off: a plain swap
    assert "forward" not in pipe.unet.__dict__ and fc.encoder_cache_settings(pipe) is None
    pipe.unet = original


# ---------------------------------------------------------------- 6. argument validation


def test_argument_errors(pipe_of):
    pipe = pipe_of("sd15")
    with pytest.raises(ValueError, match="exactly one of stride"):
        fc.enable_encoder_cache(pipe)
    with pytest.raises(ValueError, match="exactly one of stride"):
        fc.enable_encoder_cache(pipe, stride=2, key_steps="50ls")
    for stride in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="stride must be an integer >= 1"):
            fc.enable_encoder_cache(pipe, stride=stride)
    with pytest.raises(ValueError, match="unknown key-step schedule"):
        fc.enable_encoder_cache(pipe, key_steps="fast")
    with pytest.raises(ValueError, match="use stride="):
        fc.enable_encoder_cache(pipe, key_steps="uniform")
    for steps, message in [([1, 2], "start with 0"), ([0, 3, 2], "sorted"), ([0, 2, 2], "unique"),
                           ([], "must not be empty"), ([0, 1.5], "integers"), (5, "list of step indices")]:
        with pytest.raises(ValueError, match=message):
            fc.enable_encoder_cache(pipe, key_steps=steps)
    with pytest.raises(ValueError, match="parallel must be True or False"):
        fc.enable_encoder_cache(pipe, stride=2, parallel="yes")
    with pytest.raises(ValueError, match="prior_noise must be"):
        fc.enable_encoder_cache(pipe, stride=2, prior_noise=0.003)
    with pytest.raises(ValueError, match="diffusers pipeline"):
        fc.enable_encoder_cache(object(), stride=2)
    assert fc.encoder_cache_settings(pipe) is None and "forward" not in pipe.unet.__dict__  # nothing installed

    # Key steps beyond the call's step count fail at call time, naming the range.
    fc.enable_encoder_cache(pipe, key_steps=[0, 10])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        call(pipe)
    assert torch.equal(call(pipe, steps=12), call(pipe, steps=12))
    # The cached UNet follows the pipeline's step loop; other uses fail clearly.
    with pytest.raises(RuntimeError, match="disable_encoder_cache"):
        pipe.unet(z_T(pipe), 1, torch.zeros(1, 77, 32))
    fc.disable_encoder_cache(pipe)

    # UNets the split cannot reproduce are refused up front.
    unsupported = _seeded(tiny_sd15_unet, 14, sample_size=RES // 8)
    unsupported.register_to_config(class_embed_type="timestep")
    pipe.unet, original = unsupported, pipe.unet
    try:
        with pytest.raises(UnsupportedUNetError, match="class embeddings"):
            fc.enable_encoder_cache(pipe, stride=2)
    finally:
        pipe.unet = original
    assert fc.encoder_cache_settings(pipe) is None
