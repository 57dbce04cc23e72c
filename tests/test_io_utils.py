"""check_output: the rule every writing command follows, for files and for zarr stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from hifusion_model.errors import OutputError
from hifusion_model.io_utils import check_output, is_zarr_store


def _store(path: Path) -> Path:
    path.mkdir()
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    return path


def test_an_existing_store_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    store = _store(tmp_path / "pred.zarr")
    assert is_zarr_store(store)
    with pytest.raises(OutputError, match="already exists; add --overwrite"):
        check_output(store)
    assert check_output(store, overwrite=True) == store
    with pytest.raises(OutputError, match="add overwrite=True to replace it, or choose another path"):
        check_output(store, flag="path", overwrite_flag="overwrite=True")


def test_a_folder_that_is_no_store_is_never_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "results.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert not is_zarr_store(folder)
    with pytest.raises(OutputError, match="is an existing folder"):
        check_output(folder, overwrite=True)


def test_an_output_never_holds_an_input(tmp_path: Path) -> None:
    store = _store(tmp_path / "in.zarr")
    (store / "images").mkdir()
    with pytest.raises(OutputError, match="is one of the inputs"):
        check_output(store, [store], overwrite=True)
    with pytest.raises(OutputError, match="holds one of the inputs.*would delete that input"):
        check_output(store, [store / "images"], overwrite=True)
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    with pytest.raises(OutputError, match="inputs"):
        check_output(link, [store / "images"], overwrite=True)
    assert check_output(tmp_path / "new.zarr", [store]) == tmp_path / "new.zarr"
