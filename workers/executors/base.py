"""What every model executor looks like."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class ExecutionError(Exception):
    """A subtask cannot produce its outputs.

    `retryable` errors (a flaky dependency) are retried with backoff by
    `workers.run_subtask`; the others fail the subtask at once.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Stopped(Exception):
    """The subtask's task ended while it ran and its run was stopped (`ExecContext.stop_requested`)."""


@dataclass
class ExecContext:
    """What an executor may need besides its items."""

    task_id: str
    subtask_id: str
    user_id: str
    device: str  # cpu | gpu
    store: Any = None  # marketplace.infra.storage.ObjectStore
    extra: dict[str, Any] = field(default_factory=dict)
    # Whether the task ended while this runs: an executor that can stop midway (a sandbox) asks
    # it now and then and raises Stopped; the others run to their end.
    stop_requested: Callable[[], bool] = lambda: False


class Executor(Protocol):
    name: str

    def warmup(self) -> None:
        """Load weights once per worker process (called from worker_process_init); an executor
        whose class sets `preload = True` also runs one small inference, and raises when it
        cannot load: its node then refuses the model, saying why."""

    def run(self, items: list[Any], params: dict[str, Any], ctx: ExecContext) -> list[Any]:
        """Return exactly one output per item, in order; raise ExecutionError to fail the subtask."""


# Pool processes on this node, recorded by `workers.node` at worker_init (before the fork).
POOL_SIZE = 1


def configure_torch_threads() -> int:
    """Split the cores between the pool processes: each PyTorch defaulting to every core
    makes N processes fight over them (measured: half the throughput at -c 2 on 2 cores)."""
    import os

    import torch

    from marketplace.settings import get_settings

    threads = get_settings().torch_threads or max(1, (os.cpu_count() or 1) // max(1, POOL_SIZE))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
