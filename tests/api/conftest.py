import asyncio
import threading

import pytest
from channels.layers import get_channel_layer
from django.conf import settings

from inference.worker import InferenceWorker


@pytest.fixture
def inference_worker():
    """A real InferenceWorker listening on the test Redis, in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def main():
        worker = InferenceWorker(channel_layer=get_channel_layer(), channel_name=settings.INFERENCE_CHANNEL)
        holder["worker"] = worker
        ready.set()
        await worker.serve_until_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(5)
    yield holder["worker"]
    loop.call_soon_threadsafe(holder["worker"].stopping.set)
    thread.join(5)
