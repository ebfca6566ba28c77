"""The supervisor loop and the host's process tree: what bwrap and gVisor runs share.

The supervisor feeds stdin, reads stdout (bounded) and stderr (its tail only),
enforces the wall clock, and asks the backend for a usage sample (tasks, CPU
seconds) a few times a second, so limits the kernel cannot report to us (a fork
bomb at its cap, CPU spread over many processes) still end the run with a clear
message. The process tree is read from /proc, to sample and to kill a run's
processes (pids checked against their start time, so a reused pid is never hit).
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.sandbox.base import (
    STDERR_TAIL_BYTES,
    Limits,
    Outcome,
    SandboxError,
    SandboxStopped,
    Usage,
    with_tail,
)

logger = logging.getLogger(__name__)
SAMPLE_INTERVAL_S = 0.1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- host process tree -------------------------------------------------------------------


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    start: int  # start time in clock ticks; tells a reused pid apart
    threads: int
    cpu_s: float  # own and reaped children's user + system time
    comm: str


def scan_processes() -> dict[int, ProcInfo]:
    """Every process on the host (about a millisecond per hundred processes)."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        head, _, rest = raw.rpartition(b")")
        fields = rest.split()
        pid = int(entry.name)
        procs[pid] = ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            start=int(fields[19]),
            threads=int(fields[17]),
            cpu_s=sum(int(x) for x in fields[11:15]) / _CLK_TCK,
            comm=head.partition(b"(")[2].decode("utf-8", "replace"),
        )
    return procs


def descendants(root: int, procs: dict[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """`root` and everything below it, parents before children."""
    procs = scan_processes() if procs is None else procs
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        if pid in procs:
            found.append(procs[pid])
            queue.extend(children.get(pid, []))
    return found


def kill_tree(root: int, *, timeout_s: float = 3.0) -> list[int]:
    """SIGKILL `root`'s whole tree; return the pids still alive after `timeout_s` (should be none).

    The tree is frozen with SIGSTOP until a rescan finds nothing new, so a fork bomb
    cannot outrun the kill and no child is orphaned out of sight before it dies.
    """
    stopped: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fresh = [p for p in descendants(root) if stopped.get(p.pid) != p.start]
        if not fresh:
            break
        for info in fresh:
            _signal(info.pid, signal.SIGSTOP)
            stopped[info.pid] = info.start
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        procs = scan_processes()
        alive = [
            pid
            for pid, start in stopped.items()
            if pid != root and pid in procs and procs[pid].start == start and process_state(pid) != "Z"
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_state(pid: int) -> str:
    """The one-letter /proc state of `pid` (R, S, Z, ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0].decode()
    except OSError:
        return "gone"


# --- the supervisor loop -----------------------------------------------------------------


def supervise(
    proc: subprocess.Popen,
    payload: bytes,
    limits: Limits,
    *,
    sample: Callable[[], Usage],
    terminate: Callable[[], None],
) -> Outcome:
    """Feed `proc`, collect its output, enforce `limits`; raise SandboxError when one is hit.

    `terminate` must stop the whole sandbox; the tree is SIGKILLed afterwards anyway.
    """
    started = time.monotonic()
    deadline = started + limits.timeout_s
    stdout = bytearray()
    stderr = bytearray()
    selector = selectors.DefaultSelector()
    assert proc.stdin and proc.stdout and proc.stderr
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
    selector.register(proc.stdout, selectors.EVENT_READ)
    selector.register(proc.stderr, selectors.EVENT_READ)
    view = memoryview(payload)
    if view:
        selector.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    next_sample = started
    failure: str | None = None
    stopped = False
    try:
        while failure is None:
            now = time.monotonic()
            if now >= deadline:
                failure = f"sandbox: wall time limit of {limits.timeout_s:g}s exceeded"
                break
            if now >= next_sample:
                failure = _check_usage(sample(), limits)
                next_sample = now + SAMPLE_INTERVAL_S
                if failure is None and limits.stop_requested is not None and limits.stop_requested():
                    failure, stopped = "stopped: its task ended", True
                if failure:
                    break
            if not selector.get_map():
                if proc.poll() is not None:
                    break
                time.sleep(min(SAMPLE_INTERVAL_S, max(0.0, deadline - now)))
                continue
            for key, _ in selector.select(timeout=min(SAMPLE_INTERVAL_S, max(0.0, deadline - now))):
                if key.fileobj is proc.stdin:
                    view = _feed(proc, selector, view)
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    stdout += chunk
                    if len(stdout) > limits.max_output_bytes:
                        failure = f"sandbox: output exceeded {limits.max_output_bytes} bytes"
                        break
                else:
                    stderr += chunk
                    del stderr[:-STDERR_TAIL_BYTES]
        if failure is not None:
            _stop(proc, terminate)
            _drain(proc, stderr)
            raise (SandboxStopped if stopped else SandboxError)(with_tail(failure, _tail(stderr)))
        return Outcome(returncode=proc.wait(), stdout=bytes(stdout), stderr_tail=_tail(stderr))
    finally:
        selector.close()
        if proc.poll() is None:
            _stop(proc, terminate)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream and not stream.closed:
                stream.close()


def _feed(proc: subprocess.Popen, selector: selectors.BaseSelector, view: memoryview) -> memoryview:
    assert proc.stdin
    try:
        written = os.write(proc.stdin.fileno(), view[:65536])
    except BlockingIOError:
        return view
    except BrokenPipeError:
        # The command stopped reading; its exit status and output tell the rest.
        written = len(view)
    view = view[written:]
    if not view:
        selector.unregister(proc.stdin)
        proc.stdin.close()
    return view


def _check_usage(usage: Usage, limits: Limits) -> str | None:
    if usage.tasks is not None and usage.tasks >= limits.max_procs:
        return f"sandbox: process limit of {limits.max_procs} reached"
    if usage.cpu_s is not None and usage.cpu_s > limits.cpu_limit_s:
        return f"sandbox: CPU time limit of {limits.cpu_limit_s:g}s exceeded"
    return None


def _stop(proc: subprocess.Popen, terminate: Callable[[], None]) -> None:
    try:
        terminate()
    except Exception:  # the tree kill below still runs
        logger.exception("sandbox: backend terminate failed for pid %s", proc.pid)
    # Give the sandbox's own pid 1 / runsc the chance to reap its children, so
    # nothing is orphaned to the host's init; SIGKILL the tree only if it lingers.
    if not _exited(proc.pid, timeout_s=2.0):
        left = kill_tree(proc.pid)
        if left:
            logger.error("sandbox: processes %s survived SIGKILL", left)
    proc.kill()
    proc.wait()


def _exited(pid: int, *, timeout_s: float) -> bool:
    """Whether our child `pid` has exited, without reaping it (so its pid cannot be reused)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None or time.monotonic() > deadline:
            return info is not None
        time.sleep(0.01)


def _drain(proc: subprocess.Popen, stderr: bytearray) -> None:
    """Keep what the dead command last wrote to stderr (its pipe is at EOF or near it)."""
    assert proc.stderr
    if proc.stderr.closed:
        return
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            chunk = os.read(proc.stderr.fileno(), 65536)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except OSError:
            return
        if not chunk:
            return
        stderr += chunk
        del stderr[:-STDERR_TAIL_BYTES]


def _tail(stderr: bytearray) -> str:
    return bytes(stderr[-STDERR_TAIL_BYTES:]).decode("utf-8", "replace")
