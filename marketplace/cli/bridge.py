"""`marketplace bridge`: relay the outbox to Kafka and consume task submissions."""
from __future__ import annotations

import logging
import signal
from typing import Any

import click


@click.command("bridge")
@click.option("--bootstrap-servers", default=None, help="default: MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS")
@click.option("--no-relay", is_flag=True, help="do not relay the outbox")
@click.option("--no-consume", is_flag=True, help="do not consume task submissions")
@click.option("--batch-size", default=500, show_default=True, type=int)
def bridge_command(bootstrap_servers: str | None, no_relay: bool, no_consume: bool, batch_size: int) -> None:
    """Kafka bridge: outbox → marketplace.tasks/subtasks/audit, marketplace.submissions → tasks."""
    from marketplace.events.bridge import Bridge, KafkaDisabled
    from marketplace.settings import get_settings

    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bridge = Bridge(bootstrap=bootstrap_servers, relay=not no_relay, consume=not no_consume,
                        batch_size=batch_size)
    except KafkaDisabled as exc:
        raise click.ClickException(str(exc)) from None

    def _stop(*_: Any) -> None:
        bridge.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from marketplace.observability.metrics import serve_process_metrics

    serve_process_metrics("bridge")
    click.echo(f"bridge: relaying to and consuming from {bridge.bootstrap}")
    bridge.run()
