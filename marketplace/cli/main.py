"""The `marketplace` command."""
from __future__ import annotations

import os
import shutil
import sys

import click

# Long-running commands that log and trace in this very process (api, worker, standalone exec or spawn).
OBSERVED_COMMANDS = {"grpc", "bridge"}


@click.group()
@click.version_option(package_name="marketplace")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Marketplace: a distributed AI task marketplace on Celery."""
    if ctx.invoked_subcommand in OBSERVED_COMMANDS:
        from marketplace import observability

        observability.init_process(ctx.invoked_subcommand)


@main.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="heads", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from marketplace.infra import migrate

    migrate.upgrade(revision=revision)
    click.echo(f"database upgraded to {revision}")


@db.command("downgrade")
@click.option("--revision", default="-1", show_default=True)
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION."""
    from marketplace.infra import migrate

    migrate.downgrade(revision=revision)


@db.command("current")
def db_current() -> None:
    """Show the applied revision."""
    from marketplace.infra import migrate

    migrate.current()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", "num_workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
@click.option("--threads", default=4, show_default=True, type=int,
              help="request threads per worker (open event streams have threads of their own)")
def api(host: str, port: int, num_workers: int, threads: int) -> None:
    """Serve the REST API with gunicorn."""
    from marketplace.settings import get_settings

    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or shutil.which("gunicorn")
    if not gunicorn:
        raise click.ClickException("gunicorn is not installed")
    # gthread: an open event stream (`GET /v1/tasks/<id>/events`) holds one thread of its worker
    # for as long as it is open, asleep on its inbox (`events.feed`): a parked thread costs a
    # little memory and no CPU. Each worker gets `--threads` for requests plus one per stream it
    # may hold (MARKETPLACE_EVENT_STREAMS_PER_WORKER; one more is refused with 503), so streams
    # never take the threads that serve POST /v1/tasks. Not gevent: it is not installed, and it
    # would need psycopg2, redis, Celery's publisher and the OpenTelemetry exporters all made
    # cooperative (monkey-patching, psycogreen) for one endpoint that sleeps.
    streams = max(0, get_settings().event_streams_per_worker)
    args = [
        gunicorn, "--bind", f"{host}:{port}", "--workers", str(num_workers), "--threads", str(threads + streams),
        "--worker-connections", str(max(1000, 4 * (threads + streams))),
        "--worker-class", "gthread", "--no-control-socket", "--access-logfile", "-",
        "--config", "python:api.gunicorn_conf", "api.wsgi:app",
    ]
    from marketplace.observability.metrics import prepare_server_multiprocess_dir

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prepare_server_multiprocess_dir("marketplace-api-"))
    os.execv(gunicorn, args)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--queues", "-Q", default=None, help="comma-separated queues (default: every queue)")
@click.option("--concurrency", "-c", default=2, show_default=True, type=int)
@click.option("--credentials", default=None, type=click.Path(exists=True, dir_okay=False),
              help="a node credential (`marketplace nodes enroll`): run as a provider's node, from it alone")
@click.pass_context
def worker(ctx: click.Context, queues: str | None, concurrency: int, credentials: str | None) -> None:
    """Run a Celery worker (shorthand for `celery -A marketplace worker`)."""
    from marketplace.catalog import CONTROL_QUEUES, get_catalog

    celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or "celery"
    if credentials:
        from marketplace.cli.nodes import node_worker_command

        args, env = node_worker_command(credentials, queues=queues, concurrency=concurrency, celery=celery)
        os.execve(celery, [*args, *ctx.args], env)
    queues = queues or ",".join(list(CONTROL_QUEUES) + get_catalog().queues)
    os.execv(celery, [celery, "-A", "marketplace", "worker", "-Q", queues, "-c", str(concurrency), "-E", *ctx.args])


@main.command()
@click.option("--stall-seconds", type=click.FloatRange(min=0), default=None,
              help="act on tasks that have not moved for this long (default MARKETPLACE_RECOVERY_STALL_SECONDS; "
                   "0: now, e.g. right after a node died)")
def recover(stall_seconds: float | None) -> None:
    """Re-drive tasks that stopped moving (lost messages, dead nodes, a flushed Redis).

    Each line counts tasks (their ids follow)."""
    from marketplace.scheduling.recovery import not_yet_stalled_on_dead_nodes, recover_stalled
    from marketplace.settings import get_settings

    settings = get_settings()
    if stall_seconds is not None:
        settings.recovery_stall_seconds = stall_seconds
    report = recover_stalled()

    def line(kind: str, ids: list[str]) -> str:
        return f"{kind}: {len(ids)}" + (f" ({', '.join(ids[:10])}{' …' if len(ids) > 10 else ''})" if ids else "")

    for kind, ids in report.items():
        click.echo(line(kind, ids))
    waiting = not_yet_stalled_on_dead_nodes()
    if waiting:
        click.echo(line("waiting on a dead node", waiting))
        click.echo(f"  their subtasks run on nodes with no heartbeat; they are re-sent once the task has not moved "
                   f"for {settings.recovery_stall_seconds:g} s (`marketplace recover --stall-seconds 0`: now)")


@main.command()
@click.option("--port", default=8000, show_default=True, type=int, help="REST API port")
@click.option("--grpc-port", default=50051, show_default=True, type=int)
@click.option("--flower-port", default=5555, show_default=True, type=int)
@click.option("--data-dir", default=".marketplace", show_default=True, type=click.Path(file_okay=False))
@click.option("--concurrency", default=2, show_default=True, type=int, help="worker pool size")
@click.option("--no-compute", is_flag=True,
              help="the control plane only (API, gRPC, scheduler and results queues, beat, Flower): every "
                   "subtask runs on nodes that providers enroll")
def standalone(port: int, grpc_port: int, flower_port: int, data_dir: str, concurrency: int, no_compute: bool
               ) -> None:
    """Everything on one machine: embedded PostgreSQL and Redis unless their URLs are set."""
    from marketplace.cli.standalone import Standalone

    Standalone(
        port=port, grpc_port=grpc_port, flower_port=flower_port, data_dir=data_dir, concurrency=concurrency,
        compute=not no_compute,
    ).run()


from marketplace.cli.models import models as _models  # noqa: E402

main.add_command(_models)

from marketplace.cli.user import COMMANDS as _user_commands  # noqa: E402

for _command in _user_commands:
    main.add_command(_command)

from marketplace.cli.bridge import bridge_command as _bridge  # noqa: E402
from marketplace.cli.grpc import grpc_command as _grpc  # noqa: E402

main.add_command(_grpc)
main.add_command(_bridge)

from marketplace.cli.audit import audit as _audit  # noqa: E402
from marketplace.cli.nodes import nodes as _nodes  # noqa: E402

main.add_command(_nodes)

main.add_command(_audit)

from marketplace.cli.worker_check import worker_check as _worker_check  # noqa: E402

main.add_command(_worker_check)


if __name__ == "__main__":  # pragma: no cover
    main()
