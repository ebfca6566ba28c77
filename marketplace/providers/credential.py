"""A node's credential file (what `nodes enroll` wrote): read by a credentialed node's processes."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

REQUIRED = ("node_id", "name", "hostname", "grpc_address", "node_secret", "private_key", "broker_url", "queues")


@lru_cache(maxsize=2)
def load(path: str | Path) -> dict[str, Any]:
    """The credential at `path`; ValueError naming what is missing."""
    doc = json.loads(Path(path).expanduser().read_text())
    missing = [k for k in REQUIRED if not doc.get(k)]
    if missing:
        raise ValueError(f"{path} is not a node credential (missing {', '.join(missing)})")
    return dict(doc)


def current() -> dict[str, Any] | None:
    """This process's credential when it runs as a credentialed node (MARKETPLACE_NODE_CREDENTIALS)."""
    from marketplace.settings import get_settings

    path = get_settings().node_credentials
    return load(str(path)) if path else None


def unacked_keys(node_id: str) -> dict[str, str]:
    """kombu's unacked bookkeeping under the node's own keys (its broker ACL allows only these)."""
    from marketplace.providers.broker_acl import unacked_prefix

    prefix = unacked_prefix(node_id)
    return {"unacked_key": f"{prefix}unacked", "unacked_index_key": f"{prefix}unacked_index",
            "unacked_mutex_key": f"{prefix}unacked_mutex"}
