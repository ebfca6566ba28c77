"""The standalone's restart backoff (the restart itself: tests/ops/test_standalone.py)."""
from __future__ import annotations

from pathlib import Path

from marketplace.cli.children import Child, describe_exit


def test_restart_delay_doubles_to_30s_and_starts_over_once_the_child_ran_a_minute(tmp_path: Path) -> None:
    child = Child("worker", ["true"], tmp_path / "worker.log")
    child.started_at = 100.0
    assert [child.schedule_restart(100.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert child.restart_at == 130.5 and not child.due(130.4) and child.due(130.5)
    child.started_at = 200.0
    assert child.schedule_restart(260.0) == 1  # it had stayed up 60 s
    child.started_at = 261.0  # restarted, and dead again at once
    assert child.schedule_restart(261.5) == 2


def test_exit_codes_name_the_signal() -> None:
    assert describe_exit(-9) == "-9 (SIGKILL)"
    assert describe_exit(-15) == "-15 (SIGTERM)"
    assert describe_exit(1) == "1"
