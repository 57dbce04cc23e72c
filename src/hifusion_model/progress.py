"""The contract of every long job in the core: how it reports progress and learns to stop.

A long call takes ``progress(done, total, message)`` (any of the CLI's bar, a napari progress
bar, a notebook's print) and ``should_stop()``, asked between units of work; when it answers
true the job raises :class:`~hifusion_model.errors.Cancelled`, leaving every file it writes
valid. One definition here, so the CLI, the plugin and scripts can pass the same callables to
any of them.

>>> seen = []
>>> report: Progress = lambda done, total, message: seen.append((done, total))
>>> report(1, 4, "batch 1 of 4"); seen
[(1, 4)]
"""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(done, total, message)``: ``done`` of ``total`` units finished.
Progress = Callable[[int, int, str], None]
#: ``should_stop()``: true once the caller wants the job to end at the next safe point.
ShouldStop = Callable[[], bool]

__all__ = ["Progress", "ShouldStop"]
