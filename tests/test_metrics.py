"""Offline metrics against closed forms and hand-built cases, and the digits data + feature classifier
(split, training through the train-once cache, corruption handling)."""
import math

import pytest
import torch

from conftest import ring_means
from disback_core.bench.digits import DigitsClassifier, digit_features, digits_classifier, load_digits_split, predict_labels
from disback_core.bench.metrics import (class_coverage, energy_distance, frechet_distance, mode_stats, precision_recall,
                                        sliced_wasserstein)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------
# distances of a set with itself, determinism, argument checks


def test_distances_of_a_set_with_itself():
    a = torch.randn(500, 3, generator=_gen(1))
    assert sliced_wasserstein(a, a) == 0.0
    assert energy_distance(a, a, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    # the unbiased (U-statistic) form of a set against itself is exactly -2 E|X-X'| / n
    mean_offdiag = float(torch.pdist(a.double()).mean())
    assert energy_distance(a, a) == pytest.approx(-2.0 * mean_offdiag / 500, rel=1e-9)
    assert frechet_distance(a, a) < 1e-6
    # rank-deficient features (constant and collinear columns) keep FD(x, x) at ~0
    f = torch.cat([a, a[:, :1] * 2.0, torch.ones(500, 2)], 1)
    assert frechet_distance(f, f) < 1e-6


def test_metrics_are_deterministic():
    a, b = torch.randn(400, 4, generator=_gen(2)), torch.randn(400, 4, generator=_gen(3)) + 0.3
    assert sliced_wasserstein(a, b, seed=7) == sliced_wasserstein(a, b, seed=7)
    assert sliced_wasserstein(a, b, seed=7) != sliced_wasserstein(a, b, seed=8)
    assert energy_distance(a, b) == energy_distance(a, b)
    assert frechet_distance(a, b) == frechet_distance(a, b)
    assert precision_recall(a, b) == precision_recall(a, b)
    assert energy_distance(a, b) > 0 and frechet_distance(a, b) > 0


def test_argument_errors_name_the_argument():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="a must"):
        energy_distance(torch.randn(10), x)
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="feats_b"):
        frechet_distance(x, torch.randn(1, 2))
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="samples"):
        mode_stats(torch.empty(0, 2), ring_means(), 0.3)
    with pytest.raises(ValueError, match="threshold"):
        mode_stats(x, ring_means(), -1.0)
    with pytest.raises(ValueError, match="fake_feats"):
        precision_recall(x, torch.randn(3, 2), k=3)
    with pytest.raises(ValueError, match="pred_labels"):
        class_coverage(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match="pred_labels"):
        class_coverage(torch.tensor([], dtype=torch.long), 10)


# ---------------------------------------------------------------------------------------------
# energy distance: 1D Gaussians, closed form


# Monte-Carlo standard deviation of the n = 4000 estimate, measured over 30 seeds:
# 0.010 (m = 0.5), 0.019 (m = 1), 0.033 (m = 2). Tolerance = 4 standard deviations.
@pytest.mark.parametrize("m, mc_std", [(0.5, 0.010), (1.0, 0.019), (2.0, 0.033)])
def test_energy_distance_matches_closed_form_for_shifted_normals(m, mc_std):
    n = 4000
    g = _gen(int(10 * m))
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64) + m
    # X - Y ~ N(-m, 2): E|X-Y| is the mean of a folded normal; E|X-X'| = 2 / sqrt(pi)
    e_xy = math.sqrt(2) * math.sqrt(2 / math.pi) * math.exp(-m * m / 4) + m * (1 - 2 * _phi(-m / math.sqrt(2)))
    exact = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    assert energy_distance(x, y) == pytest.approx(exact, abs=4 * mc_std)
    assert energy_distance(x, y, unbiased=False) == pytest.approx(exact, abs=4 * mc_std)


# ---------------------------------------------------------------------------------------------
# Frechet distance: Gaussians, closed form


