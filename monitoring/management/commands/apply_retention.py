"""Drop stored requests older than MILLM_HISTORY_RETENTION_DAYS (or --days); safe to run from cron."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from monitoring.history import history_delete, history_retention_cutoff


class Command(BaseCommand):
    help = "Delete request history older than the retention window (MILLM_HISTORY_RETENTION_DAYS; 0 keeps all)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--days", type=int, default=None,
                            help=f"override the window (default {settings.HISTORY_RETENTION_DAYS}; 0 keeps all)")

    def handle(self, *args, days: int | None, **options) -> None:
        if days is not None and days < 0:
            raise CommandError("--days must be 0 or more")
        cutoff = history_retention_cutoff(days=days)
        if cutoff is None:
            self.stdout.write("Retention is off (0 days): nothing deleted.")
            return
        deleted = history_delete(before=cutoff)
        self.stdout.write(f"Deleted {deleted} request(s) created before {cutoff.isoformat()}.")
