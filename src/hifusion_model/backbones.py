"""ResNet feature trunks (BasicBlock, no pooling or classifier), written to match torchvision.

HiFusion encodes spots with a ResNet-18 trunk and regions with a ResNet-10 trunk. We build them
here rather than import torchvision (not a dependency), but keep torchvision's parameter names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` …) so that a ResNet-18 state
dict a user already has (ImageNet or pathology pre-training) loads without renaming.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError

#: Blocks per stage.
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET10_BLOCKS = (1, 1, 1, 1)

# Keys of a torchvision classifier state dict that a trunk does not have.
_CLASSIFIER_PREFIX = "fc."
# Prefixes that training wrappers add in front of the torchvision names (DDP, Lightning, timm).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual shortcut (projected when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
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
    """

    def __init__(self, blocks: Sequence[int], width: int = 64) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks) or width < 1:
            raise ValueError(f"need 4 positive block counts and width ≥ 1, got {blocks}, {width}")
        self.blocks = tuple(blocks)
        self.width = width
        self.out_channels = 8 * width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = width
        for i, n in enumerate(blocks):
            channels = width * 2**i
            stage = [BasicBlock(in_channels, channels, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(channels, channels) for _ in range(n - 1)]
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


def resnet18_trunk(width: int = 64) -> ResNetTrunk:
    """The spot encoder: ResNet-18 without avgpool/fc (11.18 M parameters at width 64)."""
    return ResNetTrunk(RESNET18_BLOCKS, width)


def resnet10_trunk(width: int = 64) -> ResNetTrunk:
    """The region encoder: one BasicBlock per stage (4.91 M parameters at width 64)."""
    return ResNetTrunk(RESNET10_BLOCKS, width)


# -- torchvision weights ---------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a tensor-only state dict, unwrapping ``{"state_dict": ...}`` / ``{"model": ...}``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and "unsafe global" errors all mean the same to a user
        raise CheckpointError(
            f"{path}: not a loadable PyTorch weights file ({type(e).__name__}: {e}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from e
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
    """Copy a torchvision-format ResNet-18 state dict from ``path`` into ``trunk``, in place.

    The classifier (``fc.*``) is ignored; every trunk tensor must be present with the right
    shape (old checkpoints without BatchNorm ``num_batches_tracked`` are accepted). Raises
    :class:`CheckpointError` naming the file and the first mismatches otherwise.
    """
    path = Path(path)
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    own = trunk.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
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
            f"{path}: not a torchvision ResNet-18 for this trunk "
            f"({sum(trunk.blocks) * 2 + 2}-layer, width {trunk.width}): {'; '.join(problems)}"
        )
    trunk.load_state_dict(state, strict=False)
    return trunk


__all__ = [
    "BasicBlock",
    "ResNetTrunk",
    "resnet18_trunk",
    "resnet10_trunk",
    "load_torchvision_resnet18",
    "RESNET18_BLOCKS",
    "RESNET10_BLOCKS",
]