def _with_exact_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n points whose sample mean and (n-1) covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, len(mean), generator=_gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_distance_diagonal_covariances_by_hand():
    mu1, s1 = torch.zeros(3, dtype=torch.float64), torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    mu2, s2 = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    # ||mu1 - mu2||^2 = 5; for diagonal S: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2 = 1 + 1 + 6.25
    a, b = _with_exact_moments(1000, mu1, s1, 0), _with_exact_moments(700, mu2, s2, 1)
    assert frechet_distance(a, b) == pytest.approx(13.25, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(13.25, rel=1e-9)


def test_frechet_distance_matches_closed_form_for_gaussian_samples():
    from scipy.linalg import sqrtm  # an independent matrix square root (scipy ships with scikit-learn)

    d, g = 4, _gen(123)
    a_ = torch.randn(d, d, generator=g, dtype=torch.float64)
    b_ = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1 = a_ @ a_.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    s2 = b_ @ b_.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mu1 = torch.zeros(d, dtype=torch.float64)
    mu2 = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
    exact = float((mu1 - mu2).pow(2).sum() + torch.trace(s1 + s2)
                  - 2 * torch.as_tensor(sqrtm((s1 @ s2).numpy()).real).trace())
    # same moments exactly -> same value to round-off
    exact_sets = _with_exact_moments(3000, mu1, s1, 2), _with_exact_moments(3000, mu2, s2, 3)
    assert frechet_distance(*exact_sets) == pytest.approx(exact, rel=1e-9)
    # i.i.d. samples, n = 20000: Monte-Carlo std 0.017 over 30 seeds; tolerance 4 std
    n = 20000
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    assert frechet_distance(x, y) == pytest.approx(exact, abs=0.07)


# ---------------------------------------------------------------------------------------------
# mode statistics, precision / recall, class coverage


def test_mode_stats_hand_built():
    means = ring_means(8, 2.0)
    std = 0.05
    jitter = (torch.rand(400, 2, generator=_gen(4)) * 2 - 1) * std  # |jitter| <= sqrt(2) std < 3 std
    on_four = means[torch.arange(400) % 4] + jitter  # 100 points on each of modes 0..3
    s = mode_stats(on_four, means, threshold=3 * std)
    assert s["precision"] == pytest.approx(1.0)
    assert s["coverage"] == 0.5 and s["modes_hit"] == 4
    assert s["counts"] == [100, 100, 100, 100, 0, 0, 0, 0]
    assert s["min_count"] == math.ceil(0.1 * 400 / 8)

    far = torch.zeros(50, 2)  # the ring's centre is 2 away from every mode
    s = mode_stats(far, means, threshold=0.15)
    assert s["precision"] == 0.0 and s["coverage"] == 0.0 and s["modes_hit"] == 0

    # 400 precise points on 4 modes + 1 stray precise point on mode 5 + 99 far points
    mixed = torch.cat([on_four, means[5:6], far[:1].expand(99, 2)])
    s = mode_stats(mixed, means, threshold=0.15)
    assert s["precision"] == pytest.approx(401 / 500)
    assert s["modes_hit"] == 4  # one sample (< default min_count = 7) does not cover a mode
    assert mode_stats(mixed, means, threshold=0.15, min_count=1)["modes_hit"] == 5


def _ring_clusters(n: int, which: list, g: torch.Generator, q: torch.Tensor) -> torch.Tensor:
    """Points around 8 ring centres (radius 10, std 1) in a 2-D plane embedded in 50-D by ``q``."""
    ang = torch.arange(8) * 2 * math.pi / 8
    centres = 10 * torch.stack([ang.cos(), ang.sin()], 1)
    k = torch.tensor(which)[torch.randint(len(which), (n,), generator=g)]
    return (centres[k] + torch.randn(n, 2, generator=g)) @ q.T


def test_precision_recall():
    g = _gen(5)
    q, _ = torch.linalg.qr(torch.randn(50, 2, generator=g))
    real = _ring_clusters(2000, list(range(8)), g, q)
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}

    # an exact subset: the real points of clusters 0..3 -> precision 1, recall = their share
    ang = torch.atan2((real @ q)[:, 1], (real @ q)[:, 0]) % (2 * math.pi)
    cluster = torch.round(ang / (2 * math.pi / 8)).long() % 8
    subset = real[cluster < 4]
    pr = precision_recall(real, subset)
    assert pr["precision"] == 1.0
    assert pr["recall"] == pytest.approx(len(subset) / len(real), abs=1e-12)

    # fresh samples: all clusters -> both high; half the clusters -> precision ~1, recall ~0.5
    full = precision_recall(real, _ring_clusters(2000, list(range(8)), g, q))
    assert full["precision"] > 0.95 and full["recall"] > 0.95
    half = precision_recall(real, _ring_clusters(2000, [0, 1, 2, 3], g, q))
    assert half["precision"] > 0.95
    assert half["recall"] == pytest.approx(0.5, abs=0.05)

    far = precision_recall(real, real + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_class_coverage_hand_built():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 3 + [4] * 2)  # 100 labels, 10 classes
    c = class_coverage(labels, 10)  # default min_fraction 0.25 / 10 -> at least 2.5%, i.e. 3 of 100
    assert c["classes_hit"] == 4 and c["coverage"] == 0.4
    assert c["histogram"] == [50, 30, 15, 3, 2, 0, 0, 0, 0, 0]
    p = torch.tensor([0.5, 0.3, 0.15, 0.03, 0.02], dtype=torch.float64)
    assert c["entropy"] == pytest.approx(float(-(p * p.log()).sum()) / math.log(10), rel=1e-12)
    assert class_coverage(labels, 10, min_fraction=0.02)["classes_hit"] == 5

    uniform = class_coverage(torch.arange(100) % 10, 10)
    assert uniform["coverage"] == 1.0 and uniform["entropy"] == pytest.approx(1.0)
    single = class_coverage(torch.full((100,), 7), 10)
    assert single["coverage"] == 0.1 and single["entropy"] == 0.0


