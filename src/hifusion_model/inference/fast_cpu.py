"""The fast CPU paths: int8 and fp32 through ONNX Runtime, bf16 through TorchInductor.

Large CPU jobs (:data:`MIN_SPOTS` spot views or more) run by default with the encoders'
convolutions in int8 (:mod:`.int8_cpu`), on any CPU: on C4's hex:100 grid (400 spots, 2-core
AMD EPYC with AVX-512 BF16) the exact path ran 50.4 spots/s in int8 against 35.9 compiled
bf16 and 21.8 fp32 through ONNX Runtime, with per-gene PCC ≥ 0.993 against fp32 on four
HER2ST sections (docs/experiments.md, 2026-12-04). Smaller jobs, and ``precision="fp32"`` or
``"bf16"``, keep the other paths:

* fp32 (a CPU without native bf16, or asked): of the fp32 ways of running the model that were
  measured (``benchmarks/cpu_paths.py``; docs/experiments.md, 2026-12-03), ONNX Runtime's CPU
  provider was the fastest, with the same predictions as eager fp32 (per-gene PCC ≥ 0.99999 on
  HER2ST C4), and it takes seconds to set up where ``torch.compile`` took 45–90 s for less
  speed;
* bf16 where native: autocast, and for jobs of :data:`~.compiled_cpu.COMPILE_MIN_SPOTS` spot
  views or more the network compiled by TorchInductor (:mod:`.compiled_cpu`, 1.67× eager bf16).

An export (~10 s; with the int8 calibration ~25 s) is made once per set of weights and kept on
disk (:func:`cache_dir`, 30–70 MB a graph for the bundled model); within a process the session
is kept with the network too, while its weights last. Nothing here is required: without
``onnxruntime`` (and ``onnx`` and ``onnxscript`` for the export) or a C++ compiler prediction
runs eager, and if a path fails to set up it warns once and runs eager (int8's and bf16's own
rounding aside, the same numbers). ``HIFUSION_CPU_PATH=eager``, ``onnx``, ``int8`` or
``compile`` forces a path (tests, comparisons). The runners take any module of fixed-shape
inputs (:class:`OnnxChunks`, :class:`~.compiled_cpu.CompiledChunks`): the exact path's network
and the dense path's per-spot part and shared tiles (:mod:`.dense`) run on the same rule.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..devices import autocast_dtype
from ..errors import ConfigError
from ..io_utils import atomic_path
from .compiled_cpu import COMPILE_MIN_SPOTS, CompiledChunks, compiler_available, in_chunks
from .int8_cpu import quantize, sample_patches, weight_bits

#: Environment variable that forces a CPU path: ``auto`` (the default), ``eager``, ``onnx``
#: (fp32 only), ``int8`` or ``compile``.
PATH_ENV = "HIFUSION_CPU_PATH"
CPU_PATHS = ("auto", "eager", "onnx", "int8", "compile")
#: Spot views (spots × test-time views) from which ``auto`` exports weights not yet exported:
#: the export takes ~10 s and then saves 0.035 s a spot view against oneDNN on AVX-512, 0.065 s
#: against oneDNN capped at AVX2 (docs/experiments.md, 2026-12-03), so it is repaid from ~270
#: and ~150 spot views. Weights already exported run through ONNX Runtime at any job size.
MIN_SPOTS = 200
#: What a job says while the network is compiled.
COMPILING = "compiling the network for this CPU (about a minute, once per process)"
#: The first dimension of a graph exported for any batch size (int8 graphs: calibrated one
#: spot at a time, which halved the quantisation's peak memory, then run in fixed chunks).
BATCH_DIM = "batch"
#: What a job says while the network is exported and quantised to int8.
QUANTIZING = "quantising the network to int8 (about a minute, once per set of weights)"
#: Environment variable naming the folder of exported models (default ~/.cache/hifusion).
CACHE_ENV = "HIFUSION_CACHE_DIR"

#: Per network and kind of runner: the fingerprint of its weights and the runner, so that the
#: next section predicted in this process starts at once (and a network trained further is
#: exported or compiled anew).
_RUNNERS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[Any, Any]]] = (
    weakref.WeakKeyDictionary())
_WARNED: set[str] = set()  #: failure reasons already warned of


@dataclass
class Prediction:
    """What :func:`~.predict.predict_batch` reads of a model's output: the final prediction."""

    prediction: Tensor


def requested_path() -> str:
    """The path ``HIFUSION_CPU_PATH`` asks for (``auto`` when unset)."""
    path = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if path not in CPU_PATHS:
        raise ConfigError(f"{PATH_ENV}={path!r} is not a CPU path; use {', '.join(CPU_PATHS)}")
    return path


