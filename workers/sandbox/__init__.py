"""Sandboxes that run user commands for the `generic` model (DESIGN.md §5).

`get_sandbox(name)` picks the backend named by the `sandbox` setting; a node
without one refuses `generic` (`sandbox_status` says why at worker start).
"""
from __future__ import annotations

import threading

from workers.sandbox.base import ItemResult, Limits, Sandbox, SandboxError, SandboxStopped, SandboxUnavailable

NAMES = ("gvisor", "bwrap", "docker")
_instances: dict[str, Sandbox] = {}
_lock = threading.Lock()


def get_sandbox(name: str | None) -> Sandbox:
    """The process-wide sandbox called `name` ("gvisor" | "bwrap" | "docker")."""
    if name in (None, "", "none"):
        raise SandboxUnavailable("no sandbox configured (set MARKETPLACE_SANDBOX=gvisor|bwrap|docker)")
    if name not in NAMES:
        raise SandboxUnavailable(f"unknown sandbox {name!r} (set MARKETPLACE_SANDBOX=gvisor|bwrap|docker)")
    with _lock:
        if name not in _instances:
            _instances[name] = _build(name)
        return _instances[name]


def _build(name: str) -> Sandbox:
    if name == "gvisor":
        from workers.sandbox.gvisor import GVisorSandbox

        return GVisorSandbox()
    if name == "bwrap":
        from workers.sandbox.bwrap import BwrapSandbox

        return BwrapSandbox()
    from marketplace.settings import get_settings
    from workers.sandbox.docker import DockerSandbox

    settings = get_settings()
    return DockerSandbox(image=getattr(settings, "docker_image", None), runtime=settings.docker_runtime)


def sandbox_status(name: str | None) -> tuple[bool, str]:
    """(usable, why) for the sandbox called `name`; runs a trivial command once per process."""
    try:
        get_sandbox(name).check()
    except SandboxUnavailable as err:
        return False, str(err)
    return True, f"{name} sandbox ready"


def reset_sandboxes() -> None:
    """Forget built sandboxes and their cached checks (tests change the settings)."""
    with _lock:
        _instances.clear()


__all__ = [
    "ItemResult",
    "Limits",
    "Sandbox",
    "SandboxError",
    "SandboxStopped",
    "SandboxUnavailable",
    "get_sandbox",
    "reset_sandboxes",
    "sandbox_status",
]
