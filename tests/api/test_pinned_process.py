"""A process pinned to one model (MILLM_INFERENCE_MODEL) loads it on start and skips management calls about
other models; with every process pinned elsewhere, a load is a 409 that changes nothing (issue 9)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from django.conf import settings

from catalog.models import LanguageModel, ModelStatus
from inference.process import InferenceWorker
from millm_site.channel_layer import OneTripRedisChannelLayer
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pinned_worker(tiny_catalog):
    """A real inference process in a thread, pinned to the test tier's model and restoring on start."""
    model, _ = tiny_catalog
    loop, holder = asyncio.new_event_loop(), {}

    async def main():
        layer = OneTripRedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])
        holder["worker"] = InferenceWorker(channel_layer=layer, channel_name=settings.INFERENCE_CHANNEL,
                                           pinned_model=model.name)
        await holder["worker"].serve_until_stopped(restore=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while LanguageModel.objects.get(pk=model.pk).status != ModelStatus.LOADED and time.monotonic() < deadline:
        time.sleep(0.2)
    yield model
    loop.call_soon_threadsafe(holder["worker"].stopping.set)
    thread.join(30)


def test_a_pinned_process_loads_its_model_and_skips_others(client, pinned_worker):
    model = pinned_worker
    assert LanguageModel.objects.get(pk=model.pk).status == ModelStatus.LOADED
    # Pinned: it serves beside the catalog's desired model, it does not become it.
    assert not LanguageModel.objects.get(pk=model.pk).desired_loaded
    health = client.get("/api/health").json()["data"]
    assert [(p["pinned_model"], p["loaded_model"]) for p in health["processes"]] == [(model.name, model.name)]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [model.name]

    other = factories.language_model("other-model", local_path=model.local_path)
    before = list(LanguageModel.objects.order_by("pk").values("name", "status", "desired_loaded"))
    for _ in range(2):
        response = client.post(f"/api/models/{other.name}/load")
        assert response.status_code == 409, response.content
        assert response.json()["error"]["details"]["skipped"]
    unload = client.post(f"/api/models/{model.name}/unload")
    assert unload.status_code == 409  # a pinned process never unloads its model
    assert list(LanguageModel.objects.order_by("pk").values("name", "status", "desired_loaded")) == before
    chat = client.post("/v1/chat/completions", {"model": model.name, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]},
                       content_type="application/json")
    assert chat.status_code == 200, chat.content
