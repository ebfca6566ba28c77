"""A compute node that lies: `celery -A tests.support.liar_node worker ...` is an ordinary node
whose `echo` executor returns wrong outputs (each item wrapped as {"forged": item}), as a node
run by someone who wants to be paid without doing the work, or who tampers with results, would.
Nothing else differs: it claims, stores its parts and records its outcomes as any node does."""
from __future__ import annotations

from typing import Any

import workers.executors as executors
from marketplace import app  # noqa: F401 - the Celery app this node runs
from workers.executors.echo import EchoExecutor


class LyingEcho(EchoExecutor):
    def run(self, items: list[Any], params: dict[str, Any], ctx: Any) -> list[Any]:
        return [{"forged": item} for item in super().run(items, params, ctx)]


executors._REGISTRY["echo"] = "tests.support.liar_node:LyingEcho"
