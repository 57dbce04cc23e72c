"""The pieces of the recipe probe (benchmarks/spot_probe.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from hifusion_model.evaluation.metrics import gene_pcc
from hifusion_model.models.hifusion import zscore_per_channel

probe = load_benchmark("spot_probe")


def test_batch_gene_pcc_is_the_metric_and_has_a_gradient_at_a_constant():
    g = torch.Generator().manual_seed(0)
    pred, truth = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    expected = np.mean(gene_pcc(pred.numpy(), truth.numpy()))
    assert probe.batch_gene_pcc(pred, truth).item() == pytest.approx(expected, abs=1e-3)
    constant = torch.zeros(16, 5, requires_grad=True)
    probe.batch_gene_pcc(constant, truth).backward()
    assert torch.isfinite(constant.grad).all() and constant.grad.abs().sum() > 0


def test_low_rank_readout_keeps_the_training_subspace_only():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g)).Q.T  # two orthonormal gene axes
    y = torch.randn(40, 2, generator=g) @ basis + torch.arange(6.0)
    readout = probe.low_rank_readout(y, rank=2)
    torch.testing.assert_close(readout(y), y, atol=1e-4, rtol=0)
    v = torch.randn(6, generator=g)
    off_axis = v - basis.T @ (basis @ v)  # orthogonal to both axes
    mean = y.mean(0)
    torch.testing.assert_close(readout(mean + off_axis), mean, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in readout.parameters())


def test_adapt_batchnorm_takes_the_sections_statistics_on_a_copy():
    torch.manual_seed(0)
    net = probe.SpotNet(3, "image")
    before = net.trunk.bn1.running_mean.clone()
    patches = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    adapted = probe.adapt_batchnorm(net, patches)
    torch.testing.assert_close(net.trunk.bn1.running_mean, before)
    with torch.no_grad():
        x = zscore_per_channel(torch.from_numpy(patches).float() / 255)
        expected = net.trunk.conv1(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(adapted.trunk.bn1.running_mean, expected, atol=0.05, rtol=0.05)
