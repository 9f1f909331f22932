import asyncio
import threading
import time

import pytest
from django.conf import settings

from inference.process import InferenceWorker
from millm_site.channel_layer import OneTripRedisChannelLayer


@pytest.fixture
def inference_worker():
    """A real InferenceWorker listening on the test Redis, in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def main():
        # Its own layer: one layer instance must not receive from two event loops (the test client has one).
        layer = OneTripRedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])
        worker = InferenceWorker(channel_layer=layer, channel_name=settings.INFERENCE_CHANNEL)
        holder["worker"] = worker
        ready.set()
        await worker.serve_until_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(5)
    worker = holder["worker"]
    # Serving only once it has joined the control group: a broadcast sent earlier would miss it (a 503 when
    # a previous test's worker is still on record, as on a loaded CI machine).
    deadline = time.monotonic() + 30
    while not worker.listening.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.listening.is_set(), "the test inference worker did not start listening within 30 s"
    yield worker
    loop.call_soon_threadsafe(worker.stopping.set)
    thread.join(30)  # until it has left the registry, so the next test's broadcast does not wait on it


@pytest.fixture
def two_saes_serving(client, tiny_catalog, inference_worker):
    """The test tier's model loaded with both its SAEs attached through the API: (model, late, early), the
    layer-2 SAE first (the default), then the layer-1 SAE."""
    from steering.models import SparseAutoencoder

    model, late = tiny_catalog
    early = SparseAutoencoder.objects.get(model=model, layer=1)
    assert client.post(f"/api/models/{model.name}/load").status_code == 200
    for sae in (late, early):
        response = client.post(f"/api/saes/{sae.name}/attach")
        assert response.status_code == 200, response.content
    return model, late, early
