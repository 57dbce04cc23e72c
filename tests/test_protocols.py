"""HER2ST protocols, baselines, ``hifusion benchmark her2st`` and the accuracy benchmark script.

Plans are checked on a fake folder (file names only). Runs use the real sections C2, C3, C4,
cut to 30 evenly spread spots, and a tiny model (56 px spots, width 8) trained for one epoch:
they check the pipeline and the bookkeeping, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from hifusion_model.cli import main
from hifusion_model.data.sections import new_section
from hifusion_model.data.splits import validation_masks
from hifusion_model.engine.recipes import get_recipe
from hifusion_model.errors import ConfigError, SectionError
from hifusion_model.evaluation.baselines import (
    DEFAULT_ALPHAS,
    FEATURE_NAMES,
    fit_constant,
    fit_ridge,
    patch_features,
    ridge_path,
    section_features,
)
from hifusion_model.evaluation.protocol_runs import markdown_summary, run_cells, summarize
from hifusion_model.evaluation.protocols import (
    cut_spots,
    fit_network,
    gene_panel,
    import_sections,
    plan_protocol,
    predict_and_score,
    scan_her2st,
)
from hifusion_model.models.checkpoint import load_checkpoint
from hifusion_model.models.config import tiny_config
from hifusion_model.models.losses import hifusion_loss
from hifusion_model.models.registry import build_model
from hifusion_model.models.spot_only import SpotOnly, spot_only_config

N_SPOTS = 30
IMAGED = ("B4", "C2", "C3", "C4")


def fake_her2st(folder: Path, imaged: tuple[str, ...] = IMAGED) -> Path:
    """Empty files laid out like ../shared/data/her2st (34 sections, images for a few)."""
    sections = [f"{p}{i}" for p, n in zip("ABCDEFGH", (6, 6, 4, 6, 3, 3, 3, 3)) for i in
                range(1, n + 1)]
    for sub in ("counts", "spots", "images"):
        (folder / sub).mkdir(parents=True)
    for s in sections:
        (folder / "counts" / f"{s}.tsv.gz").touch()
        (folder / "spots" / f"{s}_selection.tsv").touch()
    for s in imaged:
        (folder / "images" / f"{s}.jpg").touch()
    return folder


def tiny_recipe(**overrides):
    return get_recipe("hifusion", **{"epochs": 1, "batch_size": 8, "refit": False, **overrides})


# -- plans ------------------------------------------------------------------------------------


def test_3d_plan_trains_on_the_first_imaged_section_and_says_what_it_skips(tmp_path):
    plan = plan_protocol("3d", scan_her2st(fake_her2st(tmp_path)))
    assert [(f.name, f.train, f.test) for f in plan.folds] == [
        ("patient C", ("C2",), ("C3", "C4"))
    ]
    text = plan.describe()
    assert "the paper trains on C1" in text
    assert "patient B: only B4 is usable" in text
    assert "patients A, D, E, F, G, H" in text


def test_2d_plan_keeps_the_folds_with_imaged_sections(tmp_path):
    plan = plan_protocol("2d", scan_her2st(fake_her2st(tmp_path)))
    assert [(f.name, f.train, f.test) for f in plan.folds] == [
        ("fold {B,F}", ("C2", "C3", "C4"), ("B4",)),
        ("fold {C,G}", ("B4",), ("C2", "C3", "C4")),
    ]
    assert [s.split(":")[0] for s in plan.skipped] == ["fold {A,E}", "fold {D,H}"]
    assert "trains on 3 of the 25 sections" in plan.notes[0]


def test_saving_keeps_the_cells_another_run_wrote_meanwhile(tmp_path):
    from hifusion_model.evaluation.protocol_runs import save_results

    path = tmp_path / "r.json"
    base = {"format": "hifusion-benchmark/2", "settings": {"k": 1}, "folds": [{"name": "B4"}],
            "fold_genes": {}}
    other = {**base, "runs": [_cell("ridge", "B4", 0, 0.2, 0.4)], "fold_genes": {"B4": ["G"]}}
    save_results(path, other)
    mine = {**base, "runs": [_cell("net", "B4", 0, 0.3, 0.3)], "fold_genes": {}}
    save_results(path, mine)
    saved = json.loads(path.read_text())
    assert [r["variant"] for r in saved["runs"]] == ["net", "ridge"]
    assert saved["fold_genes"] == {"B4": ["G"]} and set(saved["summary"]) == {"net", "ridge"}


def test_loso_plan_tests_every_imaged_section_once(tmp_path):
    plan = plan_protocol("loso", scan_her2st(fake_her2st(tmp_path)))
    assert [(f.name, f.train, f.test) for f in plan.folds] == [
        ("B4", ("C2", "C3", "C4"), ("B4",)),
        ("C2", ("B4", "C3", "C4"), ("C2",)),
        ("C3", ("B4", "C2", "C4"), ("C3",)),
        ("C4", ("B4", "C2", "C3"), ("C4",)),
    ]
    text = plan.describe()
    assert "fold B4: no other section of patient B trains" in text
    assert "fold C2" not in text.split("note")[1]  # patient C trains in C's folds
    assert "A1 (no image)" in text


def _cell(variant, fold, seed, gene_pcc, mse):
    metrics = {"gene_pcc": gene_pcc, "mse": mse, "skill": 1 - mse, "spot_pcc": 0.8,
               "genes": {"ERBB2": gene_pcc + 0.1}}
    return {"variant": variant, "fold": fold, "seed": seed, "description": variant,
            "metrics": metrics, "seconds": {"fit": 1.0, "predict": 0.5}}


def test_summary_gives_the_mean_and_the_spreads_over_folds_and_seeds():
    runs = [_cell("net", f, s, g, 0.3) for f, s, g in
            (("B4", 0, 0.1), ("B4", 1, 0.2), ("C2", 0, 0.3), ("C2", 1, 0.6), ("C3", 0, 0.5))]
    results = {"folds": [{"name": n} for n in ("B4", "C2", "C3")], "runs": runs}
    net = summarize(results)["net"]
    assert net["folds"]["B4"]["gene_pcc"] == pytest.approx(0.15)
    assert net["folds"]["C2"]["gene_pcc"] == pytest.approx(0.45)
    m = net["metrics"]["gene_pcc"]
    assert m["mean"] == pytest.approx((0.15 + 0.45 + 0.5) / 3)
    assert m["sd_folds"] == pytest.approx(np.std([0.15, 0.45, 0.5], ddof=1))
    # only seed 0 ran on every fold: no seed spread yet
    assert net["complete_seeds"] == [0] and m["sd_seeds"] is None
    runs.append(_cell("net", "C3", 1, 0.7, 0.3))
    m = summarize(results)["net"]["metrics"]["gene_pcc"]
    assert m["sd_seeds"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert summarize(results)["net"]["metrics"]["ERBB2"]["mean"] == pytest.approx(m["mean"] + 0.1)
    table = markdown_summary(results)
    assert "| net | 0,1 | 0.400 ± 0.229 [0.141] |" in table
    assert "| net | gene PCC | 0.150 | 0.450 | 0.600 |" in table


def test_plans_refuse_folders_they_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="3d protocol cannot run.*only B4 is usable"):
        plan_protocol("3d", scan_her2st(fake_her2st(tmp_path / "one", ("B4",))))
    with pytest.raises(ConfigError, match="unknown protocol"):
        plan_protocol("4d", scan_her2st(fake_her2st(tmp_path / "all")))
    with pytest.raises(SectionError, match="not a HER2ST folder"):
        scan_her2st(tmp_path)


def _toy_section(genes: list[str], counts: np.ndarray, name: str):
    n = len(counts)
    xy = np.stack([np.arange(n) * 10.0, np.zeros(n)], axis=1)
    return new_section(xy, slide="/nonexistent.tif", mpp=1.0, spot_diameter_um=100,
                       name=name, source="test", counts=counts, genes=genes)


def test_gene_panel_keeps_genes_every_test_section_measures():
    train = _toy_section(["A", "B", "C"], np.array([[90, 5, 1], [90, 5, 2]]), "train")
    test = _toy_section(["B", "C"], np.array([[1, 1]]), "test")
    assert gene_panel([train], [test], 2) == ["B", "C"]  # A is top but unmeasured in test


def test_cut_spots_spreads_over_the_section():
    section = _toy_section(["A"], np.ones((100, 1)), "s")
    cut = cut_spots(section, 5)
    assert list(cut.obs_names) == [section.obs_names[i] for i in (0, 25, 50, 74, 99)]
    assert cut_spots(section, 500) is section


# -- baselines, no data ----------------------------------------------------------------------


def test_ridge_path_solves_the_normal_equations():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6], rng.normal(size=(40, 3))
    for fit in ridge_path(X, Y, (0.1, 10.0)):
        Xs = (X - X.mean(0)) / X.std(0)
        expected = np.linalg.solve(Xs.T @ Xs + fit.alpha * np.eye(6), Xs.T @ (Y - Y.mean(0)))
        np.testing.assert_allclose(fit.coef, expected, atol=1e-10)
        np.testing.assert_allclose(fit.predict(X).mean(0), Y.mean(0), atol=1e-10)


def test_patch_features_are_named_finite_and_read_texture():
    rng = np.random.default_rng(0)
    flat = np.full((56, 56, 3), 0.8)
    noisy = np.clip(flat + rng.normal(0, 0.2, flat.shape), 0, 1)
    f_flat, f_noisy = patch_features(flat, flat), patch_features(noisy, flat)
    assert f_flat.shape == (len(FEATURE_NAMES),) and np.isfinite(f_noisy).all()
    sobel = FEATURE_NAMES.index("sobel_mean")
    assert f_flat[sobel] < 1e-12 and f_noisy[sobel] > 0.05
    as_uint8 = np.round(noisy * 255).astype(np.uint8)
    np.testing.assert_allclose(
        patch_features(as_uint8, flat), patch_features(as_uint8 / 255, flat)
    )


def test_spot_only_model_is_built_from_its_config_and_its_loss_is_the_mse():
    config = spot_only_config(tiny_config(5))
    model = build_model(config)  # the engine's factory builds what the config names
    assert isinstance(model, SpotOnly)
    spot = torch.rand(3, 3, 56, 56)
    out = model.eval()(spot, spot)
    assert out.prediction.shape == (3, 5) and out.attention.shape == (3, 0, 1, 0)
    target = torch.randn(3, 5)
    terms = hifusion_loss(out, target, config)
    assert terms.total.item() == pytest.approx(torch.mean((out.prediction - target) ** 2).item())
    with pytest.raises(ConfigError, match="levels must be"):
        config.replace(levels=(1, 2))


# -- real data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(her2st_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with B4, C2, C3, C4 imported (the CLI tests reuse these imports)."""
    folder = tmp_path_factory.mktemp("benchmark")
    import_sections(scan_her2st(her2st_dir), IMAGED, folder)
    return folder


