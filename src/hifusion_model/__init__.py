"""HiFusion: predict spatial gene expression from H&E histology (Qt-free core).

The calls a notebook needs, all importable from here:

>>> from hifusion_model import available_models, create_model, evaluate, predict
>>> pred = predict("C4.h5ad", model="bundled")  # doctest: +SKIP
>>> evaluate(pred)["gene_pcc"]                  # doctest: +SKIP
>>> sorted(available_models())
['hifusion', 'hifusion_tiny', 'spot_resnet18']
>>> net = create_model("hifusion_tiny", genes=["ERBB2", "KRT19"])   # a fresh network

``predict`` returns an AnnData (``X`` predicted, ``layers['truth']`` measured where the input
has counts, ``layers['uncertainty']``); ``evaluate`` scores it per gene beside the constant.

Names are imported on first use, so ``import hifusion_model`` (and ``hifusion --version``)
stays fast: torch loads only when a model is touched.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("napari-hifusion")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

#: public name -> the module that holds it
_API = {
    "predict": "api",
    "evaluate": "api",
    "load_model": "models.checkpoint",
    "train": "engine.train",
    "read_section": "data.sections",
    "write_section": "data.sections",
    "create_model": "models.registry",
    "available_models": "models.registry",
    "get_recipe": "engine.recipes",
    "sample_section_path": "samples",
}


def open_slide(path: Any, mpp: float | None = None) -> Any:
    """A whole-slide image, read lazily (:meth:`hifusion_model.data.slide.Slide.open`)."""
    from .data.slide import Slide

    return Slide.open(path, mpp=mpp)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'hifusion_model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", "open_slide", *_API]
