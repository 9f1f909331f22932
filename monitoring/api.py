from ninja import Router

from millm_site.api import api, envelope
from monitoring.health import health_report

router = Router(tags=["health"])


@router.get("/health", summary="Database, broker and inference-process health")
async def health(request):
    report = await health_report()
    # Load balancers read the status code: only a lost database makes the web tier useless.
    return api.create_response(request, envelope(report), status=503 if report["status"] == "down" else 200)
