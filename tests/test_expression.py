from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hifusion_model.data.expression import (
    counts_matrix,
    normalize_counts,
    section_targets,
    select_top_genes,
)
from hifusion_model.data.sections import new_section
from hifusion_model.errors import ConfigError, SectionError


def _section(genes, counts, name="s"):
    counts = np.asarray(counts, dtype=float)
    return new_section(
        np.zeros((len(counts), 2)),
        slide="slide.tif",
        mpp=1.0,
        spot_diameter_um=55,
        name=name,
        source="test",
        counts=counts,
        genes=genes,
    )


def test_log_relative_by_hand():
    out = normalize_counts(np.array([[1, 0, 3], [0, 0, 0]]), "log_relative")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.log([2 / 7, 1 / 7, 4 / 7]), rtol=1e-6)
    np.testing.assert_allclose(out[1], np.log([1 / 3] * 3), rtol=1e-6)


def test_log1p_cp10k_by_hand_and_empty_spot():
    out = normalize_counts(np.array([[1, 0, 3], [0, 0, 0]]), "log1p_cp10k")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.log1p([2500, 0, 7500]), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)


@pytest.mark.parametrize("bad", [[[1, -1]], [[1, np.nan]], [[np.inf, 1]]])
def test_normalize_rejects_bad_counts(bad):
    with pytest.raises(SectionError, match="raw counts"):
        normalize_counts(np.array(bad, dtype=float))


def test_normalize_rejects_unknown_method():
    with pytest.raises(ConfigError, match="log_relative"):
        normalize_counts(np.ones((2, 2)), "zscore")


def test_select_top_genes_uses_common_genes_by_total():
    a = _section(["A", "B", "C", "ONLY_A"], [[5, 1, 0, 100], [5, 1, 2, 100]], "a")
    b = _section(["C", "B", "A"], [[9, 0, 0], [0, 3, 1]], "b")
    # totals over both: A = 10 + 1 = 11, B = 2 + 3 = 5, C = 2 + 9 = 11; ONLY_A is not in b
    assert select_top_genes([a, b], n=3) == ["A", "C", "B"]  # A/C tie broken by name
    assert select_top_genes([a, b], n=1) == ["A"]
    with pytest.raises(SectionError, match="only 3 genes"):
        select_top_genes([a, b], n=4)


def test_select_top_genes_rejects_sections_without_counts():
    bare = new_section(
        np.zeros((2, 2)), slide="s.tif", mpp=1, spot_diameter_um=55, name="bare", source="grid"
    )
    with pytest.raises(SectionError, match="'bare' has no counts"):
        select_top_genes([bare])


def test_counts_matrix_orders_genes_and_densifies():
    s = _section(["A", "B", "C"], [[1, 2, 3], [4, 5, 6]])
    assert sp.issparse(s.X)
    m = counts_matrix(s, ["C", "A"])
    assert m.dtype == np.float64
    np.testing.assert_array_equal(m, [[3, 1], [6, 4]])


def test_counts_matrix_names_missing_genes():
    s = _section(["A", "B"], [[1, 2]], name="sec1")
    with pytest.raises(SectionError, match=r"'sec1' lacks 2 of the 3 genes \(e.g. ERBB2, KRT19\)"):
        counts_matrix(s, ["ERBB2", "A", "KRT19"])


def test_section_targets_normalise_the_genes_asked_for_in_their_order():
    s = _section(["A", "B", "C"], [[1, 0, 3], [0, 0, 0]])
    np.testing.assert_allclose(section_targets(s, ["C", "A"]), np.log([[4 / 6, 2 / 6], [0.5, 0.5]]),
                               rtol=1e-6)
    np.testing.assert_allclose(section_targets(s, ["A"], "log1p_cp10k"), [[np.log1p(1e4)], [0]])
    with pytest.raises(SectionError, match="lacks 1 of the 2 genes"):
        section_targets(s, ["A", "ERBB2"])


@pytest.mark.her2st
@pytest.mark.slow
def test_her2st_top_genes_hold_erbb2(her2st_dir):
    from hifusion_model.data.importers import import_her2st

    sections = [
        import_her2st(
            her2st_dir / "images" / f"{s}.jpg",
            her2st_dir / "counts" / f"{s}.tsv.gz",
            her2st_dir / "spots" / f"{s}_selection.tsv",
        )
        for s in ("B4", "C2")
    ]
    genes = select_top_genes(sections, n=250)
    assert len(genes) == 250
    assert genes.index("ERBB2") < 10  # HER2-positive tumours: ERBB2 is the 3rd most expressed
    assert {"KRT19", "CD74"} <= set(genes)
    y = section_targets(sections[0], genes)
    assert y.shape == (283, 250) and np.isfinite(y).all()
    np.testing.assert_allclose(np.exp(y.astype(np.float64)).sum(axis=1), 1, rtol=1e-4)


