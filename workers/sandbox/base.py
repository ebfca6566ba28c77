"""What every sandbox shares: the types, the JSON-lines protocol, failure messages, the host view.

A run starts the command once; each item goes in as one JSON line on stdin,
and the command answers one JSON line per item on stdout, in order. A line
that is not JSON is that item's error; fewer or more lines than items fail
the run, whatever the exit code. The loop that drives a run on this host
(bwrap, gVisor) is in `supervise`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 2048

# Seen on stderr when an allocation hits RLIMIT_AS (Python, glibc, C++, Go, Node).
_MEMORY_MARKERS = (
    "MemoryError",
    "Cannot allocate memory",
    "out of memory",
    "std::bad_alloc",
    "memory allocation failed",
    "failed to reserve",
)
# Seen on stderr when fork hits RLIMIT_NPROC. A thread that cannot start is left out:
# under RLIMIT_AS that is more often its stack than the task count.
_PROCESS_MARKERS = (
    "fork: Resource temporarily unavailable",
    "fork: retry",
    "BlockingIOError: [Errno 11]",
    "Cannot fork",
)


class SandboxUnavailable(Exception):
    """No usable sandbox here (binary missing, no privileges, no engine); the message says why."""


class SandboxError(Exception):
    """The whole run failed (a limit was hit or the sandbox crashed); the message includes the stderr tail."""


class SandboxStopped(SandboxError):
    """The run was stopped from outside (its task ended: cancelled, or failed elsewhere)."""


@dataclass
class Limits:
    """Per-run limits.

    `memory_mb` bounds the whole run, all its processes together: a cgroup per run
    under bwrap and gVisor (`cgroup`), the container's cgroup under docker. A node
    without usable cgroups falls back to RLIMIT_AS of each process (bwrap, gVisor),
    and says so at start. `max_procs` counts tasks (processes and
    threads), as RLIMIT_NPROC does; reaching it stops the run. `cpu_s` is summed
    over every process of the sandbox.
    """

    timeout_s: float = 10.0
    memory_mb: int = 256
    max_procs: int = 64
    max_output_bytes: int = 1_000_000
    cpu_s: float | None = None  # defaults to timeout_s
    # Asked a few times a second while the command runs; True stops it (the sandbox is killed).
    stop_requested: Callable[[], bool] | None = None

    @property
    def cpu_limit_s(self) -> float:
        return self.timeout_s if self.cpu_s is None else self.cpu_s

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * 1024 * 1024


@dataclass
class ItemResult:
    ok: bool
    value: Any = None
    error: str | None = None


class Sandbox(Protocol):
    name: str

    def check(self) -> None:
        """Raise SandboxUnavailable unless a trivial command really runs here (cached)."""

    def run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        """Run `command` once over `items`; one ItemResult per item, in order."""


class ProbedSandbox:
    """`check()` runs the backend's `_probe()` once per process (a failed probe is retried
    after 30 s, so installing the tool heals a running node); `run()` checks first."""

    RECHECK_AFTER_S = 30.0

    def __init__(self) -> None:
        import threading

        self._checked: tuple[float, str | None] | None = None
        self._lock = threading.Lock()

    def _probe(self) -> str | None:
        raise NotImplementedError

    def _run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        raise NotImplementedError

    def check(self) -> None:
        with self._lock:
            stale = self._checked is not None and self._checked[1] is not None and (
                time.monotonic() - self._checked[0] > self.RECHECK_AFTER_S)
            if self._checked is None or stale:
                self._checked = (time.monotonic(), self._probe())
        if self._checked[1]:
            raise SandboxUnavailable(self._checked[1])

    def run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        self.check()
        return self._run(command, items, limits)


@dataclass
class Usage:
    """One sample of what a running sandbox uses; None where the backend cannot tell."""

    tasks: int | None = None
    cpu_s: float | None = None


@dataclass
class Outcome:
    returncode: int
    stdout: bytes
    stderr_tail: str


def encode_items(items: list[Any]) -> bytes:
    """Items as JSON lines, the command's stdin."""
    return b"".join(json.dumps(item, ensure_ascii=False).encode() + b"\n" for item in items)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_outputs(outcome: Outcome, n_items: int) -> list[ItemResult]:
    """One ItemResult per item from the command's stdout (see the module docstring)."""
    lines = outcome.stdout.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) > n_items:
        raise SandboxError(
            with_tail(f"sandbox: command printed {len(lines)} lines for {n_items} items", outcome.stderr_tail)
        )
    if len(lines) < n_items:
        # Every item needs its line, whatever the exit code: a command that printed nothing and
        # exited 0 (a filter that drops everything, a fork bomb stopped at its cap) ended Done.
        # The user's command decides this, so running it again would print the same.
        raise SandboxError(with_tail(
            f"sandbox: the command printed {_count(len(lines), 'output line')} for {_count(n_items, 'item')}"
            f" and {describe_exit(outcome.returncode)}",
            outcome.stderr_tail,
        ))
    results = []
    for index, line in enumerate(lines):
        try:
            # parse_float: 1e999 overflows to inf, which the result would carry as `Infinity`
            # (not JSON); RecursionError: nesting past the parser's stack, which was retried as a crash.
            value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
        except RecursionError:
            results.append(ItemResult(ok=False, error=f"output line {index + 1} is nested too deeply"))
            continue
        except (UnicodeDecodeError, ValueError) as err:
            preview = line[:80].decode("utf-8", "replace")
            results.append(
                ItemResult(ok=False, error=f"output line {index + 1} is not valid JSON ({err}): {preview!r}")
            )
        else:
            results.append(ItemResult(ok=True, value=value))
    return results


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    if 128 < returncode <= 128 + 64:
        # bwrap and runsc report a child killed by a signal as 128 + signo.
        return f"exited with code {returncode} ({_signal_name(returncode - 128)})"
    return f"exited with code {returncode}"


