"""Small file-system helpers shared by everything that writes user-visible files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only on success.

    A crash, Ctrl-C or exception while writing leaves any existing file at ``path`` untouched,
    so a checkpoint or a section is never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600; give it the mode a plain open() would
            tmp_path.chmod(0o666 & ~_umask())
            _fsync(tmp_path)  # the data reaches the disk before the name points at it
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; some file systems cannot, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    """The same path after resolving links, or the same inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False


def is_zarr_store(folder: str | os.PathLike) -> bool:
    """A zarr store folder (v3 ``zarr.json`` or v2 ``.zgroup``/``.zarray``): the one kind of
    folder an output may be, and so the one ``--overwrite`` replaces whole.

    >>> is_zarr_store(".")
    False
    """
    folder = Path(folder)
    return any((folder / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def _inside(path: Path, folder: Path) -> bool:
    """``path`` lies inside the existing ``folder`` (after resolving links)."""
    return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    overwrite: bool = False,
    flag: str = "--out",
    companions: Iterable[str | os.PathLike] = (),
    overwrite_flag: str = "--overwrite",
) -> Path:
    """Refuse, before any work, an output that is an input, exists, or cannot be written.

    The one home of the rule every writing command follows: ``out`` (and the ``companions``
    written beside it) must be none of ``inputs`` (compared after resolving links and by inode)
    and hold none of them (a store replaced whole would take them along), ``out`` must not
    exist unless ``overwrite`` (``overwrite_flag`` names it in the message), an existing folder
    is replaced only when it is a zarr store, and the folder that would hold ``out`` (or its
    nearest existing parent) must accept a new file. Raises :class:`OutputError`; returns
    ``out``.
    """
    out = Path(out).expanduser()
    sources = [Path(p).expanduser() for p in inputs if p is not None and str(p) != "bundled"]
    for target in (out, *(Path(c) for c in companions)):
        for source in sources:
            if _same_file(target, source):
                raise OutputError(
                    f"{target}: {flag} is one of the inputs ({source}); choose another file name"
                )
            if _inside(source, target):
                raise OutputError(
                    f"{target}: {flag} holds one of the inputs ({source}); replacing it would "
                    "delete that input, so choose another name"
                )
    if out.is_dir() and not is_zarr_store(out):
        raise OutputError(f"{out}: {flag} is an existing folder; give a file name inside it")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(
            f"{out} already exists; add {overwrite_flag} to replace it, or choose another {flag}"
        )
    folder = out.parent
    while not folder.exists():  # atomic_path creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{out}: {folder} is not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise OutputError(
            f"cannot write {out}: {folder} does not accept new files ({why}); "
            f"choose another {flag} or fix the folder's permissions"
        ) from e
    os.close(fd)
    os.unlink(probe)
    return out


def check_space(path: str | os.PathLike, needed: int) -> None:
    """Refuse, before a native writer starts, a file of up to ``needed`` bytes that cannot fit.

    HDF5 that hits a full disk or the file-size limit (``ulimit -f``) half-way leaves its
    objects broken, and freeing them later crashed the interpreter (exit 139). So the free
    space of the folder and the file-size limit are checked against an upper bound first.
    """
    path = Path(path).expanduser()
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and needed > free:
        raise OutputError(
            f"{path}: no space left on {folder}: up to {_size(needed)} needed, {_size(free)} "
            "free; free some space or choose another place"
        )
    limit = _file_size_limit()
    if limit is not None and needed > limit:
        raise OutputError(
            f"{path}: the file may need up to {_size(needed)}, more than the file-size limit of "
            f"{_size(limit)} (ulimit -f); raise the limit or write fewer spots"
        )


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def anndata_nbytes(adata: object) -> int:
    """An upper bound of an AnnData's .h5ad size: its arrays uncompressed, plus 256 kB."""
    import numpy as np
    import scipy.sparse as sp

    def size(a: object) -> int:
        if sp.issparse(a):
            return sum(int(getattr(a, k).nbytes) for k in ("data", "indices", "indptr")
                       if hasattr(a, k))
        if hasattr(a, "memory_usage"):  # a DataFrame
            return int(a.memory_usage(deep=True).sum())
        return int(np.asarray(a).nbytes) if a is not None else 0

    total = size(adata.X) + size(adata.obs) + size(adata.var)  # type: ignore[attr-defined]
    for mapping in (adata.obsm, adata.layers, adata.varm):  # type: ignore[attr-defined]
        total += sum(size(v) for v in mapping.values())
    return total + 256_000
