"""Fast checks of the Fréchet distance in benchmarks/mnist_quality.py (no MNIST, no training)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

MODULE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist_quality.py"


@pytest.fixture(scope="module")
def mq():
    spec = importlib.util.spec_from_file_location("mnist_quality", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(mq):
    # For diagonal covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(var1_i) - sqrt(var2_i))^2.
    rng = np.random.default_rng(0)
    mu1 = np.array([0.0, 0.0, 1.0, -1.0])
    mu2 = np.array([1.0, 2.0, 1.0, -1.0])
    var1 = np.array([1.0, 4.0, 9.0, 0.25])
    var2 = np.array([4.0, 1.0, 9.0, 1.0])
    n = 200_000
    a = mu1 + np.sqrt(var1) * rng.standard_normal((n, 4))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((n, 4))

    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert expected == pytest.approx(7.25)
    assert mq.frechet_distance_from_features(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_closed_form_from_exact_statistics(mq):
    mu1, mu2 = np.zeros(3), np.array([3.0, 0.0, 4.0])
    sigma1, sigma2 = np.diag([1.0, 4.0, 16.0]), np.diag([9.0, 4.0, 1.0])
    expected = 25.0 + (1 - 3) ** 2 + 0.0 + (4 - 1) ** 2
    assert mq.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_sets_is_zero(mq):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    assert mq.frechet_distance_from_features(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_is_symmetric(mq):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    b = 0.5 + rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    forward = mq.frechet_distance_from_features(a, b)
    backward = mq.frechet_distance_from_features(b, a)
    assert forward > 1.0
    assert forward == pytest.approx(backward, rel=1e-8)


def test_trace_sqrt_product_handles_singular_covariances(mq):
    # Rank-deficient covariances (more dimensions than samples) must not give NaNs.
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 10))
    b = rng.standard_normal((5, 10))
    assert np.isfinite(mq.frechet_distance_from_features(a, b))
