"""`gvisor`: the command runs under gVisor's user-space kernel (`runsc`, ptrace platform).

What works on the Debian `runsc` package (release 20221219) as root, and why this is
`runsc run` with a bundle we write rather than `runsc do`:

- `runsc do` puts a writable in-memory overlay over the whole host root and runs
  the command as root; it has no way to pass rlimits. A bundle lets us give a
  read-only root holding only /usr, the lib links and a few /etc files, a private
  tmpfs /tmp, uid 65534, no capabilities and rlimits in `process.rlimits`.
- Flags: `--network=none` (only loopback inside), `--platform=ptrace` (no KVM
  here; also the default), `--ignore-cgroups` (runsc makes no cgroups of its own:
  this release has no total-memory flag, so `runsc run` is started inside the run's
  memory cgroup from `cgroup`, limit memory_mb + RUNSC_OVERHEAD_MB, and the sentry,
  gofer and stubs that hold the command's memory are counted there), and a
  private `--root` state directory per run so concurrent runs never share state.
  `--rootless` is not used: runsc needs root for a bundle like this one, and
  check() reports a worker that is not root as unavailable.
- Limits the sentry enforces from the spec: RLIMIT_AS only where there is no
  cgroup (allocation fails with ENOMEM / MemoryError), RLIMIT_NPROC (counts threads too, like Linux),
  RLIMIT_FSIZE, RLIMIT_NOFILE. RLIMIT_CPU is accepted but NOT enforced by this
  release, so the supervisor sums the host CPU time of the sandbox's processes
  (sentry, gofer and ptrace stubs, which run the application code) instead.
- Tasks inside are not host processes; the supervisor counts them with
  `runsc ps` (about 20 ms) every few samples.
- Stopping: `runsc kill --all <id> KILL`, then the supervisor SIGKILLs the host
  tree (the sandbox is started `--attached`, so it dies with `runsc run`, and
  `runsc run` gets SIGKILL through `setpriv --pdeathsig` if the worker dies).
- Bundles (the user's command is in config.json) live in the node's 0700 run
  directory, named after the process running them; `rundir` removes those a
  killed worker left behind.
- Inside, coreutils `ls` of a directory fails with EINVAL under this release
  (Python's os.listdir and the shell work); nothing here depends on it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import workers.sandbox.cgroup as cgroups
import workers.sandbox.rundir as rundir
from workers.sandbox.base import (
    SANDBOX_ENV,
    SANDBOX_UID,
    SETPRIV,
    ItemResult,
    Limits,
    ProbedSandbox,
    SandboxError,
    SandboxStopped,
    SandboxUnavailable,
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

RUNSC_FLAGS = ("--network=none", "--platform=ptrace", "--ignore-cgroups")
# `runsc run` outlives a worker that is SIGKILLed (hard time limit, OOM) unless the
# kernel kills it with its parent; the sandbox it starts `--attached` follows it.
# What runsc's own processes (sentry, gofer, ptrace stubs) hold beside the command's memory,
# measured with a shell inside: ~45 MB at the cgroup's peak. The run's cgroup allows memory_mb
# plus this much.
RUNSC_OVERHEAD_MB = 64
_UNSET: Any = object()
_PS_INTERVAL_S = 0.3


class GVisorSandbox(ProbedSandbox):
    name = "gvisor"

    def __init__(
        self,
        runsc: str | None = None,
        run_dir: Path | None = None,
        *,
        memory_cgroups: cgroups.MemoryCgroups | str = _UNSET,
    ) -> None:
        super().__init__()
        self.runsc = runsc or shutil.which("runsc") or "/usr/bin/runsc"
        self.run_dir = run_dir  # None: rundir.default_run_dir(), read at each run
        self._memory_cgroups = memory_cgroups

    def memory_cgroups(self) -> cgroups.MemoryCgroups | str:
        if self._memory_cgroups is _UNSET:
            self._memory_cgroups = cgroups.discover()
        return self._memory_cgroups

    def hardening(self) -> dict[str, str]:
        """How memory is bounded here, in words (node facts); system calls meet gVisor's own kernel."""
        found = self.memory_cgroups()
        return {
            "memory": f"{found.describe()} (memory_mb + {RUNSC_OVERHEAD_MB} MB for runsc itself)"
            if isinstance(found, cgroups.MemoryCgroups) else f"RLIMIT_AS per process, NOT the whole run: {found}",
            "seccomp": "gVisor's sentry serves the system calls (and runs under its own seccomp filter)",
        }

    def _bundles(self) -> Path:
        return self.run_dir or rundir.default_run_dir()

    def _probe(self) -> str | None:
        if not os.access(self.runsc, os.X_OK):
            return f"gvisor: {self.runsc} not found (install the Debian package runsc)"
        if not os.access(SETPRIV, os.X_OK):
            return f"gvisor: {SETPRIV} not found (install util-linux)"
        if os.geteuid() != 0:
            return "gvisor: runsc must run as root here"
        try:  # also removes the bundles of runs that died with their worker
            rundir.prepare(self._bundles())
        except (SandboxUnavailable, OSError) as err:
            return f"gvisor: no private directory for run bundles: {err}"
        try:
            results = self._run(["/bin/sh", "-c", 'read line; echo "$line"'], ["ping"], Limits(timeout_s=30))
        except (SandboxError, OSError) as err:
            return f"gvisor: a trivial command failed: {err}"
        if results != [ItemResult(ok=True, value="ping")]:
            return f"gvisor: a trivial command answered {results!r}"
        if not isinstance(self.memory_cgroups(), cgroups.MemoryCgroups):
            logger.warning("sandbox gvisor: no cgroup for the runs, memory_mb bounds each process's address "
                           "space only (RLIMIT_AS), not the whole run: %s", self.memory_cgroups())
        return None

    def _run(self, command: list[str], items: list[Any], limits: Limits) -> list[ItemResult]:
        found = self.memory_cgroups()
        run_cgroup = (
            found.create(limits.memory_bytes + RUNSC_OVERHEAD_MB * 1024 * 1024)
            if isinstance(found, cgroups.MemoryCgroups) else None
        )
        try:
            bundle = rundir.new_bundle(self._bundles(), "gvisor")
        except BaseException:
            if run_cgroup is not None:
                run_cgroup.remove()
            raise
        container_id = f"mp-{uuid.uuid4().hex[:16]}"
        state = os.path.join(bundle, "state")
        base = [self.runsc, "--root", state, *RUNSC_FLAGS]
        try:
            _write_bundle(bundle, command, limits, cgroup=run_cgroup is not None)
            argv = [SETPRIV, "--pdeathsig", "KILL", "--", *base, "run", "--bundle", bundle, container_id]
            if run_cgroup is not None:  # runsc, its sentry and gofer, and the stubs running the command
                argv = run_cgroup.enter_argv() + argv
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
            try:
                outcome = supervise(
                    proc,
                    encode_items(items),
                    limits,
                    sample=_Sampler(proc.pid, [*base, "ps", "-format=json", container_id]),
                    terminate=lambda: _kill_container(base, container_id),
                )
            except SandboxStopped:
                raise
            except SandboxError as err:  # the OOM killer takes the sentry: the run ends some other way
                if run_cgroup is not None and run_cgroup.oom_killed():
                    raise SandboxError(f"{oom_message(limits)}; then {err}") from err
                raise
            if run_cgroup is not None and run_cgroup.oom_killed():
                raise SandboxError(with_tail(oom_message(limits), outcome.stderr_tail))
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
            if run_cgroup is not None:
                run_cgroup.remove()
        failure = classify_failure(outcome, limits, len(items))
        if failure:
            raise SandboxError(with_tail(failure, outcome.stderr_tail))
        return decode_outputs(outcome, len(items))


