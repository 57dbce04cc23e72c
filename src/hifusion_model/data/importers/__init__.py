"""Turn the common spatial-transcriptomics layouts into sections (see :mod:`..sections`).

Each importer reads one layout, finds the full-resolution image and its µm/px, and returns a
validated AnnData. The µm/px is never guessed: each importer says where it came from
(``uns['hifusion']['mpp_source']``) or raises, because a wrong scale silently ruins every patch
the model sees.

One module a layout: :mod:`.her2st` (legacy ST / HER2ST), :mod:`.visium` (Space Ranger
``outs/``, with :mod:`.tenx_matrix` for its counts), :mod:`.scanpy_visium` (scanpy/squidpy
AnnData), :mod:`.hest` (HEST-1k) and :mod:`.spot_csv` (spot centres only); :mod:`.lattice`
holds the µm/px-from-the-spot-array rule they share, :mod:`.visium_scale` Visium's use of it.
"""

from ._common import CoarseImageWarning, SpotMismatchWarning
from .her2st import ST_PITCH_UM, ST_SPOT_UM, import_her2st, st_mpp_from_geometry
from .hest import import_hest
from .lattice import LatticeFit, lattice_mpp
from .scanpy_visium import import_scanpy_visium
from .spot_csv import import_csv
from .tenx_matrix import read_10x_h5, read_10x_mtx
from .visium import import_visium
from .visium_scale import (
    SCALE_TOLERANCE,
    SCALEFACTOR_SPOT_UM,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    VISIUM_STEP_UM,
    ScaleMismatchWarning,
)

__all__ = [
    "SCALEFACTOR_SPOT_UM",
    "SCALE_TOLERANCE",
    "ST_PITCH_UM",
    "ST_SPOT_UM",
    "VISIUM_PITCH_UM",
    "VISIUM_SPOT_UM",
    "VISIUM_STEP_UM",
    "CoarseImageWarning",
    "LatticeFit",
    "ScaleMismatchWarning",
    "SpotMismatchWarning",
    "import_csv",
    "import_her2st",
    "import_hest",
    "import_scanpy_visium",
    "import_visium",
    "lattice_mpp",
    "read_10x_h5",
    "read_10x_mtx",
    "st_mpp_from_geometry",
]
