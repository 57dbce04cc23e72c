"""The dense path (inference/dense.py) on synthetic data: its lattice in µm, its statistics,
its shared tiles against direct computations, its predictions against the exact path, cancel
and dispatch."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from hifusion_model import api
from hifusion_model.cli import main
from hifusion_model.data.dataset import SpotDataset
from hifusion_model.data.sections import new_section
from hifusion_model.data.slide import Slide
from hifusion_model.devices import autocast
from hifusion_model.errors import Cancelled, ConfigError
from hifusion_model.evaluation.metrics import gene_pcc
from hifusion_model.inference import dense, fast_cpu, lattice
from hifusion_model.inference.blocks import read_model_px
from hifusion_model.inference.predict import grid_section, predict_section
from hifusion_model.models.backbones import use_level
from hifusion_model.models.checkpoint import load_model, save_checkpoint
from hifusion_model.models.config import ModelConfig, tiny_config
from hifusion_model.models.hifusion import HiFusion, encode_level

MPP = 2.0  # the synthetic slide's µm/px; spot_um = 448 µm makes the model read it at 1:1
STEP = 32


def lattice_config(genes: list[str] | int = 8, **overrides) -> ModelConfig:
    """A tiny model with the released geometry (224-px spots, 32-px tiles, 448-px regions)."""
    base = {"spot_px": 224, "region_px": 448, "spot_um": 224 * MPP, "region_um": 448 * MPP,
            "width": 4}
    return tiny_config(genes, **(base | overrides))


def network(config: ModelConfig, seed: int = 0) -> HiFusion:
    torch.manual_seed(seed)
    return HiFusion(config).eval()


@pytest.fixture(scope="module")
def slide(synthetic_slide_path):
    with Slide.open(synthetic_slide_path) as opened:
        yield opened


def lattice_section(slide: Slide, corners: list[tuple[float, float]], source: str = "grid:hex"):
    """Spots whose patches start at lattice points ``corners`` (x, y in lattice steps)."""
    xy = np.array(corners, dtype=float) * STEP + 224 / 2
    return new_section(xy, slide=slide.path, mpp=MPP, spot_diameter_um=100.0, name="lattice",
                       source=source)


# -- geometry ------------------------------------------------------------------------------------
def test_the_lattice_is_22_um_for_the_released_model_and_places_spots_in_um():
    released = ModelConfig(genes=["ERBB2"])
    her2st = lattice.Lattice.of(released, 0.6877761266286357)  # C4's µm/px: read at 1:1
    assert her2st.scale == 1.0 and her2st.step_um == pytest.approx(22.0, abs=0.01)

    scan = lattice.Lattice.of(released, 0.5)  # a 0.5 µm/px scan: 308 px read per 224-px spot
    assert scan.scale == pytest.approx(224 / 308) and scan.step_um == pytest.approx(22.0)
    spot_um, step_um = released.spot_um, scan.step_um
    on_lattice = np.array([[3, 5], [10, 2]]) * step_um + spot_um / 2  # µm centres
    half_off = on_lattice + step_um / 2
    to_px = 1 / 0.5
    np.testing.assert_allclose(scan.positions(on_lattice * to_px, 224), [[3, 5], [10, 2]])
    np.testing.assert_allclose(scan.positions(half_off * to_px, 224), [[3.5, 5.5], [10.5, 2.5]])


def test_geometries_that_cannot_share_are_refused_with_the_way_out():
    assert lattice.dense_step(lattice_config()) == STEP
    with pytest.raises(ConfigError, match="dense=False"):
        lattice.dense_step(tiny_config(4))  # 56-px spots: 8-px tiles are not the 32-px cells
    assert "test-time" in dense.dense_unsupported(network(lattice_config()), lattice_config(), 2)


def test_needed_cells_cover_each_window_and_its_blend_neighbours():
    mask, first = lattice.needed_cells(np.array([[2.0, 3.0], [4.5, 3.0]]), 7)
    assert first == (2, 3)
    assert mask.shape == (7, 10) and mask.all()  # the blended spot reaches column 4 + 7
    mask, _ = lattice.needed_cells(np.array([[0.0, 0.0], [20.0, 0.0]]), 7)
    assert mask.sum() == 2 * 49 and not mask[:, 7:20].any()


# -- statistics ----------------------------------------------------------------------------------
def test_window_statistics_are_those_of_each_window():
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    mean, std = lattice.window_statistics(image, 32, 16)
    assert mean.shape == (3, 5, 7)
    window = image[:, 16:48, 48:80]
    torch.testing.assert_close(mean[:, 1, 3], window.mean((1, 2)))
    torch.testing.assert_close(std[:, 1, 3], window.std((1, 2), correction=0))


def test_each_tile_is_z_scored_by_the_window_centred_on_it():
    image = torch.rand(3, 32 * 3 + 192, 32 * 4 + 192, generator=torch.Generator().manual_seed(1))
    tiles = lattice.tile_zscore(image, 32, 224, 16)
    assert tiles.shape == (3, 4, 3, 32, 32)
    row, col = 2, 1
    window = image[:, 32 * row:32 * row + 224, 32 * col:32 * col + 224]
    tile = window[:, 96:128, 96:128]
    var, mean = torch.var_mean(window, dim=(1, 2), keepdim=True, correction=0)
    torch.testing.assert_close(tiles[row, col], (tile - mean) / (var.sqrt() + 1e-4))


# -- shared tiles against direct computation ----------------------------------------------------
def encoded_tiles(model: HiFusion, slide: Slide, config: ModelConfig, first: tuple[int, int],
                  cells: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each lattice cell ``(row, col)`` (relative to ``first``) encoded on its own, z-scored by
    the spot-sized window centred on it, as the exact path z-scores a spot: ``(n, C)``."""
    half = (224 - STEP) // 2
    tiles = []
    for r, c in cells:
        x0, y0 = (first[0] + c) * STEP - half, (first[1] + r) * STEP - half
        pixels = read_model_px(slide, 1.0, x0, y0, 224, 224)  # the slide is read at 1:1
        window = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float() / 255
        var, mean = torch.var_mean(window, dim=(1, 2), keepdim=True, correction=0)
        tile = (window - mean) / (var.sqrt() + 1e-4)
        tiles.append(tile[:, half:half + STEP, half:half + STEP])
    with autocast(torch.device("cpu"), dtype), use_level(model.spot_encoder, 2):
        return model.spot_encoder(torch.stack(tiles)).flatten(1)


