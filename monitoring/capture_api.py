"""/api/monitoring (live capture settings, feature statistics) and /api/inspect.

The capture itself runs in the inference process (the SAE hook); these endpoints configure it and
read its running statistics. Request history lives in monitoring/history_api.py.
"""

from __future__ import annotations

from typing import Annotated

from ninja import Body, Query, Router, Schema
from pydantic import Field

from engine.rules import FeatureMetric
from inference.client import inference_client
from millm_site.envelope import envelope
from monitoring.capture_services import capture_configure
from monitoring.inspect_services import text_inspect

monitoring_router = Router(tags=["monitoring"])
inspect_router = Router(tags=["monitoring"])

METRIC = FeatureMetric


@monitoring_router.get("", summary="Monitoring settings and whether capture is active (an SAE attached)")
async def get_monitoring(request):
    pong = await inference_client().ping()
    return envelope({**pong.monitoring.model_dump(), "attached_sae": pong.attached_sae})


class ConfigureIn(Schema):
    top_k: int | None = Field(None, ge=1, le=100)
    # Bounded so no index overflows the transport to the inference process (which checks the SAE's width).
    features: list[Annotated[int, Field(ge=0, le=(1 << 31) - 1)]] | None = Field(
        None, max_length=256, description="feature indices always reported")


@monitoring_router.post("/configure", summary="Top-k per token and the features always reported")
async def configure(request, payload: ConfigureIn = Body(...)):  # noqa: B008
    return envelope(await capture_configure(top_k=payload.top_k, features=payload.features))


class EnableIn(Schema):
    enabled: bool = True


@monitoring_router.post("/enable", summary="Turn per-token capture on or off")
async def enable(request, payload: EnableIn = Body(...)):  # noqa: B008
    return envelope(await capture_configure(enabled=payload.enabled))


@monitoring_router.get("/statistics", summary="Running per-feature statistics (top 20 by mean)")
async def statistics(request, sae: str | None = Query(None, min_length=1, max_length=120)):  # noqa: B008
    """`?sae=` one of the attached SAEs (default: the first attached)."""
    return envelope(_strip(await inference_client().statistics(top=20, by="mean", sae=sae)))


@monitoring_router.delete("/statistics", summary="Reset the running statistics")
async def reset_statistics(request):
    fanout = await inference_client().reset_statistics()
    return envelope({"reset": True, "processes": fanout.report()})


class TopIn(Schema):
    n: int = Field(20, ge=1, le=1000)
    by: METRIC = "mean"
    sae: str | None = Field(None, min_length=1, max_length=120)  # an attached SAE; None: the first attached


@monitoring_router.post("/statistics/top", summary="Top-N features by any statistic")
async def statistics_top(request, payload: TopIn = Body(...)):  # noqa: B008
    return envelope(_strip(await inference_client().statistics(top=payload.n, by=payload.by, sae=payload.sae)))


def _strip(reply) -> dict:
    return reply.model_dump(exclude={"type"})


class InspectIn(Schema):
    text: str = Field(min_length=1, max_length=20000)
    model: str | None = None


@inspect_router.post("/inspect", summary="Per-token top features of a text, without generating")
async def inspect(request, payload: InspectIn):
    return envelope(await text_inspect(text=payload.text, model=payload.model))
