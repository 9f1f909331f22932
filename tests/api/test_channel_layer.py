"""The one-round-trip channel layer (millm_site/channel_layer.py) against channels_redis's own, on the test Redis:
what one sends the other receives, the same capacity and expiry, and one Redis command per send."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from millm_site.channel_layer import SEND_SCRIPT_SHA, OneTripRedisChannelLayer

CONFIG = settings.CHANNEL_LAYERS["default"]["CONFIG"]


def test_settings_use_the_one_trip_layer():
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "millm_site.channel_layer.OneTripRedisChannelLayer"


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("process_local", [False, True], ids=["general", "process-local"])
@pytest.mark.parametrize("sender_cls,receiver_cls", [(OneTripRedisChannelLayer, RedisChannelLayer),
                                                     (RedisChannelLayer, OneTripRedisChannelLayer)],
                         ids=["ours-to-upstream", "upstream-to-ours"])
def test_what_one_layer_sends_the_other_receives_in_order(sender_cls, receiver_cls, process_local):
    async def main():
        sender, receiver = sender_cls(**CONFIG), receiver_cls(**CONFIG)
        channel = await receiver.new_channel() if process_local else f"test-layer-{uuid.uuid4().hex}"
        messages = [{"type": "chunk", "n": i, "text": "héllo", "raw": b"\x00\xff", "nested": {"a": [1, 2.5, None]}}
                    for i in range(5)]
        for message in messages:
            await sender.send(channel, message)
        received = [await asyncio.wait_for(receiver.receive(channel), 5) for _ in messages]
        await sender.flush()
        await receiver.close_pools()
        await sender.close_pools()
        return received, messages

    received, messages = run(main())
    assert received == messages


def test_a_full_channel_raises_channel_full_and_keeps_what_it_holds():
    async def main():
        layer = OneTripRedisChannelLayer(**{**CONFIG, "capacity": 3})
        channel = f"test-layer-{uuid.uuid4().hex}"
        for i in range(3):
            await layer.send(channel, {"type": "m", "n": i})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "m", "n": 3})
        received = [(await layer.receive(channel))["n"] for _ in range(3)]
        await layer.send(channel, {"type": "m", "n": 4})  # room again
        received.append((await layer.receive(channel))["n"])
        await layer.close_pools()
        return received

    assert run(main()) == [0, 1, 2, 4]


def test_a_sent_message_expires_with_the_layers_expiry():
    client = redis.Redis.from_url(settings.REDIS_URL)

    async def main():
        layer = OneTripRedisChannelLayer(**{**CONFIG, "expiry": 7})
        channel = f"test-layer-{uuid.uuid4().hex}"
        await layer.send(channel, {"type": "m"})
        await layer.close_pools()
        return layer.prefix + channel

    key = run(main())
    assert 0 < client.ttl(key) <= 7
    client.delete(key)


def test_a_send_is_one_redis_command_even_after_the_script_cache_is_flushed():
    client = redis.Redis.from_url(settings.REDIS_URL)

    async def main(count: int):
        layer = OneTripRedisChannelLayer(**CONFIG)
        channel = f"test-layer-{uuid.uuid4().hex}"
        for i in range(count):
            await layer.send(channel, {"type": "m", "n": i})
        received = [(await layer.receive(channel))["n"] for _ in range(count)]
        await layer.close_pools()
        return received

    client.script_flush()  # the first send finds no script: it loads it (EVAL) and the rest use EVALSHA
    assert run(main(3)) == [0, 1, 2]
    assert client.script_exists(SEND_SCRIPT_SHA) == [True]
    before = client.info("commandstats")
    assert run(main(20)) == list(range(20))
    after = client.info("commandstats")

    def calls(stats, command):
        return stats.get(f"cmdstat_{command}", {}).get("calls", 0)

    assert calls(after, "evalsha") - calls(before, "evalsha") == 20  # one round trip a send, not four
    assert calls(after, "zadd") - calls(before, "zadd") >= 20  # run inside the script, and counted there