def test_shared_tiles_are_each_tile_encoded_alone_across_chunks_and_bands(slide, monkeypatch):
    """Chunks, bands carrying rows over and padded batches add nothing: every needed cell holds
    its tile's own features, and no other cell is filled. The encoder sees batches of
    TILE_ROUND multiples only (oneDNN keeps kernels per input shape, so every new shape costs
    memory for good), and tiles held in the encoder's bf16 are what it computed."""
    monkeypatch.setattr(dense, "CHUNK_COLS", 11)
    config = lattice_config()
    model = network(config)
    grid = lattice.Lattice.of(config, MPP)
    needed = np.zeros((9, 30), bool)
    needed[1:4, 2:5] = needed[5:9, 13:20] = needed[0:7, 25:27] = True  # boxes of odd sizes
    first = (3, 2)
    shapes: list[tuple[int, ...]] = []
    hook = model.spot_encoder.register_forward_pre_hook(
        lambda _, args: shapes.append(tuple(args[0].shape)))
    with torch.inference_mode():
        tiles = dense.SharedTiles(model, slide, grid, needed, first, torch.device("cpu"), None)
        held = []
        for top, bottom in ((0, 4), (2, 7), (7, 9)):  # overlapping bands, then an adjacent one
            tiles.hold(top, bottom)
            held.append((top, tiles.map.clone()))
        hook.remove()
        expected = encoded_tiles(model, slide, config, first, np.argwhere(needed))
        whole = torch.zeros(*needed.shape, config.feature_dim)
        whole[torch.as_tensor(needed)] = expected
        for top, got in held:
            torch.testing.assert_close(got, whole[top:top + len(got)], rtol=1e-4, atol=1e-5)
        assert shapes and all(s[0] % dense.TILE_ROUND == 0 for s in shapes), shapes

        bf16 = dense.SharedTiles(model, slide, grid, needed, first, torch.device("cpu"),
                                 torch.bfloat16)
        bf16.hold(0, needed.shape[0])
        assert bf16.map.dtype == torch.bfloat16
        window = bf16.windows(np.array([[5.5, 3.0]]), 2)  # cell (1, 2) of the map, half right
        assert window.dtype == torch.float32
        cells = bf16.map.float().permute(2, 0, 1)
        torch.testing.assert_close(window[0], (cells[:, 1:3, 2:4] + cells[:, 1:3, 3:5]) / 2)
        own = encoded_tiles(model, slide, config, first, np.array([[1, 2]]), torch.bfloat16)
        assert own.dtype == torch.bfloat16  # so holding the tiles in bf16 rounds nothing