@pytest.fixture(scope="module")
def sections(her2st_dir: Path, work: Path) -> dict:
    return import_sections(scan_her2st(her2st_dir), ("C2", "C3", "C4"), work, max_spots=N_SPOTS)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tiny_config(1).to_dict()
    del d["genes"]
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.slow
def test_3d_protocol_runs_end_to_end(her2st_dir: Path, sections: dict, tmp_path: Path):
    plan = plan_protocol("3d", scan_her2st(her2st_dir))
    recipe = tiny_recipe()
    result = run_cells(plan, sections, tmp_path, variants=["hifusion"], seeds=[0],
                       recipe=recipe, model_config=tiny_config(1), device="cpu", workers=0)
    (cell,) = result["runs"]
    assert cell["train"] == ["C2"] and len(result["fold_genes"]["patient C"]) == 250
    per_section = cell["metrics"]["per_section"]
    assert set(per_section) == {"C3", "C4"}
    for m in per_section.values():
        assert m["n_spots"] == N_SPOTS
        assert all(np.isfinite(m[k]) for k in ("mse", "mae", "spot_pcc", "gene_pcc"))
        assert set(m["genes"]) == {"ERBB2", "KRT19", "CD74"}
        assert m["baseline"]["gene_pcc"] == 0.0
    # the baselines' validation blocks are the very spots the engine held out
    card = load_checkpoint(cell["info"]["checkpoint"]).card
    held = validation_masks([sections["C2"]], recipe)[0]
    assert card["sections"][0]["n_val"] == held.sum() > 0


