"""The shipped sample: HER2ST section C4, found by one lookup and opened like any section."""

from __future__ import annotations

import pytest

from hifusion_model.data.sections import read_section
from hifusion_model.data.slide import Slide
from hifusion_model.errors import SectionError
from hifusion_model.samples import load_sample_section, sample_section_path


def test_the_sample_section_opens_with_its_slide_beside_it():
    section = load_sample_section()
    meta = section.uns["hifusion"]
    assert section.n_obs > 100 and section.n_vars > 250 and "ERBB2" in section.var_names
    with Slide.open(sample_section_path().with_name("her2st_C4.ome.tif")) as slide:
        assert slide.mpp == pytest.approx(meta["mpp"], rel=1e-3)
    assert read_section(sample_section_path()).n_obs == section.n_obs


def test_a_missing_sample_says_what_to_do(monkeypatch):
    monkeypatch.setattr("hifusion_model.samples.SAMPLE_NAME", "no_such_sample")
    with pytest.raises(SectionError, match=r"sample data is not installed \(expected .*"
                                           r"no_such_sample\.h5ad\); reinstall napari-hifusion"):
        sample_section_path()
