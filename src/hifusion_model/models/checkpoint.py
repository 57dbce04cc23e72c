"""Checkpoints: one safe file holding a model's weights, configuration and model card.

A checkpoint is a ``torch.save`` file holding only tensors and plain Python values::

    {"format": "napari-hifusion/1", "config": ModelConfig.to_dict(), "state_dict": {...},
     "train_mean": Tensor(G) float32, "card": {...}}

It is always read with ``torch.load(weights_only=True)``: a file carrying arbitrary Python
objects (a pickle that would run code) is refused without being executed. ``train_mean`` is
the mean training target per gene: the constant baseline every evaluation reports beside the
model. The ``card`` is JSON-like provenance; keys read by ``hifusion info``:

``data`` (training sections), ``date``, ``command`` (the exact training command),
``normalization``, ``validation`` (a :func:`~hifusion_model.evaluation.metrics.evaluate_predictions`
result, whose ``gene_pcc_all`` holds the validation PCC of every gene) and ``notes``. Training
writes the card from its typed form, :class:`hifusion_model.engine.card.ModelCard`.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..io_utils import atomic_path, check_space
from .config import ModelConfig

if TYPE_CHECKING:
    from .hifusion import HiFusion

FORMAT_NAME = "napari-hifusion"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
#: The model shipped inside the package (fp16 weights trained on HER2ST).
BUNDLED_NAME = "her2st_hifusion.pt"
_KEYS = ("format", "config", "state_dict", "train_mean", "card")


@dataclass
class Checkpoint:
    """A loaded checkpoint; floating weights are float32 whatever precision they were stored in."""

    path: Path
    config: ModelConfig
    state_dict: dict[str, Tensor]
    train_mean: Tensor
    card: dict[str, Any] = field(default_factory=dict)
    stored_dtype: str = "float32"

    @property
    def genes(self) -> list[str]:
        return self.config.genes


# -- saving ---------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON fallback for numpy and torch values that sneak into a card (scalars, arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-like")


def _plain_card(card: dict[str, Any] | None) -> dict[str, Any]:
    """The card after a JSON round trip: what ``weights_only`` loading accepts."""
    stamped = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software": f"napari-hifusion {__version__}",
        **(card or {}),
    }
    try:
        return json.loads(json.dumps(stamped, default=_plain))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the model card must hold only JSON-like values: {e}") from e


def _stored(name: str, t: Tensor, half: bool) -> Tensor:
    """fp16 for weights when ``half``; BatchNorm statistics stay fp32 (tiny variances underflow)."""
    t = t.detach().cpu()
    keep = not t.is_floating_point() or "running_" in name
    return t.clone() if keep or not half else t.half()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    train_mean: Any,
    card: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` (a :class:`HiFusion` with ``.config``) atomically to ``path``.

    ``half=True`` stores floating weights as float16, halving the file (the bundled model must
    stay small); loading casts them back to float32. The card gets ``date`` and ``software``
    unless it sets them.
    """
    path = Path(path)
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"save_checkpoint needs a model with a ModelConfig .config, got {model!r}")
    mean = torch.as_tensor(train_mean, dtype=torch.float32).detach().cpu().reshape(-1).clone()
    if mean.numel() != config.n_genes:
        raise CheckpointError(
            f"cannot save {path}: train_mean has {mean.numel()} values but the model predicts "
            f"{config.n_genes} genes"
        )
    state = {k: _stored(k, v, half) for k, v in model.state_dict().items()}
    check_finite(path, {**state, "train_mean": mean}, saving=True)
    payload = {
        "format": FORMAT,
        "config": config.to_dict(),
        "state_dict": state,
        "train_mean": mean,
        "card": _plain_card(card),
    }
    check_space(path, sum(v.nbytes for v in state.values()) + 1_000_000)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e}") from e
    return path


# -- loading --------------------------------------------------------------------------------------
def _sniff(head: bytes) -> str | None:
    """Name what a non-zip file looks like; ``torch.save`` has written zip archives since 1.6."""
    if head.startswith(b"PK"):
        return None
    if not head:
        return "an empty file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head[:1] == b"\x80":  # a plain pickle, or a legacy (pre-1.6) torch.save: torch decides
        return None
    return "not a PyTorch file"


