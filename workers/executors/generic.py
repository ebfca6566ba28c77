"""`generic`: the user's command in a sandbox; each item one JSON line in, one JSON line out."""
from __future__ import annotations

from typing import Any

from marketplace.settings import get_settings
from marketplace.tasks.params import MAX_MEMORY_MB, MAX_TIMEOUT_S, MIN_MEMORY_MB
from workers.executors.base import ExecContext, ExecutionError, Stopped
from workers.sandbox import Limits, Sandbox, SandboxError, SandboxStopped, SandboxUnavailable, get_sandbox


class GenericExecutor:
    name = "generic"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def warmup(self) -> None:
        """Raise SandboxUnavailable when this node has no working sandbox (it then refuses `generic`)."""
        _sandbox().check()

    def run(self, items: list[Any], params: dict[str, Any], ctx: ExecContext) -> list[Any]:
        command = _command(params)
        limits = _limits(params)
        limits.stop_requested = ctx.stop_requested
        try:
            results = _sandbox().run(command, items, limits)
        except SandboxStopped as err:  # its task ended: the sandbox and every process in it are gone
            raise Stopped(str(err)) from err
        except SandboxUnavailable as err:
            raise ExecutionError(f"generic: no sandbox on this node: {err}", retryable=False) from err
        except SandboxError as err:
            raise ExecutionError(str(err), retryable=False) from err
        return [result.value if result.ok else {"error": result.error} for result in results]


def _sandbox() -> Sandbox:
    return get_sandbox(get_settings().sandbox)


def _command(params: dict[str, Any]) -> list[str]:
    command = params.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command):
        raise ExecutionError("params.command must be a non-empty list of strings")
    if any("\0" in arg for arg in command):
        raise ExecutionError("params.command must not contain NUL characters")
    return command


def _limits(params: dict[str, Any]) -> Limits:
    timeout_s = params.get("timeout_s", 10)
    if not _is_number(timeout_s) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ExecutionError(f"params.timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    memory_mb = params.get("memory_mb", 256)
    if not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or not MIN_MEMORY_MB <= memory_mb <= MAX_MEMORY_MB:
        raise ExecutionError(f"params.memory_mb must be an integer in [{MIN_MEMORY_MB}, {MAX_MEMORY_MB}]")
    return Limits(timeout_s=min(float(timeout_s), _wall_clock_cap()), memory_mb=memory_mb)


def _wall_clock_cap() -> float:
    """The sandbox's wall clock must run out before Celery's soft limit (the catalog's time_limit,
    counted from the task's start): at `timeout_s` = time_limit the soft limit came first, was
    taken for a crash and retried, and a command that hangs ran four times."""
    from marketplace.catalog import get_catalog

    limit = get_catalog().time_limit("generic")
    return limit - max(1.0, min(10.0, limit * 0.05))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value
