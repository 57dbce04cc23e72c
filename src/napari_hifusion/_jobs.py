"""Run one long core call off the GUI thread, with progress, cancel and errors as notifications.

Core jobs report through a ``progress(done, total, message)`` callback and stop when
``should_stop()`` is true. :class:`JobRunner` runs such a call inside a napari ``thread_worker``
generator that *yields* each progress report, so napari delivers it on the GUI thread; the
widgets only ever touch layers from ``on_done`` (GUI thread as well).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import thread_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info

from hifusion_model.errors import Cancelled, HiFusionError
from hifusion_model.progress import Progress, ShouldStop

_DONE = object()


@dataclass
class JobContext:
    """What a job running off the GUI thread may use: report progress, ask to stop, send events.

    ``emit(obj)`` delivers ``obj`` to the runner's ``on_event`` on the GUI thread (e.g. one
    training epoch's record for the live curve).
    """

    progress: Progress
    should_stop: ShouldStop
    emit: Callable[[Any], None]


Job = Callable[[JobContext], Any]


def _job_reports(job: Job, stop: threading.Event) -> Iterator[tuple]:
    """Generator body of the worker: run ``job`` in a helper thread, yield its reports as they come.

    A callback cannot ``yield``, so the job runs one thread further down and posts its reports
    into a queue that this generator drains. It returns ``(error, value)`` rather than raising:
    an exception escaping a worker would also reach napari's global handler, which shows a
    traceback (even for a plain Cancel).
    """
    reports: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}
    context = JobContext(
        progress=lambda d, t, m="": reports.put(("progress", (int(d), int(t), str(m)))),
        should_stop=stop.is_set,
        emit=lambda obj: reports.put(("event", obj)),
    )

    def target() -> None:
        try:
            outcome["value"] = job(context)
        except BaseException as e:  # handed to the worker's errored signal below
            outcome["error"] = e
        finally:
            reports.put(_DONE)

    threading.Thread(target=target, name="hifusion-job", daemon=True).start()
    while (report := reports.get()) is not _DONE:
        yield report
    return outcome.get("error"), outcome.get("value")


class JobRunner:
    """One job at a time for a panel: napari progress bar, Cancel, and notifications on failure."""

    def __init__(self, title: str, on_progress: Progress | None = None,
                 on_event: Callable[[Any], None] | None = None) -> None:
        self.title = title
        self.on_progress = on_progress
        self.on_event = on_event
        self.worker: Any = None
        self._stop = threading.Event()
        self._bar: napari_progress | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Job, on_done: Callable[[Any], None],
              on_finished: Callable[[], None] | None = None) -> Any:
        """Start ``job``; ``on_done(result)`` runs on the GUI thread when it succeeds."""
        if self.running:
            show_info(f"{self.title} is already running; cancel it first")
            return None
        self._stop = threading.Event()
        self._bar = napari_progress(total=0, desc=self.title)
        worker = thread_worker(_job_reports, start_thread=False)(job, self._stop)
        worker.yielded.connect(self._report)
        worker.returned.connect(lambda outcome: self._returned(on_done, *outcome))
        worker.errored.connect(self._failed)  # only for failures of the machinery itself
        worker.finished.connect(self._finish)
        if on_finished is not None:
            worker.finished.connect(on_finished)
        self.worker = worker
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the job to stop; the core leaves its files valid and raises ``Cancelled``."""
        self._stop.set()

    def _report(self, report: tuple[str, Any]) -> None:
        what, payload = report
        if what == "event":
            if self.on_event is not None:
                self.on_event(payload)
            return
        done, total, message = payload
        bar = self._bar  # a local: updating the bar can run _finish, which clears self._bar
        if bar is not None:
            if total and bar.total != total:
                bar.total = total
            bar.n = min(done, total) if total else done
            bar.set_description(f"{self.title}: {message}" if message else self.title)
            bar.refresh()
        if self.on_progress is not None:
            self.on_progress(done, total, message)

    def _returned(self, callback: Callable[[Any], None], error: BaseException | None,
                  result: Any) -> None:
        if error is not None:
            self._failed(error)
            return
        try:
            callback(result)
        except Exception as e:
            self._failed(e)

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            show_info(f"{self.title} cancelled")
        else:
            notify_error(error, self.title)

    def _finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.worker = None


def notify_error(error: BaseException, context: str) -> None:
    """Show ``error`` as a napari notification; user errors plainly, bugs with their type."""
    if isinstance(error, HiFusionError):
        show_error(f"{context}: {error}")
    else:
        show_error(f"{context} failed ({type(error).__name__}: {error})")


def guarded(context: str) -> Callable:
    """Decorator for button handlers: any exception becomes a notification, never a crash."""

    def wrap(func: Callable) -> Callable:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Exception as e:
                notify_error(e, context)
                return None

        return run

    return wrap
