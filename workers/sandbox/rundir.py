"""Where gVisor's run bundles live: one private directory per node, and no bundle outlives its run.

A bundle holds one run's OCI spec (the user's command is in its config.json) and runsc's state.
Bundles live in `<model_cache_dir>/sandbox/`, created 0700 and owned by the worker's user, not in
the shared temp dir. Each is named after the process running it (`mp-gvisor-<pid>-<start>-<random>`,
start = the process's start time, so a reused pid is not taken for its owner) and removed when the
run ends. A process that is SIGKILLed mid-run cannot remove its own: the first run of each process
on a directory (the probe at worker start) removes every bundle whose process is gone, or that is
older than any run can be. Pool processes and other workers may share the directory: the bundles
of live processes are left alone.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

from marketplace.tasks.params import MAX_TIMEOUT_S
from workers.sandbox.base import SandboxUnavailable

logger = logging.getLogger(__name__)

# No run lasts this long: its wall clock is capped at MAX_TIMEOUT_S, and the hard time limit kills
# the worker process before. Covers an owner that looks alive but is not (a pid of another pid
# namespace sharing the directory).
STALE_AFTER_S = 2 * MAX_TIMEOUT_S
_BUNDLE_NAME = re.compile(r"^mp-[a-z]+-(\d+)-(\d+)-[^-]+$")

_cleaned: set[str] = set()
_lock = threading.Lock()


def default_run_dir() -> Path:
    """`<model_cache_dir>/sandbox`: the node's own directory, where no other local user can write."""
    from marketplace.settings import get_settings

    return Path(os.path.expanduser(str(get_settings().model_cache_dir))) / "sandbox"


def prepare(root: Path) -> Path:
    """`root` as a 0700 directory of ours; on its first use in this process, without stale bundles."""
    _ensure_private(root)
    with _lock:
        if str(root) not in _cleaned:
            remove_stale(root)
            _cleaned.add(str(root))
    return root


def new_bundle(root: Path, kind: str) -> str:
    """A fresh, empty bundle directory for one run of this process (mode 0700)."""
    pid = os.getpid()
    return tempfile.mkdtemp(prefix=f"mp-{kind}-{pid}-{_start_time(pid)}-", dir=prepare(root))


def remove_stale(root: Path) -> list[str]:
    """Remove the bundles in `root` whose process is gone or that are too old; return their names."""
    removed = []
    now = time.time()
    for entry in os.scandir(root):
        match = _BUNDLE_NAME.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # its owner (or another cleaner) removed it just now
            continue
        if age < STALE_AFTER_S and _alive(int(match[1]), int(match[2])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.name)
    if removed:
        logger.info("sandbox: removed %d bundle(s) left by runs that died in %s", len(removed), root)
    return removed


def _ensure_private(root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise SandboxUnavailable(f"sandbox: {root} must be a directory owned by uid {os.geteuid()}")
    if stat.S_IMODE(info.st_mode) != 0o700:  # made before, or by hand, with other bits
        os.chmod(root, 0o700)


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return None


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0


def _alive(pid: int, start: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and int(fields[19]) == start and fields[0] not in (b"Z", b"X")
