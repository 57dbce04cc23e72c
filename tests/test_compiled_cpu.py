"""The compiled CPU path (TorchInductor): it predicts as eager does, on the exact and the dense
path, and a failure to compile falls back to eager with a warning. Compiling takes tens of
seconds, so the agreement tests are slow ones (``make test-slow``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import spot_array_section
from test_dense import eager_and_fast, lattice_config, network

from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.data.slide import Slide
from hifusion_model.inference import compiled_cpu, dense, fast_cpu
from hifusion_model.inference.predict import CPU_CHUNK, predict_section
from hifusion_model.models.registry import create_model

CPU = torch.device("cpu")


def inductor_failure() -> str | None:
    """Why TorchInductor cannot compile on this machine (None when it can): the agreement
    tests need it, and scripts/setup.sh installs g++ and the Python headers for it."""
    if not compiled_cpu.compiler_available():
        return "TorchInductor needs a C++ compiler (g++)"
    try:
        compiled_cpu.CompiledChunks(torch.nn.Linear(3, 2), 2, [(3,)], None)
    except Exception as e:  # noqa: BLE001 (whatever stops it is the reason to skip)
        return f"TorchInductor cannot compile here: {type(e).__name__}: {e}"[:300]
    return None


@pytest.fixture(scope="module")
def inductor() -> None:
    why = inductor_failure()
    if why is not None:
        pytest.skip(why)


@pytest.fixture(autouse=True)
def fresh_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_cpu, "_RUNNERS", type(fast_cpu._RUNNERS)())
    monkeypatch.setattr(fast_cpu, "_WARNED", set())


@pytest.fixture(scope="module")
def lattice_slide(synthetic_slide_path: Path):
    with Slide.open(synthetic_slide_path) as opened:
        yield opened


@pytest.mark.slow  # ~40 s of compiling
@pytest.mark.usefixtures("inductor")
def test_compiled_predictions_are_eager_ones(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """fp32 compiled against fp32 eager (bf16 would add its own rounding): padded calls (the
    last batch) and calls of more than one chunk (batches of 11 in chunks of 8)."""
    torch.manual_seed(0)
    model = create_model("hifusion_tiny", genes=["ERBB2", "KRT19", "CD74"]).eval()
    section = read_section(spot_array_section(tmp_path, n_spots=12))
    slide = section_slide(section)
    run = {"device": "cpu", "batch_size": 11, "workers": 0, "precision": "fp32"}
    monkeypatch.setenv(fast_cpu.PATH_ENV, "eager")
    eager = predict_section(model, model.config, section, slide, **run)
    monkeypatch.setenv(fast_cpu.PATH_ENV, "compile")
    compiled = predict_section(model, model.config, section, slide, **run)
    runners = [r for _, r in fast_cpu._RUNNERS[model].values()]
    assert [type(r) for r in runners] == [fast_cpu.CompiledModel]
    assert runners[0].chunk == CPU_CHUNK
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~20 s of compiling
@pytest.mark.usefixtures("inductor")
def test_the_dense_path_compiles_its_own_levels_with_the_same_predictions(
        lattice_slide: Slide, monkeypatch: pytest.MonkeyPatch) -> None:
    eager, compiled = eager_and_fast(lattice_slide, monkeypatch, "compile")
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_a_failed_compile_falls_back_to_eager_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    model = network(lattice_config())
    monkeypatch.setenv(fast_cpu.PATH_ENV, "compile")
    monkeypatch.setattr(fast_cpu, "CompiledChunks", broken)
    monkeypatch.setattr(dense, "CompiledChunks", broken)
    with pytest.warns(UserWarning, match="no C.. compiler here.*eager PyTorch instead"):
        assert fast_cpu.cpu_runner(model, CPU, torch.bfloat16, 1, CPU_CHUNK) is model
    runner = dense.spot_runner(model, CPU, torch.bfloat16, 1, CPU_CHUNK)
    assert runner.__name__ == "eager"  # the same reason is not warned of twice
    assert fast_cpu._RUNNERS[model] == {}
