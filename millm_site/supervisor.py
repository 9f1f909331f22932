"""Runs web, inference and worker as child processes, restarts the ones that die, stops them all.

`make run` uses it with an embedded Redis; production runs one container per process instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("millm.supervisor")


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str], cwd: str | None) -> None:
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops children in order.
        self.process = subprocess.Popen(self.argv, env=env, cwd=cwd, start_new_session=True)
        log.info("child_started", child=self.name, pid=self.process.pid)


class Supervisor:
    max_restarts_per_minute = 5

    def __init__(self, children: list[Child], *, cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self.children = children
        self.cwd = cwd
        self.env = dict(env or os.environ)
        self.stopping = False

    def run(self, *, on_started=None) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        for child in self.children:
            child.start(self.env, self.cwd)
        if on_started:
            on_started()
        try:
            while not self.stopping:
                self._restart_exited()
                time.sleep(0.25)
        finally:
            self.stop_all()
        return 0

    def _request_stop(self, signum, frame) -> None:
        self.stopping = True

    def _restart_exited(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > self.max_restarts_per_minute:
                log.error("child_failing", child=child.name, exit_code=child.process.returncode)
                self.stopping = True
                return
            log.warning("child_exited_restarting", child=child.name, exit_code=child.process.returncode)
            child.start(self.env, self.cwd)

    def stop_all(self, *, grace_s: float = 10.0) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("children_stopped", count=len(running))


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
