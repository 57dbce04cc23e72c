"""The C heap in long inference jobs: big freed blocks kept for the next batch, then given back.

glibc serves an allocation above its mmap threshold (grown on its own from 128 KB to at most
32 MB) with fresh pages from the kernel, and unmaps them when it is freed, so a 50 MB activation
of a batch of regions is page-faulted in again on every call. On a strip of the generated
50,000-px slide (the dense path, bf16 compiled, 2,114 spots) that was 7.7 million minor faults
and 15.5 s of system time in 62 s; keeping blocks up to :data:`KEPT_BYTES` in the heap took it
to 0.7 million and 1.9 s, and the strip to 54 s (docs/experiments.md, 2026-12-04). The memory
stays bounded because the dense path hands the freed heap back after every band
(:func:`return_freed_memory`); outside glibc (macOS, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Blocks up to this size come from the heap and stay there when freed, inside
#: :func:`reused_heap` (the dense path's largest are ~100 MB: a chunk's window statistics).
KEPT_BYTES = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters
_GLIBC_DEFAULT = 128 * 1024  # both thresholds' defaults

_LIBC: Any = None  #: glibc once looked up (False where there is none)
_LOCK = threading.Lock()
_DEPTH = 0


def _glibc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _LIBC = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC


def _set_thresholds(nbytes: int) -> None:
    libc = _glibc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
        libc.mallopt(_M_TRIM_THRESHOLD, nbytes)


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc's ``malloc_trim``).

    A band of the dense path frees hundreds of MB of slide pixels, statistics and activations;
    trimming after each band brought a 12,000-px slide's resident size between bands from 1.57
    to 0.98 GB."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


@contextmanager
def reused_heap() -> Iterator[None]:
    """Inside, freed blocks up to :data:`KEPT_BYTES` are kept for reuse rather than unmapped;
    on leaving (the outermost of nested uses), glibc's default thresholds come back and the
    heap is trimmed.

    >>> with reused_heap():
    ...     pass
    """
    global _DEPTH
    with _LOCK:
        _DEPTH += 1
        if _DEPTH == 1:
            _set_thresholds(KEPT_BYTES)
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _set_thresholds(_GLIBC_DEFAULT)
                return_freed_memory()


__all__ = ["KEPT_BYTES", "return_freed_memory", "reused_heap"]
