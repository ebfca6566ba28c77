"""Object store behind one small interface: S3 (boto3; MinIO or moto) or a local directory."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


class StorageError(Exception):
    """The object store could not be reached or refused the operation (retryable)."""


class ObjectNotFound(StorageError):
    pass


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store `data` under `key` (overwriting); return its sha256."""

    def get_bytes(self, key: str) -> bytes: ...

    def get_many(self, keys: list[str]) -> Iterator[bytes]:
        """The objects under `keys`, in that order (a task's parts, for its result)."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list_keys(self, prefix: str) -> Iterator[str]:
        """The keys under `prefix`, in key order (published audit checkpoints)."""

    def check(self) -> None:
        """Raise StorageError unless the store is usable (readiness)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """A directory tree; writes are atomic (temp file + rename) so readers never see halves."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        try:  # the directory usually exists (a task's parts share one): no mkdir per write
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return sha256_hex(data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def get_many(self, keys: list[str]) -> Iterator[bytes]:
        return (self.get_bytes(key) for key in keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root  # only the prefix's folder
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return iter(sorted(k for k in keys if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith(".tmp-")))

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")


PARALLEL_GETS = 8


class S3Store:
    """S3 API via boto3 (MinIO in compose, moto's server in tests)."""

    def __init__(self, *, endpoint_url: str | None, bucket: str, region: str = "us-east-1") -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=3,
                read_timeout=30,
            ),
        )
        self._bucket_checked = False

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(str(exc)) from exc
            raise StorageError(f"S3 {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        if self._bucket_checked:
            return
        try:
            self._call(self.client.head_bucket, Bucket=self.bucket)
        except (ObjectNotFound, StorageError) as exc:
            if isinstance(exc.__cause__, ClientError) or isinstance(exc, ObjectNotFound):
                self._call(self.client.create_bucket, Bucket=self.bucket)
            else:
                raise
        self._bucket_checked = True

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.ensure_bucket()
        self._call(
            self.client.put_object,
            Bucket=self.bucket,
            Key=_safe_key(key),
            Body=data,
            ContentType=content_type or "application/octet-stream",
        )
        return sha256_hex(data)

    def get_bytes(self, key: str) -> bytes:
        obj = self._call(self.client.get_object, Bucket=self.bucket, Key=_safe_key(key))
        return obj["Body"].read()

    def get_many(self, keys: list[str]) -> Iterator[bytes]:
        # A request each, waiting on the network: a 1,000-part result read them one at a time
        # (4.1 s against moto's server, in a transaction holding the task's row lock). boto3
        # clients are thread-safe; PARALLEL_GETS stays under botocore's 10 pooled connections.
        from concurrent.futures import ThreadPoolExecutor

        if len(keys) < 2:
            return (self.get_bytes(key) for key in keys)
        with ThreadPoolExecutor(max_workers=min(PARALLEL_GETS, len(keys)), thread_name_prefix="s3-get") as pool:
            return iter(list(pool.map(self.get_bytes, keys)))

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=_safe_key(key))
            return True
        except ObjectNotFound:
            return False

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=_safe_key(key))

    def list_keys(self, prefix: str) -> Iterator[str]:
        self.ensure_bucket()
        token: str | None = None
        while True:
            page = self._call(self.client.list_objects_v2, Bucket=self.bucket, Prefix=prefix,
                              **({"ContinuationToken": token} if token else {}))
            yield from (obj["Key"] for obj in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def check(self) -> None:
        self._bucket_checked = False
        self.ensure_bucket()


_store: ObjectStore | None = None


def build_store(settings=None) -> ObjectStore:  # type: ignore[no-untyped-def]
    if settings is None:
        from marketplace.settings import get_settings

        settings = get_settings()
    if settings.s3_endpoint_url:
        return S3Store(endpoint_url=settings.s3_endpoint_url, bucket=settings.s3_bucket, region=settings.s3_region)
    root = settings.storage_dir or Path.cwd() / "data" / "objects"
    return LocalStore(root)


def get_store() -> ObjectStore:
    """The process-wide store (rebuilt after fork by `reset_store`)."""
    global _store
    if _store is None:
        from marketplace.settings import get_settings

        if get_settings().is_node:
            raise StorageError("a credentialed node has no object-store key: the platform stores its parts")
        _store = build_store()
    return _store


def reset_store() -> None:
    global _store
    _store = None
