"""Tests of fcr.eval.metrics: closed forms, limiting cases, and the SD code paths with random-weight models.

No Inception / CLIP weights are downloaded: the SD tests inject randomly initialised extractors,
so they check the code path and the arithmetic, never a real score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OPEN_CLIP_CONFIG
from PIL import Image
from torch import nn

from fcr.eval import metrics, sd_metrics

# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_identical_sets_is_zero() -> None:
    f = np.random.default_rng(0).normal(size=(400, 8))
    assert metrics.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    mu, sigma = metrics.feature_statistics(f)
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_forms() -> None:
    d = 5
    m = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # Identity covariances: only the mean term remains.
    assert metrics.frechet_distance(np.zeros(d), np.eye(d), m, np.eye(d)) == pytest.approx(m @ m, rel=1e-10)
    # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (s1 - s2)^2 with s the std devs.
    s1 = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    s2 = np.array([2.0, 2.0, 1.0, 0.5, 4.0])
    expected = float(np.sum((s1 - s2) ** 2) + m @ m)
    got = metrics.frechet_distance(np.zeros(d), np.diag(s1**2), m, np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-10)
    # Symmetric in its two arguments.
    assert metrics.frechet_distance(m, np.diag(s2**2), np.zeros(d), np.diag(s1**2)) == pytest.approx(expected)


def test_fid_of_sampled_gaussians_matches_closed_form() -> None:
    rng = np.random.default_rng(1)
    d, n = 8, 20_000
    m = np.full(d, 0.5)  # ||m||^2 = 2
    f1 = rng.normal(size=(n, d))
    f2 = rng.normal(size=(n, d)) + m
    # Bias of the plug-in estimate is O(d^2 / n) ~ 0.005; the sd of the mean term is about
    # 2 ||m|| sqrt(2 / n) ~ 0.03, so 0.15 is ~5 sd and still detects an error of ||m||^2 = 2.
    assert metrics.fid_from_features(f1, f2) == pytest.approx(float(m @ m), abs=0.15)


def test_frechet_one_dimensional_and_rank_deficient() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 1)), rng.normal(loc=2.0, size=(300, 1))
    mu_a, var_a = a.mean(), a.var(ddof=1)
    mu_b, var_b = b.mean(), b.var(ddof=1)
    expected = (mu_a - mu_b) ** 2 + (math.sqrt(var_a) - math.sqrt(var_b)) ** 2
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)
    # Fewer samples than dimensions: singular covariances must still give a finite value.
    few = rng.normal(size=(6, 20))
    value = metrics.fid_from_features(few, few + 1.0)
    assert math.isfinite(value) and value == pytest.approx(20.0, rel=1e-2)


def test_frechet_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        metrics.feature_statistics(np.zeros((1, 3)))


# ----------------------------------------------------------------------------- KID


def test_kid_same_vs_shifted_distribution() -> None:
    rng = np.random.default_rng(3)
    d, n = 16, 600
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    shifted = rng.normal(size=(n, d)) + 1.0
    same_mean, same_std = metrics.kid(a, b, num_subsets=20, subset_size=300)
    shift_mean, shift_std = metrics.kid(a, shifted, num_subsets=20, subset_size=300)
    assert same_std > 0 and shift_std > 0
    # Unbiased estimator: same-distribution KID is centred on 0, far below the shifted value.
    assert abs(same_mean) < 0.02 * shift_mean
    assert shift_mean > 10 * shift_std
    # Same seed, same subsets; subset size is capped at the smaller set.
    assert metrics.kid(a, b, 20, 300, seed=5) == metrics.kid(a, b, 20, 300, seed=5)
    assert math.isfinite(metrics.kid(a[:50], b, num_subsets=3, subset_size=1000)[0])


def test_kid_matches_direct_unbiased_formula() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.3
    # One subset of the full (equal) sets: the subset is a permutation, which MMD ignores.
    got, std = metrics.kid(x, y, num_subsets=1, subset_size=7)

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return float((u @ v / 3 + 1) ** 3)

    m = 7
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert got == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)
    assert std == 0.0


# ----------------------------------------------------------------------------- precision / recall


def test_precision_recall_limits() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(200, 4))
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
    far = rng.normal(size=(150, 4)) + 100.0
    assert metrics.precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precision_recall_subset_cluster() -> None:
    rng = np.random.default_rng(6)
    cluster_a = rng.normal(size=(100, 2))
    cluster_b = rng.normal(size=(100, 2)) + 50.0
    real = np.concatenate([cluster_a, cluster_b])
    fake = cluster_a[:80]  # covers only part of cluster A: every fake point is a real point
    precision, recall = metrics.precision_recall(real, fake, k=3, chunk_size=17)  # odd chunks on purpose
    assert precision == 1.0
    assert recall <= 0.5  # no point of cluster B is within reach of the fake manifold
    assert recall >= 0.4  # the 80 copied points themselves are covered
    assert metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(fake)) == (precision, recall)


def test_precision_recall_matches_brute_force() -> None:
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(45, 5)) + 0.7
    k = 4

    def radii(s: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(s[:, None] - s[None], axis=-1)
        np.fill_diagonal(d, np.inf)  # exclude the point itself
        return np.sort(d, axis=1)[:, k - 1]

    def inside(q: np.ndarray, s: np.ndarray) -> float:
        d = np.linalg.norm(q[:, None] - s[None], axis=-1)
        return float((d <= radii(s)[None]).any(axis=1).mean())

    expected = (inside(fake, real), inside(real, fake))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a non-trivial case
    assert metrics.precision_recall(real, fake, k=k, chunk_size=7) == pytest.approx(expected)


# ----------------------------------------------------------------------------- probabilities


def test_inception_score_limits() -> None:
    one_hot = np.eye(10)[np.arange(1000) % 10]  # each split of 100 holds every class 10 times
    mean, std = metrics.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    const = np.full((500, 10), 0.1)
    assert metrics.inception_score(const, splits=5) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-12))


def test_inception_score_hand_computed() -> None:
    p = np.array([[0.9, 0.1], [0.1, 0.9]])  # marginal (0.5, 0.5)
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert metrics.inception_score(p, splits=1)[0] == pytest.approx(math.exp(kl))
    with pytest.raises(ValueError):
        metrics.inception_score(np.array([[0.5, 0.6]]), splits=1)


def test_prompt_alignment_hand_computed() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    labels = [0, 1, 1, 2]
    out = metrics.prompt_alignment(probs, labels)
    assert out["accuracy"] == pytest.approx(2 / 4)  # rows 0 and 2 correct
    assert out["mean_prob"] == pytest.approx((0.7 + 0.3 + 0.5 + 0.2) / 4)
    with pytest.raises(ValueError):
        metrics.prompt_alignment(probs, [0, 1, 3, 0])


# ----------------------------------------------------------------------------- embedded setting


class _TinyClassifier(nn.Module):
    """Stand-in with the classifier interface: ``features`` (N, D) and ``forward`` logits."""

    def __init__(self, feature_dim: int = 6) -> None:
        super().__init__()
        self.proj = nn.Linear(16, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _classifiers() -> list[nn.Module]:
    torch.manual_seed(0)
    models: list[nn.Module] = [_TinyClassifier()]
    try:
        from fcr.eval.classifier import FashionClassifier
    except ImportError:  # classifier module still being written: the stand-in covers the path
        return models
    models.append(FashionClassifier(widths=(4, 4, 4), feature_dim=8))
    return models


def _classifier_metrics(model: nn.Module, gen: torch.Tensor, labels, reference_features, **kwargs) -> dict[str, float]:
    """Classifier features and probabilities of ``gen``, then every metric (as the sweep scores images)."""
    from fcr.eval.classifier import extract_features, predict_proba

    return metrics.metrics_from_features(extract_features(model, gen, 32), reference_features,
                                         predict_proba(model, gen, 32), labels, **kwargs)


# A random ReLU network has dead feature units, hence singular covariances and sqrtm warnings.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
@pytest.mark.parametrize("model", _classifiers(), ids=lambda m: type(m).__name__)
def test_classifier_metrics_columns_and_values(model: nn.Module) -> None:
    gen = torch.rand(60, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(60) % 10
    from fcr.eval.classifier import extract_features

    out = _classifier_metrics(model, gen, labels, extract_features(model, gen, 32), kid_subsets=5, is_splits=3)
    name = metrics.DEFAULT_EXTRACTOR_NAME
    for col in ("fd", "kid", "kid_std", "precision", "recall", "is", "is_std"):
        assert math.isfinite(out[f"{col}_{name}"]), col
    # Generated set == reference set.
    assert out[f"fd_{name}"] == pytest.approx(0.0, abs=1e-6)
    assert out[f"precision_{name}"] == 1.0 and out[f"recall_{name}"] == 1.0
    model.eval()
    with torch.no_grad():
        probs = model(gen).softmax(1)
    assert out["class_accuracy"] == pytest.approx(float((probs.argmax(1) == labels).float().mean()))
    assert out["class_prob"] == pytest.approx(float(probs[torch.arange(60), labels].mean()), rel=1e-5)
    assert out["n_generated"] == 60.0

    # Custom name, shifted references give FD > 0; no labels, no class agreement.
    ref = extract_features(model, (gen * 0.5).clamp(-1, 1), 32)
    out2 = _classifier_metrics(model, gen, None, ref, extractor_name="x", kid_subsets=5, is_splits=3)
    assert out2["fd_x"] > 0 and "class_accuracy" not in out2


# ----------------------------------------------------------------------------- SD: CLIPScore


def _tiny_clip(tmp_path: Path) -> sd_metrics.ClipBundle:
    """A real open_clip model built through its factory from a tiny config (random weights)."""
    import open_clip

    (tmp_path / "fcr-test-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "fcr-test-tiny-clip.json")
    torch.manual_seed(0)
    return sd_metrics.load_clip("fcr-test-tiny-clip", None, torch.device("cpu"))


def test_clip_score_code_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _tiny_clip(tmp_path)
    calls: list[tuple[str, str | None]] = []

    def fake_load(name: str, pretrained: str | None, device: torch.device) -> sd_metrics.ClipBundle:
        calls.append((name, pretrained))
        return bundle

    monkeypatch.setattr(sd_metrics, "load_clip", fake_load)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(5)]
    images[1] = images[1].convert("L")  # grayscale input must be accepted
    prompts = ["a shirt", "a shoe", "a bag", "a dress", "a coat"]
    scores = sd_metrics.clip_score(images, prompts, device="cpu", batch_size=2)
    assert calls == [("ViT-L-14", "openai")]
    assert scores.shape == (5,) and np.all(scores >= 0) and np.all(scores <= 100)

    # Recompute one score by hand: 100 * cosine, clipped at 0.
    model, preprocess, tokenizer = bundle
    with torch.no_grad():
        img = model.encode_image(preprocess(images[3].convert("RGB"))[None])
        txt = model.encode_text(tokenizer([prompts[3]]))
    cos = float(nn.functional.cosine_similarity(img, txt).item())
    assert scores[3] == pytest.approx(max(100 * cos, 0.0), abs=1e-3)
    # Injection bypasses the loader; batching does not change scores.
    again = sd_metrics.clip_score(images, prompts, clip=bundle, device="cpu", batch_size=5)
    assert len(calls) == 1 and np.allclose(again, scores, atol=1e-4)
    with pytest.raises(ValueError):
        sd_metrics.clip_score(images, prompts[:2], clip=bundle)


# ----------------------------------------------------------------------------- SD: clean-fid


class _RandomExtractor(nn.Module):
    """Fixed random projection of pooled (B, 3, 299, 299) [0, 255] images, counting images seen."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(12, dim, generator=gen))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)  # clean-fid resized the images before us
        self.seen += x.shape[0]
        return (nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)) @ self.w


