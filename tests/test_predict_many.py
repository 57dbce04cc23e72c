"""``hifusion predict`` on many inputs: naming, up-front checks, failures that leave the others
going, and the shares of a run split across processes (in one process; ``test_predict_ddp.py``
runs them under torchrun)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from hifusion_model.api import predict
from hifusion_model.cli import main
from hifusion_model.data.sections import read_section
from hifusion_model.errors import ConfigError, OutputError, SectionError
from hifusion_model.inference.many import (
    expand_inputs,
    input_share,
    merge_shares,
    output_paths,
    spot_share,
)
from hifusion_model.models.checkpoint import load_model


def assert_same_prediction(a: ad.AnnData, b: ad.AnnData) -> None:
    """Two predictions hold the same spots, genes, values and metadata, value for value."""
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert a.obs.equals(b.obs) and sorted(a.layers) == sorted(b.layers)
    for x, y in [(a.X, b.X), (a.obsm["spatial"], b.obsm["spatial"]),
                 *((a.layers[k], b.layers[k]) for k in a.layers)]:
        np.testing.assert_array_equal(x, y)
    _same_tree(a.uns, b.uns)


def _same_tree(x: object, y: object) -> None:
    if isinstance(x, dict):
        assert isinstance(y, dict) and sorted(x) == sorted(y)
        for k in x:
            _same_tree(x[k], y[k])
    else:
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def batch(tmp_path: Path, synthetic_dir: Path) -> Path:
    """``sections/``: the synthetic section twice (``A.h5ad``, ``B.h5ad``) beside its slide."""
    folder = tmp_path / "sections"
    folder.mkdir()
    shutil.copy(synthetic_dir / "slide.ome.tif", folder / "slide.ome.tif")
    for name in ("A", "B"):
        shutil.copy(synthetic_dir / "section.h5ad", folder / f"{name}.h5ad")
    return folder


def _predict(model: Path, *argv: str) -> int:
    return main(["predict", *argv, "--model", str(model), "--device", "cpu", "--workers", "0",
                 "--precision", "fp32"])


def test_folders_expand_to_their_matches_once_each(batch: Path) -> None:
    a = batch / "A.h5ad"
    assert expand_inputs([a, batch]) == [a, batch / "B.h5ad"]  # A reached twice, kept once
    assert expand_inputs([batch], "*.tif") == [batch / "slide.ome.tif"]
    with pytest.raises(SectionError, match=r"no file matches '\*\.svs'"):
        expand_inputs([batch], "*.svs")
    with pytest.raises(SectionError, match="nope.h5ad does not exist"):
        expand_inputs([a, batch / "nope.h5ad"])
    with pytest.raises(ConfigError, match="no folder is among the inputs"):
        expand_inputs([a], "*.h5ad")


def test_two_inputs_of_one_name_are_refused() -> None:
    with pytest.raises(OutputError, match=r"a/C4.h5ad and b/C4.svs would both be written to "
                       r"preds/C4.pred.h5ad"):
        output_paths([Path("a/C4.h5ad"), Path("b/C4.svs")], "preds")


@pytest.mark.parametrize(("n", "batch_size", "world"), [(165, 8, 2), (165, 8, 3), (10, 32, 2),
                                                       (5, 1, 4), (3, 1, 5)])
def test_spot_shares_are_whole_batches_that_tile_the_spots_in_order(n, batch_size, world) -> None:
    shares = [spot_share(n, batch_size, r, world) for r in range(world)]
    assert [s.start for s in shares[1:]] == [s.stop for s in shares[:-1]]
    assert shares[0].start == 0 and shares[-1].stop == n
    assert all(s.start % batch_size == 0 or s.start == n for s in shares)  # or empty


def test_input_shares_give_every_input_to_one_process() -> None:
    shares = [input_share(7, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(7))


def test_merged_spot_shares_equal_one_process(synthetic_section_path: Path,
                                              tiny_checkpoint_path: Path) -> None:
    section = read_section(synthetic_section_path)
    model = load_model(tiny_checkpoint_path, "cpu")
    options = {"device": "cpu", "batch_size": 32, "workers": 0, "precision": "fp32"}
    whole = predict(section, model, **options)
    parts = []
    for rank in range(3):  # 165 spots in 6 batches: 2 each
        part = section[spot_share(section.n_obs, 32, rank, 3)].copy()
        parts.append(predict(part, model, **options))
    assert_same_prediction(merge_shares([*parts, None], "section.h5ad"), whole)
    with pytest.raises(SectionError, match="no spots to predict"):
        merge_shares([None, None], "section.h5ad")


def test_many_inputs_write_one_prediction_each_named_after_it(
    batch: Path, tiny_checkpoint_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = batch.parent / "preds"
    assert _predict(tiny_checkpoint_path, str(batch), "--out-dir", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["A.pred.h5ad", "B.pred.h5ad"]
    assert capsys.readouterr().out.count("165 spots × 12 genes predicted") == 2
    single = batch.parent / "one" / "A.h5ad"  # the slide is as far from it as from preds/
    assert _predict(tiny_checkpoint_path, str(batch / "A.h5ad"), "--out", str(single)) == 0
    assert_same_prediction(ad.read_h5ad(out / "A.pred.h5ad"), ad.read_h5ad(single))


def test_a_bad_input_is_reported_and_the_others_go_on(
    batch: Path, tiny_checkpoint_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (batch / "A.h5ad").write_text("not HDF5")
    slide = batch / "slide.ome.tif"  # a slide without --grid
    out = batch.parent / "preds"
    assert _predict(tiny_checkpoint_path, str(batch), str(slide), "--out-dir", str(out)) == 2
    assert [p.name for p in out.iterdir()] == ["B.pred.h5ad"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "Traceback" not in "".join(err)
    assert err[0].startswith(f"hifusion predict: error: {batch / 'A.h5ad'}: cannot read")
    assert "is a slide without spots" in err[1]
    assert err[2] == f"hifusion predict: 2 of 3 inputs failed: {batch / 'A.h5ad'}, {slide}"


def test_existing_outputs_are_refused_before_any_work_unless_skipped(
    batch: Path, tiny_checkpoint_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = batch.parent / "preds"
    out.mkdir()
    (out / "A.pred.h5ad").write_text("an earlier prediction")
    assert _predict(tiny_checkpoint_path, str(batch), "--out-dir", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hifusion predict: error: {out / 'A.pred.h5ad'} already exists (1 of 2 "
                   "outputs); add --overwrite to replace them, --skip-existing to predict only "
                   "the others, or choose another --out-dir")
    assert [p.name for p in out.iterdir()] == ["A.pred.h5ad"]  # B was not started either
    assert _predict(tiny_checkpoint_path, str(batch), "--out-dir", str(out),
                    "--skip-existing") == 0
    assert (out / "A.pred.h5ad").read_text() == "an earlier prediction"
    assert (out / "B.pred.h5ad").is_file()
    assert "1 input(s) already predicted" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["{a}", "{b}", "--out", "{out}/x.h5ad"], "--out names one file, but"),
    (["{batch}", "--out", "{out}/x.h5ad"], "give --out-dir DIR"),
    (["{a}", "--out-dir", "{out}", "--spots", "{a}"], "--spots holds the spots of one slide"),
    (["{a}", "--out", "{out}/x.h5ad", "--skip-existing"], "--skip-existing goes with --out-dir"),
    (["{a}", "--out-dir", "{out}", "--skip-existing", "--overwrite"], "give one of the two"),
    (["{a}", "{batch}/nope.h5ad", "--out-dir", "{out}"], "nope.h5ad does not exist"),
])
def test_mixed_forms_are_one_line_errors(
    batch: Path, tiny_checkpoint_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
    message: str,
) -> None:
    names = {"a": batch / "A.h5ad", "b": batch / "B.h5ad", "batch": batch,
             "out": batch.parent / "preds"}
    assert _predict(tiny_checkpoint_path, *(a.format(**names) for a in argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not names["out"].exists()