def test_constant_baseline_scores_zero_gene_pcc(sections: dict):
    train, test = [sections["C2"]], {n: sections[n] for n in ("C3", "C4")}
    genes = gene_panel(train, list(test.values()))
    constant = fit_constant(train, genes, recipe=tiny_recipe())
    metrics = predict_and_score(constant, test)
    assert metrics["gene_pcc"] == 0.0
    assert all(v == 0.0 for m in metrics["per_section"].values() for v in m["genes"].values())
    assert metrics["mse"] == pytest.approx(metrics["baseline"]["mse"])
    assert constant.info["n_train"] == N_SPOTS - validation_masks(train, tiny_recipe())[0].sum()


@pytest.mark.slow
def test_ridge_baseline_is_deterministic_and_finite(sections: dict):
    config = tiny_config(1)
    first, again = (section_features(sections["C3"], config) for _ in range(2))
    assert first.shape == (N_SPOTS, len(FEATURE_NAMES))
    np.testing.assert_array_equal(first, again)
    train, test = [sections["C2"]], {"C3": sections["C3"]}
    genes = gene_panel(train, list(test.values()), 50)
    ridge = fit_ridge(train, genes, config.replace(genes=genes), recipe=tiny_recipe())
    assert ridge.info["alpha"] in DEFAULT_ALPHAS
    metrics = predict_and_score(ridge, test)
    assert all(np.isfinite(metrics[k]) for k in ("mse", "mae", "spot_pcc", "gene_pcc"))