def _write_images(folder: Path, seed: int, n: int = 12, brightness: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.clip(rng.integers(0, 200, (24, 24, 3)) + brightness, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


def test_sd_fid_folders_with_random_extractor(tmp_path: Path) -> None:
    a = _write_images(tmp_path / "a", seed=0)
    a_copy = _write_images(tmp_path / "a_copy", seed=0)
    b = _write_images(tmp_path / "b", seed=1, brightness=60)
    fx = _RandomExtractor()
    same = sd_metrics.sd_fid(a, ref_dir=a_copy, device="cpu", feature_extractor=fx)
    assert fx.seen == 24  # both folders went through the extractor
    assert same == pytest.approx(0.0, abs=1e-6)
    different = sd_metrics.sd_fid(a, ref_dir=b, device="cpu", feature_extractor=fx)
    # clean-fid's FID equals ours on the same features.
    fa = sd_metrics.sd_folder_features(a, device="cpu", feature_extractor=fx)
    fb = sd_metrics.sd_folder_features(b, device="cpu", feature_extractor=fx)
    assert fa.shape == (12, 4)
    assert different > 0.1 and different == pytest.approx(metrics.fid_from_features(fa, fb), rel=1e-5)
    with pytest.raises(ValueError):
        sd_metrics.sd_fid(a, device="cpu", feature_extractor=fx)


def test_cached_reference_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cleanfid
    from cleanfid import fid

    # clean-fid keeps custom stats next to its package file: point that at tmp_path, and make
    # its default Inception builder return the random extractor, so nothing is downloaded.
    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    fx = _RandomExtractor()
    monkeypatch.setattr(fid, "build_feature_extractor", lambda mode, device=None, use_dataparallel=True: fx)
    a = _write_images(tmp_path / "a", seed=0)
    b = _write_images(tmp_path / "b", seed=1, brightness=60)

    sd_metrics.cache_reference_statistics(b, "Fcr_Test_Ref", device="cpu")
    assert (tmp_path / "cleanfid" / "stats" / "fcr_test_ref_clean_custom_na.npz").exists()
    assert fx.seen == 12
    with pytest.raises(FileExistsError):
        sd_metrics.cache_reference_statistics(b, "fcr_test_ref", device="cpu")
    sd_metrics.cache_reference_statistics(b, "fcr_test_ref", device="cpu", overwrite=True)

    against_stats = sd_metrics.sd_fid(a, ref_stats_name="Fcr_Test_Ref", device="cpu")
    against_folder = sd_metrics.sd_fid(a, ref_dir=b, device="cpu")
    assert against_stats > 0.1 and against_stats == pytest.approx(against_folder, rel=1e-6)
    assert sd_metrics.sd_fid(b, ref_stats_name="fcr_test_ref", device="cpu") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(FileNotFoundError):
        sd_metrics.sd_fid(a, ref_stats_name="missing_stats", device="cpu")


@pytest.mark.parametrize("n, d", [(12, 40), (200, 8), (5, 1)])
def test_frechet_to_reference_equals_frechet_distance(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    ref = rng.normal(size=(3000, d)) @ rng.normal(size=(d, d)) * 0.3 + 1.0
    feats = rng.normal(size=(n, d)) * 0.7
    mu_r, s_r = metrics.feature_statistics(ref)
    exact = metrics.frechet_distance(*metrics.feature_statistics(feats), mu_r, s_r)
    fast = metrics.FrechetToReference(mu_r, s_r)
    assert fast(feats) == pytest.approx(exact, rel=1e-6)
    assert fast(ref[:500]) == pytest.approx(metrics.frechet_distance(*metrics.feature_statistics(ref[:500]), mu_r, s_r),
                                            rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        fast(feats[:1])


def test_fd_infinity_removes_the_small_sample_bias() -> None:
    from fcr.eval.metrics import FrechetToReference, fd_infinity, feature_statistics

    rng = np.random.default_rng(0)
    frechet = FrechetToReference(*feature_statistics(rng.normal(size=(20000, 8))))
    same = fd_infinity(rng.normal(size=(400, 8)), frechet)
    # The same distribution: FD at n = 400 is all bias; the extrapolation removes most of it.
    assert same["fd_at_n"] > 0 and abs(same["fd_inf"]) < same["fd_at_n"] / 2 and same["slope"] > 0
    shifted = fd_infinity(rng.normal(size=(400, 8)) + 0.5, frechet)  # true FD = 8 x 0.5² = 2
    assert abs(shifted["fd_inf"] - 2.0) < 4 * shifted["fd_inf_se"] + 0.05
    with pytest.raises(ValueError, match="more images than min_size"):
        fd_infinity(rng.normal(size=(9, 8)), frechet)
