import os
import socket
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import OperationalError, connection

from catalog.demo import (
    catalog_is_empty,
    demo_assets_ensure,
    demo_assets_mark_desired,
    demo_calibration_pending,
    demo_calibration_request,
)
from millm_site.embedded_redis import embedded_redis_child, require_redis
from millm_site.env import SettingError
from millm_site.supervisor import Child, ChildFailedToStart, Supervisor, python_argv
from monitoring.prometheus_dir import prometheus_dir_prepare


class Command(BaseCommand):
    help = "Serve miLLM: migrate, build the demo if the catalog is empty, then run web + inference + worker."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument("--skip-demo", action="store_true", help="do not build demo assets")

    def handle(self, *args, host: str, port: int, skip_demo: bool, **options):
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        try:
            connection.ensure_connection()
        except OperationalError as exc:
            raise SettingError(f"DATABASE_URL cannot be reached: {str(exc).strip().splitlines()[0]}") from None
        call_command("migrate", interactive=False, verbosity=0)
        if not skip_demo and catalog_is_empty():
            self.stdout.write(f"Catalog is empty: building the {settings.DEMO_TIER} tier demo model and SAE…")
            # The calibrations (≈ 500 of the first build's ≈ 840 CPU s) run in the worker once this serves.
            model, sae = demo_assets_ensure(tier=settings.DEMO_TIER,
                                            calibrate=settings.DEMO_CALIBRATION == "foreground")
            # A newcomer's first page should chat and steer at once: the inference process loads and
            # attaches these on start, as it restores any desired state.
            demo_assets_mark_desired(model=model, sae=sae)
            self.stdout.write(f"Registered model {model.name} and SAE {sae.name}; they load on start.")
        # Also on a restart whose last run stopped before the calibration finished.
        calibrate = not skip_demo and bool(demo_calibration_pending(tier=settings.DEMO_TIER))

        children = []
        if settings.REDIS_URL_IS_EMBEDDED:
            children.append(embedded_redis_child(settings.EMBEDDED_REDIS_SOCKET))  # first up, last down
        else:
            require_redis(settings.REDIS_URL)

        prometheus_dir_prepare(var_dir=settings.VAR_DIR)  # children inherit it: one scrape sums them all
        count = settings.INFERENCE_PROCESSES  # each one restarted on its own
        children += [
            Child("web", python_argv("-m", "daphne", "-b", host, "-p", str(port), "millm_site.asgi:application")),
            *(Child("inference" if count == 1 else f"inference-{i + 1}", python_argv("manage.py", "run_inference"))
              for i in range(count)),
            Child("worker", python_argv("-m", "celery", "-A", "millm_site", "worker", "--pool=threads",
                                        "--concurrency=4", "--loglevel=WARNING")),
        ]
        # daphne's requests wait for a starting inference process instead of a quick 503 (startup race).
        os.environ["MILLM_INFERENCE_EXPECTED"] = "1"
        try:
            Supervisor(children, cwd=str(settings.BASE_DIR)).run(
                on_started=lambda: self._announce(host, port, calibrate=calibrate))
        except ChildFailedToStart as exc:
            raise SettingError(str(exc)) from None

    def _announce(self, host: str, port: int, *, calibrate: bool = False) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        self.stdout.write(self.style.SUCCESS(f"miLLM is serving on http://{host}:{port}/  (Ctrl-C stops everything)"))
        if calibrate:
            self._calibrate_in_background(host, port)

    def _calibrate_in_background(self, host: str, port: int) -> None:
        # The embedded Redis is up now; the task waits in it until the worker is ready.
        try:
            saes = demo_calibration_request(tier=settings.DEMO_TIER)
        except Exception as exc:  # noqa: BLE001 - serving without calibrated strengths beats not serving
            self.stderr.write(f"The demo calibration could not be queued ({type(exc).__name__}); features need an "
                              "explicit strength until POST /api/saes/{name}/calibrate runs.")
            return
        if saes:
            cost = " (about 8 CPU-minutes)" if settings.DEMO_TIER == "demo" else ""
            self.stdout.write(
                f"The demo's calibrated strengths are computed in the background{cost}; chat and steering with "
                f"explicit strengths work now. Progress: the Steering page, " + ", ".join(
                    f"http://{host}:{port}/api/saes/{sae.name}/calibration" for sae in saes))
