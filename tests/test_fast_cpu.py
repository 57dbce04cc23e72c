"""The fast fp32 CPU path (ONNX Runtime): when it is chosen, that it predicts as eager does,
and that any failure to set it up falls back to eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic import spot_array_section

from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.errors import ConfigError
from hifusion_model.evaluation.metrics import gene_pcc
from hifusion_model.inference import fast_cpu
from hifusion_model.inference.int8_cpu import sample_patches
from hifusion_model.inference.predict import CPU_CHUNK, predict_section
from hifusion_model.models.registry import create_model

CPU = torch.device("cpu")
needs_onnx = pytest.mark.skipif(not fast_cpu.onnx_available(),
                                reason="onnxruntime, onnx and onnxscript are not installed")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Exports go to this test's folder, never to the user's cache or another test's."""
    monkeypatch.setenv(fast_cpu.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(fast_cpu, "_RUNNERS", type(fast_cpu._RUNNERS)())
    return tmp_path / "cache" / "onnx"


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("hifusion_tiny", genes=["ERBB2", "KRT19", "CD74"]).eval()


def test_choose_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fast_cpu.PATH_ENV, raising=False)
    monkeypatch.setattr(fast_cpu, "onnx_available", lambda: True)
    big, small = fast_cpu.MIN_SPOTS, fast_cpu.MIN_SPOTS - 1
    assert fast_cpu.choose_path(CPU, None, big) == "onnx"
    assert fast_cpu.choose_path(CPU, None, small) == "eager"  # the export would not pay
    assert fast_cpu.choose_path(CPU, torch.bfloat16, big) == "eager"  # native bf16 is faster
    monkeypatch.setattr(fast_cpu, "compiler_available", lambda: True)
    huge = fast_cpu.COMPILE_MIN_SPOTS
    assert fast_cpu.choose_path(CPU, torch.bfloat16, huge - 1) == "eager"  # would not repay
    assert fast_cpu.choose_path(CPU, torch.bfloat16, huge) == "compile"
    assert fast_cpu.choose_path(CPU, None, huge) == "onnx"  # fp32: ONNX Runtime is faster
    monkeypatch.setattr(fast_cpu, "compiler_available", lambda: False)
    assert fast_cpu.choose_path(CPU, torch.bfloat16, huge) == "eager"
    assert fast_cpu.choose_path(torch.device("cuda"), None, big) == "eager"
    monkeypatch.setattr(fast_cpu, "onnx_available", lambda: False)
    assert fast_cpu.choose_path(CPU, None, big) == "eager"
    monkeypatch.setenv(fast_cpu.PATH_ENV, "onnx")
    assert fast_cpu.choose_path(CPU, None, 1) == "onnx"  # forced: a failure then falls back
    assert fast_cpu.choose_path(CPU, torch.bfloat16, big) == "eager"  # no bf16 ONNX path
    monkeypatch.setenv(fast_cpu.PATH_ENV, "compile")
    assert fast_cpu.choose_path(CPU, None, 1) == "compile"
    assert fast_cpu.choose_path(torch.device("cuda"), None, big) == "eager"
    monkeypatch.setenv(fast_cpu.PATH_ENV, "eager")
    monkeypatch.setattr(fast_cpu, "onnx_available", lambda: True)
    assert fast_cpu.choose_path(CPU, None, big) == "eager"
    monkeypatch.setenv(fast_cpu.PATH_ENV, "fast")
    with pytest.raises(ConfigError, match="HIFUSION_CPU_PATH"):
        fast_cpu.choose_path(CPU, None, big)


