"""/api/health, /api/monitoring/system and /api/monitoring/throughput: is everything up, how busy is it
now, and how throughput has tracked memory while generating."""

from __future__ import annotations

from typing import Any

from ninja import Query, Router, Status

from millm_site.envelope import envelope
from monitoring.health import health_report
from monitoring.system_status import system_publisher, system_status_collect, throughput_samples

router = Router(tags=["health"])
THROUGHPUT_LIMIT_MAX = 1000  # more than the inference process keeps


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


@router.get("/monitoring/throughput", summary="Throughput-versus-memory samples for tuning the batch size, newest first",
            tags=["system"])
async def throughput(request, limit: int = Query(100, ge=1, le=THROUGHPUT_LIMIT_MAX)):
    samples = await throughput_samples(limit=limit)
    return envelope({"count": len(samples), "samples": samples})
