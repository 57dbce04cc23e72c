"""Sample data shipped with the package: HER2ST section C4, which the bundled model never saw.

Built by ``scripts/make_sample_data.py`` from the public HER2ST data (Andersson et al., Nature
Communications 2021): a JPEG OME-TIFF pyramid of the spotted area at its true µm/px and a section
``.h5ad`` with the raw counts and spot centres.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SectionError

SAMPLE_NAME = "her2st_C4"


def sample_section_path() -> Path:
    """Path of the sample section ``.h5ad`` (its slide lies beside it).

    The one lookup of the sample: the library, napari's sample menu and the demo all use it.

    >>> sample_section_path().name
    'her2st_C4.h5ad'
    """
    path = Path(__file__).with_name(f"{SAMPLE_NAME}.h5ad")
    if not path.is_file():
        raise SectionError(
            f"the HER2ST C4 sample data is not installed (expected {path}); reinstall "
            "napari-hifusion (or rebuild it with scripts/make_sample_data.py), or open a section "
            "of your own"
        )
    return path


def load_sample_section():
    """The sample section as an AnnData (see :mod:`hifusion_model.data.sections`)."""
    from ..data.sections import read_section

    return read_section(sample_section_path())
