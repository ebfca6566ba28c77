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
- Memory: a cgroup per run (`cgroup`), so `memory_mb` bounds all the run's processes and its
  tmpfs together; bwrap is started inside it, so nothing it forks escapes. A node without usable
  cgroups falls back to RLIMIT_AS per process, and says so at start (`hardening()`).
- A seccomp filter (`seccomp`), installed by bwrap just before it execs the command, answers
  EPERM to ptrace, mount, unshare/setns, keyctl, bpf, perf_event_open, module loading, kexec,
  reboot and the like.
- The command is not in any argv on the host: bwrap reads all its arguments from a memfd
  (`--args FD`), so the host's process list shows `bwrap --args N` for bwrap and its pid 1
  inside. The command's own process is a host process, though, and shows its own argv
  (only gVisor hides it; see README, Security).
- rlimits are applied inside by `prlimit` (util-linux) just before the command:
  NPROC = max_procs (+1 for bwrap's pid 1, which the count includes), CPU (backstop; the
  supervisor sums CPU over all processes), FSIZE, NOFILE, CORE = 0, and AS = memory_mb only
  where there is no cgroup.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from typing import Any

import workers.sandbox.cgroup as cgroups
import workers.sandbox.seccomp as seccomp
from workers.sandbox.base import (
    SANDBOX_ENV,
    SANDBOX_UID,
    SETPRIV,
    ItemResult,
    Limits,
    ProbedSandbox,
    SandboxError,
    SandboxStopped,
    Usage,
    classify_failure,
    decode_outputs,
    encode_items,
    host_entries,
    oom_message,
    with_tail,
)
from workers.sandbox.supervise import descendants, supervise

logger = logging.getLogger(__name__)
PRLIMIT = "/usr/bin/prlimit"
COMMAND_FILE = "/run/marketplace/command"
_UNSET: Any = object()


