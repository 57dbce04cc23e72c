"""Build the sample section shipped in the package: HER2ST C4, cropped to its spots.

C4 is the section the bundled model never sees in training (patient C's other sections and B4
are its training data), so the demo shows a prediction, not a memory. The slide is cropped to
the spotted area plus a margin that covers the model's region patches, and stored as a tiled
JPEG OME-TIFF pyramid at its true µm/px (from the ST array geometry); spot centres are shifted
by the crop offset, counts are kept raw.

    python scripts/make_sample_data.py ../shared/data/her2st
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from hifusion_model import samples
from hifusion_model.data.importers import import_her2st
from hifusion_model.data.sections import new_section, write_section
from hifusion_model.data.convert import convert_to_ome_tiff
from hifusion_model.data.slide import Slide

SECTION = "C4"
MARGIN_UM = 300.0  # > half the bundled model's 308 µm region patch


def crop_box(xy: np.ndarray, margin_px: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around all spot centres, clipped to the image."""
    x0, y0 = np.floor(xy.min(axis=0) - margin_px).astype(int)
    x1, y1 = np.ceil(xy.max(axis=0) + margin_px).astype(int)
    return max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("her2st", type=Path, help="folder with counts/, spots/, images/")
    parser.add_argument("--out", type=Path, default=Path(samples.__file__).parent)
    args = parser.parse_args()

    d = args.her2st
    section = import_her2st(
        d / "images" / f"{SECTION}.jpg",
        d / "counts" / f"{SECTION}.tsv.gz",
        d / "spots" / f"{SECTION}_selection.tsv",
    )
    meta = section.uns["hifusion"]
    mpp = meta["mpp"]
    xy = np.asarray(section.obsm["spatial"], dtype=float)
    with Slide.open(meta["slide_abs"], mpp=mpp) as slide:
        x0, y0, x1, y1 = crop_box(xy, MARGIN_UM / mpp, slide.shape)
        crop = np.asarray(slide.levels[0][y0:y1, x0:x1, :3])

    slide_name = f"her2st_{SECTION}.ome.tif"
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "crop.tif"
        tifffile.imwrite(flat, crop, photometric="rgb")
        convert_to_ome_tiff(flat, args.out / slide_name, mpp=mpp)

    sample = new_section(
        xy - [x0, y0],
        slide=args.out / slide_name,
        mpp=mpp,
        spot_diameter_um=meta["spot_diameter_um"],
        name=f"HER2ST {SECTION}",
        source=f"her2st {SECTION} (Andersson et al. 2021), cropped at x={x0}, y={y0}",
        obs_names=list(section.obs_names),
        counts=section.X,
        genes=list(section.var_names),
        array_row=section.obs["array_row"].to_numpy(),
        array_col=section.obs["array_col"].to_numpy(),
        extra={"mpp_source": meta["mpp_source"], "crop_offset_px": [int(x0), int(y0)]},
    )
    out = write_section(sample, args.out / f"her2st_{SECTION}.h5ad")
    print(f"wrote {out} ({sample.n_obs} spots, {sample.n_vars} genes) and {slide_name} "
          f"({crop.shape[1]}×{crop.shape[0]} px at {mpp:.4f} µm/px)")


if __name__ == "__main__":
    main()
