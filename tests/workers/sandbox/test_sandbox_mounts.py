"""No writable place inside a sandbox holds more than the job's memory_mb.

Each writable place is host memory (a tmpfs): under bubblewrap `/dev` was one with no size of
ours (the kernel's default, half the host's memory), and a job of `memory_mb: 16` put 1,200 MB
there. The command below looks for every directory it can create a file in (every mount point,
the top of the tree and of /dev, the usual scratch places, its cwd and HOME) and fills each with
more than memory_mb, in files under the per-file limit (RLIMIT_FSIZE = memory_mb), as an attacker
would. With a memory cgroup per run, what the tmpfs hold is the run's memory, so that fill ends
the run for memory; without one, each tmpfs stops at its own size.
"""
from __future__ import annotations

import pytest

from tests.workers.sandbox.sandbox_support import py
from workers.sandbox import Limits, SandboxError
from workers.sandbox.cgroup import MemoryCgroups

FILL = r"""
import json, os, sys

CHUNK = b"x" * 2**20
FILE_MB = 8  # several files: one alone stops at RLIMIT_FSIZE
SCRATCH = ["/", "/dev", "/dev/shm", "/dev/pts", "/dev/mqueue", "/tmp", "/var/tmp", "/run", "/run/lock",
           "/var/lock", "/home", "/root", "/mnt", "/opt", "/srv", "/sys/fs/cgroup"]


def candidates():
    found = set(SCRATCH) | {os.getcwd(), os.environ.get("HOME", "/"), os.environ.get("TMPDIR", "/tmp")}
    with open("/proc/self/mounts") as f:
        found |= {line.split()[1].replace("\\040", " ") for line in f}
    for parent in ("/", "/dev", "/etc", "/usr", "/var", "/run"):
        try:  # os.scandir: coreutils ls fails under this gVisor release
            found |= {e.path for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)}
        except OSError:
            pass
    # /proc and /sys hold kernel files, not storage; their mount points above are still tried.
    return sorted(p for p in found if os.path.isdir(p) and not p.startswith(("/proc/", "/sys/")))


def fill(path, target):
    written, index = 0, 0
    while written < target:
        try:
            fd = os.open(os.path.join(path, f".fill-{index}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            return written, err.strerror, index
        try:
            for _ in range(FILE_MB):
                written += os.write(fd, CHUNK)
        except OSError as err:
            return written, err.strerror, index + 1
        finally:
            os.close(fd)
        index += 1
    return written, None, index


for line in sys.stdin:
    target = json.loads(line)
    writable = {}
    for path in candidates():
        written, error, files = fill(path, target)
        if files:  # a file could be created here
            writable[path] = [written, error]
    dev = []
    with open("/dev/null", "wb") as f:
        dev.append(f.write(b"x"))
    for name in ("/dev/zero", "/dev/urandom", "/dev/random"):
        with open(name, "rb") as f:
            dev.append(len(f.read(16)))
    print(json.dumps({"writable": writable, "dev": dev}), flush=True)
"""


def test_every_writable_place_holds_at_most_memory_mb(sandbox, marker: str) -> None:  # type: ignore[no-untyped-def]
    limits = Limits(timeout_s=60, memory_mb=64, cpu_s=60)
    target = limits.memory_bytes + 16 * 2**20  # past the limit; the same tmpfs reached twice stays full
    counted = sandbox.name == "bwrap" and _has_cgroup(sandbox)
    if counted:
        # A tmpfs's pages are the run's memory: filling past memory_mb ends the run for memory.
        # (gVisor's cgroup allows runsc's own overhead on top: there /tmp fills up first.)
        with pytest.raises(SandboxError, match="memory limit of 64 MB exceeded"):
            sandbox.run(py(FILL, marker), [target], limits)
        # Where a job can write at all, each place a quarter full.
        target = limits.memory_bytes // 4
    [result] = sandbox.run(py(FILL, marker), [target], limits)
    assert result.ok, result
    writable, dev = result.value["writable"], result.value["dev"]

    # Where a job can write at all: the private /tmp (cwd, HOME and TMPDIR), and under bubblewrap
    # /dev/shm (gVisor's is part of its read-only /dev). /dev itself is read-only in both.
    for path, (written, error) in writable.items():
        assert written <= limits.memory_bytes, f"{path} took {written >> 20} MB from a job of 64 MB: {writable}"
        assert error == (None if counted else "No space left on device"), (path, error)
    expected = {"/tmp"} if sandbox.name == "gvisor" else {"/tmp", "/dev/shm"}
    assert set(writable) == expected, writable
    # The fill really reaches its target (a fill that stopped early would prove nothing).
    assert writable["/tmp"][0] >= min(target, limits.memory_bytes - 4 * 2**20), writable
    # A read-only /dev still has the devices programs use.
    assert dev == [1, 16, 16, 16]


def _has_cgroup(sandbox) -> bool:  # type: ignore[no-untyped-def]
    return isinstance(sandbox.memory_cgroups(), MemoryCgroups)
