"""The speed yardstick (benchmarks/released_port.py) computes exactly what our model computes."""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_benchmark

from hifusion_model.models.config import tiny_config
from hifusion_model.models.hifusion import HiFusion


def _randomize_statistics(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and level weights: identity ones would hide mix-ups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
        model.level_logits.copy_(torch.randn(model.level_logits.shape, generator=g))


@pytest.mark.parametrize("level_norm", ["shared", "per_level"])
def test_port_matches_ours_with_shared_weights(level_norm):
    torch.manual_seed(0)
    config = tiny_config(levels=(1, 2, 7), level_norm=level_norm)
    ours = HiFusion(config)
    _randomize_statistics(ours, seed=1)
    port = load_benchmark("released_port").ReleasedHiFusion(config)
    port.load_state_dict(ours.state_dict())  # strict: same parameter and buffer names
    ours.eval(), port.eval()

    g = torch.Generator().manual_seed(2)
    spot = torch.rand(5, 3, config.spot_px, config.spot_px, generator=g)
    region = torch.rand(5, 3, config.region_px, config.region_px, generator=g)
    with torch.no_grad():
        a, b = ours(spot, region), port(spot, region)

    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(b.prediction, a.prediction, **close)
    torch.testing.assert_close(b.fusion_weights, a.fusion_weights, **close)
    torch.testing.assert_close(b.attention, a.attention, **close)
    for fb, fa in zip(b.level_features, a.level_features, strict=True):
        torch.testing.assert_close(fb, fa, **close)
    for pb, pa in zip(b.level_predictions, a.level_predictions, strict=True):
        torch.testing.assert_close(pb, pa, **close)
    # live, level-specific maps: a tile mix-up or a dead network would not survive this
    assert all(f.abs().mean() > 1e-3 for f in a.level_features)
    assert not torch.allclose(a.level_features[1], a.level_features[2])