# ---------------------------------------------------------------------------------------------
# digits data and feature classifier


def test_load_digits_split():
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    assert x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == math.ceil(0.3 * 1797)
    assert len(y_tr) == len(x_tr) and len(y_te) == len(x_te)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    for x in (x_tr, x_te):
        assert x.min() == -1.0 and x.max() == 1.0
    for y in (y_tr, y_te):  # stratified: every class on both sides, in the overall proportions
        counts = torch.bincount(y, minlength=10)
        assert (counts > 0).all()
        assert (counts.double() / len(y) - 0.1).abs().max() < 0.01
    again = load_digits_split(seed=0)
    assert all(torch.equal(u, v) for u, v in zip((x_tr, y_tr, x_te, y_te), again))
    other = load_digits_split(seed=1)
    assert not torch.equal(other[1], y_tr)


STEPS = 600  # measured test accuracy 0.993 (seed 0); the full default budget is 1500 steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    rng = torch.random.get_rng_state()
    model, info = digits_classifier(cache_dir=cache, seed=0, steps=STEPS)
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's global RNG is left alone
    return cache, model, info


def test_classifier_trains_to_high_accuracy(trained):
    _, model, info = trained
    assert isinstance(model, DigitsClassifier)
    assert info["cached"] is False and info["steps"] == STEPS
    assert info["test_accuracy"] >= 0.95
    assert info["train_seconds"] > 0 and info["final_loss"] < 0.2
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _, _, x_te, y_te = load_digits_split()
    pred = predict_labels(model, x_te)
    assert pred.dtype == torch.int64
    assert float((pred == y_te).double().mean()) == pytest.approx(info["test_accuracy"])
    f = digit_features(model, x_te, batch_size=100)
    assert f.shape == (len(x_te), 64) and torch.isfinite(f).all()
    assert (f.std(0) > 1e-4).all()  # no dead feature units
    assert torch.allclose(f, digit_features(model, x_te))
    assert class_coverage(pred, 10)["coverage"] == 1.0
    # real-vs-real in feature space: train vs test split are close, shuffled pixels are far
    x_tr = load_digits_split()[0]
    noise = x_te[:, :, torch.randperm(8), :]
    fd_real = frechet_distance(digit_features(model, x_tr), f)
    assert fd_real < frechet_distance(digit_features(model, noise), f)
    with pytest.raises(ValueError, match="x must"):
        digit_features(model, torch.zeros(4, 64))


def test_classifier_cache_hit_and_corruption(trained):
    cache, model, _ = trained
    again, info = digits_classifier(cache_dir=cache, seed=0, steps=STEPS)
    assert info["cached"] is True
    ref = model.state_dict()
    assert ref.keys() == again.state_dict().keys()
    assert all(torch.equal(ref[k], v) for k, v in again.state_dict().items())
    assert not again.training and not any(p.requires_grad for p in again.parameters())

    weights = next(cache.glob("digits-classifier-*/weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])  # flip the bits of some weight bytes
    weights.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="sha256"):
        retrained, info = digits_classifier(cache_dir=cache, seed=0, steps=STEPS)
    assert info["cached"] is False and info["test_accuracy"] >= 0.95
    # training is deterministic: the retrained weights equal the first run's bit for bit
    assert all(torch.equal(ref[k], v) for k, v in retrained.state_dict().items())
