"""WebSockets: a foreign Origin is always refused; with MILLM_API_KEY set the key (header or session) is needed."""

import asyncio

import pytest
from channels.testing import WebsocketCommunicator

from millm_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

STREAMS = ["/ws/monitor/", "/ws/system/", "/ws/progress/"]


def connects(path: str, headers: list[tuple[bytes, bytes]]) -> bool:
    async def attempt() -> bool:
        ws = WebsocketCommunicator(application, path, headers=[(b"host", b"testserver"), *headers])
        connected, _ = await ws.connect(timeout=5)
        await ws.disconnect()
        return connected

    return asyncio.run(attempt())


@pytest.mark.parametrize("path", STREAMS)
def test_no_key_means_refused(keyed, path):
    assert not connects(path, [])
    assert not connects(path, [(b"origin", b"http://testserver")])
    assert not connects(path, [(b"authorization", b"Bearer wrong")])


@pytest.mark.parametrize("path", STREAMS)
def test_the_key_by_header_is_accepted(keyed, path):
    assert connects(path, [(b"authorization", f"Bearer {keyed}".encode())])
    assert connects(path, [(b"x-api-key", keyed.encode())])


def test_a_logged_in_browser_session_is_accepted(logged_in, settings):
    cookie = f"{settings.SESSION_COOKIE_NAME}={logged_in.cookies[settings.SESSION_COOKIE_NAME].value}"
    assert connects("/ws/monitor/", [(b"origin", b"http://testserver"), (b"cookie", cookie.encode())])


def test_a_foreign_origin_is_refused_even_with_the_key(keyed):
    assert not connects("/ws/monitor/", [(b"origin", b"http://evil.example"),
                                         (b"authorization", f"Bearer {keyed}".encode())])


def test_without_a_key_it_stays_open_to_same_origin_and_programs(settings):
    settings.MILLM_API_KEY = ""
    assert connects("/ws/progress/", [])
    assert connects("/ws/progress/", [(b"origin", b"http://testserver")])
    assert not connects("/ws/progress/", [(b"origin", b"http://evil.example")])
    settings.MILLM_ALLOWED_ORIGINS = ["http://ui.example:3000"]
    assert connects("/ws/progress/", [(b"origin", b"http://ui.example:3000")])