def test_finest_tiles_on_the_lattice_are_the_spots_own_and_blend_between(slide):
    """Without z-scoring, a tile's features depend on the tile alone: a spot on the lattice gets
    exactly its own 7×7 tile map, one half a step off the mean of its two neighbours'."""
    config = lattice_config(input_norm="none")
    model = network(config)
    section = lattice_section(slide, [(4, 3), (5, 3), (9, 6)])
    spots = torch.stack([SpotDataset(section, slide, config)[i]["spot"] for i in range(3)])
    with torch.inference_mode(), use_level(model.spot_encoder, 2):
        own = encode_level(model.spot_encoder, spots, 7)
    grid = lattice.Lattice.of(config, MPP)
    origins = np.array([[4.0, 3.0], [5.0, 3.0], [9.0, 6.0], [4.5, 3.0]])
    needed, first = lattice.needed_cells(origins, 7)
    with torch.inference_mode():
        shared = dense.SharedTiles(model, slide, grid, needed, first, torch.device("cpu"), None)
        shared.hold(0, needed.shape[0])
        tiles = shared.windows(origins, 7)
    torch.testing.assert_close(tiles[:3], own, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tiles[3], (own[0] + own[1]) / 2, rtol=1e-4, atol=1e-5)


def test_the_tail_is_the_forward_pass_after_the_encoders():
    config = lattice_config()
    model = network(config)
    spot, region = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 448, 448)
    with torch.inference_mode():
        expected = model(spot, region).prediction
        z_spot, z_region = model._normalize(spot), model._normalize(region)
        got = dense.fuse_and_attend(model, model.encode_spot(z_spot),
                                    model.region_encoder(z_region))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# -- predictions ---------------------------------------------------------------------------------
def test_dense_predictions_are_the_exact_ones_where_sharing_is_exact(slide, monkeypatch):
    """Spots on the lattice and no z-scoring: nothing is approximated, so any slip in bands,
    spot order, windows or the per-spot levels shows as a difference."""
    monkeypatch.setattr(dense, "BAND_ROWS", 2)  # several bands, each carrying rows over
    config = lattice_config(input_norm="none")
    model = network(config)
    corners = [(9, 7), (4, 3), (13, 3), (6, 5), (4, 9), (10, 3), (7, 3)]  # not in raster order
    section = lattice_section(slide, corners)
    seen = []
    exact = predict_section(model, config, section, slide, precision="fp32", workers=0)
    got = dense.predict_dense(model, config, section, slide, precision="fp32", workers=0,
                              batch_size=3, progress=lambda d, n, m: seen.append((d, n)))
    assert float(exact.std(axis=0).mean()) > 1e-3  # the spots differ, so order matters
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)
    assert seen == [(3, 7), (6, 7), (7, 7)]


def eager_and_fast(slide: Slide, monkeypatch, cpu_path: str) -> tuple[np.ndarray, np.ndarray]:
    """fp32 dense predictions of a tiny lattice model on five spots (two between lattice
    points; chunks padded), eager and on the CPU path ``cpu_path``, which is checked to have
    run: the per-spot part goes where the exact path's network would, and in int8 the shared
    tiles too."""
    config = lattice_config()
    model = network(config)
    section = lattice_section(slide, [(4, 3), (5.5, 3), (9, 6.25), (6, 8), (12, 3)])
    run = {"precision": "fp32", "workers": 0, "batch_size": 3}
    monkeypatch.setenv(fast_cpu.PATH_ENV, "eager")
    eager = dense.predict_dense(model, config, section, slide, **run)
    monkeypatch.setenv(fast_cpu.PATH_ENV, cpu_path)
    fast = dense.predict_dense(model, config, section, slide, **run)
    tiles = [("tiles", "int8")] if cpu_path == "int8" else []  # int8 shares int8 tiles
    assert [key[:2] for key in fast_cpu._RUNNERS[model]] == [("dense", cpu_path), *tiles]
    assert float(eager.std(axis=0).mean()) > 1e-3
    return eager, fast


@pytest.mark.skipif(not fast_cpu.onnx_available(), reason="needs onnxruntime, onnx, onnxscript")
def test_the_per_spot_levels_through_onnx_runtime_predict_as_eager(slide, monkeypatch, tmp_path):
    monkeypatch.setenv(fast_cpu.CACHE_ENV, str(tmp_path))
    eager, fast = eager_and_fast(slide, monkeypatch, "onnx")
    np.testing.assert_allclose(fast, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not fast_cpu.onnx_available(), reason="needs onnxruntime, onnx, onnxscript")