def _signal_name(signo: int) -> str:
    try:
        return signal.Signals(signo).name
    except ValueError:
        return f"signal {signo}"


def _exit_signal(returncode: int) -> int | None:
    if returncode < 0:
        return -returncode
    if 128 < returncode <= 128 + 64:
        return returncode - 128
    return None


def with_tail(message: str, stderr_tail: str) -> str:
    tail = stderr_tail.strip()
    return f"{message}; stderr (last {STDERR_TAIL_BYTES} bytes):\n{tail}" if tail else message


def oom_message(limits: Limits) -> str:
    """A run whose cgroup's OOM killer fired: it held more than memory_mb, all processes together."""
    return f"sandbox: memory limit of {limits.memory_mb} MB exceeded (the kernel killed the run for memory)"


def classify_failure(outcome: Outcome, limits: Limits, n_items: int) -> str | None:
    """The limit that ended an incomplete run early, judged by its exit and stderr, if any."""
    if outcome.returncode == 0 or outcome.stdout.count(b"\n") >= n_items:
        return None
    sig = _exit_signal(outcome.returncode)
    if sig == signal.SIGXCPU:
        return f"sandbox: CPU time limit of {limits.cpu_limit_s:g}s exceeded"
    if sig == signal.SIGXFSZ:
        return f"sandbox: file size limit of {limits.memory_mb} MB exceeded"
    if any(marker in outcome.stderr_tail for marker in _MEMORY_MARKERS):
        return f"sandbox: memory limit of {limits.memory_mb} MB exceeded"
    if any(marker in outcome.stderr_tail for marker in _PROCESS_MARKERS):
        return f"sandbox: process limit of {limits.max_procs} reached"
    return None  # decode_outputs names the missing lines and the exit


# --- what the sandboxed command sees of the host --------------------------------------

# Read-only, and only what programs need to start: no /root, /home, /work, /var, /run.
_ROOT_ENTRIES = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "group",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "passwd",
    "ssl",
)
SANDBOX_UID = 65534  # nobody
SETPRIV = "/usr/bin/setpriv"
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    # glibc reserves 64 MB of address space per malloc arena; under RLIMIT_AS a
    # few threads would otherwise exhaust the limit without using any memory.
    "MALLOC_ARENA_MAX": "2",
}


@dataclass(frozen=True)
class HostEntry:
    path: str  # absolute path, the same inside and outside
    kind: str  # "symlink" | "dir" | "file"
    target: str = ""  # for symlinks


def host_entries() -> list[HostEntry]:
    """The host paths a sandbox exposes read-only, in mount order."""
    names = [f"/{name}" for name in _ROOT_ENTRIES]
    names += [f"/etc/{name}" for name in _ETC_ENTRIES]
    names += sorted(entry.path for entry in os.scandir("/etc") if entry.name.startswith("python3"))
    entries = []
    for path in names:
        if os.path.islink(path) and path.count("/") == 1:
            entries.append(HostEntry(path, "symlink", os.readlink(path)))
        elif os.path.isdir(path):
            entries.append(HostEntry(path, "dir"))
        elif os.path.isfile(path):
            entries.append(HostEntry(path, "file"))
    return entries
