"""A memory cgroup per sandbox run: `memory_mb` bounds everything the run holds, all processes together.

RLIMIT_AS bounds each process's address space, so four processes of 0.6 × memory_mb each
fitted, and a program that reserves address space it never touches (Go, Java, a calloc'd
buffer) failed although it used little. A cgroup counts what the run really holds: every
process's resident memory, and what it writes to its tmpfs /tmp and /dev/shm.

Where the node's cgroups are:
- cgroup v2 (the unified hierarchy): under the worker's own cgroup, in `marketplace-sandboxes/`
  with the memory controller enabled. A non-root cgroup that holds processes cannot enable a
  controller for its children ("no internal processes"), so when the worker's cgroup does, its
  processes are first moved to a leaf `marketplace-node/` beside it (what container runtimes do
  in a delegated cgroup). Each run gets `memory.max` = the limit, no swap, and
  `memory.oom.group` = 1 (the OOM killer stops the whole run, not one process of it).
- cgroup v1 (a `memory` hierarchy, as on hybrid hosts): the same tree under the worker's own
  memory cgroup, `memory.limit_in_bytes` (and `memsw`, when swap accounting is on).
- Neither writable (no root, no delegation, no memory controller): `discover()` says why; the
  sandboxes then fall back to RLIMIT_AS per process and say so at node start (log and the
  node's heartbeat facts), never silently.

A run's processes enter its cgroup before the sandbox starts: the backend's argv is prefixed by
a shell that writes its own pid to `cgroup.procs` and execs the rest, so nothing the sandbox
forks escapes it. After the run the counter `oom_kill` tells whether the kernel killed a process
for memory; the backend then fails the run naming the memory limit.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SANDBOXES = "marketplace-sandboxes"
NODE_LEAF = "marketplace-node"
_lock = threading.Lock()
_found: dict[str, MemoryCgroups | str] = {}


@dataclass(frozen=True)
class RunCgroup:
    """One run's cgroup."""

    path: Path
    version: int

    def enter_argv(self) -> list[str]:
        """Prefix for the sandbox's argv: join this cgroup, then exec the rest (no user data here)."""
        return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer stopped a process of this run."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return False
        counters = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        return any(int(counters.get(key, "0")) > 0 for key in ("oom_kill", "oom_group_kill"))

    def remove(self) -> None:
        """Remove the (now empty) cgroup; a process still in it is killed first."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    logger.warning("sandbox: could not remove cgroup %s: %s", self.path, err)
                    return
            _kill_members(self.path, self.version)
            time.sleep(0.02)


class MemoryCgroups:
    """Where this node makes its runs' cgroups."""

    def __init__(self, base: Path, version: int) -> None:
        self.base = base
        self.version = version

    def describe(self) -> str:
        return f"cgroup v{self.version} per run under {self.base}"

    def create(self, limit_bytes: int) -> RunCgroup:
        pid = os.getpid()
        path = self.base / f"mp-{pid}-{_start_time(pid)}-{uuid.uuid4().hex[:8]}"
        path.mkdir(mode=0o700)
        cgroup = RunCgroup(path, self.version)
        try:
            if self.version == 2:
                _write(path / "memory.max", str(limit_bytes))
                _write(path / "memory.swap.max", "0", optional=True)
                _write(path / "memory.oom.group", "1", optional=True)
            else:
                _write(path / "memory.limit_in_bytes", str(limit_bytes))
                _write(path / "memory.memsw.limit_in_bytes", str(limit_bytes), optional=True)
                _write(path / "memory.swappiness", "0", optional=True)
        except OSError:
            cgroup.remove()
            raise
        return cgroup

    def remove_stale(self) -> list[str]:
        """Remove run cgroups whose process is gone (a worker killed mid-run leaves its own)."""
        removed = []
        for entry in os.scandir(self.base):
            parts = entry.name.split("-")
            if len(parts) != 4 or parts[0] != "mp" or not entry.is_dir(follow_symlinks=False):
                continue
            if _alive(int(parts[1]), int(parts[2])):
                continue
            RunCgroup(Path(entry.path), self.version).remove()
            removed.append(entry.name)
        return removed


def discover(mountinfo: str = "/proc/self/mountinfo", own: str = "/proc/self/cgroup") -> MemoryCgroups | str:
    """This node's run cgroups, or why there are none (once per process)."""
    with _lock:
        if own not in _found:
            _found[own] = _discover(mountinfo, own)
            found = _found[own]
            if isinstance(found, MemoryCgroups):
                try:
                    removed = found.remove_stale()
                except OSError:
                    removed = []
                if removed:
                    logger.info("sandbox: removed %d cgroup(s) left by runs that died", len(removed))
        return _found[own]