def test_choose_path_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 where asked, or under auto for jobs of MIN_SPOTS spot views, whatever the dtype and
    whatever the cache holds (a job's predictions never depend on the cache)."""
    monkeypatch.delenv(fast_cpu.PATH_ENV, raising=False)
    monkeypatch.setattr(fast_cpu, "onnx_available", lambda: True)
    monkeypatch.setattr(fast_cpu, "compiler_available", lambda: True)
    assert [fast_cpu.int8_asked(p) for p in ("int8", "auto", "fp32", "bf16")] == [
        True, None, False, False]
    big, small = fast_cpu.MIN_SPOTS, fast_cpu.MIN_SPOTS - 1
    for dtype in (None, torch.bfloat16):
        assert fast_cpu.choose_path(CPU, dtype, big, int8=None) == "int8"
        assert fast_cpu.choose_path(CPU, dtype, fast_cpu.COMPILE_MIN_SPOTS, int8=None) == "int8"
        assert fast_cpu.choose_path(CPU, dtype, 1, int8=True) == "int8"
        assert fast_cpu.choose_path(CPU, dtype, big, int8=False) != "int8"
    assert fast_cpu.choose_path(CPU, None, small, exported=True, int8=None) == "onnx"
    assert fast_cpu.choose_path(CPU, torch.bfloat16, small, int8=None) == "eager"
    assert fast_cpu.choose_path(torch.device("cuda"), None, big, int8=True) == "eager"
    monkeypatch.setattr(fast_cpu, "onnx_available", lambda: False)
    assert fast_cpu.choose_path(CPU, None, big, int8=None) == "eager"
    monkeypatch.setenv(fast_cpu.PATH_ENV, "int8")
    assert fast_cpu.choose_path(CPU, torch.bfloat16, 1) == "int8"  # forced
    monkeypatch.setenv(fast_cpu.PATH_ENV, "onnx")
    assert fast_cpu.choose_path(CPU, None, big, int8=None) == "onnx"
    monkeypatch.delenv(fast_cpu.PATH_ENV)
    monkeypatch.setattr(fast_cpu, "onnx_available", lambda: True)
    assert fast_cpu.precision_run(CPU, "auto", big) == "int8"
    assert fast_cpu.precision_run(CPU, "int8", 1) == "int8"
    assert fast_cpu.precision_run(CPU, "fp32", big) == "fp32"
    assert fast_cpu.precision_run(CPU, "bf16", big) == "bfloat16"


@pytest.mark.parametrize(("size", "out"), [(8, 7), (14, 7), (10, 7), (7, 2), (7, 7), (5, 3)])
def test_adaptive_max_pool_by_windows(size: int, out: int) -> None:
    x = torch.randn(2, 4, size, size + 1)
    pooled, _ = fast_cpu.adaptive_max_pool2d_by_windows(x, [out, out + 1])
    assert torch.equal(pooled, F.adaptive_max_pool2d(x, (out, out + 1)))


def test_failed_export_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                           tiny_model: torch.nn.Module) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setenv(fast_cpu.PATH_ENV, "onnx")
    monkeypatch.setattr(fast_cpu, "export_onnx", broken)
    monkeypatch.setattr(fast_cpu, "_WARNED", set())
    with pytest.warns(UserWarning, match="eager PyTorch instead"):
        assert fast_cpu.cpu_runner(tiny_model, CPU, None, 1, CPU_CHUNK) is tiny_model


def test_runner_is_kept_while_the_weights_are(monkeypatch: pytest.MonkeyPatch,
                                              tiny_model: torch.nn.Module) -> None:
    built = []

    class Recorder:
        def __init__(self, model: torch.nn.Module, chunk: int, cache: Path,
                     int8: bool = False) -> None:
            self.chunk = chunk
            built.append(chunk)

    monkeypatch.setenv(fast_cpu.PATH_ENV, "onnx")
    monkeypatch.setattr(fast_cpu, "OnnxModel", Recorder)
    first = fast_cpu.cpu_runner(tiny_model, CPU, None, 1, 8)
    assert fast_cpu.cpu_runner(tiny_model, CPU, None, 1, 8) is first
    with torch.no_grad():
        next(tiny_model.parameters()).add_(0.1)  # trained further: export again
    assert fast_cpu.cpu_runner(tiny_model, CPU, None, 1, 8) is not first
    assert built == [8, 8]


@needs_onnx
def test_onnx_model_predicts_as_eager(tiny_model: torch.nn.Module) -> None:
    """Padded (5 spots) and multi-chunk (11) calls of a 4-spot graph give eager's predictions."""
    runner = fast_cpu.OnnxModel(tiny_model, chunk=4)
    g = torch.Generator().manual_seed(1)
    c = tiny_model.config
    for n in (5, 11):
        spot = torch.rand(n, 3, c.spot_px, c.spot_px, generator=g)
        region = torch.rand(n, 3, c.region_px, c.region_px, generator=g)
        with torch.inference_mode():
            expected = tiny_model(spot, region).prediction
            got = runner(spot.contiguous(memory_format=torch.channels_last), region).prediction
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_onnx
def test_int8_model_quantises_the_convolutions_and_predicts_close_to_fp32(
        own_cache: Path, tiny_model: torch.nn.Module) -> None:
    """On real H&E patches (the packaged sample, which it is also calibrated on) the int8 graph
    follows fp32 from spot to spot (per-gene PCC; a random tiny model, so a loose bound);
    every convolution takes int8 weights, and attention's and the head's products do not."""
    import onnx

    cache = fast_cpu.export_path(tiny_model, 4, int8=True)
    assert cache != fast_cpu.export_path(tiny_model, 4) and cache.name.endswith(".int8.onnx")
    runner = fast_cpu.OnnxModel(tiny_model, chunk=4, cache=cache, int8=True)
    graph = onnx.load(str(cache))
    ops = [node.op_type for node in graph.graph.node]
    weights = {i.name: i.data_type for i in graph.graph.initializer}
    conv_weights = [weights.get(graph_input(graph, node.input[1])) for node in graph.graph.node
                    if node.op_type == "Conv"]
    assert conv_weights and set(conv_weights) == {onnx.TensorProto.INT8}
    products = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert products and not any(graph_input(graph, i) != i for n in products for i in n.input)
    spot, region = (torch.cat(x) for x in zip(*sample_patches(tiny_model.config, 4, n=16)))
    with torch.inference_mode():
        expected = tiny_model(spot, region).prediction.numpy()
        got = runner(spot.contiguous(memory_format=torch.channels_last), region).prediction
    assert gene_pcc(got.numpy(), expected).min() > 0.95