def onnx_available() -> bool:
    """ONNX Runtime and the exporter's packages are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx",
                                                                  "onnxscript"))


def precision_run(device: torch.device, precision: str, spot_views: int) -> str:
    """What a job of ``spot_views`` spot views under ``precision`` runs its network in:
    ``int8`` (:func:`choose_path`), else its autocast dtype's name (``fp32`` without one).

    >>> import torch
    >>> precision_run(torch.device("cpu"), "fp32", 10_000)
    'fp32'
    """
    dtype = autocast_dtype(device, precision)
    if choose_path(device, dtype, spot_views, int8=int8_asked(precision)) == "int8":
        return "int8"
    return str(dtype).removeprefix("torch.") if dtype else "fp32"


def int8_asked(precision: str) -> bool | None:
    """What ``precision`` says of int8: ``True`` asked (``int8``), ``None`` where it pays
    (``auto``), ``False`` never (``fp32``, ``bf16``, ``fp16``)."""
    return True if precision == "int8" else None if precision == "auto" else False


def choose_path(device: torch.device, dtype: torch.dtype | None, spot_views: int,
                exported: bool = False, int8: bool | None = False) -> str:
    """The way to run a job of ``spot_views`` spot views on ``device`` under ``dtype``.

    On the CPU: ``int8`` (the convolutions quantised, through ONNX Runtime: :mod:`.int8_cpu`)
    when asked (``int8=True``), or when allowed (``int8=None``, what ``precision="auto"`` gives)
    and the job has at least :data:`MIN_SPOTS` spot views (by size alone, so that a job's
    predictions never depend on what the cache holds). Otherwise fp32 takes ``onnx`` when the
    weights are ``exported`` already or the job has :data:`MIN_SPOTS` spot views (the same
    numbers as eager, to 1e-5), and bf16 ``compile`` for jobs of :data:`COMPILE_MIN_SPOTS` spot
    views where a C++ compiler exists; the rest, and other devices, run ``eager``.
    ``HIFUSION_CPU_PATH`` forces ``eager``, ``compile``, ``int8``, or ``onnx`` for fp32 (bf16
    has no ONNX Runtime path: it runs eager).

    >>> import torch
    >>> choose_path(torch.device("cuda"), None, 10_000)
    'eager'
    """
    path = requested_path()
    if device.type != "cpu" or path == "eager":
        return "eager"
    if path in ("compile", "int8"):
        return path
    if path == "auto" and (int8 or (int8 is None and spot_views >= MIN_SPOTS)):
        return "int8" if onnx_available() else "eager"
    if dtype is not None:
        worth_it = path == "auto" and spot_views >= COMPILE_MIN_SPOTS
        return "compile" if worth_it and compiler_available() else "eager"
    if path == "onnx":
        return "onnx"
    worth_it = exported or spot_views >= MIN_SPOTS
    return "onnx" if worth_it and onnx_available() else "eager"


def cache_dir() -> Path:
    """Where exported models are kept: ``$HIFUSION_CACHE_DIR``, else ``~/.cache/hifusion``
    (``$XDG_CACHE_HOME/hifusion`` where that is set), folder ``onnx``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME")
                                             or Path.home() / ".cache") / "hifusion"
    return Path(root) / "onnx"


def export_path(model: nn.Module, chunk: int, int8: bool = False) -> Path:
    """The cache file of ``model``'s export for ``chunk`` spots: named by a hash of everything
    the graph depends on (architecture, every weight and statistic, chunk, torch version, and
    the code that builds and exports the graph: :func:`graph_code`; for ``int8``, the
    weights' bits on this CPU: :func:`~.int8_cpu.weight_bits`).

    The code is part of the name because the cache outlives any one version of it: an export
    from an experimental variant of the exporter, under the same weights, once ran here
    instead of the current one (per-gene PCC 0.974 against eager on C4, where a fresh export
    gives 0.999995)."""
    h = hashlib.sha256(repr((type(model).__qualname__, getattr(model, "config", None), chunk,
                             torch.__version__, int8 and weight_bits())).encode())
    h.update(graph_code(model))
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return cache_dir() / f"{h.hexdigest()[:32]}{'.int8' * int8}.onnx"


def graph_code(model: nn.Module) -> bytes:
    """The source of the modules an export of ``model`` is made of: its own module, the
    package's ``models`` (its layers, heads and configuration) and this one (the export)."""
    here = Path(__file__).resolve()
    files = {here, *(here.parents[1] / "models").glob("*.py")}
    own = getattr(sys.modules.get(type(model).__module__), "__file__", None)
    if own:
        files.add(Path(own).resolve())
    return b"".join(f.read_bytes() for f in sorted(files))


