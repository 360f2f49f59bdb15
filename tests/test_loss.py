"""Tests of the FCR training loss against an independent computation on tiny UNets."""

from __future__ import annotations

import pytest
import torch
from conftest import make_unet
from diffusers import DDPMScheduler

from fcr.core.loss import (
    FCRConfig,
    LossParts,
    delta_in_train_timesteps,
    fcr_training_loss,
    feature_distance,
    sample_timestep_pairs,
)
from fcr.core.unet import EncoderFeatures

T = 1000
BATCH = 2


@pytest.fixture(scope="module")
def unets():
    return {name: make_unet(name, seed=1, sample_size=16) for name in ("sd15", "embedded-v")}


def _batch(channels: int, cross_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(BATCH, channels, 16, 16, generator=g)
    cond = torch.randn(BATCH, 5, cross_dim, generator=g)
    return x0, cond


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", prediction_type=prediction_type)


class _Capture:
    """Collects encoder features with forward hooks, independently of ``fcr.core.unet``."""

    def __init__(self, unet):
        self.conv: list[torch.Tensor] = []
        self.down: list[list[torch.Tensor]] = []
        self.mid: list[torch.Tensor] = []
        self.handles = [unet.conv_in.register_forward_hook(lambda m, i, o: self.conv.append(o))]
        self.handles += [
            b.register_forward_hook(lambda m, i, o: self.down.append(list(o[1]))) for b in unet.down_blocks
        ]
        self.handles.append(unet.mid_block.register_forward_hook(lambda m, i, o: self.mid.append(o)))

    def group(self, name: str) -> list[torch.Tensor]:
        if name == "all":
            return self.conv + [x for res in self.down for x in res] + self.mid
        if name == "early":
            return self.conv + self.down[0]
        if name == "mid":
            return self.mid
        return self.down[-1]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _features(unet, x, t, cond, group):
    cap = _Capture(unet)
    try:
        out = unet(x, t, cond).sample
    finally:
        cap.close()
    return out, cap.group(group)


def _reference(unet, sched, x0, cond, cfg, seed, prediction_type):
    """The loss recomputed by hand: full UNet forward for the denoise term, hooks for features."""
    g = torch.Generator().manual_seed(seed)
    t, d = sample_timestep_pairs(x0.shape[0], T, cfg, g)
    eps = torch.randn(x0.shape, generator=g)
    eps_prev = eps if cfg.shared_noise else torch.randn(x0.shape, generator=g)
    ac = sched.alphas_cumprod.double()

    def noisy(e, ts):
        a = ac[ts].view(-1, 1, 1, 1)
        return (a.sqrt() * x0.double() + (1 - a).sqrt() * e.double()).float()

    pred, fa = _features(unet, noisy(eps, t), t, cond, cfg.feature_group)
    _, fb = _features(unet, noisy(eps_prev, t - d), t - d, cond, cfg.feature_group)
    a_t = ac[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = eps
    else:
        target = (a_t.sqrt() * eps.double() - (1 - a_t).sqrt() * x0.double()).float()
    denoise = ((pred - target) ** 2).mean()
    per_tensor = []
    for x, y in zip(fa, fb):
        if cfg.normalize:
            num = torch.linalg.vector_norm((x - y).flatten(1), dim=1) ** 2
            sq = [torch.linalg.vector_norm(z.flatten(1), dim=1) ** 2 for z in (x, y)]
            den = 0.5 * (sq[0] + sq[1])
            per_tensor.append((num / den).mean())
        else:
            per_tensor.append(((x - y) ** 2).sum() / x.numel())
    fcr = sum(per_tensor) / len(per_tensor)
    return denoise, fcr, t, d


CASES = [("sd15", "epsilon"), ("embedded-v", "v_prediction")]


@pytest.mark.parametrize("name,prediction_type", CASES)
@pytest.mark.parametrize("group", ["all", "early", "mid", "late"])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_independent_computation(unets, name, prediction_type, group, normalize, torch_threads):
    unet, channels, cross_dim = unets[name]
    x0, cond = _batch(channels, cross_dim)
    sched = _scheduler(prediction_type)
    cfg = FCRConfig(lambda_fcr=0.7, delta_max=30, feature_group=group, normalize=normalize)
    with torch.no_grad():
        parts = fcr_training_loss(unet, sched, x0, cond, cfg, generator=torch.Generator().manual_seed(5))
        denoise, fcr, t, d = _reference(unet, sched, x0, cond, cfg, 5, prediction_type)
    assert torch.equal(parts.timesteps, t) and torch.equal(parts.deltas, d)
    torch.testing.assert_close(parts.denoise, denoise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.fcr, fcr, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(parts.total, denoise + 0.7 * fcr, rtol=1e-4, atol=1e-6)
    assert parts.fcr > 0


@pytest.mark.parametrize("units", ["train", "sampling"])
def test_independent_noise_matches_reference(unets, units):
    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim, seed=3)
    sched = _scheduler()
    cfg = FCRConfig(lambda_fcr=1.0, delta_max=5, delta_units=units, sampling_steps=25, shared_noise=False)
    with torch.no_grad():
        parts = fcr_training_loss(unet, sched, x0, cond, cfg, generator=torch.Generator().manual_seed(11))
        denoise, fcr, t, d = _reference(unet, sched, x0, cond, cfg, 11, "epsilon")
    assert torch.equal(parts.deltas, d)
    torch.testing.assert_close(parts.denoise, denoise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.fcr, fcr, rtol=1e-4, atol=1e-7)


def test_prediction_type_override_beats_scheduler(unets):
    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim)
    cfg_v = FCRConfig(prediction_type="v_prediction")
    with torch.no_grad():
        over = fcr_training_loss(unet, _scheduler("epsilon"), x0, cond, cfg_v, torch.Generator().manual_seed(2))
        native = fcr_training_loss(
            unet, _scheduler("v_prediction"), x0, cond, FCRConfig(), torch.Generator().manual_seed(2)
        )
        eps = fcr_training_loss(unet, _scheduler("epsilon"), x0, cond, FCRConfig(), torch.Generator().manual_seed(2))
    torch.testing.assert_close(over.denoise, native.denoise)
    assert not torch.allclose(over.denoise, eps.denoise)


def _count_calls(module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(m, i, o):
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


def test_lambda_zero_is_plain_denoising_with_one_encoder_pass(unets):
    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim)
    sched = _scheduler()
    counts = {}
    results = {}
    for lam in (0.0, 0.3):
        mid_calls, h1 = _count_calls(unet.mid_block)
        first_calls, h2 = _count_calls(unet.down_blocks[0])
        try:
            with torch.no_grad():
                results[lam] = fcr_training_loss(
                    unet, sched, x0, cond, FCRConfig(lambda_fcr=lam), generator=torch.Generator().manual_seed(7)
                )
        finally:
            h1.remove()
            h2.remove()
        counts[lam] = (mid_calls[0], first_calls[0])
    assert counts[0.0] == (1, 1)
    assert counts[0.3] == (2, 2)

    zero = results[0.0]
    assert zero.total is zero.denoise
    assert zero.fcr.item() == 0.0
    # Same draws whatever λ: the control sees the same t, Δ, ε as the FCR run.
    assert torch.equal(zero.timesteps, results[0.3].timesteps)
    assert torch.equal(zero.deltas, results[0.3].deltas)
    assert torch.equal(zero.denoise, results[0.3].denoise)
    # And it is the plain UNet's MSE.
    g = torch.Generator().manual_seed(7)
    t, _ = sample_timestep_pairs(BATCH, T, FCRConfig(), g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = unet(sched.add_noise(x0, eps, t), t, cond).sample
    torch.testing.assert_close(zero.total, ((pred - eps) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_fcr_gradient_reaches_encoder_only(unets):
    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim)
    unet.zero_grad(set_to_none=True)
    parts = fcr_training_loss(unet, _scheduler(), x0, cond, FCRConfig(lambda_fcr=1.0), torch.Generator().manual_seed(0))
    assert parts.fcr.item() > 0
    parts.fcr.backward()
    try:
        down = [p.grad for p in unet.down_blocks[0].parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in down)
        assert unet.conv_in.weight.grad.abs().sum() > 0
        # The decoder is not on the FCR path.
        assert all(p.grad is None for p in unet.up_blocks.parameters())
        assert unet.conv_out.weight.grad is None
    finally:
        unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("shared", [True, False])
def test_shared_noise_flag(unets, monkeypatch, shared):
    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim)
    sched = _scheduler()
    seen: list[torch.Tensor] = []
    original = sched.add_noise

    def recording(samples, noise, timesteps):
        seen.append(noise.clone())
        return original(samples, noise, timesteps)

    monkeypatch.setattr(sched, "add_noise", recording)
    with torch.no_grad():
        cfg = FCRConfig(lambda_fcr=1.0, shared_noise=shared)
        fcr_training_loss(unet, sched, x0, cond, cfg, torch.Generator().manual_seed(4))
    assert len(seen) == 2
    assert torch.equal(seen[0], seen[1]) == shared


def test_sample_timestep_pairs_train_units():
    cfg = FCRConfig(delta_max=10)
    t, d = sample_timestep_pairs(4096, T, cfg, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and d.dtype == torch.int64 and t.shape == d.shape == (4096,)
    assert (t - d >= 0).all() and (t <= T - 1).all()
    assert d.min() >= 1 and d.max() <= 10
    assert set(d.tolist()) == set(range(1, 11))


def test_sample_timestep_pairs_sampling_units():
    cfg = FCRConfig(delta_max=10, delta_units="sampling", sampling_steps=50)
    assert delta_in_train_timesteps(cfg, T) == 200
    t, d = sample_timestep_pairs(4096, T, cfg, torch.Generator().manual_seed(0))
    assert (d % 20 == 0).all() and d.min() >= 20 and d.max() <= 200
    assert set(d.tolist()) == set(range(20, 201, 20))
    assert (t - d >= 0).all() and (t <= T - 1).all()


def test_sample_timestep_pairs_cover_full_range():
    # Small T: every (Δ, t) with Δ <= t <= T-1 occurs, so no off-by-one at either end.
    cfg = FCRConfig(delta_max=3)
    t, d = sample_timestep_pairs(20000, 8, cfg, torch.Generator().manual_seed(1))
    pairs = set(zip(d.tolist(), t.tolist()))
    assert pairs == {(k, s) for k in range(1, 4) for s in range(k, 8)}


def test_sample_timestep_pairs_deterministic_and_lambda_free():
    a = sample_timestep_pairs(64, T, FCRConfig(lambda_fcr=0.0), torch.Generator().manual_seed(3))
    b = sample_timestep_pairs(64, T, FCRConfig(lambda_fcr=2.0), torch.Generator().manual_seed(3))
    c = sample_timestep_pairs(64, T, FCRConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _synthetic(seed: int, scale: float = 1.0) -> EncoderFeatures:
    g = torch.Generator().manual_seed(seed)
    skips = (torch.randn(3, 4, 8, 8, generator=g) * scale, torch.randn(3, 8, 4, 4, generator=g) * scale)
    return EncoderFeatures(skips=skips, mid=torch.randn(3, 8, 2, 2, generator=g) * scale, forward_upsample_size=False)


def test_feature_distance_scale_invariance():
    a, b = _synthetic(0), _synthetic(1)
    a3 = a.map(lambda x: 3.0 * x)
    b3 = b.map(lambda x: 3.0 * x)
    idx = [0, 1, 2]
    torch.testing.assert_close(feature_distance(a3, b3, idx, True), feature_distance(a, b, idx, True))
    torch.testing.assert_close(feature_distance(a3, b3, idx, False), 9.0 * feature_distance(a, b, idx, False))


def test_feature_distance_definition():
    ones = EncoderFeatures((torch.ones(2, 3, 4, 4),), torch.full((2, 5), 2.0), False)
    zeros = EncoderFeatures((torch.zeros(2, 3, 4, 4),), torch.zeros(2, 5), False)
    # raw: mean of per-tensor MSE = (1 + 4) / 2; normalised: ‖a‖²/(½‖a‖²) = 2 for every tensor.
    assert feature_distance(ones, zeros, [0, 1], False).item() == pytest.approx(2.5)
    assert feature_distance(ones, zeros, [0, 1], True).item() == pytest.approx(2.0)
    assert feature_distance(ones, zeros, [1], False).item() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        feature_distance(ones, zeros, [], False)


def test_log_dict():
    parts = LossParts(
        total=torch.tensor(1.5), denoise=torch.tensor(1.0), fcr=torch.tensor(0.5),
        timesteps=torch.tensor([10, 20]), deltas=torch.tensor([1, 3]),
    )  # fmt: skip
    assert parts.log_dict() == {
        "loss": 1.5, "loss_denoise": 1.0, "loss_fcr": 0.5, "timestep_mean": 15.0, "delta_mean": 2.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(lambda_fcr=-0.1), "lambda_fcr"),
        (dict(lambda_fcr=float("nan")), "lambda_fcr"),
        (dict(delta_max=0), "delta_max"),
        (dict(delta_max=2.5), "delta_max"),
        (dict(delta_units="seconds"), "delta_units"),
        (dict(sampling_steps=0), "sampling_steps"),
        (dict(feature_group="middle"), "feature_group"),
        (dict(prediction_type="sample"), "prediction_type"),
    ],
)
def test_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FCRConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,ok",
    [
        (dict(delta_max=T - 1), True),
        (dict(delta_max=T), False),
        (dict(delta_max=49, delta_units="sampling", sampling_steps=50), True),
        (dict(delta_max=50, delta_units="sampling", sampling_steps=50), False),
    ],
)
def test_delta_max_must_be_below_num_train_timesteps(kwargs, ok):
    cfg = FCRConfig(**kwargs)
    if ok:
        assert delta_in_train_timesteps(cfg, T) < T
        t, d = sample_timestep_pairs(16, T, cfg, torch.Generator().manual_seed(0))
        assert (t - d >= 0).all()
    else:
        with pytest.raises(ValueError, match="delta_max"):
            delta_in_train_timesteps(cfg, T)
        with pytest.raises(ValueError, match="delta_max"):
            sample_timestep_pairs(16, T, cfg)


def test_loss_time_errors(unets):
    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim)
    with pytest.raises(ValueError, match="delta_max"):
        fcr_training_loss(unet, _scheduler(), x0, cond, FCRConfig(lambda_fcr=1.0, delta_max=T))
    with pytest.raises(ValueError, match="sampling_steps"):
        fcr_training_loss(unet, _scheduler(), x0, cond, FCRConfig(delta_units="sampling", sampling_steps=T + 1))
    with pytest.raises(ValueError, match="prediction_type"):
        fcr_training_loss(unet, _scheduler("sample"), x0, cond, FCRConfig())


