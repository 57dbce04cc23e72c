"""Small synthetic slides, sections and models for the tests (seconds, no real data).

The slide is white glass with one elliptic, textured pink "tissue" blob, written as a tiled
pyramidal OME-TIFF with its µm/px; the section puts a spot grid on it with Poisson counts
whose rates follow position, so every gene has a visible pattern.

``spot_array_section`` stands in for the engine tests' real HER2ST crop: 40 neighbouring spots of
a jittered square ST array (200 µm pitch, 100 µm spots, HER2ST's 0.6875 µm/px), the image cut
to them with a margin, and counts for more genes than the tests select.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MPP = 2.0  # µm/px: a 1024 px slide is ~2 mm, a 100 µm spot is 50 px
SHAPE = (768, 1024)


def synthetic_slide(path: str | Path, shape: tuple[int, int] = SHAPE, mpp: float = MPP,
                    levels: int = 3, seed: int = 0) -> Path:
    """Write a pyramidal, tiled RGB OME-TIFF with ``PhysicalSizeX = mpp``."""
    import tifffile

    path = Path(path)
    image = tissue_image(shape, seed)
    with tifffile.TiffWriter(path, ome=True) as tif:
        options = dict(photometric="rgb", tile=(256, 256), compression="zlib")
        tif.write(image, subifds=levels - 1, metadata={
            "axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}, **options)
        for level in range(1, levels):
            step = 2**level
            tif.write(image[::step, ::step], subfiletype=1, **options)
    return path


def tissue_image(shape: tuple[int, int], seed: int = 0, radius: float = 0.38) -> np.ndarray:
    """White background with a textured pink-purple ellipse: what a tissue mask can find.

    ``radius``: the ellipse's semi-axes as fractions of the height and width."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (radius * h)) ** 2 + ((xx - w / 2) / (radius * w)) ** 2 < 1
    image = np.full((h, w, 3), 245, np.uint8)
    texture = rng.integers(-25, 25, size=(h, w, 1))
    gradient = (xx / w * 60)[..., None]
    tissue = np.clip(np.array([200, 110, 170]) + texture - gradient, 0, 255).astype(np.uint8)
    image[inside] = tissue[inside]
    return image


def synthetic_section(folder: str | Path, n_genes: int = 12, pitch_um: float = 100.0,
                      spot_um: float = 55.0, seed: int = 0) -> Path:
    """Write ``slide.ome.tif`` and ``section.h5ad`` (spots on the tissue, with counts); return the .h5ad."""
    from hifusion_model.data.grids import spot_grid, tissue_mask_from_image
    from hifusion_model.data.sections import new_section, write_section

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slide = synthetic_slide(folder / "slide.ome.tif", seed=seed)
    mask = tissue_mask_from_image(tissue_image(SHAPE, seed))
    xy, rows, cols = spot_grid(SHAPE, MPP, "hex", pitch_um, spot_um, mask=mask,
                               return_indices=True)
    rng = np.random.default_rng(seed)
    position = xy[:, :1] / SHAPE[1]
    rates = 5 + 40 * np.abs(np.sin(np.pi * (position + np.linspace(0, 1, n_genes)[None])))
    counts = rng.poisson(rates)
    genes = ["ERBB2", *[f"GENE{i}" for i in range(1, n_genes)]]
    section = new_section(xy, slide=slide, mpp=MPP, spot_diameter_um=spot_um, name="synthetic",
                          source="synthetic", counts=counts, genes=genes, array_row=rows,
                          array_col=cols)
    return write_section(section, folder / "section.h5ad")


def tiny_checkpoint(path: str | Path, genes: list[str], seed: int = 0, card: dict | None = None) -> Path:
    """Save an untrained tiny HiFusion model for ``genes`` (with a model card holding val PCCs)."""
    import torch

    from hifusion_model.models.checkpoint import save_checkpoint
    from hifusion_model.models.config import tiny_config
    from hifusion_model.models.hifusion import HiFusion

    torch.manual_seed(seed)
    model = HiFusion(tiny_config(genes))
    pccs = {g: round(0.9 - 0.05 * i, 3) for i, g in enumerate(genes)}
    card = card if card is not None else {"validation": {"gene_pcc_all": pccs}, "notes": "test model"}
    return save_checkpoint(path, model, train_mean=torch.zeros(len(genes)), card=card)


def spot_array_section(folder: str | Path, *, name: str = "B4", n_spots: int = 40,
                       n_genes: int = 20, pitch_um: float = 200.0, spot_um: float = 100.0,
                       mpp: float = 0.6875, margin_px: int = 260, jitter_px: float = 4.0,
                       genes: list[str] | None = None, seed: int = 0) -> Path:
    """Write ``folder/<name>.h5ad`` and its cropped image: ``n_spots`` neighbouring ST spots.

    ``genes``: their names (``n_genes`` of them), by default ERBB2, KRT19, CD74, ACTB, FASN
    (HER2ST's, so tests of a model for those genes can use it), then GENE5, GENE6, ...

    The geometry is HER2ST's (a square array, 200 µm apart, read at 0.6875 µm/px); the image is
    tissue everywhere under the spots; each gene's rate follows position with its own phase and
    level, so genes differ in total (top-gene selection is well defined) and in pattern.
    """
    import tifffile

    from hifusion_model.data.sections import new_section, write_section

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots))) + 2
    rows, cols = (a.ravel() for a in np.mgrid[0:side, 0:side])
    pitch_px = pitch_um / mpp
    grid = np.stack([cols, rows], axis=1) * pitch_px
    centre = grid[np.argmin(np.linalg.norm(grid - grid.mean(axis=0), axis=1))]
    keep = np.sort(np.argsort(np.linalg.norm(grid - centre, axis=1), kind="stable")[:n_spots])
    xy = grid[keep] + rng.normal(0, jitter_px, (n_spots, 2))
    rows, cols = rows[keep], cols[keep]
    xy = xy - xy.min(axis=0) + margin_px
    w, h = (np.ceil(xy.max(axis=0)).astype(int) + margin_px)
    image = tissue_image((h, w), seed, radius=0.62)  # covers every spot and its margin
    tif = folder / f"{name}_crop.tif"
    tifffile.imwrite(tif, image, photometric="rgb")
    u = (xy - xy.min(axis=0)) / np.ptp(xy, axis=0).clip(1)
    phase = np.linspace(0, 1, n_genes)[None]
    level = np.geomspace(60, 3, n_genes)[None]
    rates = level * (0.3 + np.abs(np.sin(np.pi * (u[:, :1] + 0.5 * u[:, 1:] + phase))))
    counts = rng.poisson(rates)
    if genes is None:
        named = ["ERBB2", "KRT19", "CD74", "ACTB", "FASN"][:n_genes]
        genes = [*named, *[f"GENE{i}" for i in range(len(named), n_genes)]]
    if len(genes) != n_genes:
        raise ValueError(f"{len(genes)} gene names for n_genes={n_genes}")
    section = new_section(xy, slide=tif, mpp=mpp, spot_diameter_um=spot_um, name=name,
                          source="synthetic", obs_names=[f"{c}x{r}" for r, c in zip(rows, cols)],
                          counts=counts, genes=genes, array_row=rows, array_col=cols)
    return write_section(section, folder / f"{name}.h5ad")
