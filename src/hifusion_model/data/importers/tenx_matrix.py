"""10x feature-barcode matrices (Cell/Space Ranger): the HDF5 file and the MTX folder."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...errors import SectionError
from ._common import check_counts


def _feature_matrix(X: sp.spmatrix, barcodes, names, ids, kind, path: Path) -> ad.AnnData:
    """Cells × genes AnnData from 10x features (antibody and CRISPR features dropped)."""
    names, ids = np.asarray(names, dtype=str), np.asarray(ids, dtype=str)
    if kind is not None:  # only genes are predicted
        genes = np.asarray(kind, dtype=str) == "Gene Expression"
        X, names, ids = X[:, genes], names[genes], ids[genes]
    var = pd.DataFrame({"gene_ids": ids}, index=ad.utils.make_index_unique(pd.Index(names)))
    adata = ad.AnnData(
        X=sp.csr_matrix(X, dtype=np.float32),
        obs=pd.DataFrame(index=pd.Index(np.asarray(barcodes, dtype=str), dtype=object)),
        var=var,
    )
    check_counts(adata.X.data, path)
    return adata


def read_10x_h5(path: Path) -> ad.AnnData:
    """Read a Cell/Space Ranger ≥ 3 feature-barcode matrix (HDF5, CSC genes × barcodes)."""
    if not path.is_file():
        raise SectionError(
            f"{path}: count matrix not found; "
            "Space Ranger writes filtered_feature_bc_matrix.h5 in outs/"
        )
    try:
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            shape = tuple(int(s) for s in m["shape"][:])
            X = sp.csc_matrix(
                (m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape
            ).T.tocsr()
            barcodes = m["barcodes"][:].astype(str)
            features = m["features"]
            names = features["name"][:].astype(str)
            ids = features["id"][:].astype(str)
            kind = features["feature_type"][:].astype(str) if "feature_type" in features else None
    except (OSError, KeyError, ValueError) as e:
        raise SectionError(
            f"{path}: not a readable 10x feature-barcode matrix ({type(e).__name__}: {e}); "
            "pass Space Ranger's filtered_feature_bc_matrix.h5"
        ) from e
    return _feature_matrix(X, barcodes, names, ids, kind, path)


def _mtx_file(folder: Path, *names: str) -> Path:
    for name in names:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    raise SectionError(
        f"{folder}: no {' or '.join(names)}(.gz); a 10x matrix folder holds barcodes.tsv.gz, "
        "features.tsv.gz and matrix.mtx.gz"
    )


def read_10x_mtx(folder: Path) -> ad.AnnData:
    """Read a 10x matrix folder (``matrix.mtx``, ``barcodes.tsv``, ``features.tsv`` or the older
    ``genes.tsv``, each optionally gzipped), as ``scanpy.read_10x_mtx`` does."""
    import gzip

    import scipy.io

    matrix_path = _mtx_file(folder, "matrix.mtx")
    barcodes_path = _mtx_file(folder, "barcodes.tsv")
    features_path = _mtx_file(folder, "features.tsv", "genes.tsv")
    try:
        opener = gzip.open if matrix_path.suffix == ".gz" else open
        with opener(matrix_path, "rb") as f:
            X = sp.csr_matrix(scipy.io.mmread(f)).T.tocsr()  # genes × barcodes on disk
        barcodes = pd.read_csv(barcodes_path, sep="\t", header=None, dtype=str)[0]
        features = pd.read_csv(features_path, sep="\t", header=None, dtype=str)
    except (ValueError, OSError, EOFError, IndexError) as e:
        raise SectionError(
            f"{folder}: not a readable 10x matrix folder ({type(e).__name__}: {e}); pass "
            "Space Ranger's filtered_feature_bc_matrix/"
        ) from e
    if X.shape != (len(barcodes), len(features)):
        raise SectionError(
            f"{matrix_path}: the matrix is {X.shape[1]} features × {X.shape[0]} barcodes, but "
            f"the folder lists {len(features)} features and {len(barcodes)} barcodes; "
            "the files belong to different runs"
        )
    names = features[1] if features.shape[1] > 1 else features[0]
    kind = features[2] if features.shape[1] > 2 else None
    return _feature_matrix(X, barcodes, names, features[0], kind, matrix_path)