@pytest.mark.slow
def test_spot_only_cnn_trains_with_the_engine(sections: dict, tmp_path: Path):
    train, test = [sections["C2"]], {"C3": sections["C3"]}
    genes = gene_panel(train, list(test.values()), 20)
    net = fit_network(train, genes, tmp_path / "spot.pt", recipe=tiny_recipe(),
                      model_config=spot_only_config(tiny_config(1)), device="cpu", workers=0)
    assert isinstance(net.model, SpotOnly) and net.info["arch"] == "spot_resnet18"
    assert predict_and_score(net, test)["per_section"]["C3"]["n_spots"] == N_SPOTS


@pytest.mark.slow
def test_cli_benchmark_her2st_quick_run(her2st_dir, work, tiny_json, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["benchmark", "her2st", str(her2st_dir), "--protocol", "3d", "--epochs", "1",
            "--batch-size", "8", "--model-config", str(tiny_json), "--work", str(work),
            "--max-spots", str(N_SPOTS), "--workers", "0", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "run   patient C: train C2 -> test C3, C4" in printed
    assert "skip  patient B" in printed and "| HiFusion, our recipe | 0 |" in printed
    result = json.loads(out.read_text())
    (cell,) = result["runs"]
    assert set(cell["metrics"]["per_section"]) == {"C3", "C4"} and cell["seed"] == 0
    assert result["settings"]["max_spots"] == N_SPOTS and result["skipped"]
    assert result["summary"]["hifusion"]["metrics"]["gene_pcc"]["n_folds"] == 1


@pytest.mark.slow
def test_cli_loso_runs_in_pieces_and_keeps_the_cells_it_has(
    her2st_dir, work, tiny_json, tmp_path, capsys
):
    out = tmp_path / "loso.json"
    argv = ["benchmark", "her2st", str(her2st_dir), "--epochs", "1", "--batch-size", "8",
            "--model-config", str(tiny_json), "--work", str(work), "--max-spots",
            "12", "--workers", "0", "--device", "cpu", "--json", str(out)]
    assert main([*argv, "--variants", "constant", "--seeds", "0,1"]) == 0
    first = json.loads(out.read_text())
    assert [(r["fold"], r["seed"]) for r in first["runs"]] == [
        (f, s) for f in IMAGED for s in (0, 1)]
    assert main([*argv, "--variants", "constant,ridge", "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "run   B4: train C2, C3, C4 -> test B4" in printed
    result = json.loads(out.read_text())
    assert result["runs"][:8] == first["runs"]  # kept, not run again
    assert [r["variant"] for r in result["runs"][8:]] == ["ridge"] * 4
    summary = result["summary"]
    assert summary["constant"]["metrics"]["gene_pcc"] == {
        "mean": 0.0, "sd_folds": 0.0, "sd_seeds": 0.0, "n_folds": 4}
    assert summary["ridge"]["metrics"]["mse"]["n_folds"] == 4
    # every cell says how well the uncertainty ranked its errors, per fold in the summary
    scores = result["runs"][0]["uncertainty"]["per_section"]["B4"]
    assert set(scores) == {"per_gene", "per_spot", "pooled"}
    assert all(-1 <= v <= 1 for v in scores.values())
    assert set(summary["ridge"]["uncertainty"]) == set(IMAGED)
    assert "| ridge on colour/texture features | Spearman per spot |" in printed
    again = result
    # other settings are refused, not mixed in
    assert main([*argv, "--variants", "constant", "--set", "lr=0.1"]) == 2
    assert "holds runs with another settings" in capsys.readouterr().err
    assert json.loads(out.read_text())["runs"] == again["runs"]
    # a piece of the protocol: one fold
    assert main([*argv, "--variants", "constant", "--seeds", "2", "--folds", "C3"]) == 0
    added = json.loads(out.read_text())["runs"][len(again["runs"]):]
    assert [(r["variant"], r["fold"], r["seed"]) for r in added] == [("constant", "C3", 2)]
    assert main([*argv, "--variants", "constant", "--folds", "Z9"]) == 2
    assert "no fold Z9 in the loso plan; its folds are B4, C2, C3, C4" in capsys.readouterr().err


def test_cli_benchmark_help_says_what_runs(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "her2st", "--help"])
    text = capsys.readouterr().out
    assert "train C2 -> test C3, C4" in text and "{D,H}" in text and "--max-spots" in text


@pytest.mark.slow
def test_accuracy_script_runs_in_pieces_and_merges(her2st_dir, work, tiny_json, tmp_path, capsys):
    script, out = load_benchmark("accuracy_her2st"), tmp_path / "acc.json"
    common = ["--experiments", "3d-C", "--her2st", str(her2st_dir), "--work", str(work),
              "--model-config", str(tiny_json), "--max-spots", str(N_SPOTS), "--out", str(out),
              "--n-genes", "30", "--device", "cpu", "--workers", "0"]
    assert script.main(["--variants", "e", *common]) == 0
    assert script.main(["--variants", "d", *common]) == 0
    result = json.loads(out.read_text())
    variants = result["experiments"]["3d-C"]["variants"]
    assert set(variants) == {"d", "e"}
    assert variants["d"]["metrics"]["gene_pcc"] != 0 == variants["e"]["metrics"]["gene_pcc"]
    table = capsys.readouterr().out
    assert "| 3d-C | C3 | d: ridge" in table and "| 3d-C | all | e: constant" in table
    # another data cut would make the merged table compare unlike things: refused
    common[common.index("--max-spots") + 1] = str(N_SPOTS - 1)
    assert script.main(["--variants", "e", *common]) == 2


@pytest.mark.slow
def test_accuracy_script_self_trains_a_student(her2st_dir, work, tiny_json, tmp_path):
    script, out = load_benchmark("accuracy_her2st"), tmp_path / "acc.json"
    argv = ["--experiments", "3d-C", "--her2st", str(her2st_dir), "--work", str(tmp_path / "w"),
            "--model-config", str(tiny_json), "--max-spots", str(N_SPOTS), "--out", str(out),
            "--n-genes", "8", "--device", "cpu", "--workers", "0", "--epochs", "1",
            "--batch-size", "8", "--variants", "c", "--teachers", "2", "--set", "refit=false"]
    assert script.main(argv) == 0
    record = json.loads(out.read_text())["experiments"]["3d-C"]["variants"]["c"]
    assert record["selection"].startswith("none: a student of 2 teachers")
    info = record["info"]
    assert [t["best_epoch"] for t in info["teachers"]] == [1, 1] and info["pseudo_spots"][0] > 0
    card = load_checkpoint(info["checkpoint"]).card
    measured, gaps = card["sections"]
    assert measured["n_val"] == 0 and gaps["n_train"] == info["pseudo_spots"][0]
    assert gaps["pseudo_labels_from"] == [t["checkpoint"] for t in info["teachers"]]


@pytest.fixture(scope="module")
def pretrained_runs(her2st_dir, work, tiny_json, tmp_path_factory) -> dict:
    """The accuracy script run for c, then for a, both pretraining their encoders first."""
    script, out = load_benchmark("accuracy_her2st"), tmp_path_factory.mktemp("acc") / "acc.json"
    argv = ["--experiments", "3d-C", "--her2st", str(her2st_dir), "--work", str(work),
            "--model-config", str(tiny_json), "--max-spots", str(N_SPOTS), "--out", str(out),
            "--n-genes", "8", "--device", "cpu", "--workers", "0", "--epochs", "1",
            "--pretrain-spot", "2", "--pretrain-region", "1", "--pretrain-batch-size", "8"]
    trunks = work / "3d-C" / "pretrain"
    assert script.main(["--variants", "c", *argv]) == 0
    after_c = sorted(p.name for p in trunks.glob("*.pt"))
    spot_written = (trunks / "spot_2.pt").stat().st_mtime_ns
    assert script.main(["--variants", "a", *argv]) == 0
    return {"script": script, "argv": argv, "trunks": trunks, "after_c": after_c,
            "spot_rewritten": (trunks / "spot_2.pt").stat().st_mtime_ns != spot_written,
            "variants": json.loads(out.read_text())["experiments"]["3d-C"]["variants"],
            "models": [work / "3d-C" / v / "model.pt" for v in ("a", "c")]}


@pytest.mark.slow
def test_accuracy_script_pretrains_the_encoders_a_variant_has_once(pretrained_runs):
    runs, trunks = pretrained_runs, pretrained_runs["trunks"]
    assert runs["after_c"] == ["spot_2.pt"]  # c has no region encoder
    assert not runs["spot_rewritten"]  # a reused the spot encoder c had pretrained
    assert set(runs["variants"]["c"]["pretraining"]) == {"spot"}
    record = runs["variants"]["a"]["pretraining"]
    assert (record["spot"]["steps"], record["region"]["steps"]) == (2, 1)
    assert record["region"]["sections"] == ["C2"] and record["region"]["encoder"] == "region"
    card = load_checkpoint(runs["models"][0]).card
    assert card["region_encoder_init"] == str(trunks / "region_1.pt")
    # other pretraining settings: pretrained again, not reused
    before = (trunks / "spot_2.pt").stat().st_mtime_ns
    again = ["--variants", "c", *runs["argv"], "--pretrain-batch-size", "4"]
    assert runs["script"].main(again) == 0
    assert (trunks / "spot_2.pt").stat().st_mtime_ns != before
    assert json.loads((trunks / "spot_2.json").read_text())["settings"]["batch_size"] == 4
    # weights given and weights to pretrain for the same encoder: refused
    with pytest.raises(SystemExit):
        runs["script"].main(["--variants", "a", *runs["argv"],
                             "--spot-encoder-init", str(trunks / "spot_2.pt")])


@pytest.mark.slow
def test_ensemble_script_scores_the_mean_of_models_trained_on_the_same_genes(
        pretrained_runs, work, tmp_path):
    # a and c of 3d-C: same genes and training mean
    script, out = load_benchmark("ensemble_her2st"), tmp_path / "ens.json"
    models = [str(m) for m in pretrained_runs["models"]]
    common = ["--sections", str(work / "sections"), "--json", str(out)]
    assert script.main([*models, *common]) == 0
    scores = json.loads(out.read_text())["scores"]
    for s in ("C3", "C4"):  # the MSE of a mean is at most the mean of the MSEs (convexity)
        singles = [scores[m]["per_section"][s]["mse"] for m in models]
        assert scores["ensemble"]["per_section"][s]["mse"] <= np.mean(singles) + 1e-9
        assert scores["ensemble"]["per_section"][s]["mse"] != singles[0]
    assert script.main([*models, *common, "--test", "C9"]) == 2
    assert script.main([*models, *common, "--tta", "2"]) == 0
    two_views = json.loads(out.read_text())
    assert two_views["tta"] == 2 and two_views["scores"][models[0]] != scores[models[0]]
    assert script.main([*models, *common, "--tta", "9"]) == 2
