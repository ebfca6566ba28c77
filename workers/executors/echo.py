"""`echo`: every item comes back unchanged."""
from __future__ import annotations

import time
from typing import Any

from marketplace.tasks.params import MAX_SLEEP_S
from workers.executors.base import ExecContext


class EchoExecutor:
    name = "echo"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def warmup(self) -> None:
        return None

    def run(self, items: list[Any], params: dict[str, Any], ctx: ExecContext) -> list[Any]:
        # `fail_items` lets tests and demos provoke a deterministic failure.
        fail = params.get("fail_items") or []
        for item in items:
            if item in fail:
                from workers.executors.base import ExecutionError

                raise ExecutionError(f"echo: item {item!r} is listed in params.fail_items", retryable=True)
        # `sleep_s` (per item) keeps a subtask running, e.g. to kill its worker mid-run. Not
        # sleep(0): that still gives up the CPU, ~5% of a pool child's samples in a fan-out.
        pause = min(MAX_SLEEP_S, max(0.0, float(params.get("sleep_s") or 0))) * len(items)
        if pause > 0:
            time.sleep(pause)
        return list(items)
