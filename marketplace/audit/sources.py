"""Where an outside verifier reads the audit log from: the API, a database URL, files, a bucket.

No settings and no secrets: everything comes from the arguments. Records come in seq order, in
their public form (`hashing.public_record`); checkpoints as published.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from marketplace.audit.hashing import CHECKPOINT_FIELDS, checkpoint_bytes, public_record

logger = logging.getLogger(__name__)
PAGE = 1000
CHECKPOINTS_PATH = "/v1/audit/checkpoints"


class SourceError(RuntimeError):
    """The records or checkpoints could not be read."""


def _get(url: str, *, token: str | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = requests.get(url, params=params, headers=headers, timeout=60)
    except requests.RequestException as exc:
        raise SourceError(f"{url}: {exc}") from exc
    if resp.status_code != 200:
        raise SourceError(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json()  # type: ignore[no-any-return]


def api_records(base_url: str, *, token: str | None, page: int = PAGE) -> Iterator[dict[str, Any]]:
    """Every record, paging GET /v1/audit/records (an admin's or an auditor's token)."""
    after = 0
    while True:
        body = _get(f"{base_url.rstrip('/')}/v1/audit/records", token=token, params={"after_seq": after, "limit": page})
        yield from body["records"]
        if body.get("next_after_seq") is None:
            return
        after = int(body["next_after_seq"])


def database_records(database_url: str, *, page: int = 5000) -> Iterator[dict[str, Any]]:
    """Every record, read with SELECT only, in a read-only transaction."""
    from sqlalchemy import create_engine, text

    if database_url.startswith("postgresql://") or database_url.startswith("postgres://"):
        database_url = "postgresql+psycopg2://" + database_url.split("://", 1)[1]
    engine = create_engine(database_url, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.execute(text("SET TRANSACTION READ ONLY"))
            rows = conn.execution_options(stream_results=True, max_row_buffer=page).execute(text(
                "SELECT seq, ts, actor, action, subject, task_id, data, prev_hash, hash, signature "
                "FROM audit_records ORDER BY seq"))
            for row in rows:
                yield public_record(row._mapping)
            conn.rollback()
    finally:
        engine.dispose()


def _checkpoints_url(url: str) -> str:
    path = urlsplit(url).path.rstrip("/")
    return url.rstrip("/") if path.endswith(CHECKPOINTS_PATH) else url.rstrip("/") + CHECKPOINTS_PATH


def api_checkpoints(url: str) -> Iterator[dict[str, Any]]:
    """Every checkpoint from GET /v1/audit/checkpoints (no token needed: they are public)."""
    after = 0
    endpoint = _checkpoints_url(url)
    while True:
        body = _get(endpoint, params={"after_size": after, "limit": 1000})
        yield from body["checkpoints"]
        if body.get("next_after_size") is None:
            return
        after = int(body["next_after_size"])


def store_checkpoints(store: Any, prefix: str = "audit/checkpoints/") -> Iterator[dict[str, Any]]:
    """Every checkpoint published in an object store (`infra.storage`'s S3Store or LocalStore)."""
    for key in store.list_keys(prefix):
        if key.endswith(".json"):
            yield json.loads(store.get_bytes(key))


def dir_checkpoints(path: Path) -> list[dict[str, Any]]:
    out = []
    for file in sorted(Path(path).glob("*.json")):
        try:
            out.append(json.loads(file.read_bytes()))
        except ValueError as exc:
            raise SourceError(f"{file}: not JSON: {exc}") from exc
    return out


def load_checkpoints(where: str) -> list[dict[str, Any]]:
    """Checkpoints from a folder of saved ones, or an API (http:// or https://)."""
    if where.startswith(("http://", "https://")):
        return list(api_checkpoints(where))
    if not Path(where).is_dir():
        raise SourceError(f"{where}: not a folder of checkpoints nor an http(s) URL")
    return dir_checkpoints(Path(where))


def save_checkpoints(checkpoints: Iterator[dict[str, Any]], folder: Path) -> tuple[int, list[str]]:
    """Save each as `<size, 20 digits>.json`; a different one of a size already saved is kept
    beside it (`<size>.<sha256 prefix>.json`): two of one size are a fork, the evidence of it.
    Returns (how many new files, warnings)."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    new, warnings = 0, []
    for cp in checkpoints:
        if not isinstance(cp, dict) or set(cp) != set(CHECKPOINT_FIELDS) or type(cp.get("size")) is not int:
            warnings.append(f"skipped a malformed checkpoint: {str(cp)[:120]}")
            continue
        raw = checkpoint_bytes(cp)
        path = folder / f"{cp['size']:020d}.json"
        if path.exists():
            if path.read_bytes() == raw:
                continue
            path = folder / f"{cp['size']:020d}.{hashlib.sha256(raw).hexdigest()[:12]}.json"
            warnings.append(f"a different checkpoint of size {cp['size']} was already saved: fork evidence kept "
                            f"as {path.name}")
            if path.exists():
                continue
        path.write_bytes(raw)
        new += 1
    return new, warnings
