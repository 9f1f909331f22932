"""What the download commands share: a tqdm bar fed by the download's progress, and the outcome."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.core.management.base import CommandError
from tqdm import tqdm

from downloads.models import Download, DownloadStatus
from downloads.services import download_run
from millm_site.errors import MillmError


def run_with_bar(download: Download, *, token: str | None, quiet: bool) -> Download:
    """Run the download in this process (no worker), drawing one byte bar; raise CommandError unless it completed."""
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request would shred the bar
    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=download.name, disable=quiet,
               dynamic_ncols=True)

    def on_progress(done: int, total: int | None, current_file: str) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.set_postfix_str(current_file[-40:], refresh=False)
        bar.update(done - bar.n)

    try:
        finished = download_run(download_id=download.pk, token=token, listener=on_progress)
    finally:
        bar.close()
    if finished.status != DownloadStatus.COMPLETED:
        reason = finished.error_details.get("reason") if finished.error_details else None
        detail = f" [{finished.error_code}{': ' + reason if reason else ''}]" if finished.error_code else ""
        message = f": {finished.error_message}{detail}" if finished.error_message else ""
        raise CommandError(f"Download {finished.pk} {finished.status}{message}")
    return finished


def request_or_fail(make: Callable[[], Download]) -> Download:
    try:
        return make()
    except MillmError as exc:
        raise CommandError(f"{exc.code}: {exc.message}") from None