def test_fcr_deep_regularises_deepcaches_reused_feature(unets):
    """FCR-deep: the same draws and denoising loss as encoder FCR; the term is the distance of the
    deep hidden state DeepCache reuses (written out here with deep_forward) and its gradient reaches
    the deep up layers but not the shallow path's last layers."""
    from fcr.core.loss import sample_timestep_pairs
    from fcr.core.unet import deep_branch, deep_forward, deep_hidden

    unet, channels, cross_dim = unets["sd15"]
    x0, cond = _batch(channels, cross_dim)
    sched = _scheduler()
    cfg = FCRConfig(lambda_fcr=0.5, feature_group="deep", deep_branch=1)
    parts = fcr_training_loss(unet, sched, x0, cond, cfg, torch.Generator().manual_seed(0))
    encoder = fcr_training_loss(unet, sched, x0, cond, FCRConfig(lambda_fcr=0.5), torch.Generator().manual_seed(0))
    torch.testing.assert_close(parts.denoise, encoder.denoise, rtol=1e-5, atol=1e-7)  # same prediction at t
    # The term written out: same draws (t, Δ, ε) from the same generator.
    g = torch.Generator().manual_seed(0)
    t, delta = sample_timestep_pairs(BATCH, T, cfg, g)
    eps = torch.randn(x0.shape, generator=g)
    branch = deep_branch(unet, 1)
    with torch.no_grad():
        a = deep_forward(unet, sched.add_noise(x0, eps, t), t, cond, branch)[1]
        b = deep_hidden(unet, sched.add_noise(x0, eps, t - delta), t - delta, cond, branch)
    torch.testing.assert_close(parts.fcr.detach(), ((a - b) ** 2).mean(), rtol=1e-5, atol=1e-8)
    assert parts.fcr.item() > 0
    torch.testing.assert_close(parts.total, parts.denoise + 0.5 * parts.fcr)
    unet.zero_grad(set_to_none=True)
    parts.fcr.backward()
    try:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.mid_block.parameters())
        assert unet.conv_out.weight.grad is None  # the head is on the shallow path only
    finally:
        unet.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="deep_branch"):
        FCRConfig(feature_group="deep", deep_branch=-1)
