"""Where to run and at what precision: one place for the device and autocast rules.

``auto`` picks CUDA, then Apple's MPS, then the CPU. Reduced precision is chosen per device:
bf16 on GPUs that support it (no loss scaling needed), fp16 with a ``GradScaler`` on older GPUs,
and on the CPU bf16 only where the processor computes it natively (AVX-512 BF16 or AMX), since
emulated bf16 is slower than fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pathlib import Path

import torch

from .errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(
    device: str | torch.device = "auto", *, local_rank: int | None = None
) -> torch.device:
    """Turn ``auto``/``cuda``/``cuda:1``/``mps``/``cpu`` into an available ``torch.device``.

    ``local_rank`` (from torchrun) selects the GPU of this process when ``device`` names no index.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            if torch.cuda.is_available():
                name = "cuda"
            elif torch.backends.mps.is_available():
                name = "mps"
            else:
                name = "cpu"
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(
                f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps"
            ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu"
            )
        index = dev.index if dev.index is not None else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s) visible)"
            )
        dev = torch.device("cuda", index)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but MPS is not available here; use --device cpu"
        )
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX-512 BF16 or AMX), so autocast pays off."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def cpu_has_vnni() -> bool:
    """True when the CPU has VNNI (AVX-512 VNNI, or AVX-VNNI as Intel's Alder Lake and later
    have), the int8 dot products that accumulate in int32 without saturating."""
    if bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()):  # AVX-512 VNNI
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux
        return False
    return "avx_vnni" in flags


def autocast_dtype(
    device: torch.device, precision: str = "auto", *, training: bool = False
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or ``None`` for plain fp32.

    ``auto`` means bf16/fp16 on CUDA, bf16 on CPUs with native support at inference (training on
    the CPU stays fp32 unless asked: bf16 gradients cost accuracy there for little speed), fp32
    on MPS. ``int8`` (CPU inference only: the convolutions quantised, :mod:`.inference.int8_cpu`)
    gives ``auto``'s dtype for whatever runs outside the quantised graph.
    """
    if precision == "int8" and (training or device.type != "cpu"):
        raise ConfigError("int8 is for predicting on the CPU; on a GPU, or to train, use auto, "
                          "bf16 or fp32")
    if precision not in ("auto", "int8", *_DTYPES):
        raise ConfigError(
            f"precision must be auto, fp32, bf16, fp16 or int8, got {precision!r}")
    if precision in ("auto", "int8"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and not training and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    dtype = _DTYPES[precision]
    if dtype is torch.float16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for GPUs; on the CPU use bf16 or fp32")
    return dtype


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype``, or nothing when ``dtype`` is ``None``."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


__all__ = ["resolve_device", "autocast_dtype", "autocast", "cpu_has_native_bf16",
           "cpu_has_vnni"]
