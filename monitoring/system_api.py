"""/api/health and /api/monitoring/system: is everything up, and how busy is it now."""

from __future__ import annotations

from typing import Any

from ninja import Router, Status

from millm_site.envelope import envelope
from monitoring.health import health_report
from monitoring.system_status import system_publisher, system_status_collect

router = Router(tags=["health"])


@router.get("/health", response={200: dict[str, Any], 503: dict[str, Any]},
            summary="Database, broker and inference-process health")
async def health(request):
    report = await health_report()
    # Load balancers read the status code: only a lost database makes the web tier useless.
    return Status(503 if report["status"] == "down" else 200, envelope(report))


@router.get("/monitoring/system", summary="CPU, memory, inference queue, latency and health lights now",
            tags=["system"])
async def system_status(request):
    status = await system_status_collect()
    return envelope({**status, "recent_alerts": list(system_publisher.alerts)})
