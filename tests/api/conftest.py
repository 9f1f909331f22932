import asyncio
import threading

import pytest
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from inference.process import InferenceWorker


@pytest.fixture
def inference_worker():
    """A real InferenceWorker listening on the test Redis, in a thread with its own event loop."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def main():
        # Its own layer: one layer instance must not receive from two event loops (the test client has one).
        layer = RedisChannelLayer(**settings.CHANNEL_LAYERS["default"]["CONFIG"])
        worker = InferenceWorker(channel_layer=layer, channel_name=settings.INFERENCE_CHANNEL)
        holder["worker"] = worker
        ready.set()
        await worker.serve_until_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(5)
    yield holder["worker"]
    loop.call_soon_threadsafe(holder["worker"].stopping.set)
    thread.join(5)
