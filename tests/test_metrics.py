from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from hifusion_model.errors import HiFusionError
from hifusion_model.evaluation.metrics import (
    MetricInputError,
    evaluate_predictions,
    gene_pcc,
    mae,
    mse,
    per_gene_pcc_by_section,
    per_spot_pcc,
    skill,
    spot_pcc,
    top_genes,
)

# 4 spots x 3 genes, small integers so the expected values are easy to check by hand.
TRUTH = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 5.0], [3.0, 4.0, 4.0], [0.0, 3.0, 6.0]])
PRED = np.array([[1.5, 2.0, 2.0], [2.0, 2.0, 4.0], [2.5, 3.0, 5.0], [1.0, 2.0, 5.0]])


def test_errors_match_hand_computation():
    diff = PRED - TRUTH
    assert mse(PRED, TRUTH) == pytest.approx((diff**2).sum() / 12)
    assert mae(PRED, TRUTH) == pytest.approx(np.abs(diff).sum() / 12)
    assert mse(PRED, TRUTH) == pytest.approx(8.5 / 12)


def test_correlations_match_scipy():
    by_spot = [pearsonr(PRED[i], TRUTH[i])[0] for i in range(4)]
    by_gene = [pearsonr(PRED[:, g], TRUTH[:, g])[0] for g in range(3)]
    np.testing.assert_allclose(per_spot_pcc(PRED, TRUTH), by_spot, rtol=1e-12)
    assert spot_pcc(PRED, TRUTH) == pytest.approx(np.mean(by_spot))
    np.testing.assert_allclose(gene_pcc(PRED, TRUTH), by_gene, rtol=1e-12)


def test_accepts_torch_tensors():
    assert mse(torch.from_numpy(PRED).float(), TRUTH) == pytest.approx(mse(PRED, TRUTH), rel=1e-6)


def test_constant_predictor_scores_zero_per_gene_but_high_per_spot():
    rng = np.random.default_rng(0)
    profile = np.linspace(0.0, 5.0, 20)  # every spot shares one broad profile ...
    truth = profile + 0.3 * rng.standard_normal((50, 20))  # ... plus spot-level variation
    constant = np.broadcast_to(truth.mean(axis=0), truth.shape)
    assert np.array_equal(gene_pcc(constant, truth), np.zeros(20))
    assert spot_pcc(constant, truth) > 0.95


def test_constant_from_rounding_is_still_zero():
    # The column mean of 0.1 is not exactly 0.1 in floating point; the result must still be 0.
    truth = np.array([[0.1, 1.0], [0.1, 2.0], [0.1, 3.0]])
    np.testing.assert_array_equal(gene_pcc(truth[:, [1, 1]], truth)[0], 0.0)
    np.testing.assert_array_equal(gene_pcc(truth, truth), [0.0, 1.0])


def test_per_section_average_differs_from_pooled():
    # Within each section the prediction is anti-correlated, but the section offset it gets
    # right makes the pooled correlation strongly positive.
    truth = np.array([[0.0], [1.0], [10.0], [11.0]])
    pred = np.array([[1.0], [0.0], [11.0], [10.0]])
    sections = ["A", "A", "B", "B"]
    assert gene_pcc(pred, truth)[0] > 0.9
    np.testing.assert_allclose(per_gene_pcc_by_section(pred, truth, sections), [-1.0])
    result = evaluate_predictions(pred, truth, sections=sections)
    assert result["gene_pcc"] == pytest.approx(-1.0)
    assert result["per_section"]["B"]["gene_pcc"] == pytest.approx(-1.0)


def test_skill():
    assert skill(0.25, 1.0) == 0.75
    assert skill(1.0, 1.0) == 0.0
    assert skill(2.0, 1.0) == -1.0
    with pytest.raises(MetricInputError, match="baseline"):
        skill(0.1, 0.0)


def test_evaluate_predictions_report():
    genes = ["ERBB2", "ACTB", "CD74"]
    sections = np.array(["S1", "S1", "S2", "S2"])
    train_mean = np.array([1.0, 2.5, 4.0])
    result = evaluate_predictions(
        PRED, TRUTH, sections=sections, genes=genes, train_mean=train_mean
    )
    # The report is plain JSON (strict: no NaN, no inf).
    assert json.loads(json.dumps(result, allow_nan=False)) == result

    base = np.broadcast_to(train_mean, TRUTH.shape)
    assert result["n_spots"] == 4 and result["n_genes"] == 3 and result["n_sections"] == 2
    assert result["mse"] == pytest.approx(mse(PRED, TRUTH))
    assert result["spot_pcc"] == pytest.approx(spot_pcc(PRED, TRUTH))
    assert result["baseline"]["mse"] == pytest.approx(mse(base, TRUTH))
    assert result["baseline"]["gene_pcc"] == 0.0
    assert result["baseline"]["source"] == "train_mean"
    assert result["skill"] == pytest.approx(1 - mse(PRED, TRUTH) / mse(base, TRUTH))

    per_gene = (gene_pcc(PRED[:2], TRUTH[:2]) + gene_pcc(PRED[2:], TRUTH[2:])) / 2
    assert list(result["gene_pcc_all"]) == genes
    np.testing.assert_allclose(list(result["gene_pcc_all"].values()), per_gene)
    assert result["gene_pcc"] == pytest.approx(per_gene.mean())
    assert set(result["genes"]) == {"ERBB2", "CD74"}  # KRT19 is not among the genes
    assert result["genes"]["CD74"] == pytest.approx(per_gene[2])
    assert result["per_section"]["S2"]["n_spots"] == 2
    assert result["per_section"]["S2"]["mse"] == pytest.approx(mse(PRED[2:], TRUTH[2:]))


def test_without_train_mean_the_baseline_is_the_test_mean():
    result = evaluate_predictions(PRED, TRUTH)
    assert result["baseline"]["source"] == "test_mean"
    assert result["baseline"]["mse"] == pytest.approx(TRUTH.var(axis=0).mean())
    assert list(result["per_section"]) == ["all"]


def test_top_genes():
    assert top_genes({"a": 0.1, "b": 0.5, "c": -0.2}, n=2) == [("b", 0.5), ("a", 0.1)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_raises(bad):
    pred = PRED.copy()
    pred[1, 2] = bad
    with pytest.raises(MetricInputError, match="pred holds 1 NaN or infinite"):
        spot_pcc(pred, TRUTH)
    with pytest.raises(ValueError):  # also a ValueError for numeric callers
        evaluate_predictions(TRUTH, pred)


def test_shape_problems_raise():
    with pytest.raises(MetricInputError, match="shape"):
        mse(PRED, TRUTH[:3])
    with pytest.raises(MetricInputError, match="one label per spot"):
        per_gene_pcc_by_section(PRED, TRUTH, ["A"])
    with pytest.raises(MetricInputError, match="gene names"):
        evaluate_predictions(PRED, TRUTH, genes=["a"])
    with pytest.raises(HiFusionError, match="train_mean has 2 genes"):
        evaluate_predictions(PRED, TRUTH, train_mean=[1.0, 2.0])
