"""The standalone's child processes: started in a session of their own, restarted when they die."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

RESTART_FIRST_DELAY = 1.0  # seconds before the first restart; doubled after each quick death
RESTART_MAX_DELAY = 30.0
STABLE_AFTER = 60.0  # a child that ran this long before dying is restarted after the first delay again


def describe_exit(returncode: int) -> str:
    """`1`, or `-9 (SIGKILL)` for a child killed by a signal."""
    if returncode < 0:
        try:
            return f"{returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return str(returncode)


@dataclass
class Child:
    """One command the standalone keeps running, logging to `log`."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it waits out its backoff
    delay: float = RESTART_FIRST_DELAY

    def start(self) -> int:
        """Start it (again), appending to its log; its pid."""
        # 0600: what a child logs (accounts, tasks, errors) is for the operator only.
        with os.fdopen(os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            # A new session: a signal to its group reaches its own children (pool, gunicorn workers).
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})
        self.started_at = time.monotonic()
        self.restart_at = None
        return self.proc.pid

    def exited(self) -> int | None:
        """Its exit code once it has died (None while it runs or waits to be restarted)."""
        if self.proc is None or self.restart_at is not None:
            return None
        return self.proc.poll()

    def signal_group(self, signum: int) -> None:
        """Signal its whole process group: a dead worker's pool processes outlive it otherwise,
        holding its /metrics socket and running tasks nobody acknowledges."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def schedule_restart(self, now: float) -> float:
        """After a death: the delay before it starts again (doubling up to the cap, back to the first
        delay when it had stayed up a while)."""
        delay = RESTART_FIRST_DELAY if now - self.started_at >= STABLE_AFTER else self.delay
        self.delay = min(delay * 2, RESTART_MAX_DELAY)
        self.restart_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        return self.restart_at is not None and now >= self.restart_at
