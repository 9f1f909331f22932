"""The embedded Redis of `make run` and a quick restart: a socket that still answers belongs to the previous
server (still draining, its Redis stops last). Unlinking it let that Redis, on its way out, delete the new
server's socket file: the new Redis alive but unreachable, every request a 503 until a manual restart."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from millm_site.embedded_redis import clear_socket, embedded_redis_child, redis_reachable
from millm_site.env import SettingError


def start_redis(socket_path):
    child = embedded_redis_child(socket_path)
    process = subprocess.Popen(child.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not redis_reachable(f"unix://{socket_path}", timeout_s=0.2):
        assert time.monotonic() < deadline and process.poll() is None, "redis did not start"
        time.sleep(0.05)
    return process


def test_a_live_socket_is_left_alone_and_refused(tmp_path):
    socket_path = tmp_path / "redis.sock"
    other = start_redis(socket_path)
    try:
        with pytest.raises(SettingError, match="another miLLM server is running"):
            clear_socket(socket_path, wait_s=0.5)
        assert redis_reachable(f"unix://{socket_path}")  # the other server's Redis still answers
    finally:
        other.terminate()
        other.wait(10)


def test_a_quick_restart_waits_for_the_previous_redis_then_binds_its_own(tmp_path):
    socket_path = tmp_path / "redis.sock"
    previous = start_redis(socket_path)
    stopper = threading.Timer(0.5, previous.terminate)  # the previous server finishing its drain
    stopper.start()
    try:
        clear_socket(socket_path, wait_s=10)
        previous.wait(10)
        ours = start_redis(socket_path)
        try:
            time.sleep(0.3)
            assert redis_reachable(f"unix://{socket_path}")  # nobody removed our socket on the way out
        finally:
            ours.terminate()
            ours.wait(10)
    finally:
        stopper.cancel()
        if previous.poll() is None:
            previous.kill()


def test_a_stale_socket_of_a_killed_server_is_removed(tmp_path):
    socket_path = tmp_path / "redis.sock"
    socket_path.write_text("")  # what a kill -9 leaves: a file nobody answers on
    clear_socket(socket_path, wait_s=5)
    assert not socket_path.exists()