def test_weights_take_7_bits_on_x86_without_vnni_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without VNNI, ONNX Runtime's x86 int8 kernels sum pairs of products in int16: 7-bit
    weights cannot overflow it. The bits are part of the cached graph's name."""
    from hifusion_model.inference import int8_cpu

    model = create_model("hifusion_tiny", genes=["ERBB2"])
    names = set()
    for machine, vnni, bits in (("x86_64", False, 7), ("x86_64", True, 8), ("AMD64", False, 7),
                                ("arm64", False, 8)):
        monkeypatch.setattr(int8_cpu.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(int8_cpu, "cpu_has_vnni", lambda v=vnni: v)
        assert int8_cpu.weight_bits() == bits
        names.add(fast_cpu.export_path(model, 8, int8=True).name)
    assert len(names) == 2


def graph_input(graph, name: str) -> str:
    """The initializer behind ``name``: a DequantizeLinear's input, or ``name`` itself."""
    for node in graph.graph.node:
        if name in node.output and node.op_type == "DequantizeLinear":
            return node.input[0]
    return name


@needs_onnx
def test_predict_section_through_onnx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      tiny_model: torch.nn.Module) -> None:
    """The section's predictions through ONNX Runtime are eager's, and that path did run."""
    section = read_section(spot_array_section(tmp_path, n_spots=12))
    slide = section_slide(section)
    config = tiny_model.config
    monkeypatch.setenv(fast_cpu.PATH_ENV, "eager")
    eager = predict_section(tiny_model, config, section, slide, device="cpu", batch_size=5,
                            workers=0, precision="fp32")
    monkeypatch.setenv(fast_cpu.PATH_ENV, "onnx")
    fast = predict_section(tiny_model, config, section, slide, device="cpu", batch_size=5,
                           workers=0, precision="fp32")
    assert [type(r) for _, r in fast_cpu._RUNNERS[tiny_model].values()] == [fast_cpu.OnnxModel]
    np.testing.assert_allclose(fast, eager, atol=1e-4, rtol=1e-4)


@needs_onnx
def test_export_is_kept_on_disk(monkeypatch: pytest.MonkeyPatch, own_cache: Path,
                                tiny_model: torch.nn.Module) -> None:
    """A large job exports and keeps the graph; later jobs of any size (in a new process: no
    session in memory) read it instead of exporting again."""
    exports = []
    real_export = fast_cpu.export_onnx
    monkeypatch.setattr(fast_cpu, "export_onnx",
                        lambda *a, **kw: exports.append(a) or real_export(*a, **kw))
    monkeypatch.delenv(fast_cpu.PATH_ENV, raising=False)
    assert fast_cpu.cpu_runner(tiny_model, CPU, None, 1, 4) is tiny_model  # small, new: eager
    first = fast_cpu.cpu_runner(tiny_model, CPU, None, fast_cpu.MIN_SPOTS, 4)
    assert isinstance(first, fast_cpu.OnnxModel) and len(exports) == 1
    assert [p.name for p in own_cache.iterdir()] == [fast_cpu.export_path(tiny_model, 4).name]
    monkeypatch.setattr(fast_cpu, "_RUNNERS", type(fast_cpu._RUNNERS)())
    again = fast_cpu.cpu_runner(tiny_model, CPU, None, 1, 4)
    assert isinstance(again, fast_cpu.OnnxModel) and again is not first and len(exports) == 1


def test_an_export_made_by_other_model_code_is_not_reused(monkeypatch: pytest.MonkeyPatch,
                                                          tiny_model: torch.nn.Module) -> None:
    """The cache outlives an installation: the same weights under changed model code (or
    export code) name another file, so a stale graph never runs in place of the current one."""
    before = fast_cpu.export_path(tiny_model, 4)
    assert fast_cpu.export_path(tiny_model, 4) == before  # stable while nothing changes
    assert b"class HiFusion" in fast_cpu.graph_code(tiny_model)
    real = fast_cpu.graph_code
    monkeypatch.setattr(fast_cpu, "graph_code", lambda m: real(m) + b"# an edit")
    assert fast_cpu.export_path(tiny_model, 4) != before
