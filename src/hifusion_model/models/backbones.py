"""ResNet feature trunks (BasicBlock, no pooling or classifier), written to match torchvision.

HiFusion encodes spots with a ResNet-18 trunk and regions with a ResNet-10 trunk. We build them
here rather than import torchvision (not a dependency), but keep torchvision's parameter names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` …) so that a ResNet-18 state
dict a user already has (ImageNet or pathology pre-training) loads without renaming.

A trunk shared by inputs of very different statistics (HISM feeds it whole 224-px spots and
32-px tiles) can keep one set of BatchNorm running statistics per input kind
(``norm_levels > 1``, :class:`LevelBatchNorm2d`): convolutions and the BatchNorm affine weights
stay shared, only the statistics used in eval mode are kept apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from .checkpoint import safe_load

#: Blocks per stage.
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET10_BLOCKS = (1, 1, 1, 1)

# Keys of a torchvision classifier state dict that a trunk does not have.
_CLASSIFIER_PREFIX = "fc."
# Prefixes that training wrappers add in front of the torchvision names (DDP, Lightning, timm).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


# -- BatchNorm with per-level running statistics --------------------------------------------
class LevelBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with one set of running statistics per input level and shared gamma/beta.

    The active level (``.level``, set with :func:`use_level`) picks which statistics a forward
    pass updates (train mode) or normalises with (eval mode); the train-mode output is exactly
    BatchNorm2d's. Level 0 keeps torchvision's ``running_mean`` / ``running_var`` /
    ``num_batches_tracked``, so a plain BatchNorm state dict still fits; levels ``1 … L-1``
    live in ``level_running_mean`` / ``level_running_var`` ``(L-1, C)`` and
    ``level_num_batches_tracked`` ``(L-1,)``. No parameters are added.
    """

    def __init__(self, num_features: int, levels: int, **kwargs) -> None:
        if levels < 2:
            raise ValueError(f"LevelBatchNorm2d needs ≥ 2 levels (else BatchNorm2d), got {levels}")
        if not kwargs.get("track_running_stats", True):
            raise ValueError("LevelBatchNorm2d exists to track running statistics")
        super().__init__(num_features, **kwargs)
        self.levels = levels
        self.level = 0  #: the active level; plain attribute, not state
        mean, var = self.running_mean, self.running_var
        self.register_buffer("level_running_mean", mean.new_zeros(levels - 1, num_features))
        self.register_buffer("level_running_var", var.new_ones(levels - 1, num_features))
        count = self.num_batches_tracked.new_zeros(levels - 1)
        self.register_buffer("level_num_batches_tracked", count)
        self.share_statistics()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "level_running_mean"):  # absent while BatchNorm2d.__init__ runs
            self.share_statistics()

    @torch.no_grad()
    def share_statistics(self) -> None:
        """Copy level 0's running statistics to every other level (e.g. after loading weights)."""
        self.level_running_mean.copy_(self.running_mean.expand_as(self.level_running_mean))
        self.level_running_var.copy_(self.running_var.expand_as(self.level_running_var))
        self.level_num_batches_tracked.copy_(
            self.num_batches_tracked.expand_as(self.level_num_batches_tracked)
        )  # a tensor copy, not .item(): also works on the meta device (shape probes)

    def _statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the active level's buffers: F.batch_norm updates them in place."""
        if not 0 <= self.level < self.levels:
            raise ValueError(f"level {self.level} out of range for {self.levels} levels")
        if self.level == 0:
            return self.running_mean, self.running_var, self.num_batches_tracked
        i = self.level - 1
        return (
            self.level_running_mean[i], self.level_running_var[i],
            self.level_num_batches_tracked[i],
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        mean, var, count = self._statistics()
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            count.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm2d does
                factor = 1.0 / float(count)
        return F.batch_norm(
            x, mean, var, self.weight, self.bias, self.training, factor, self.eps
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}"


@contextmanager
def use_level(module: nn.Module, level: int) -> Iterator[None]:
    """Make every :class:`LevelBatchNorm2d` in ``module`` use ``level``'s statistics for a while.

    A no-op for modules without any (plain BatchNorm trunks, test doubles).
    """
    norms = [m for m in module.modules() if isinstance(m, LevelBatchNorm2d)]
    previous = [m.level for m in norms]
    for m in norms:
        if not 0 <= level < m.levels:
            raise ValueError(f"level {level} out of range for {m.levels} levels")
        m.level = level
    try:
        yield
    finally:
        for m, old in zip(norms, previous):
            m.level = old


def _batch_norm(channels: int, norm_levels: int) -> nn.BatchNorm2d:
    """Plain BatchNorm2d for one level (torchvision's state dict), LevelBatchNorm2d for more."""
    if norm_levels < 1:
        raise ValueError(f"norm_levels must be ≥ 1, got {norm_levels}")
    return nn.BatchNorm2d(channels) if norm_levels == 1 else LevelBatchNorm2d(channels, norm_levels)


# -- trunks ----------------------------------------------------------------------------------
def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual shortcut (projected when the shape changes)."""

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, norm_levels: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = _batch_norm(channels, norm_levels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = _batch_norm(channels, norm_levels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                _batch_norm(channels, norm_levels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNetTrunk(nn.Module):
    """conv1 7×7/2 → BN → ReLU → maxpool 3×3/2 → four BasicBlock stages; returns the last map.

    Stage ``i`` has ``width · 2**i`` channels and stride 2 from the second stage on, so the
    output has ``out_channels = 8 · width`` channels at 1/32 of the input size (rounded up).
    ``norm_levels > 1`` keeps that many sets of BatchNorm statistics (see :func:`use_level`).
    """

    def __init__(self, blocks: Sequence[int], width: int = 64, norm_levels: int = 1) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks) or width < 1:
            raise ValueError(f"need 4 positive block counts and width ≥ 1, got {blocks}, {width}")
        self.blocks = tuple(blocks)
        self.width = width
        self.norm_levels = norm_levels
        self.out_channels = 8 * width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _batch_norm(width, norm_levels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = width
        for i, n in enumerate(blocks):
            channels = width * 2**i
            stage = [BasicBlock(in_channels, channels, 1 if i == 0 else 2, norm_levels)]
            stage += [BasicBlock(channels, channels, 1, norm_levels) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_channels = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions and identity BatchNorm, as torchvision and HiFusion do."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet18_trunk(width: int = 64, norm_levels: int = 1) -> ResNetTrunk:
    """The spot encoder: ResNet-18 without avgpool/fc (11.18 M parameters at width 64)."""
    return ResNetTrunk(RESNET18_BLOCKS, width, norm_levels)


def resnet10_trunk(width: int = 64, norm_levels: int = 1) -> ResNetTrunk:
    """The region encoder: one BasicBlock per stage (4.91 M parameters at width 64)."""
    return ResNetTrunk(RESNET10_BLOCKS, width, norm_levels)


# -- torchvision weights ---------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a tensor-only state dict, unwrapping ``{"state_dict": ...}`` / ``{"model": ...}``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file; check the path")
    obj = safe_load(path, "weights file", "save it with torch.save(model.state_dict(), path)")
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path}: not a state dict (a mapping of parameter names to tensors); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return _strip_wrapper_prefix(dict(obj))


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if "conv1.weight" not in state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_torchvision_resnet18(trunk: ResNetTrunk, path: str | Path) -> ResNetTrunk:
    """Copy a torchvision-format ResNet-18 state dict from ``path`` into ``trunk``, in place
    (or a ResNet-10's into a ResNet-10 trunk, such as ``hifusion pretrain --encoder region``'s).

    The classifier (``fc.*``) is ignored; every trunk tensor must be present with the right
    shape (old checkpoints without BatchNorm ``num_batches_tracked`` are accepted). Raises
    :class:`CheckpointError` naming the file and the first mismatches otherwise. A trunk with
    per-level statistics gets the file's statistics at every level, unless the file has its
    own per-level statistics (a per-level trunk's state dict).
    """
    path = Path(path)
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    own = trunk.state_dict()
    per_level = any(_is_level_buffer(k) for k in state)  # else: copied from level 0 below
    missing = [
        k for k in own
        if k not in state and not k.endswith("num_batches_tracked")
        and not (_is_level_buffer(k) and not per_level)
    ]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise CheckpointError(
            f"{path}: not torchvision-format ResNet weights for this trunk "
            f"({sum(trunk.blocks) * 2 + 2}-layer, width {trunk.width}): {'; '.join(problems)}"
        )
    trunk.load_state_dict(state, strict=False)
    if not per_level:
        for m in trunk.modules():
            if isinstance(m, LevelBatchNorm2d):
                m.share_statistics()
    return trunk


def _is_level_buffer(key: str) -> bool:
    """A LevelBatchNorm2d buffer of levels ≥ 1 (torchvision files have none)."""
    return key.rpartition(".")[2].startswith("level_")


__all__ = [
    "LevelBatchNorm2d",
    "use_level",
    "BasicBlock",
    "ResNetTrunk",
    "resnet18_trunk",
    "resnet10_trunk",
    "load_torchvision_resnet18",
    "RESNET18_BLOCKS",
    "RESNET10_BLOCKS",
]
