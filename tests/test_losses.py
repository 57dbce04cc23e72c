"""The HiFusion loss on hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from hifusion_model.errors import ConfigError
from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusionOutput
from hifusion_model.models.losses import LossTerms, hifusion_loss


def _output(level_predictions, level_features, prediction=((1.0, 2.0),)) -> HiFusionOutput:
    n = len(level_predictions)
    return HiFusionOutput(
        prediction=torch.tensor(prediction),
        level_predictions=[torch.tensor(p) for p in level_predictions],
        level_features=[torch.tensor(f).view(1, 2, 1, 1) for f in level_features],
        fusion_weights=torch.full((n,), 1 / n),
        attention=torch.full((1, 1, 1, 4), 0.25),
    )


def test_hand_computed_terms_with_released_weights():
    config = tiny_config(genes=2)  # levels (1, 2, 7): aux 1/3, align 0.5
    output = _output(
        level_predictions=[[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]],  # MSE 0, 1, 2
        level_features=[[0.0, 0.0], [1.0, -1.0], [2.0, 2.0]],  # |f1 - f|: 1, 2
    )
    terms = hifusion_loss(output, torch.zeros(1, 2), config)
    assert isinstance(terms, LossTerms)
    assert terms.main.item() == pytest.approx(2.5)  # (1² + 2²) / 2
    assert terms.aux.item() == pytest.approx(3.0)
    assert terms.align.item() == pytest.approx(3.0)
    assert terms.total.item() == pytest.approx(2.5 + 3.0 / 3 + 0.5 * 3.0)
    assert terms.item() == pytest.approx({"total": 5.0, "main": 2.5, "aux": 3.0, "align": 3.0})


def test_gene_weights_scale_each_genes_squared_error():
    config = tiny_config(genes=2)
    output = _output(level_predictions=[[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 0.0]]],
                     level_features=[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    terms = hifusion_loss(output, torch.zeros(1, 2), config, torch.tensor([1.5, 0.5]))
    assert terms.main.item() == pytest.approx((1.5 * 1 + 0.5 * 4) / 2)
    assert terms.aux.item() == pytest.approx(0 + (1.5 + 0.5) / 2 + 1.5 * 4 / 2)


def test_aux_weight_defaults_to_one_over_levels_and_can_be_set():
    target = torch.zeros(1, 2)
    output = _output([[[0.0, 0.0]], [[2.0, 2.0]]], [[0.0, 0.0], [0.0, 0.0]])  # aux 4, align 0
    default = hifusion_loss(output, target, tiny_config(genes=2, levels=(1, 2)))
    assert default.total.item() == pytest.approx(2.5 + 4.0 / 2)
    custom = hifusion_loss(output, target, tiny_config(genes=2, levels=(1, 2), aux_weight=0.25))
    assert custom.total.item() == pytest.approx(2.5 + 0.25 * 4.0)


def test_alignment_is_measured_against_level_one_wherever_it_is_listed():
    config = tiny_config(genes=2, levels=(2, 1, 7), align_weight=1.0)
    zero = [[0.0, 0.0]]
    output = _output([zero] * 3, [[3.0, 3.0], [1.0, 1.0], [1.0, 0.0]])  # |f1 - f|: 2, 0.5
    assert hifusion_loss(output, torch.zeros(1, 2), config).align.item() == pytest.approx(2.5)


def test_single_level_has_zero_alignment():
    config = tiny_config(genes=2, levels=(1,))
    terms = hifusion_loss(_output([[[1.0, 1.0]]], [[5.0, 5.0]]), torch.zeros(1, 2), config)
    assert terms.align.item() == 0 and terms.total.item() == pytest.approx(2.5 + 1.0)


def test_loss_is_float32_for_bfloat16_outputs_and_differentiable():
    config = tiny_config(genes=2)
    prediction = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, requires_grad=True)
    output = _output([[[0.0, 0.0]]] * 3, [[0.0, 0.0]] * 3)
    output.prediction = prediction
    terms = hifusion_loss(output, torch.zeros(1, 2), config)
    assert terms.total.dtype == torch.float32
    terms.total.backward()
    assert torch.allclose(prediction.grad.float(), torch.tensor([[1.0, 2.0]]))  # d/dp mean(p²)


def test_target_shape_must_match_prediction():
    config = tiny_config(genes=2)
    output = _output([[[0.0, 0.0]]] * 3, [[0.0, 0.0]] * 3)
    with pytest.raises(ConfigError, match=r"targets have shape \(1, 3\).*predicts \(1, 2\)"):
        hifusion_loss(output, torch.zeros(1, 3), config)
