"""The per-spot uncertainty: Poisson noise of the target at a library read from the stain."""

from __future__ import annotations

import numpy as np
import pytest

from hifusion_model.errors import SectionError
from hifusion_model.inference.uncertainty import (
    NoiseModel,
    error_correlation,
    fit_noise_model,
    poisson_log_sd,
    stain_features,
)


def test_poisson_log_sd_matches_sampling():
    rng = np.random.default_rng(0)
    lam = np.array([0.05, 0.7, 3.0, 25.0, 400.0, 5000.0])
    sampled = np.log1p(rng.poisson(lam, size=(200_000, len(lam)))).std(axis=0)
    np.testing.assert_allclose(poisson_log_sd(lam), sampled, rtol=0.02, atol=1e-3)


def test_purple_nuclei_read_as_more_haematoxylin_than_pink_stroma():
    pink = np.zeros((1, 3, 32, 32), np.uint8) + np.array([230, 150, 200], np.uint8)[None, :,
                                                                                    None, None]
    purple = np.zeros_like(pink) + np.array([90, 60, 150], np.uint8)[None, :, None, None]
    f = stain_features(np.concatenate([pink, purple]))
    assert f.shape == (2, 1) and f[1, 0] > f[0, 0]


def test_noise_model_recovers_a_linear_library_and_round_trips():
    rng = np.random.default_rng(1)
    h = rng.uniform(0.01, 0.1, size=(300, 1))
    library = np.exp(5.0 + 30.0 * h[:, 0] + rng.normal(0, 0.05, 300))
    model = fit_noise_model(h, library)
    assert model.intercept == pytest.approx(5.0, abs=0.05)
    assert model.coef[0] == pytest.approx(30.0, rel=0.05)
    assert model.residual_sd == pytest.approx(0.05, rel=0.2)
    assert NoiseModel.from_card({"noise_model": model.to_dict()}) == model
    assert NoiseModel.from_card({}) is None
    with pytest.raises(SectionError, match="at least"):
        fit_noise_model(h[:2], library[:2])


def test_sparser_tissue_gets_more_uncertainty_and_that_ranks_the_error():
    """Spots that catch few UMIs have noisier targets: the model says so, and it is right."""
    rng = np.random.default_rng(2)
    n, genes = 400, 20
    h = rng.uniform(0.0, 0.1, size=(n, 1))
    library = np.exp(4.0 + 30.0 * h[:, 0])
    profile = rng.dirichlet(np.ones(genes))
    counts = rng.poisson(profile[None] * library[:, None])
    truth = np.log((counts + 1) / (counts + 1).sum(axis=1, keepdims=True))
    pred = np.broadcast_to(np.log(profile + 1 / library.mean()), truth.shape)
    model = fit_noise_model(h, (counts + 1).sum(axis=1))
    u = model.uncertainty(pred, h)
    assert u.shape == (n, genes) and u.dtype == np.float32 and np.all(u > 0)
    scores = error_correlation(u, pred, truth)
    assert scores["per_spot"] > 0.5 and scores["per_gene"] > 0.2
    # shuffled, it ranks nothing
    shuffled = error_correlation(u[rng.permutation(n)], pred, truth)
    assert abs(shuffled["per_spot"]) < 0.15