def test_the_per_spot_levels_in_int8_predict_close_to_eager(slide, monkeypatch, tmp_path):
    """Calibrated on the packaged sample's patches, the int8 per-spot part and shared tiles
    follow eager fp32 from spot to spot (a random tiny model: a loose bound)."""
    monkeypatch.setenv(fast_cpu.CACHE_ENV, str(tmp_path))
    eager, fast = eager_and_fast(slide, monkeypatch, "int8")
    assert gene_pcc(fast, eager).min() > 0.95
    assert [p.name.endswith(".int8.onnx") for p in (tmp_path / "onnx").iterdir()] == [True] * 2


def test_a_stop_request_ends_the_dense_path_with_cancelled(slide):
    config = lattice_config()
    section = lattice_section(slide, [(4, 3), (8, 3), (12, 3), (4, 8)])
    asked, seen = [], []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2  # let the first batch through, then stop

    with pytest.raises(Cancelled, match="stopped"):
        dense.predict_dense(network(config), config, section, slide, workers=0, batch_size=2,
                            should_stop=stop, progress=lambda d, n, m: seen.append(d))
    assert seen == [2]


# -- which path --------------------------------------------------------------------------------
def test_auto_takes_the_dense_path_for_grids_on_a_cpu_in_int8_or_bf16_only(slide):
    config = lattice_config()
    model = network(config)
    cpu = {"device": torch.device("cpu"), "runs_in": "bfloat16"}
    grid = grid_section(slide, kind="hex", pitch_um=200)  # as hex:70 for 154 µm spots
    assert dense.sharing(grid, config, MPP) < dense.SHARED_ENOUGH
    assert dense.choose_dense(None, grid, model, config, MPP, **cpu)
    assert dense.choose_dense(None, grid, model, config, MPP, **(cpu | {"runs_in": "int8"}))
    assert not dense.choose_dense(None, grid, model, config, MPP, **(cpu | {"runs_in": "fp32"}))
    assert not dense.choose_dense(None, grid, model, config, MPP, device=torch.device("cuda"),
                                  runs_in="bfloat16")  # not measured there
    assert not dense.choose_dense(False, grid, model, config, MPP, **cpu)
    assert not dense.choose_dense(None, grid, model, config, MPP, tta=2, **cpu)
    assert dense.choose_dense(True, grid, model, config, MPP)  # forced: any precision
    own = grid.copy()
    own.uns["hifusion"] = {**own.uns["hifusion"], "source": "visium"}
    assert not dense.choose_dense(None, own, model, config, MPP, **cpu)
    assert dense.choose_dense(True, own, model, config, MPP, **cpu)
    sparse = grid_section(slide, kind="square", pitch_um=600)  # patches do not overlap
    assert not dense.choose_dense(None, sparse, model, config, MPP, **cpu)
    with pytest.raises(ConfigError, match="test-time"):
        dense.choose_dense(True, grid, model, config, MPP, tta=2)


def test_predict_on_a_grid_says_which_path_ran(synthetic_slide_path, tmp_path, capsys):
    config = lattice_config(genes=["ERBB2", "KRT19"])
    path = save_checkpoint(tmp_path / "lattice.pt", network(config), train_mean=torch.zeros(2))
    pair = load_model(path)
    shared = api.predict(synthetic_slide_path, pair, grid="hex:200", device="cpu", workers=0,
                         precision="bf16")
    exact = api.predict(synthetic_slide_path, pair, grid="hex:200", device="cpu", workers=0,
                        dense=False)
    assert shared.uns["hifusion_model"]["inference"] == "dense"
    assert exact.uns["hifusion_model"]["inference"] == "exact"
    np.testing.assert_array_equal(shared.obsm["spatial"], exact.obsm["spatial"])  # none moved

    out = tmp_path / "grid.h5ad"
    args = ["predict", str(synthetic_slide_path), "--grid", "hex:200", "--model", str(path),
            "--out", str(out), "--device", "cpu", "--workers", "0", "--bf16"]
    assert main(args) == 0 and "dense path" in capsys.readouterr().out
    assert main([*args, "--dense", "no", "--overwrite"]) == 0
    assert "dense path" not in capsys.readouterr().out
    assert ad.read_h5ad(out).uns["hifusion_model"]["inference"] == "exact"
