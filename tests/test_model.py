"""The HiFusion network and its ResNet trunks: shapes, size, tiling, gradients, determinism."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from hifusion_model.errors import CheckpointError, ConfigError
from hifusion_model.models.backbones import (
    LevelBatchNorm2d,
    load_torchvision_resnet18,
    resnet10_trunk,
    resnet18_trunk,
    use_level,
)
from hifusion_model.models.checkpoint import load_model, save_checkpoint
from hifusion_model.models.config import ModelConfig, tiny_config
from hifusion_model.models.hifusion import (
    HiFusion,
    HiFusionOutput,
    align_to,
    assemble_tiles,
    count_parameters,
    encode_level,
    hism_tiles,
    zscore_per_channel,
)
from hifusion_model.models.losses import hifusion_loss


def _inputs(config: ModelConfig, batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    spot = torch.rand(batch, 3, config.spot_px, config.spot_px, generator=g)
    region = torch.rand(batch, 3, config.region_px, config.region_px, generator=g)
    return spot, region


# -- trunks ----------------------------------------------------------------------------------
def test_trunks_match_torchvision_layout_and_size():
    r18, r10 = resnet18_trunk(), resnet10_trunk()
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in fc (512·1000 + 1000).
    assert count_parameters(r18) == 11_689_512 - 513_000
    assert count_parameters(r10) == 4_905_792
    names = set(r18.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.1.conv2.weight",
            "layer2.0.downsample.0.weight", "layer4.1.bn2.num_batches_tracked"} <= names
    assert not any(n.startswith(("fc.", "avgpool")) for n in names)
    assert "layer1.1.conv1.weight" not in r10.state_dict()
    r18.eval()
    with torch.inference_mode():  # the three HISM tile sizes of the released model
        shapes = [tuple(r18(torch.rand(2, 3, s, s)).shape) for s in (224, 112, 32)]
    assert shapes == [(2, 512, 7, 7), (2, 512, 4, 4), (2, 512, 1, 1)]


def test_trunk_init_is_kaiming_fan_out():
    torch.manual_seed(0)
    w = resnet18_trunk().layer4[0].conv2.weight  # fan_out = 512·9: std = sqrt(2 / 4608)
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02)


def _torchvision_state(width: int = 64, seed: int = 1) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    trunk = resnet18_trunk(width)
    for m in trunk.modules():  # make BatchNorm statistics non-trivial, so copying them shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = dict(trunk.state_dict())
    state["fc.weight"] = torch.randn(1000, 8 * width)
    state["fc.bias"] = torch.randn(1000)
    return state


@pytest.mark.parametrize("wrap", [False, True])
def test_load_torchvision_resnet18_copies_every_tensor(tmp_path, wrap):
    state = _torchvision_state(width=16)
    saved = {"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state
    torch.save(saved, tmp_path / "r18.pth")
    torch.manual_seed(2)
    trunk = resnet18_trunk(16)
    assert load_torchvision_resnet18(trunk, tmp_path / "r18.pth") is trunk
    loaded = trunk.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k


def test_load_torchvision_resnet18_rejects_bad_files(tmp_path):
    trunk = resnet18_trunk(16)
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_torchvision_resnet18(trunk, tmp_path / "absent.pth")

    torch.save(_torchvision_state(width=8), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=r"narrow\.pth.*wrong shape.*conv1\.weight"):
        load_torchvision_resnet18(trunk, tmp_path / "narrow.pth")

    torch.save(resnet10_trunk(16).state_dict(), tmp_path / "r10.pth")
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_torchvision_resnet18(trunk, tmp_path / "r10.pth")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_torchvision_resnet18(trunk, tmp_path / "list.pth")

    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth: it is not a safe weights file"):
        load_torchvision_resnet18(trunk, tmp_path / "junk.pth")


# -- full-size model -------------------------------------------------------------------------
def test_default_model_shapes_and_parameter_count():
    config = ModelConfig(genes=[f"G{i}" for i in range(250)])
    torch.manual_seed(0)
    model = HiFusion(config).eval()
    # spot ResNet-18 trunk 11,176,512 + region ResNet-10 trunk 4,905,792
    # + shared level head 512·250 + 250 = 128,250 + cross-attention 4·(512·512 + 512) = 1,050,624
    # + head LayerNorm 1,024 + Linear 128,250 + 3 level weights = 17,390,455
    expected = 11_176_512 + 4_905_792 + 128_250 + 1_050_624 + 1_024 + 128_250 + 3
    assert count_parameters(model) == expected
    assert abs(count_parameters(model) - 17.4e6) < 0.3e6

    for batch in (1, 5):
        with torch.inference_mode():
            out = model(*_inputs(config, batch))
        assert isinstance(out, HiFusionOutput)
        assert out.prediction.shape == (batch, 250)
        assert [p.shape for p in out.level_predictions] == [(batch, 250)] * 3
        assert [f.shape for f in out.level_features] == [(batch, 512, 7, 7)] * 3
        assert out.attention.shape == (batch, 8, 1, 4)
        assert torch.allclose(out.attention.sum(-1), torch.ones(batch, 8, 1))
        assert torch.allclose(out.fusion_weights, torch.full((3,), 1 / 3))
        assert torch.isfinite(out.prediction).all()


# -- HISM tiling -----------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiles_are_cut_row_major_and_reassemble_exactly(channels_last):
    x = torch.randn(2, 3, 14, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tiles = hism_tiles(x, 7)
    assert tiles.shape == (2 * 49, 3, 2, 2)
    assert torch.equal(tiles[49 + 3 * 7 + 5], x[1, :, 6:8, 10:12])  # image 1, tile (3, 5)
    assert tiles.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(assemble_tiles(tiles, 7), x)


def _constant_tiles(batch: int, k: int, px: int) -> tuple[Tensor, Tensor]:
    """Images whose k×k tiles are flat, with a distinct value per image, channel and tile."""
    values = torch.arange(batch * 3 * k * k, dtype=torch.float32).reshape(batch, 3, k, k)
    values = values / values.numel()
    t = px // k
    return values.repeat_interleave(t, -2).repeat_interleave(t, -1), values


def test_encode_level_puts_each_tile_where_it_came_from():
    image, values = _constant_tiles(batch=2, k=7, px=56)
    assert torch.allclose(encode_level(nn.AdaptiveAvgPool2d(1), image, 7), values, atol=1e-6)


class _PoolEncoder(nn.Module):
    """An 'encoder' that average-pools to ``size`` and pads channels with zeros: layout only."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size

    def forward(self, x: Tensor) -> Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, self.size)
        return nn.functional.pad(pooled, (0, 0, 0, 0, 0, self.channels - x.shape[1]))


