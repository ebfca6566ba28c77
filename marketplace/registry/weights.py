"""Model weights in the object store: `models/<name>/<version>/{weights.pt,manifest.json}`.

The manifest is written after the weights, so a node that can read a manifest
can trust that its weights are complete; nodes check the sha256 it records.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from marketplace.infra.db import utcnow
from marketplace.infra.errors import InvalidInput
from marketplace.infra.storage import ObjectStore

logger = logging.getLogger(__name__)
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def weights_key(name: str, version: str) -> str:
    return f"models/{name}/{version}/weights.pt"


def manifest_key(name: str, version: str) -> str:
    return f"models/{name}/{version}/manifest.json"


def push_weights(
    store: ObjectStore, *, name: str, path: Path, version: str = "v1", labels: list[str] | None = None,
) -> dict[str, Any]:
    """Upload a weights file and its manifest `{name, version, sha256, size, labels?}`."""
    from marketplace.catalog import get_catalog

    if get_catalog().get(name) is None:
        raise InvalidInput.field("name", f"unknown model {name!r}")
    if not VERSION_RE.match(version):
        raise InvalidInput.field("version", "letters, digits, '.', '_' or '-' (at most 64)")
    data = Path(path).read_bytes()
    if not data:
        raise InvalidInput.field("path", f"{path} is empty")
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(weights_key(name, version), data, "application/octet-stream")
    manifest: dict[str, Any] = {
        "name": name, "version": version, "sha256": sha, "size": len(data),
        "pushed_at": utcnow().isoformat(),
    }
    if labels:
        manifest["labels"] = labels
    store.put_bytes(manifest_key(name, version), json.dumps(manifest, indent=1).encode(), "application/json")
    return manifest


def read_manifest(store: ObjectStore, *, name: str, version: str) -> dict[str, Any]:
    return json.loads(store.get_bytes(manifest_key(name, version)))


# Versions seen pushed, with when: a submit checks the store once a minute per version, not per task.
_PUSHED: dict[tuple[str, str], float] = {}
PUSHED_CACHE_SECONDS = 60.0


def require_pushed(name: str, version: str) -> None:
    """InvalidInput naming `params.version` when no weights were pushed for it: the job would
    take a node's time and a start fee per subtask to fail with the same news. A store that
    does not answer lets the task through (the node reports what it finds)."""
    import time

    from marketplace.infra.storage import StorageError, get_store

    seen = _PUSHED.get((name, version))
    if seen is not None and time.monotonic() - seen < PUSHED_CACHE_SECONDS:
        return
    try:
        pushed = get_store().exists(manifest_key(name, version))
    except StorageError as exc:
        logger.warning("weights of %s %s not checked: %s", name, version, exc)
        return
    if not pushed:
        raise InvalidInput.field("params.version", f"no weights pushed for {name} version {version!r} "
                                 f"(an operator pushes them: marketplace models push {name} FILE --version {version})")
    _PUSHED[(name, version)] = time.monotonic()
