"""`bwrap`: the command runs in fresh Linux namespaces set up by bubblewrap.

- All namespaces are new (`--unshare-all`): no network but loopback, own pid
  space (bwrap is pid 1 inside; when it dies the kernel kills everything in the
  sandbox), `--die-with-parent`, `--new-session` (no TIOCSTI into our terminal).
- The root is a tmpfs holding read-only binds of /usr, the lib links and a few
  /etc files; /dev (bwrap's minimal one) is read-only; /tmp and /dev/shm are
  private tmpfs of `memory_mb` each, the only places a job can write; `--clearenv`, and
  bwrap itself starts with `SANDBOX_ENV` only (it is pid 1 inside: its environ is readable).
- No further user namespaces (`--disable-userns`).
- When the worker is root, bwrap itself is started as uid 65534: RLIMIT_NPROC
  is never enforced for host uid 0, and under a user namespace created by root
  the inner uid maps back to 0. Started unprivileged, bwrap makes its own user
  namespace, and since Linux 5.14 RLIMIT_NPROC is counted per (namespace, uid),
  so concurrent sandboxes do not share one process budget.
- rlimits are applied inside by `prlimit` (util-linux) just before the command:
  AS = memory_mb, NPROC = max_procs (+1 for bwrap's pid 1, which the count
  includes), CPU (backstop; the supervisor sums CPU over all processes), FSIZE,
  NOFILE, CORE = 0.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Any

from workers.sandbox.base import (
    SANDBOX_ENV,
    SANDBOX_UID,
    ItemResult,
    Limits,
    ProbedSandbox,
    SandboxError,
    Usage,
    classify_failure,
    decode_outputs,
    encode_items,
    host_entries,
    with_tail,
)
from workers.sandbox.supervise import descendants, supervise

PRLIMIT = "/usr/bin/prlimit"


class BwrapSandbox(ProbedSandbox):
    name = "bwrap"

    def __init__(self, bwrap: str | None = None) -> None:
        super().__init__()
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"

    def _probe(self) -> str | None:
        if not os.access(self.bwrap, os.X_OK):
            return f"bwrap: {self.bwrap} not found (install the Debian package bubblewrap)"
        if not os.access(PRLIMIT, os.X_OK):
            return f"bwrap: {PRLIMIT} not found (install util-linux)"
        try:
            results = self._run(["/bin/sh", "-c", 'read line; echo "$line"'], ["ping"], Limits(timeout_s=30))
        except (SandboxError, OSError) as err:
            return f"bwrap: a trivial command failed (are unprivileged user namespaces allowed?): {err}"
        if results != [ItemResult(ok=True, value="ping")]:
            return f"bwrap: a trivial command answered {results!r}"
        return None

    def _run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        drop = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if os.geteuid() == 0 else {}
        proc = subprocess.Popen(
            self._argv(command, limits),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            # bwrap is pid 1 inside, as the sandbox's uid, and its /proc/1/environ is readable there:
            # with the worker's environment it handed user code the JWT secret, the database URL and
            # the store's keys (`--clearenv` clears only the command's). It needs none of it.
            env=dict(SANDBOX_ENV),
            **drop,
        )
        outcome = supervise(
            proc,
            encode_items(items),
            limits,
            sample=lambda: _sample(proc.pid),
            terminate=lambda: _kill_namespace(proc.pid),
        )
        failure = classify_failure(outcome, limits, len(items))
        if failure:
            raise SandboxError(with_tail(failure, outcome.stderr_tail))
        return decode_outputs(outcome, len(items))

    def _argv(self, command: list[str], limits: Limits) -> list[str]:
        argv = [
            self.bwrap,
            "--unshare-all",
            # No user namespaces inside: `unshare -Ur` made the command root of one (mounts and
            # the kernel's namespaced code within reach).
            "--unshare-user", "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID),
            "--hostname", "sandbox",
            "--cap-drop", "ALL",
        ]  # fmt: skip
        for entry in host_entries():
            if entry.kind == "symlink":
                argv += ["--symlink", entry.target, entry.path]
            else:
                argv += ["--ro-bind", entry.path, entry.path]
        argv += [
            "--proc", "/proc",
            "--dev", "/dev",
            # Sized: --dev's /dev/shm is a tmpfs as large as half the host's memory.
            "--size", str(limits.memory_bytes), "--perms", "1777", "--tmpfs", "/dev/shm",
            # --dev's /dev is such a tmpfs too, and writable: a job of 16 MB put 1,200 MB there.
            # Read-only (not recursive: /dev/shm stays writable, the device nodes stay usable).
            "--remount-ro", "/dev",
            "--size", str(limits.memory_bytes), "--perms", "1777", "--tmpfs", "/tmp",
            "--remount-ro", "/",
            "--chdir", "/tmp",
            "--clearenv",
        ]  # fmt: skip
        for key, value in SANDBOX_ENV.items():
            argv += ["--setenv", key, value]
        cpu = int(limits.cpu_limit_s) + 1
        argv += [
            "--",
            PRLIMIT,
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.max_procs + 1}",
            f"--cpu={cpu}",
            f"--fsize={limits.memory_bytes}",
            "--nofile=512",
            "--core=0",
            "--",
            *command,
        ]
        return argv


def _sample(root: int) -> Usage:
    tree = descendants(root)
    # Neither bwrap (outside, and pid 1 inside) counts against the command's tasks.
    tasks = sum(p.threads for p in tree if p.pid != root and p.ppid != root)
    return Usage(tasks=tasks, cpu_s=sum(p.cpu_s for p in tree))


def _kill_namespace(root: int) -> None:
    """SIGKILL bwrap's pid 1 inside: the kernel then kills every process in the sandbox."""
    for info in descendants(root):
        if info.ppid == root:
            try:
                os.kill(info.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
