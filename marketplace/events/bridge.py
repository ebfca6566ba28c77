"""`marketplace bridge`: the outbox relay and the submissions consumer, side by side.

Both loops run in threads of one process until SIGINT/SIGTERM. Without
`MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS` there is no bridge: the outbox is still
written in every transaction, and the `marketplace.events.prune` beat job
deletes rows older than `outbox_retention_hours` (with Kafka configured it
deletes only rows already relayed).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from marketplace.settings import get_settings

logger = logging.getLogger(__name__)


class KafkaDisabled(RuntimeError):
    """No bootstrap servers are configured."""


class Bridge:
    def __init__(self, *, bootstrap: str | None = None, relay: bool = True, consume: bool = True,
                 prune_interval: float = 3600.0, **relay_opts: Any) -> None:
        bootstrap = bootstrap or get_settings().kafka_bootstrap_servers
        if not bootstrap:
            raise KafkaDisabled(
                "MARKETPLACE_KAFKA_BOOTSTRAP_SERVERS is not set, so the Kafka bridge is off; domain events are "
                "still written to the outbox and pruned by the `marketplace.events.prune` beat job"
            )
        self.bootstrap = bootstrap
        self.stop = threading.Event()
        self.prune_interval = prune_interval
        self.relay = None
        self.consumer = None
        if relay:
            from marketplace.events.relay import Relay

            self.relay = Relay(bootstrap=bootstrap, **relay_opts)
        if consume:
            from marketplace.events.consumer import SubmissionConsumer

            self.consumer = SubmissionConsumer(bootstrap=bootstrap)

    def _prune_forever(self) -> None:
        from marketplace.events.relay import prune

        while not self.stop.wait(self.prune_interval):
            try:
                prune(include_unsent=False)  # this bridge relays them
            except Exception as exc:  # the next round tries again
                logger.warning("outbox prune failed: %s", exc)

    def run(self) -> None:
        threads = [threading.Thread(target=self._prune_forever, name="outbox-prune", daemon=True)]
        if self.relay is not None:
            threads.append(threading.Thread(target=self.relay.run, args=(self.stop,), name="outbox-relay"))
        if self.consumer is not None:
            threads.append(threading.Thread(target=self.consumer.run, args=(self.stop,), name="submissions"))
        for t in threads:
            t.start()
        logger.info("bridge running against %s (relay=%s, consume=%s)", self.bootstrap,
                    self.relay is not None, self.consumer is not None)
        try:
            while not self.stop.wait(1.0):
                pass
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=60)
            if self.relay is not None:
                self.relay.close()
            if self.consumer is not None:
                self.consumer.close()