class _Sampler:
    """Host CPU of the whole runsc tree every sample; the container's task count now and then."""

    def __init__(self, root: int, ps: list[str]) -> None:
        self.root = root
        self.ps = ps
        self.tasks: int | None = None
        self.next_ps = time.monotonic() + _PS_INTERVAL_S

    def __call__(self) -> Usage:
        cpu = sum(p.cpu_s for p in descendants(self.root))
        if time.monotonic() >= self.next_ps:
            self.tasks = self._count_tasks()
            self.next_ps = time.monotonic() + _PS_INTERVAL_S
        return Usage(tasks=self.tasks, cpu_s=cpu)

    def _count_tasks(self) -> int | None:
        try:
            done = subprocess.run(self.ps, capture_output=True, timeout=5, check=False)
            pids = json.loads(done.stdout or b"null")
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return self.tasks
        # Before the container exists (or after it ends) ps fails or prints nothing.
        return len(pids) if isinstance(pids, list) else self.tasks


def _kill_container(base: list[str], container_id: str) -> None:
    subprocess.run([*base, "kill", "--all", container_id, "KILL"], capture_output=True, timeout=5, check=False)


def _write_bundle(bundle: str, command: list[str], limits: Limits, *, cgroup: bool) -> None:
    rootfs = os.path.join(bundle, "rootfs")
    os.mkdir(rootfs)
    for name in ("proc", "dev", "sys", "tmp", "etc"):
        os.mkdir(os.path.join(rootfs, name))
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={limits.memory_mb}m"],
        },
    ]
    for entry in host_entries():
        inside = os.path.join(rootfs, entry.path.lstrip("/"))
        if entry.kind == "symlink":
            os.symlink(entry.target, inside)
            continue
        if entry.kind == "dir":
            os.makedirs(inside, exist_ok=True)
        else:
            open(inside, "w").close()
        mounts.append({"destination": entry.path, "type": "bind", "source": entry.path, "options": ["rbind", "ro"]})
    nproc = limits.max_procs
    cpu = int(limits.cpu_limit_s) + 1
    spec = {
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID},
            "args": list(command),
            "env": [f"{k}={v}" for k, v in SANDBOX_ENV.items()],
            "cwd": "/tmp",
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "noNewPrivileges": True,
            "rlimits": ([] if cgroup else [  # the run's cgroup bounds all of it; else each process
                {"type": "RLIMIT_AS", "soft": limits.memory_bytes, "hard": limits.memory_bytes},
            ]) + [
                {"type": "RLIMIT_NPROC", "soft": nproc, "hard": nproc},
                {"type": "RLIMIT_FSIZE", "soft": limits.memory_bytes, "hard": limits.memory_bytes},
                {"type": "RLIMIT_NOFILE", "soft": 512, "hard": 512},
                {"type": "RLIMIT_CPU", "soft": cpu, "hard": cpu},
                {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
            ],
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
