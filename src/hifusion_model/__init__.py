"""HiFusion: predict spatial gene expression from H&E histology (Qt-free core)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-hifusion")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