@pytest.mark.parametrize(("levels", "k", "size"), [((1, 7), 7, 7), ((1, 2), 2, 4)])
def test_model_level_maps_reproduce_the_tile_layout(levels, k, size):
    config = tiny_config(levels=levels, input_norm="none")
    model = HiFusion(config).eval()
    model.spot_encoder = _PoolEncoder(config.feature_dim, size)
    spot, values = _constant_tiles(batch=2, k=k, px=config.spot_px)
    region = torch.rand(2, 3, config.region_px, config.region_px)
    with torch.inference_mode():
        out = model(spot, region)
    expected = values.repeat_interleave(size // k, -2).repeat_interleave(size // k, -1)
    for features in out.level_features:  # level 1 and the re-assembled, max-pooled tiles
        assert features.shape == (2, config.feature_dim, size, size)
        assert torch.allclose(features[:, :3], expected, atol=1e-6)
        assert not features[:, 3:].any()


def test_align_to_max_pools_larger_and_interpolates_smaller_maps():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.equal(align_to(x, (4, 4)), nn.functional.max_pool2d(x, 2))
    small = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    up = align_to(small, (4, 4))
    assert up.shape == (1, 1, 4, 4) and up[0, 0, 0, 0] == 0 and up[0, 0, -1, -1] == 3
    assert align_to(x, (8, 8)) is x


def test_zscore_is_per_image_and_channel_and_safe_on_flat_images():
    x = torch.rand(2, 3, 8, 8) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 3
    z = zscore_per_channel(x)
    assert torch.allclose(z.mean((-2, -1)), torch.zeros(2, 3), atol=1e-5)
    # std 1 up to the eps: the low-contrast channel (std 0.03) comes out 0.3 % short
    assert torch.allclose(z.std((-2, -1), unbiased=False), torch.ones(2, 3), atol=5e-3)
    flat = zscore_per_channel(torch.full((1, 3, 224, 224), 0.7))
    assert flat.abs().max() < 1e-2  # float rounding of the mean is not blown up to unit scale


# -- training behaviour ----------------------------------------------------------------------
def test_gradients_reach_encoders_fusion_weights_and_attention():
    config = tiny_config()
    torch.manual_seed(0)
    model = HiFusion(config).train()
    spot, region = _inputs(config, batch=4)
    hifusion_loss(model(spot, region), torch.randn(4, config.n_genes), config).total.backward()
    for name in ("spot_encoder.conv1.weight", "spot_encoder.layer4.1.conv2.weight",
                 "region_encoder.conv1.weight", "level_logits", "cross_attention.in_proj_weight",
                 "cross_attention.out_proj.weight", "level_head.weight", "head.2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_same_seed_same_model_and_eval_is_deterministic():
    config = tiny_config(head_dropout=0.5)
    inputs = _inputs(config, batch=3)
    torch.manual_seed(7)
    a = HiFusion(config).eval()
    torch.manual_seed(7)
    b = HiFusion(config).eval()
    with torch.no_grad():
        first, second, other = a(*inputs), a(*inputs), b(*inputs)
    assert torch.equal(first.prediction, second.prediction)
    assert torch.equal(first.attention, second.attention)
    assert torch.equal(first.prediction, other.prediction)

    a.train()
    with torch.no_grad():
        assert not torch.equal(a(*inputs).prediction, a(*inputs).prediction)  # dropout


@pytest.mark.parametrize("level_norm", ["shared", "per_level"])
def test_channels_last_and_bfloat16_autocast_agree_with_float32(level_norm):
    config = tiny_config(level_norm=level_norm)
    torch.manual_seed(0)
    model = HiFusion(config).eval()
    spot, region = _inputs(config, batch=2)
    with torch.no_grad():
        reference = model(spot, region).prediction
        model = model.to(memory_format=torch.channels_last)
        cl = [x.contiguous(memory_format=torch.channels_last) for x in (spot, region)]
        assert torch.allclose(model(*cl).prediction, reference, atol=1e-4)
        encoded = []
        hook = model.spot_encoder.register_forward_hook(lambda m, i, o: encoded.append(o.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*cl)
        hook.remove()
    # the encoders run in bf16; the fusion, attention and head stay in fp32 (exact where cheap)
    assert set(encoded) == {torch.bfloat16}
    assert out.prediction.dtype == torch.float32
    assert torch.allclose(out.prediction.float(), reference, atol=0.1 * reference.abs().max())

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hifusion_loss(model(*cl), torch.randn(2, config.n_genes), config)
    assert loss.total.dtype == torch.float32
    loss.total.backward()
    assert model.spot_encoder.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("spot_shape", "region_shape", "match"),
    [
        ((2, 3, 48, 48), (2, 3, 112, 112), r"spot must be \(B, 3, 56, 56\).*\(2, 3, 48, 48\)"),
        ((2, 3, 56, 56), (2, 4, 112, 112), r"region must be \(B, 3, 112, 112\)"),
        ((3, 56, 56), (2, 3, 112, 112), r"spot must be \(B, 3, 56, 56\)"),
        ((2, 3, 56, 56), (3, 3, 112, 112), "2 spots but 3 regions"),
    ],
)
def test_wrong_input_shapes_name_the_expected_shape(spot_shape, region_shape, match):
    model = HiFusion(tiny_config())
    with pytest.raises(ConfigError, match=match):
        model(torch.rand(spot_shape), torch.rand(region_shape))


def test_integer_images_are_refused():
    config = tiny_config()
    spot = torch.zeros(1, 3, 56, 56, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="divide uint8 by 255"):
        HiFusion(config)(spot, torch.rand(1, 3, 112, 112))


def _synthetic_spots(config: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """16 spots = 4 colours × 4 stripe frequencies; each gene is a colour effect + a texture one."""
    colours = torch.tensor([[0.9, 0.3, 0.5], [0.4, 0.2, 0.8], [0.8, 0.7, 0.9], [0.3, 0.6, 0.4]])
    g = torch.Generator().manual_seed(0)
    colour_effect = torch.randn(4, config.n_genes, generator=g)
    texture_effect = torch.randn(4, config.n_genes, generator=g)

    def image(colour: Tensor, freq: int, px: int) -> Tensor:
        x = torch.linspace(0, 1, px)
        stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * freq * x).view(1, 1, px).expand(1, px, px)
        return colour.view(3, 1, 1) * (0.6 + 0.4 * stripes)

    cases = [(c, t) for c in range(4) for t in range(4)]
    freqs = (0, 2, 5, 11)
    spots = torch.stack([image(colours[c], freqs[t], config.spot_px) for c, t in cases])
    regions = torch.stack([image(colours[c], freqs[t], config.region_px) for c, t in cases])
    targets = torch.stack([colour_effect[c] + texture_effect[t] for c, t in cases])
    return spots, regions, targets


@dataclass
class _Overfit:
    model: HiFusion
    losses: list[float]
    train_mse: float  #: train-mode forward (batch statistics)
    eval_mse: float  #: eval-mode forward (running statistics)


@functools.cache
def _overfit(level_norm: str) -> _Overfit:
    """100 Adam steps on the 16 synthetic spots, all three HISM levels (cached: ~5 s each)."""
    # input_norm="none": per-image z-scoring would, by design, erase flat colour differences;
    # 28/56 px patches keep 100 steps at a few seconds (7×7 tiles of 4 px still work).
    config = tiny_config(input_norm="none", spot_px=28, region_px=56, level_norm=level_norm)
    torch.manual_seed(0)
    model = HiFusion(config).train()
    spots, regions, targets = _synthetic_spots(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = hifusion_loss(model(spots, regions), targets, config)
        loss.total.backward()
        optimizer.step()
        losses.append(loss.main.item())
    with torch.no_grad():
        eval_mse = (model.eval()(spots, regions).prediction - targets).square().mean().item()
        train_mse = (model.train()(spots, regions).prediction - targets).square().mean().item()
    return _Overfit(model.eval(), losses, train_mse, eval_mse)


@pytest.mark.slow
def test_tiny_model_overfits_sixteen_synthetic_spots():
    losses = _overfit("shared").losses
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


# -- per-level BatchNorm statistics ------------------------------------------------------------
@pytest.mark.slow
def test_per_level_statistics_make_eval_match_training():
    shared, per_level = _overfit("shared"), _overfit("per_level")
    # Training is untouched: same init, same batch statistics, hence the very same losses.
    assert per_level.losses == shared.losses
    # Shared statistics mix 28-px spots with 4-px tiles, so eval mode predicts something else
    # (measured: train 0.003, eval ~1); per-level statistics keep eval where training got.
    assert per_level.eval_mse < 5 * per_level.train_mse + 0.05, per_level
    assert per_level.eval_mse < 0.1 * shared.eval_mse, (per_level, shared)


def test_per_level_adds_buffers_but_no_parameters():
    shared = HiFusion(tiny_config())
    per_level = HiFusion(tiny_config(level_norm="per_level"))
    assert count_parameters(per_level) == count_parameters(shared)
    assert [n for n, _ in per_level.named_parameters()] == [n for n, _ in shared.named_parameters()]
    extra = set(per_level.state_dict()) - set(shared.state_dict())
    assert set(shared.state_dict()) < set(per_level.state_dict())
    assert extra and all(k.startswith("spot_encoder.") and ".level_" in k for k in extra)
    bn = per_level.spot_encoder.layer2[0].downsample[1]
    assert isinstance(bn, LevelBatchNorm2d) and bn.level_running_var.shape == (2, 16)
    assert not any(isinstance(m, LevelBatchNorm2d) for m in per_level.region_encoder.modules())


def test_each_level_updates_only_its_own_statistics():
    config = tiny_config(levels=(1, 7), input_norm="none", level_norm="per_level")
    torch.manual_seed(0)
    model = HiFusion(config).train()
    whole, tiles = copy.deepcopy(model.spot_encoder), copy.deepcopy(model.spot_encoder)
    spot, region = _inputs(config, batch=4)
    with torch.no_grad():
        model(spot, region)
        whole(spot)  # level 0 of a fresh copy: what the whole spots alone do to statistics
        tiles(hism_tiles(spot, 7))
    pairs = zip(model.spot_encoder.modules(), whole.modules(), tiles.modules())
    norms = [(m, w, t) for m, w, t in pairs if isinstance(m, LevelBatchNorm2d)]
    assert len(norms) == 20
    for m, w, t in norms:
        assert torch.allclose(m.running_mean, w.running_mean, atol=1e-6)
        assert torch.allclose(m.running_var, w.running_var, atol=1e-6)
        assert torch.allclose(m.level_running_mean[0], t.running_mean, atol=1e-6)
        assert torch.allclose(m.level_running_var[0], t.running_var, atol=1e-6)
        assert m.num_batches_tracked == m.level_num_batches_tracked[0] == 1
    # The levels see different images: 8-px tiles shrink to 1×1 maps, mostly padding. After one
    # momentum-0.1 step, a 0.05 gap in running variance is a 0.5 gap in batch variance.
    last = model.spot_encoder.layer4[1].bn2
    assert (last.running_var - last.level_running_var[0]).abs().max() > 0.05


def test_level_batch_norm_trains_like_batch_norm_and_evaluates_per_level():
    torch.manual_seed(0)
    plain, levelled = nn.BatchNorm2d(4), LevelBatchNorm2d(4, levels=3)
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    with use_level(levelled, 2):
        assert levelled.level == 2
        assert torch.equal(levelled(x), plain(x))
    assert levelled.level == 0  # restored
    assert torch.equal(levelled.level_running_mean[1], plain.running_mean)
    assert torch.equal(levelled.running_mean, torch.zeros(4))  # levels 0 and 1 untouched
    assert torch.equal(levelled.level_running_mean[0], torch.zeros(4))
    levelled.eval()
    plain.eval()
    with use_level(levelled, 2):
        assert torch.equal(levelled(x), plain(x))
    assert torch.equal(levelled(x), x / (1 + 1e-5) ** 0.5)  # level 0: still (0, 1)
    with pytest.raises(ValueError, match="level 3 out of range for 3 levels"):
        with use_level(levelled, 3):
            pass


def test_per_level_checkpoint_round_trip_is_bit_exact(tmp_path):
    config = tiny_config(level_norm="per_level")
    torch.manual_seed(0)
    model = HiFusion(config).train()
    spot, region = _inputs(config, batch=3)
    with torch.no_grad():
        model(spot, region)  # give each level statistics of its own
        expected = model.eval()(spot, region).prediction
    bn = model.spot_encoder.layer1[0].bn1
    assert not torch.equal(bn.running_mean, bn.level_running_mean[1])
    path = save_checkpoint(tmp_path / "per_level.pt", model, train_mean=torch.zeros(8))
    loaded, ckpt = load_model(path)
    assert ckpt.config.level_norm == "per_level"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(spot, region).prediction, expected)


def test_checkpoints_without_level_norm_load_as_shared(tmp_path):
    model = HiFusion(tiny_config())
    path = save_checkpoint(tmp_path / "old.pt", model, train_mean=torch.zeros(8))
    payload = torch.load(path, weights_only=True)
    del payload["config"]["level_norm"]  # as written before the option existed
    torch.save(payload, path)
    loaded, ckpt = load_model(path)
    assert ckpt.config.level_norm == "shared"
    assert not any(isinstance(m, LevelBatchNorm2d) for m in loaded.modules())


def test_level_norm_is_validated_and_survives_json():
    config = tiny_config(level_norm="per_level")
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match=r"level_norm must be one of .*'per_tile'"):
        tiny_config(level_norm="per_tile")


def test_torchvision_weights_fill_every_level_of_a_per_level_trunk(tmp_path):
    state = _torchvision_state(width=16)
    torch.save(state, tmp_path / "r18.pth")
    trunk = load_torchvision_resnet18(resnet18_trunk(16, norm_levels=3), tmp_path / "r18.pth")
    norms = {n: m for n, m in trunk.named_modules() if isinstance(m, LevelBatchNorm2d)}
    assert len(norms) == 20  # every BatchNorm of a ResNet-18, downsample ones included
    for name, m in norms.items():
        for stat in ("running_mean", "running_var"):
            expected = state[f"{name}.{stat}"]
            assert torch.equal(getattr(m, stat), expected), name
            assert torch.equal(getattr(m, f"level_{stat}"), expected.expand(2, -1)), name

    # a per-level trunk's own state dict keeps its distinct levels
    for m in norms.values():
        m.level_running_mean.uniform_(-1, 1)
    torch.save(trunk.state_dict(), tmp_path / "per_level.pth")
    other = load_torchvision_resnet18(resnet18_trunk(16, norm_levels=3), tmp_path / "per_level.pth")
    for k, v in trunk.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_per_image_standardisation_undoes_a_per_channel_gain_and_bias() -> None:
    """Why RGB gain/bias jitter is nearly inert under ``input_norm="image"``: only clipping survives."""
    torch.manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(4, 3, 16, 16)
    gain, bias = torch.tensor([1.05, 0.95, 1.02]), torch.tensor([0.02, -0.03, 0.01])
    jittered = x * gain.view(1, 3, 1, 1) + bias.view(1, 3, 1, 1)  # stays inside [0, 1]
    torch.testing.assert_close(zscore_per_channel(jittered), zscore_per_channel(x),
                               rtol=1e-4, atol=1e-4)
    clipped = (x * 1.5).clamp(0, 1)  # a gain that saturates bright pixels is not undone
    assert (zscore_per_channel(clipped) - zscore_per_channel(x)).abs().max() > 0.1
