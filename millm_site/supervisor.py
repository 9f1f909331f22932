"""Runs Redis, web, inference and worker as child processes, restarts the ones that die, stops them all.

`make run` uses it with an embedded Redis; production runs one container per process instead.

Kept hand-written (issue 9): it is small and does exactly what `make run` needs — Redis first and
answering before the others start, each child restarted on its own with a short backoff, Redis
stopped last, and the Linux parent-death signal so a `kill -9` of the supervisor leaves no child
holding the port. honcho (foreman's model) stops everything when one process exits instead of
restarting it; circus and supervisord are daemons with their own config, control socket and
processes, and neither ties a child's life to its parent's.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("millm.supervisor")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESTART_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # by exits in a row that came soon after a start
HEALTHY_AFTER_S = 10.0  # a child that ran this long is restarted at once when it exits


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """preexec_fn: the kernel kills the child when the supervisor dies, even by SIGKILL (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        # SIGKILL, not SIGTERM: without the supervisor nothing would wait for a slow drain, and a child
        # that survives keeps the port (daphne) or the GPU (inference).
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class Child:
    name: str
    argv: list[str]
    ready: Callable[[], bool] | None = None  # polled after a start (Redis: answers a ping)
    before_start: Callable[[], None] | None = None
    stop_last: bool = False  # the others still talk to it while they drain (Redis)
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None

    def start(self, env: dict[str, str], cwd: str | None) -> None:
        if self.before_start:
            self.before_start()
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops children in order.
        self.process = subprocess.Popen(self.argv, env=env, cwd=cwd, start_new_session=True,
                                        preexec_fn=_die_with_parent(os.getpid()))
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("child_started", child=self.name, pid=self.process.pid)

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.ready is not None and not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


class ChildFailedToStart(RuntimeError):
    pass


class Supervisor:
    def __init__(self, children: list[Child], *, cwd: str | None = None, env: dict[str, str] | None = None,
                 grace_s: float = 10.0) -> None:
        self.children = children
        self.cwd = cwd
        self.env = dict(env or os.environ)
        self.grace_s = grace_s
        self.stopping = False

    def run(self, *, on_started=None) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        try:
            for child in self.children:
                child.start(self.env, self.cwd)
                if not child.wait_ready(timeout_s=10):
                    raise ChildFailedToStart(f"{child.name} did not become ready (exit code {child.process.poll()})")
            if on_started:
                on_started()
            while not self.stopping:
                self._restart_exited()
                time.sleep(0.1)
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
            if child.restart_at is None:
                ran_s = now - child.started_at
                if ran_s >= HEALTHY_AFTER_S:
                    child.quick_exits = 0
                # A crash loop (e.g. a dependency still down) backs off instead of spinning or giving up.
                delay = RESTART_BACKOFF_S[min(child.quick_exits, len(RESTART_BACKOFF_S) - 1)]
                child.quick_exits += 1
                child.restart_at = now + delay
                log.warning("child_exited_restarting", child=child.name, exit_code=child.process.returncode,
                            ran_s=round(ran_s, 1), delay_s=delay)
            if now >= child.restart_at:
                child.start(self.env, self.cwd)

    def stop_all(self) -> None:
        first = [c.process for c in self.children if not c.stop_last]
        last = [c.process for c in self.children if c.stop_last]
        stopped = _terminate(first, grace_s=self.grace_s) + _terminate(last, grace_s=self.grace_s)
        log.info("children_stopped", count=stopped)


def _terminate(processes: list[subprocess.Popen | None], *, grace_s: float) -> int:
    """SIGTERM, wait up to grace_s for all of them together, then SIGKILL the rest."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return len(running)


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
