"""Progress of one running download: bytes into the database and the `progress` group, and the cancel check.

huggingface_hub reports each chunk to a progress-bar class it instantiates itself (`tqdm_class=`);
`ProgressReporter.progress_class()` is such a class that forwards the byte counts here. Writes and
events are throttled to a few per second; the cancel flag is read at the same pace, so a cancel
stops the transfer within a fraction of a second (the exception unwinds through huggingface_hub,
which deletes its partial file).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from django.utils import timezone

from downloads.models import Download, DownloadStatus
from downloads.selectors import download_as_dict
from millm_site.events import event_publish_sync

log = structlog.get_logger("millm.downloads")

PROGRESS_INTERVAL_S = 0.25
ProgressListener = Callable[[int, int | None, str], None]  # (bytes_done, bytes_total, current_file)


class DownloadCancelled(Exception):
    """Raised from inside the transfer when the download was cancelled (flag in the row, or Ctrl-C)."""


def progress_event(kind: str, payload: dict[str, Any]) -> None:
    """Tell the live pages; a command-line download may run with no Redis at all, so never fail on it."""
    try:
        event_publish_sync("progress", kind, payload)
    except Exception as exc:  # noqa: BLE001 - progress events are best effort
        log.debug("progress_event_not_sent", kind=kind, error=type(exc).__name__)


def download_event(download: Download) -> None:
    progress_event("download_progress", download_as_dict(download))


class ProgressReporter:
    def __init__(self, download: Download, *, listener: ProgressListener | None = None,
                 interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.download = download
        self.listener = listener
        self.interval_s = interval_s
        self.completed_bytes = 0  # files finished so far
        self.file_bytes = 0  # of the file in flight
        self.file_size = 0
        self._last_flush = 0.0

    @property
    def bytes_done(self) -> int:
        return self.completed_bytes + max(0, min(self.file_bytes, self.file_size or self.file_bytes))

    def start_file(self, path: str, size: int) -> None:
        self.download.current_file, self.file_size, self.file_bytes = path, size, 0
        self.flush(force=True)

    def advance(self, n: int) -> None:
        self.file_bytes += n  # n < 0 when huggingface_hub restarts a file the server would not resume
        if self.listener:
            self.listener(self.bytes_done, self.download.bytes_total, self.download.current_file)
        self.flush()

    def finish_file(self) -> None:
        self.completed_bytes += self.file_size
        self.file_bytes = self.file_size = 0
        if self.listener:
            self.listener(self.bytes_done, self.download.bytes_total, self.download.current_file)

    def flush(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.interval_s:
            return
        self._last_flush = now
        d = self.download
        d.bytes_done = self.bytes_done
        Download.objects.filter(pk=d.pk).update(bytes_done=d.bytes_done, current_file=d.current_file,
                                                updated_at=timezone.now())
        state = Download.objects.filter(pk=d.pk).values_list("cancel_requested", "status").first()
        if state is None or state[0] or state[1] != DownloadStatus.RUNNING:
            raise DownloadCancelled()
        download_event(d)

    def progress_class(self) -> type[Any]:
        """A tqdm stand-in for huggingface_hub's `tqdm_class=`: it only forwards byte counts."""
        reporter = self

        class HubProgress:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.n = 0
                initial = int(kwargs.get("initial") or 0)  # bytes already on disk when resuming
                if initial:
                    reporter.advance(initial)

            def __enter__(self) -> HubProgress:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def update(self, n: int | float | None = 1) -> None:
                self.n += int(n or 0)
                reporter.advance(int(n or 0))

            def close(self) -> None:
                return None

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                return None

        return HubProgress
