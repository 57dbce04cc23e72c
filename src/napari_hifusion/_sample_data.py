"""npe2 sample data: HER2ST section C4 (H&E, spots, counts), shipped in ``hifusion_model.samples``.

The package holds a pyramidal OME-TIFF and a section ``.h5ad`` pointing at it; both open exactly
as the reader opens any section.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hifusion_model.errors import SectionError

from ._layers import LayerData

SAMPLE_PACKAGE = "hifusion_model.samples"
SAMPLE_NAME = "C4"


def sample_section_path(name: str = SAMPLE_NAME) -> Path:
    """The installed sample section ``.h5ad`` (the one whose file name contains ``name``)."""
    missing = (f"the HER2ST {name} sample data is not installed (expected a section .h5ad in "
               f"the {SAMPLE_PACKAGE} package); reinstall napari-hifusion, or open a section of "
               "your own with File > Open")
    try:
        folder = resources.files(SAMPLE_PACKAGE)
    except ModuleNotFoundError as e:
        raise SectionError(missing) from e
    sections = sorted(p for p in folder.iterdir() if p.name.endswith(".h5ad"))
    chosen = [p for p in sections if name.lower() in p.name.lower()] or sections
    if not chosen:
        raise SectionError(missing)
    return Path(str(chosen[0]))


def her2st_c4() -> list[LayerData]:
    """The C4 slide and its measured spots (expression in the points' features)."""
    from hifusion_model.data.sections import read_section

    from ._reader import section_layers

    return section_layers(read_section(sample_section_path()))