def _discover(mountinfo: str, own: str) -> MemoryCgroups | str:
    try:
        mounts = _cgroup_mounts(mountinfo)
        memberships = _memberships(own)
    except OSError as err:
        return f"cannot read the process's cgroups: {err}"
    reasons = []
    v2_mount = next((m for m in mounts if m[0] == "cgroup2"), None)
    if v2_mount is not None and "" in memberships:
        found = _prepare_v2(_inside(v2_mount, memberships[""]))
        if isinstance(found, MemoryCgroups):
            return found
        reasons.append(found)
    v1_mount = next((m for m in mounts if m[0] == "cgroup" and "memory" in m[3]), None)
    if v1_mount is not None and "memory" in memberships:
        found = _prepare_v1(_inside(v1_mount, memberships["memory"]))
        if isinstance(found, MemoryCgroups):
            return found
        reasons.append(found)
    if not reasons:
        reasons.append("no cgroup hierarchy with a memory controller is mounted")
    return "; ".join(reasons)


def _prepare_v2(own: Path) -> MemoryCgroups | str:
    try:
        if "memory" not in (own / "cgroup.controllers").read_text().split():
            return f"cgroup v2 {own} has no memory controller (delegate it to the worker)"
        if "memory" not in (own / "cgroup.subtree_control").read_text().split():
            try:
                _write(own / "cgroup.subtree_control", "+memory")
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise
                _move_processes(own, own / NODE_LEAF)
                _write(own / "cgroup.subtree_control", "+memory")
        base = own / SANDBOXES
        base.mkdir(mode=0o755, exist_ok=True)
        if "memory" not in (base / "cgroup.subtree_control").read_text().split():
            _write(base / "cgroup.subtree_control", "+memory")
    except OSError as err:
        return f"cgroup v2 {own} is not usable for sandboxes: {err}"
    return _usable(MemoryCgroups(base, 2))


def _prepare_v1(own: Path) -> MemoryCgroups | str:
    base = own / SANDBOXES
    try:
        base.mkdir(mode=0o755, exist_ok=True)
    except OSError as err:
        return f"cgroup v1 memory {own} is not usable for sandboxes: {err}"
    return _usable(MemoryCgroups(base, 1))


def _usable(cgroups: MemoryCgroups) -> MemoryCgroups | str:
    """Make and remove one run cgroup: a hierarchy that looks fine may still refuse writes."""
    try:
        cgroups.create(64 << 20).remove()
    except OSError as err:
        return f"cannot create a cgroup under {cgroups.base}: {err}"
    return cgroups


def _move_processes(source: Path, leaf: Path) -> None:
    """Move every process of `source` to `leaf`, so `source` may enable controllers for its children."""
    leaf.mkdir(mode=0o755, exist_ok=True)
    for _ in range(5):  # processes forked meanwhile land in `source` again
        pids = (source / "cgroup.procs").read_text().split()
        if not pids:
            break
        for pid in pids:
            try:
                _write(leaf / "cgroup.procs", pid)
            except ProcessLookupError:
                pass
    logger.warning("sandbox: moved the processes of cgroup %s to %s to enable the memory controller", source, leaf)


def _kill_members(path: Path, version: int) -> None:
    if version == 2 and (path / "cgroup.kill").exists():
        _write(path / "cgroup.kill", "1", optional=True)
        return
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, PermissionError):
            pass


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root inside the hierarchy, mount point, super options) of each cgroup mount."""
    found = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], set(fields[sep + 3].split(","))
            if fstype in ("cgroup", "cgroup2"):
                found.append((fstype, fields[3], fields[4], options))
    return found


def _memberships(own: str) -> dict[str, str]:
    """{controller: path} from /proc/self/cgroup; "" is the unified (v2) hierarchy."""
    out: dict[str, str] = {}
    with open(own, encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                out[name] = path
    return out


def _inside(mount: tuple[str, str, str, set[str]], path: str) -> Path:
    """The directory of cgroup `path` under a mount whose root is `mount[1]`."""
    root, point = mount[1], mount[2]
    relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return Path(point) if relative in (".", "") else Path(point) / relative


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        if not optional:
            raise


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int, start: int) -> bool:
    return _start_time(pid) == start != 0


def reset() -> None:
    """Forget what discover() found (tests)."""
    with _lock:
        _found.clear()
