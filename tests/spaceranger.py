"""A tiny, real-shaped 10x Visium Space Ranger output, made by the tests.

Geometry from the 10x spec: a 6.5 mm capture area of 78 rows × 128 columns, 4992 spots of 55 µm
on a hex array of 100 µm pitch; ``array_col`` counts half pitches along a row and ``array_row``
rows √3/2 pitch apart, so ``array_row + array_col`` is even. The image is slightly rotated
against the array and Space Ranger's pixel coordinates are whole numbers. The scale factors
follow Space Ranger: ``spot_diameter_fullres`` spans a theoretical 65 µm spot.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import tifffile
from PIL import Image

ROWS, COLS = 78, 128
PITCH_UM = 100.0
MARGIN_UM = 750.0  # the fiducial frame around the capture area
GENES = ["ERBB2", "GATA3", "KRT19", "ACTB", "MALAT1", "ACTB"]  # a duplicated name, as 10x has
HIRES_SCALEF, LOWRES_SCALEF = 0.5, 0.2


def array_um(rotation_deg: float = 1.2) -> tuple[pd.DataFrame, np.ndarray]:
    """Every spot's array coordinates and its centre (x, y) in µm on the slide."""
    rows, cols = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    keep = (rows + cols) % 2 == 0
    grid = pd.DataFrame({"array_row": rows[keep], "array_col": cols[keep]})
    xy = np.column_stack([grid.array_col * PITCH_UM / 2, grid.array_row * PITCH_UM * np.sqrt(3) / 2])
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return grid, xy @ rot.T + MARGIN_UM


def barcodes(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    codes: set[str] = set()
    while len(codes) < n:
        codes.add("".join(rng.choice(list("ACGT"), 16)) + "-1")
    return sorted(codes)


def write_spaceranger(
    root: Path,
    *,
    mpp: float = 4.0,
    positions: str = "csv",
    matrix: str = "h5",
    fullres: bool = True,
    spot_diameter_um: float = 65.0,
    rotation_deg: float = 1.2,
) -> Path:
    """Write ``root/run/outs`` (and ``root/run/image.tif`` with ``fullres``); return ``outs``.

    ``positions``: ``csv`` (Space Ranger ≥ 2, header), ``list`` (``tissue_positions_list.csv``,
    no header) or ``parquet``; ``matrix``: ``h5`` or ``mtx`` (``filtered_feature_bc_matrix/``).
    ``spot_diameter_um`` is what ``spot_diameter_fullres`` spans (65 µm in Space Ranger).
    """
    outs = root / "run" / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True)
    grid, xy_um = array_um(rotation_deg)
    extent_um = xy_um.max(axis=0) + MARGIN_UM
    shape = (int(np.ceil(extent_um[1] / mpp)), int(np.ceil(extent_um[0] / mpp)))
    xy_px = np.round(xy_um / mpp).astype(np.int64)
    centre = xy_um.mean(axis=0)
    in_tissue = (((xy_um - centre) / [2200.0, 1600.0]) ** 2).sum(axis=1) < 1
    table = pd.DataFrame({
        "barcode": barcodes(len(grid)),
        "in_tissue": in_tissue.astype(int),
        "array_row": grid.array_row,
        "array_col": grid.array_col,
        "pxl_row_in_fullres": xy_px[:, 1],
        "pxl_col_in_fullres": xy_px[:, 0],
    })
    if positions == "csv":
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    elif positions == "list":
        table.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    elif positions == "parquet":
        table.to_parquet(spatial / "tissue_positions.parquet", index=False)
    else:
        raise ValueError(positions)
    (spatial / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": spot_diameter_um / mpp,
        "tissue_hires_scalef": HIRES_SCALEF,
        "fiducial_diameter_fullres": 1.615 * spot_diameter_um / mpp,
        "tissue_lowres_scalef": LOWRES_SCALEF,
    }))

    image = np.full((*shape, 3), 240, np.uint8)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    blob = (((xx * mpp - centre[0]) / 2300) ** 2 + ((yy * mpp - centre[1]) / 1700) ** 2) < 1
    image[blob] = (200, 110, 170)
    if fullres:
        tifffile.imwrite(root / "run" / "image.tif", image, photometric="rgb", compression="zlib")
    for name, f in (("tissue_hires_image.png", HIRES_SCALEF), ("tissue_lowres_image.png", LOWRES_SCALEF)):
        small = Image.fromarray(image).resize((round(shape[1] * f), round(shape[0] * f)))
        small.save(spatial / name)

    tissue = table[table.in_tissue == 1]
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, (len(tissue), len(GENES) + 1))  # + one antibody feature
    ids = [f"ENSG{i:011d}" for i in range(len(GENES))] + ["CD3"]
    names = [*GENES, "CD3"]
    kinds = ["Gene Expression"] * len(GENES) + ["Antibody Capture"]
    csc = sp.csc_matrix(counts.T)  # features × barcodes, as 10x stores it
    if matrix == "h5":
        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
            m = f.create_group("matrix")
            m["data"], m["indices"], m["indptr"], m["shape"] = csc.data, csc.indices, csc.indptr, csc.shape
            m["barcodes"] = np.array(tissue.barcode, dtype="S")
            features = m.create_group("features")
            features["name"] = np.array(names, dtype="S")
            features["id"] = np.array(ids, dtype="S")
            features["feature_type"] = np.array(kinds, dtype="S")
            features["genome"] = np.array(["GRCh38"] * len(names), dtype="S")
            f.attrs.update({"library_ids": np.array(["run"], dtype="S"), "filetype": "matrix",
                            "chemistry_description": "Spatial 3' v1", "version": 2,
                            "software_version": "spaceranger-2.0.0"})
    elif matrix == "mtx":
        folder = outs / "filtered_feature_bc_matrix"
        folder.mkdir()
        with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
            scipy.io.mmwrite(f, sp.coo_matrix(csc), field="integer")
        with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
            f.write("\n".join(tissue.barcode) + "\n")
        with gzip.open(folder / "features.tsv.gz", "wt") as f:
            f.write("".join(f"{i}\t{n}\t{k}\n" for i, n, k in zip(ids, names, kinds, strict=True)))
    else:
        raise ValueError(matrix)
    return outs