class BwrapSandbox(ProbedSandbox):
    name = "bwrap"

    def __init__(
        self,
        bwrap: str | None = None,
        *,
        memory_cgroups: cgroups.MemoryCgroups | str = _UNSET,
        seccomp_program: bytes | str = _UNSET,
    ) -> None:
        """`memory_cgroups` and `seccomp_program` (or why there is none) are found here unless given."""
        super().__init__()
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        self._memory_cgroups = memory_cgroups
        self._seccomp_program = seccomp_program

    def memory_cgroups(self) -> cgroups.MemoryCgroups | str:
        if self._memory_cgroups is _UNSET:
            self._memory_cgroups = cgroups.discover()
        return self._memory_cgroups

    def seccomp_program(self) -> bytes | str:
        if self._seccomp_program is _UNSET:
            self._seccomp_program = seccomp.program()
        return self._seccomp_program

    def hardening(self) -> dict[str, str]:
        """How memory is bounded and which system calls are filtered here, in words (node facts)."""
        found = self.memory_cgroups()
        program = self.seccomp_program()
        return {
            "memory": found.describe() if isinstance(found, cgroups.MemoryCgroups)
            else f"RLIMIT_AS per process, NOT the whole run: {found}",
            "seccomp": f"{len(seccomp.DENIED)} system calls denied" if isinstance(program, bytes)
            else f"NONE: {program}",
        }

    def _probe(self) -> str | None:
        if not os.access(self.bwrap, os.X_OK):
            return f"bwrap: {self.bwrap} not found (install the Debian package bubblewrap)"
        if not os.access(PRLIMIT, os.X_OK):
            return f"bwrap: {PRLIMIT} not found (install util-linux)"
        if os.geteuid() == 0 and not os.access(SETPRIV, os.X_OK):
            return f"bwrap: {SETPRIV} not found (install util-linux)"
        try:
            results = self._run(["/bin/sh", "-c", 'read line; echo "$line"'], ["ping"], Limits(timeout_s=30))
        except (SandboxError, OSError) as err:
            return f"bwrap: a trivial command failed (are unprivileged user namespaces allowed?): {err}"
        if results != [ItemResult(ok=True, value="ping")]:
            return f"bwrap: a trivial command answered {results!r}"
        if not isinstance(self.memory_cgroups(), cgroups.MemoryCgroups):
            logger.warning("sandbox bwrap: no cgroup for the runs, memory_mb bounds each process's address "
                           "space only (RLIMIT_AS), not the whole run: %s", self.memory_cgroups())
        if not isinstance(self.seccomp_program(), bytes):
            logger.warning("sandbox bwrap: user commands run WITHOUT a seccomp filter: %s", self.seccomp_program())
        return None

    def _run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        found = self.memory_cgroups()
        run_cgroup = found.create(limits.memory_bytes) if isinstance(found, cgroups.MemoryCgroups) else None
        program = self.seccomp_program()
        fds: list[int] = []
        try:
            if isinstance(program, bytes):
                fds.append(seccomp.memfd(program, "mp-seccomp"))
            # The command reaches the sandbox as a script in a memfd, bwrap's other arguments in
            # another (`--args`): none of it is in an argv on the host, where every local user
            # reads it (`ps`). bwrap cannot take the command itself from --args.
            fds.append(seccomp.memfd(self._script(command, limits, cgroup=run_cgroup is not None), "mp-command"))
            args = self._args(limits, seccomp_fd=fds[0] if isinstance(program, bytes) else None, script_fd=fds[-1])
            fds.append(seccomp.memfd(b"".join(arg.encode() + b"\0" for arg in args), "mp-bwrap-args"))
            argv = [self.bwrap, "--args", str(fds[-1]), "--", "/bin/sh", COMMAND_FILE]
            if os.geteuid() == 0:
                # bwrap runs as uid 65534 (see the module docstring); setpriv drops to it after
                # the process has joined its cgroup, which needs root.
                drop = [SETPRIV, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--"]
                argv = drop + argv
            if run_cgroup is not None:
                argv = run_cgroup.enter_argv() + argv
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                pass_fds=fds,
                cwd="/",
                # bwrap is pid 1 inside, as the sandbox's uid, and its /proc/1/environ is readable there:
                # with the worker's environment it handed user code the JWT secret, the database URL and
                # the store's keys (`--clearenv` clears only the command's). It needs none of it.
                env=dict(SANDBOX_ENV),
            )
            for fd in fds:  # bwrap has its copies
                os.close(fd)
            fds.clear()
            try:
                outcome = supervise(
                    proc,
                    encode_items(items),
                    limits,
                    sample=lambda: _sample(proc.pid),
                    terminate=lambda: _kill_namespace(proc.pid),
                )
            except SandboxStopped:
                raise
            except SandboxError as err:  # a process killed for memory can look like a hang or an exit
                if run_cgroup is not None and run_cgroup.oom_killed():
                    raise SandboxError(f"{oom_message(limits)}; then {err}") from err
                raise
            if run_cgroup is not None and run_cgroup.oom_killed():
                raise SandboxError(with_tail(oom_message(limits), outcome.stderr_tail))
        finally:
            for fd in fds:
                os.close(fd)
            if run_cgroup is not None:
                run_cgroup.remove()
        failure = classify_failure(outcome, limits, len(items))
        if failure:
            raise SandboxError(with_tail(failure, outcome.stderr_tail))
        return decode_outputs(outcome, len(items))

    def _script(self, command: list[str], limits: Limits, *, cgroup: bool) -> bytes:
        """What /bin/sh runs inside: prlimit, then the command (quoted for a POSIX shell)."""
        cpu = int(limits.cpu_limit_s) + 1
        argv = [PRLIMIT]
        if not cgroup:  # the cgroup bounds the whole run; without one, each process's address space
            argv.append(f"--as={limits.memory_bytes}")
        argv += [
            f"--nproc={limits.max_procs + 1}",
            f"--cpu={cpu}",
            f"--fsize={limits.memory_bytes}",
            "--nofile=512",
            "--core=0",
            "--",
            *command,
        ]
        return f"exec {shlex.join(argv)}\n".encode()

    def _args(self, limits: Limits, *, seccomp_fd: int | None, script_fd: int) -> list[str]:
        """bwrap's options (read from a file descriptor, not its argv)."""
        args = [
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
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        for entry in host_entries():
            if entry.kind == "symlink":
                args += ["--symlink", entry.target, entry.path]
            else:
                args += ["--ro-bind", entry.path, entry.path]
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            # Sized: --dev's /dev/shm is a tmpfs as large as half the host's memory.
            "--size", str(limits.memory_bytes), "--perms", "1777", "--tmpfs", "/dev/shm",
            # --dev's /dev is such a tmpfs too, and writable: a job of 16 MB put 1,200 MB there.
            # Read-only (not recursive: /dev/shm stays writable, the device nodes stay usable).
            "--remount-ro", "/dev",
            "--size", str(limits.memory_bytes), "--perms", "1777", "--tmpfs", "/tmp",
            "--ro-bind-data", str(script_fd), COMMAND_FILE,
            "--remount-ro", "/",
            "--chdir", "/tmp",
            "--clearenv",
        ]  # fmt: skip
        for key, value in SANDBOX_ENV.items():
            args += ["--setenv", key, value]
        return args


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
