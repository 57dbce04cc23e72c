"""The fast bf16 path on the CPU: the network compiled by TorchInductor, for large bf16 jobs.

Eager bf16 autocast spends much of its time outside the convolutions: BatchNorm, ReLU and the
residual additions each read and write every activation once more, the weights are cast to bf16
on every call, and max-pooling computes indices nobody reads. Inductor with ``freezing`` folds
the BatchNorm statistics into the convolutions, fuses the element-wise work into oneDNN's
post-operations and packs the weights once. On the development CPU (2 cores, AVX-512 BF16 +
AMX) that made the bundled model 1.67× as fast as eager bf16 autocast (28.0 against 16.8 spots/s,
batches of 8; docs/experiments.md, 2026-12-03).

Compiling takes ~40 s (fewer when Inductor's own disk cache already holds the kernels) and a
C++ compiler, so it is taken only for jobs large enough to repay it (:data:`COMPILE_MIN_SPOTS`
spot views: a Visium section or a whole-slide grid, not a HER2ST section), and only where the
compiler exists. Anything that fails falls back to eager, with a warning, as the ONNX Runtime
path does (:mod:`.fast_cpu` chooses between them). Since int8 (:mod:`.int8_cpu`) ran 1.4×
as fast, a large job compiles only when bf16 is asked for (``precision="bf16"``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

#: Spot views from which a bf16 job compiles: ~40 s of compiling against 0.024 s saved a spot
#: view (eager bf16 16.8 → 28.0 spots/s), repaid from ~1,700.
COMPILE_MIN_SPOTS = 2000


def compiler_available() -> bool:
    """Inductor's C++ compiler (``$CXX``, else g++; clang++ on macOS) is on the PATH."""
    default = "clang++" if sys.platform == "darwin" else "g++"
    return shutil.which(os.environ.get("CXX") or default) is not None


class _Autocast(nn.Module):
    """``module`` under ``dtype`` autocast, so that the compiled graph holds the casts."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *inputs: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16,
                            enabled=self.dtype is not None):
            return self.module(*inputs)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.contiguous()


class CompiledChunks:
    """``module(*inputs) -> Tensor`` compiled for calls of exactly ``chunk`` items.

    ``examples`` give each input's shape past the first dimension. Calls with fewer items are
    padded with zeros (one graph, nothing recompiled), more are run ``chunk`` at a time. The
    compilation runs in the constructor, on zeros, so that a failure shows there (and the
    caller can fall back) rather than in the middle of a job.
    """

    def __init__(self, module: nn.Module, chunk: int, examples: Sequence[Sequence[int]],
                 dtype: torch.dtype | None) -> None:
        import torch._inductor.config as inductor_config

        self.chunk, self._config = chunk, inductor_config
        self._fn = torch.compile(_Autocast(module, dtype).eval(), dynamic=False)
        zeros = [torch.zeros(chunk, *shape) for shape in examples]
        self(*zeros)

    def __call__(self, *inputs: Tensor) -> Tensor:
        with self._config.patch(freezing=True), torch.inference_mode():
            return in_chunks(lambda *part: self._fn(*[_channels_last(x.float()) for x in part]),
                             inputs, self.chunk)


def in_chunks(run: Callable[..., Tensor], inputs: Sequence[Tensor], chunk: int) -> Tensor:
    """``run`` on exactly ``chunk`` items a call (the last call padded with zeros), its outputs
    cut back to the items given and concatenated as float32: for runners built for one shape."""
    n, parts = len(inputs[0]), []
    for start in range(0, n, chunk):
        part = [x[start:start + chunk] for x in inputs]
        if len(part[0]) < chunk:
            part = [torch.cat([x, x.new_zeros((chunk - len(x), *x.shape[1:]))]) for x in part]
        parts.append(run(*part)[:min(chunk, n - start)].float())
    return torch.cat(parts)


__all__ = ["COMPILE_MIN_SPOTS", "CompiledChunks", "compiler_available", "in_chunks"]