def cpu_runner(model: nn.Module, device: torch.device, dtype: torch.dtype | None,
               spot_views: int, chunk: int, announce: Callable[[str], None] | None = None,
               int8: bool | None = False) -> Callable[[Tensor, Tensor], Any]:
    """``model`` itself, or its ONNX Runtime (fp32 or int8) or compiled twin for
    ``chunk``-spot calls where that is faster (:func:`choose_path`, which ``int8`` is passed to).

    Either returns an object whose ``.prediction`` is ``(n, G)``; ``model`` must be in eval mode.
    A path that fails to set up warns once per reason and falls back to ``model``.
    ``announce(message)`` hears of a compilation or quantisation before it starts.
    """
    path = choose_path(device, dtype, spot_views, exported=True, int8=int8)
    if path == "eager":
        return model  # decided without hashing the weights

    def build() -> OnnxModel | CompiledModel | None:
        if path == "compile":
            if announce is not None:
                announce(COMPILING)
            return CompiledModel(model, chunk, dtype)
        cache = export_path(model, chunk, int8=path == "int8")
        if choose_path(device, dtype, spot_views, cache.is_file(), int8) == "eager":
            return None
        if announce is not None and path == "int8" and not cache.is_file():
            announce(QUANTIZING)
        return OnnxModel(model, chunk, cache, int8=path == "int8")

    runner = held_runner(model, (path, chunk, dtype), build)
    return model if runner is None else runner


def held_runner(model: nn.Module, key: Hashable, build: Callable[[], Any]) -> Any:
    """The runner ``build()`` makes for ``model`` and ``key``, kept while ``model``'s weights
    last (so that the next section predicted in this process starts at once); None when
    ``build`` returns None or fails (a failure warns once per reason: the caller runs eager)."""
    weights = _fingerprint(model)
    held = _RUNNERS.setdefault(model, {})
    if key in held and held[key][0] == weights:
        return held[key][1]
    try:
        runner = build()
    except Exception as e:  # noqa: BLE001 (any exporter, compiler or runtime failure)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"the fast CPU path could not be set up ({reason}); predicting "
                          "with eager PyTorch instead (same predictions, slower)", stacklevel=3)
        return None
    if runner is not None:
        held[key] = (weights, runner)
    return runner


class CompiledModel:
    """``model``'s prediction compiled by TorchInductor for ``chunk``-spot calls under
    ``dtype`` autocast (:class:`~.compiled_cpu.CompiledChunks`; compiles on construction)."""

    def __init__(self, model: nn.Module, chunk: int, dtype: torch.dtype | None) -> None:
        c = model.config
        self.chunk = chunk
        self._compiled = CompiledChunks(_PredictionOnly(model), chunk,
                                        [(3, c.spot_px, c.spot_px),
                                         (3, c.region_px, c.region_px)], dtype)

    def __call__(self, spot: Tensor, region: Tensor) -> Prediction:
        return Prediction(self._compiled(spot, region))


class OnnxChunks:
    """``module(*inputs) -> Tensor`` as an ONNX Runtime CPU session for calls of ``chunk`` items.

    ``examples`` give each input's shape past the first dimension. Calls with fewer items are
    padded with zeros (one graph, nothing recompiled); more are run ``chunk`` at a time.
    Threads: torch's intra-op count, idle when done. With ``calibration`` (a callable giving
    tuples of inputs, each call's of any size) the graph is exported for any batch size and its
    convolutions quantised to int8 (:func:`~.int8_cpu.quantize`). With a ``cache`` path the
    graph is read from it, or exported (and quantised) and written there (a cache that cannot
    be read or written is passed over).
    """

    def __init__(self, module: nn.Module, chunk: int, examples: Sequence[Sequence[int]],
                 cache: Path | None = None,
                 calibration: Callable[[], Sequence[Sequence[Tensor]]] | None = None) -> None:
        import onnxruntime as ort

        self.chunk = chunk
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        # a graph of any batch size runs as one of ``chunk``: as fast as an exported fixed one
        options.add_free_dimension_override_by_name(BATCH_DIM, chunk)

        def session(graph: bytes) -> Any:
            return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

        if cache is not None and cache.is_file():
            with contextlib.suppress(Exception):  # unreadable or from elsewhere: export anew
                self.session = session(cache.read_bytes())
                return
        graph = export_onnx(module, [torch.zeros(chunk, *shape) for shape in examples],
                            dynamic_batch=calibration is not None)
        if calibration is not None:
            graph = quantize(graph, calibration())
        self.session = session(graph)
        if cache is not None:
            with contextlib.suppress(OSError), atomic_path(cache) as tmp:
                tmp.write_bytes(graph)

    def __call__(self, *inputs: Tensor) -> Tensor:
        def run(*part: Tensor) -> Tensor:
            feed = {f"input{i}": x.float().contiguous().numpy() for i, x in enumerate(part)}
            return torch.from_numpy(self.session.run(None, feed)[0])

        return in_chunks(run, inputs, self.chunk)


