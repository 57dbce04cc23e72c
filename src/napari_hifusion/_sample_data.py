"""npe2 sample data: HER2ST section C4 (H&E, spots, counts), shipped in ``hifusion_model.samples``.

The package holds a pyramidal OME-TIFF and a section ``.h5ad`` pointing at it; both open exactly
as the reader opens any section.
"""

from __future__ import annotations

from hifusion_model.samples import sample_section_path

from ._layers import LayerData


def her2st_c4() -> list[LayerData]:
    """The C4 slide and its measured spots (expression in the points' features)."""
    from hifusion_model.data.sections import read_section

    from ._reader import section_layers

    return section_layers(read_section(sample_section_path()))


__all__ = ["her2st_c4", "sample_section_path"]