def safe_load(path: str | os.PathLike, what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load(weights_only=True)`` on CPU: code stored in the file never runs.

    Every failure is a :class:`CheckpointError` naming ``path``. PyTorch's own text is never
    passed on: it advises ``weights_only=False``, i.e. running an untrusted pickle. ``hint``
    ends the message for a corrupt file (what to do instead).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for users
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not torch.save's pickle, or no pickle at all
            raise CheckpointError(f"refused {path}: it is not a safe {what} (not written by "
                                  "torch.save, or damaged)" + (f"; {hint}" if hint else "")) from e
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"refused {path}: it is not a safe {what}, it holds Python objects other than "
            "tensors and plain values" + (f" ({culprit.group(1)})" if culprit else "")
            + " whose loading could run arbitrary code; use a file written by napari-hifusion "
            "(or torch.save of a state dict)"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError ... on bad bytes
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in detail or "pickle" in detail.lower():
            detail = type(e).__name__
        raise CheckpointError(
            f"{path} is truncated or corrupt ({detail}), not a readable {what}"
            + (f"; {hint}" if hint else "")
        ) from e


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give the path of a .pt checkpoint")
    with open(path, "rb") as f:
        kind = _sniff(f.read(8))
    if kind:
        raise CheckpointError(
            f"{path} is {kind}; expected a napari-hifusion checkpoint (.pt) written by "
            "'hifusion train'"
        )
    return safe_load(path, "checkpoint", "re-download or re-save it")


def _check_format(path: Path, obj: Any) -> None:
    if not isinstance(obj, dict) or "format" not in obj:
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            what = "a bare PyTorch state dict (for example torchvision weights)"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path} is not a napari-hifusion checkpoint but {what}; expected a file written "
            "by 'hifusion train' (backbone weights go to backbones.load_torchvision_resnet18)"
        )
    name, _, version = str(obj["format"]).partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise CheckpointError(
            f"{path} has format {obj['format']!r}, expected {FORMAT!r}; it was not written by "
            "napari-hifusion"
        )
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {obj['format']!r}, newer than this napari-hifusion "
            f"{__version__} reads ({FORMAT!r}); upgrade napari-hifusion"
        )
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is an incomplete checkpoint: missing {missing}")


def _parse(path: Path, obj: dict[str, Any]) -> Checkpoint:
    try:
        config = ModelConfig.from_dict(obj["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds an invalid model configuration: {e}") from e
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' must map parameter names to tensors")
    mean = obj["train_mean"]
    if not isinstance(mean, Tensor) or mean.shape != (config.n_genes,):
        shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise CheckpointError(
            f"{path}: train_mean must be a tensor of {config.n_genes} values (one per gene), "
            f"got {shape}"
        )
    if not isinstance(obj["card"], dict):
        raise CheckpointError(f"{path}: the model card must be a dict")
    check_finite(path, {**state, "train_mean": mean})
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    return Checkpoint(
        path=path,
        config=config,
        state_dict={k: v.float() if v.is_floating_point() else v for k, v in state.items()},
        train_mean=mean.float(),
        card=obj["card"],
        stored_dtype="/".join(sorted(dtypes)) or "float32",
    )


def check_finite(path: str | os.PathLike, tensors: dict[str, Tensor], saving: bool = False) -> None:
    """Refuse NaN or infinite weights: such a model predicts garbage (all NaN) without a word."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad and saving:
        raise CheckpointError(
            f"cannot save {path}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. "
            f"{bad[0]}), the training diverged; lower the learning rate (--lr) or add --set "
            "grad_clip=1"
        )
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
            "the training that wrote it diverged or the file is damaged: retrain (with a lower "
            "--lr) or use another checkpoint"
        )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint without running any code stored in it."""
    path = Path(path)
    obj = _read(path)
    _check_format(path, obj)
    return _parse(path, obj)


def bundled_model_path() -> Path:
    """Where the bundled HER2ST model lives inside the installed package (it may be absent)."""
    return Path(str(files("hifusion_model").joinpath("weights", BUNDLED_NAME)))


def resolve_checkpoint_path(source: str | os.PathLike) -> Path:
    """The file a checkpoint source names: ``"bundled"`` is the model shipped in the package.

    Only ``"bundled"`` is checked here (a missing bundled model means a broken installation);
    any other path is the loader's to judge.

    >>> resolve_checkpoint_path("runs/m.pt")
    PosixPath('runs/m.pt')
    >>> resolve_checkpoint_path("bundled").name
    'her2st_hifusion.pt'
    """
    if str(source) != "bundled":
        return Path(source)
    path = bundled_model_path()
    if not path.is_file():
        raise CheckpointError(
            f"the bundled model is missing from this installation (expected {path}); "
            "reinstall napari-hifusion or give the path of a checkpoint"
        )
    return path


def load_model(
    source: str | os.PathLike = "bundled", device: str | torch.device = "cpu"
) -> tuple[HiFusion, Checkpoint]:
    """The network a checkpoint (a path or ``"bundled"``) describes, in eval mode on ``device``."""
    from .registry import build_model

    ckpt = load_checkpoint(resolve_checkpoint_path(source))
    model = build_model(ckpt.config)
    mismatch = _state_mismatch(model.state_dict(), ckpt.state_dict)
    if mismatch:
        raise CheckpointError(
            f"{ckpt.path}: the weights do not fit the network its configuration describes "
            f"({mismatch}); the file is damaged or from an incompatible version"
        )
    model.load_state_dict(ckpt.state_dict)
    return model.to(device).eval(), ckpt


def _state_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str:
    """Summarise missing, unexpected and wrongly shaped weights; empty when they fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} {tuple(found[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items() if k in found and found[k].shape != v.shape
    ]
    parts = [
        f"{len(names)} {what}, e.g. {names[0]}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", wrong))
        if names
    ]
    return "; ".join(parts)


__all__ = [
    "FORMAT",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "safe_load",
    "load_model",
    "bundled_model_path",
    "resolve_checkpoint_path",
]