class OnnxModel:
    """``model``'s prediction through ONNX Runtime for ``chunk``-spot calls
    (:class:`OnnxChunks`, read from or exported to ``cache``), its convolutions in int8 when
    ``int8`` (calibrated on the packaged sample: :func:`~.int8_cpu.sample_patches`)."""

    def __init__(self, model: nn.Module, chunk: int, cache: Path | None = None,
                 int8: bool = False) -> None:
        c = model.config
        self.chunk = chunk
        self._chunks = OnnxChunks(_PredictionOnly(model), chunk,
                                  [(3, c.spot_px, c.spot_px), (3, c.region_px, c.region_px)],
                                  cache, (lambda: sample_patches(c, 1)) if int8 else None)

    def __call__(self, spot: Tensor, region: Tensor) -> Prediction:
        return Prediction(self._chunks(spot, region))


class _PredictionOnly(nn.Module):
    """The final prediction alone: an exported graph returns tensors, not HiFusionOutput."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, spot: Tensor, region: Tensor) -> Tensor:
        return self.model(spot, region).prediction


def export_onnx(module: nn.Module, examples: Sequence[Tensor],
                dynamic_batch: bool = False) -> bytes:
    """``module(*examples) -> Tensor`` as a serialised ONNX graph for inputs of the examples'
    shapes (named ``input0``, ``input1``, …), or, with ``dynamic_batch``, of any first
    dimension (named :data:`BATCH_DIM`; a session fixes it again: :class:`OnnxChunks`).

    ``adaptive_max_pool2d`` (level maps larger than level 1's) has no ONNX operator, so it is
    decomposed first into maxima over its windows, which ONNX has."""
    quiet = contextlib.redirect_stdout(io.StringIO())  # the exporter reports each step
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), quiet, \
            _errors_only("torch.onnx", "onnxscript"):  # and logs what it skips
        warnings.simplefilter("ignore")  # and warns of what it decomposes
        # a copy: weights moved under inference mode (as predict_section moves them) are
        # inference tensors, which the exporter cannot trace
        twin = copy.deepcopy(module).requires_grad_(False)
        batch = torch.export.Dim(BATCH_DIM, min=1)
        dynamic = [{0: batch}] * len(examples) if dynamic_batch else None
        program = torch.export.export(twin, tuple(examples), dynamic_shapes=dynamic)
        program = program.run_decompositions(
            {torch.ops.aten.adaptive_max_pool2d.default: adaptive_max_pool2d_by_windows})
        onnx_program = torch.onnx.export(program, input_names=[f"input{i}" for i in
                                                               range(len(examples))],
                                         output_names=["output"], verbose=False)
    graph = onnx_program.model_proto
    if dynamic_batch:  # the exporter names the dimension by its own count
        name = graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        for value in (*graph.graph.input, *graph.graph.output, *graph.graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == name:
                    dim.dim_param = BATCH_DIM
    return graph.SerializeToString()


@contextlib.contextmanager
def _errors_only(*loggers: str) -> Iterator[None]:
    """Only errors from ``loggers`` (and the loggers below them) while inside."""
    handles = [logging.getLogger(name) for name in loggers]
    levels = [h.level for h in handles]
    for h in handles:
        h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for h, level in zip(handles, levels):
            h.setLevel(level)


def adaptive_max_pool2d_by_windows(x: Tensor, size: list[int]) -> tuple[Tensor, Tensor]:
    """``adaptive_max_pool2d`` as maxima over its windows, rows then columns (exact).

    Window ``i`` of ``n`` inputs pooled to ``out`` spans ``[⌊i·n/out⌋, ⌈(i+1)·n/out⌉)``, as in
    PyTorch. The indices (unused by the model) are zeros."""
    def along(t: Tensor, dim: int, out: int) -> Tensor:
        n = t.shape[dim]
        starts = [i * n // out for i in range(out)]
        ends = [-(-(i + 1) * n // out) for i in range(out)]
        return torch.cat([t.narrow(dim, a, b - a).amax(dim=dim, keepdim=True)
                          for a, b in zip(starts, ends)], dim=dim)

    pooled = along(along(x, -2, size[0]), -1, size[1])
    return pooled, torch.zeros(pooled.shape, dtype=torch.int64, device=x.device)


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes whenever a weight or statistic is replaced or modified in place (inference
    tensors keep no version counter: only their replacement shows)."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


__all__ = [
    "BATCH_DIM",
    "CACHE_ENV",
    "COMPILING",
    "MIN_SPOTS",
    "PATH_ENV",
    "QUANTIZING",
    "CompiledModel",
    "OnnxChunks",
    "OnnxModel",
    "Prediction",
    "adaptive_max_pool2d_by_windows",
    "cache_dir",
    "choose_path",
    "cpu_runner",
    "export_onnx",
    "export_path",
    "held_runner",
    "int8_asked",
    "onnx_available",
    "precision_run",
]
