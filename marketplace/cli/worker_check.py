"""`marketplace worker-check`: is this compute node alive? (a Kubernetes liveness exec probe)

A node is alive when both hold:
- its heartbeat is current: the registry record that its main process refreshes every
  MARKETPLACE_HEARTBEAT_INTERVAL from a thread (`registry.signals`) is younger than
  MARKETPLACE_HEARTBEAT_TTL. A stopped or wedged process stops refreshing it, and the
  scheduler already counts such a node as gone;
- it answers a Celery `ping` addressed to its name within `--timeout`: the consumer loop that
  takes messages is running (the heartbeat thread alone can outlive a stuck loop).

When Redis itself cannot be reached, nothing can be judged and the check passes, saying so:
every node would fail at once, and restarting them all would kill their running subtasks
without mending Redis.
"""
from __future__ import annotations

import time

import click

EXIT_DEAD = 1


@click.command("worker-check")
@click.option("--node", "-n", "node", default="celery@%h", show_default=True,
              help="the node's name, as given to the worker's -n (%h, %n and %d expand as Celery expands them)")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="seconds to wait for the node's reply to a ping")
@click.option("--ping/--no-ping", default=True, show_default=True, help="also ping the node through the broker")
def worker_check(node: str, timeout: float, ping: bool) -> None:
    """Exit 0 if the node heartbeats and answers a ping, 1 (saying why) if it does not."""
    from celery.utils.nodenames import host_format
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from marketplace.infra.redis_client import get_redis
    from marketplace.registry.service import heartbeat_record
    from marketplace.settings import get_settings

    name = host_format(node)
    ttl = get_settings().heartbeat_ttl
    try:
        record = heartbeat_record(get_redis(), hostname=name)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        click.echo(f"{name}: cannot judge, Redis is unreachable ({type(exc).__name__}); passing")
        return
    if record is None:
        _dead(f"{name}: no heartbeat within MARKETPLACE_HEARTBEAT_TTL ({ttl:g}s): stopped, hung or not started")
    age = time.time() - float(record.get("last_heartbeat") or 0)
    if age > ttl:
        _dead(f"{name}: last heartbeat {age:.1f}s ago, older than MARKETPLACE_HEARTBEAT_TTL ({ttl:g}s)")
    if ping:
        from kombu.exceptions import OperationalError

        from marketplace.infra.celery_app import app

        try:
            replies = app.control.ping(destination=[name], timeout=timeout)
        except (RedisConnectionError, RedisTimeoutError, OperationalError) as exc:
            click.echo(f"{name}: cannot ping, Redis is unreachable ({type(exc).__name__}); passing")
            return
        if not any(name in reply for reply in replies or []):
            _dead(f"{name}: no reply to a ping within {timeout:g}s (heartbeat {age:.1f}s ago)")
    click.echo(f"{name}: alive (heartbeat {age:.1f}s ago{', answers ping' if ping else ''})")


def _dead(message: str) -> None:
    click.echo(message, err=True)
    raise SystemExit(EXIT_DEAD)
