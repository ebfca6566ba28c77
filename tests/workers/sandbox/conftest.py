"""Sandbox fixtures: each real sandbox in turn, and a tag that proves a run left nothing behind."""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from workers.sandbox import get_sandbox, rundir
from workers.sandbox.supervise import process_state, scan_processes


@pytest.fixture(params=["gvisor", "bwrap"])
def sandbox(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    box = get_sandbox(request.param)
    box.check()  # fails (not skips) when the sandbox does not work here
    return box


@pytest.fixture()
def marker(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A unique tag; after the test no live process may carry it, descend from us, or be a gVisor
    stub, and no child of ours may be left unreaped."""
    # runsc bundles go under tmp_path, so its host processes carry the tag in argv too.
    monkeypatch.setattr(rundir, "default_run_dir", lambda: tmp_path / "sandbox")
    tag = f"mp-test-{uuid.uuid4().hex[:12]}"
    before = {(p.pid, p.start) for p in scan_processes().values()}
    yield tag
    deadline = time.monotonic() + 1.0
    while True:
        left = _leftovers(tag, str(tmp_path), before)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == [], f"sandboxed processes outlived the run: {left}"


def _leftovers(tag: str, tmp: str, before: set[tuple[int, int]]) -> list[str]:
    procs = scan_processes()
    mine = {os.getpid()}
    changed = True
    while changed:  # our descendants
        new = {p.pid for p in procs.values() if p.ppid in mine} - mine
        changed = bool(new)
        mine |= new
    found = []
    for info in procs.values():
        if info.pid == os.getpid() or (info.pid, info.start) in before:
            continue
        if process_state(info.pid) in ("Z", "X", "gone") and info.ppid != os.getpid():
            continue  # dead; only a zombie we failed to reap counts
        cmdline = _cmdline(info.pid)
        stub = info.comm == "exe" and _uid(info.pid) == 65534 and not _of_another_run(info, procs, tmp)  # gVisor
        if info.pid in mine or tag in cmdline or tmp in cmdline or stub:
            found.append(f"{info.pid} {info.comm} {cmdline[:120]}")
    return found


def _of_another_run(info, procs, tmp: str) -> bool:  # type: ignore[no-untyped-def]
    """A gVisor stub under a runsc whose state lives in another test run's tmp (a suite running
    beside this one); a stub whose runsc is gone (orphaned: a leak) is not."""
    seen: set[int] = set()
    while info is not None and info.pid not in seen and info.pid > 1:
        seen.add(info.pid)
        cmdline = _cmdline(info.pid)
        if "--root=" in cmdline and tmp not in cmdline:
            return True
        info = procs.get(info.ppid)
    return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1
