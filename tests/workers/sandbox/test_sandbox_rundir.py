"""gVisor's run bundles (the user's command is in their config.json) stay private and do not pile up.

Each SIGKILL of a worker left an `mp-gvisor-*` directory in the shared temp dir for good.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.wait import wait_until
from workers.sandbox import SandboxUnavailable
from workers.sandbox.gvisor import GVisorSandbox

ROOT = Path(__file__).resolve().parents[3]

# A worker's pool process: runs one sandboxed command that hangs, until it is SIGKILLed.
HANG = """
import sys
from pathlib import Path
from workers.sandbox import Limits
from workers.sandbox.gvisor import GVisorSandbox
GVisorSandbox(run_dir=Path(sys.argv[1])).run(
    ["/usr/bin/python3", "-c", "import time; time.sleep(120)", sys.argv[2]], [1], Limits(timeout_s=120))
"""


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[19].decode()


def _bundle_running(root: Path, marker: str) -> Path | None:
    for path in root.glob("mp-gvisor-*/config.json"):
        try:
            if marker in path.read_text():
                return path.parent
        except OSError:  # being written
            pass
    return None


def test_a_killed_runs_bundle_is_removed_at_the_next_start(tmp_path: Path, marker: str) -> None:
    root = tmp_path / "sandbox"
    root.mkdir(mode=0o755)  # made before by someone else's umask: it must end up private anyway
    os.chmod(root, 0o755)
    worker = subprocess.Popen([sys.executable, "-c", HANG, str(root), marker], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        bundle = wait_until(lambda: _bundle_running(root, marker), timeout=60, what="the run's bundle")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    assert bundle.name.startswith(f"mp-gvisor-{worker.pid}-"), bundle.name
    assert bundle.exists()  # nothing in the killed process could remove it

    # Beside it: a bundle of a process that is alive (this one: another pool process, another
    # worker sharing the directory), one older than any run can be, and something else entirely.
    live = Path(tempfile.mkdtemp(prefix=f"mp-gvisor-{os.getpid()}-{_start_time(os.getpid())}-", dir=root))
    old = Path(tempfile.mkdtemp(prefix=f"mp-gvisor-{os.getpid()}-{_start_time(os.getpid())}-", dir=root))
    hours_ago = time.time() - 3 * 3600
    os.utime(old, (hours_ago, hours_ago))
    reused = Path(tempfile.mkdtemp(prefix=f"mp-gvisor-{os.getpid()}-1-", dir=root))  # our pid, another start
    other = root / "notes"
    other.mkdir()

    GVisorSandbox(run_dir=root).check()  # the next worker's start probes its sandbox

    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, "notes"])
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert not reused.exists() and not old.exists() and not bundle.exists()


def test_each_run_removes_its_bundle(tmp_path: Path, marker: str) -> None:
    from workers.sandbox import ItemResult, Limits

    root = tmp_path / "sandbox"
    box = GVisorSandbox(run_dir=root)
    assert box.run(["/bin/cat"], [marker], Limits(timeout_s=30)) == [ItemResult(ok=True, value=marker)]
    assert list(root.iterdir()) == []


def test_a_run_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "sandbox"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)  # a local user made it first, to read or swap the bundles
    with pytest.raises(SandboxUnavailable, match=f"{root} must be a directory owned by uid 0"):
        GVisorSandbox(run_dir=root).check()
