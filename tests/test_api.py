"""The public API at the package root: predict, evaluate, create_model, on synthetic data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from synthetic import synthetic_section, tiny_checkpoint

import hifusion_model
from hifusion_model import api
from hifusion_model.data.sections import read_section, section_slide
from hifusion_model.errors import ConfigError, SectionError
from hifusion_model.inference import uncertainty
from hifusion_model.models import registry
from hifusion_model.models.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def section_path(tmp_path_factory):
    return synthetic_section(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model_path(section_path):
    genes = list(read_section(section_path).var_names)
    return tiny_checkpoint(section_path.parent / "tiny.pt", genes)


def test_the_root_exports_the_notebook_api():
    for name in ("predict", "evaluate", "load_model", "train", "read_section", "create_model",
                 "open_slide"):
        assert callable(getattr(hifusion_model, name)), name
    with pytest.raises(AttributeError):
        hifusion_model.no_such_thing  # noqa: B018


def test_predict_a_section_and_evaluate_it(section_path, model_path):
    pred = hifusion_model.predict(section_path, model=str(model_path), device="cpu", workers=0)
    section = read_section(section_path)
    assert pred.shape == (section.n_obs, section.n_vars)
    assert "truth" in pred.layers and "uncertainty" not in pred.layers  # no noise model
    np.testing.assert_array_equal(pred.obsm["spatial"], section.obsm["spatial"])
    scores = hifusion_model.evaluate(pred)
    assert {"mse", "gene_pcc", "skill", "baseline"} <= set(scores)
    assert set(scores["genes"]) == {"ERBB2"}
    # the same numbers as the files route
    out = section_path.parent / "pred.h5ad"
    from hifusion_model.inference.predict import write_predictions

    write_predictions(pred, out)
    assert hifusion_model.evaluate(out)["mse"] == pytest.approx(scores["mse"])


def test_a_model_with_a_noise_model_gives_an_uncertainty_layer(section_path, model_path):
    section = read_section(section_path)
    ckpt = load_checkpoint(model_path)
    slide = section_slide(section)
    try:
        noise = uncertainty.fit_on_sections([(section, slide)], ckpt.config)
    finally:
        slide.close()
    net = registry.create_model("hifusion_tiny", genes=ckpt.genes)
    net.load_state_dict(ckpt.state_dict)
    path = save_checkpoint(section_path.parent / "noisy.pt", net, train_mean=ckpt.train_mean,
                           card={"noise_model": noise.to_dict()})
    pred = api.predict(section, model=str(path), device="cpu", workers=2, batch_size=5)
    u = pred.layers["uncertainty"]
    assert u.shape == pred.shape and np.isfinite(u).all() and (u > 0).all()
    # the stain seen during prediction is the stain a second read finds
    slide = section_slide(section)
    try:
        again = noise.uncertainty(np.asarray(pred.X),
                                  uncertainty.section_stain_features(section, slide, ckpt.config))
    finally:
        slide.close()
    np.testing.assert_allclose(u, again, rtol=1e-5)


def test_predict_on_a_bare_slide_with_a_grid(section_path, model_path):
    slide = section_path.parent / "slide.ome.tif"
    pred = api.predict(slide, model=str(model_path), grid="hex:200", device="cpu", workers=0)
    assert pred.n_obs > 3 and "truth" not in pred.layers
    with pytest.raises(ConfigError, match="slide without spots"):
        api.predict(slide, model=str(model_path))
    with pytest.raises(ConfigError, match="is a section"):
        api.predict(section_path, model=str(model_path), grid="hex:100")
    with pytest.raises(SectionError, match="no measured truth"):
        api.evaluate(pred)
    assert api.parse_grid("square") == ("square", None)
    with pytest.raises(ConfigError, match="number of µm"):
        api.parse_grid("hex:wide")


def test_a_loaded_pair_is_reused(section_path, model_path):
    pair = hifusion_model.load_model(str(model_path))
    a = api.predict(section_path, model=pair, device="cpu", workers=0)
    b = api.predict(section_path, model=str(model_path), device="cpu", workers=0)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    assert isinstance(a, ad.AnnData)


def test_the_registry_names_every_network():
    models = registry.available_models()
    assert set(models) == {"hifusion", "hifusion_tiny", "spot_resnet18"}
    spot = registry.create_model("spot_resnet18", genes=["A", "B"])
    assert spot.config.arch == "spot_resnet18" and spot.config.levels == (1,)
    out = spot(torch.rand(1, 3, 224, 224), torch.rand(1, 3, 224, 224))
    assert out.prediction.shape == (1, 2)
    wide = registry.model_config("hifusion", ["A"], width=32)
    assert wide.width == 32
    with pytest.raises(ConfigError, match="unknown model 'resnet50'; choose one of hifusion"):
        registry.create_model("resnet50", genes=["A"])
    with pytest.raises(ConfigError, match="at least one gene"):
        registry.create_model("hifusion", genes=[])


def test_train_then_predict_gives_the_uncertainty_of_the_trained_model(section_path, tmp_path):
    """A trained model carries its noise model (fitted on its training spots) in the card."""
    from hifusion_model.models.config import tiny_config

    recipe = hifusion_model.get_recipe("hifusion", epochs=1, batch_size=8, refit=False)
    result = hifusion_model.train([section_path], tmp_path / "m.pt", recipe=recipe,
                                  model_config=tiny_config(1), genes=6, device="cpu")
    card = load_checkpoint(result.checkpoint).card
    noise = uncertainty.NoiseModel.from_card(card)
    assert noise is not None and noise.n_spots == read_section(section_path).n_obs
    pred = hifusion_model.predict(section_path, model=str(result.checkpoint), device="cpu",
                                  workers=0)
    assert pred.layers["uncertainty"].shape == pred.shape == (noise.n_spots, 6)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, as written, on the packaged sample with the bundled model."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"gene PCC 0\.3\d\d, ERBB2 0\.[67]\d\d", printed[0]), printed
    assert re.fullmatch(r"184 spots, uncertainty 0\.\d\d-0\.\d\d", printed[1]), printed
    pred = ad.read_h5ad(tmp_path / "C4.pred.h5ad")
    assert {"truth", "uncertainty"} <= set(pred.layers)


def test_plot_draws_a_gene_beside_its_measurement(section_path, model_path, tmp_path, capsys):
    from PIL import Image

    from hifusion_model.cli import main
    from hifusion_model.inference.predict import write_predictions

    pred = api.predict(section_path, model=str(model_path), device="cpu", workers=0)
    write_predictions(pred, tmp_path / "p.h5ad")
    assert "spatial" in ad.read_h5ad(tmp_path / "p.h5ad").uns  # the H&E the figure draws on
    out = tmp_path / "fig.png"
    assert main(["plot", str(tmp_path / "p.h5ad"), "--gene", "GENE3", "--out", str(out)]) == 0
    with Image.open(out) as im:
        width, height = im.size
    assert width > 3 * height  # predicted, measured and the PCC panel side by side
    assert main(["plot", str(tmp_path / "p.h5ad"), "--gene", "erbb2", "--out",
                 str(tmp_path / "g.png")]) == 2
    assert "erbb2 is not among the 12 predicted genes; did you mean ERBB2?" in \
        capsys.readouterr().err
    assert main(["plot", str(tmp_path / "p.h5ad"), "--out", str(tmp_path / "f.tiff")]) == 2
    assert main(["plot", str(tmp_path / "p.h5ad"), "--out", str(out)]) == 2  # exists
    assert not (tmp_path / "g.png").exists()


def test_the_cli_is_quiet_when_stderr_is_not_a_terminal(section_path, model_path, tmp_path,
                                                         capsys):
    """A log file or a job scheduler gets the result line, not progress-bar frames."""
    from hifusion_model.cli import main

    out = tmp_path / "p.h5ad"
    assert main(["predict", str(section_path), "--model", str(model_path), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "spots/s" in captured.out
