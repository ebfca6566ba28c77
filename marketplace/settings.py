"""Typed settings: the only place that reads the environment."""
from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent

# `postgresql://` and `postgres://` (what psql, pg_dump, Heroku and pgserver print) and any
# explicit driver (`postgresql+psycopg://`, `+asyncpg`, ...): SQLAlchemy 2.1 maps the bare
# scheme to psycopg 3, which is not installed, and our statements use psycopg2 itself
# (`infra.prepared`, `infra.db.autocommit`).
_POSTGRES_SCHEME = re.compile(r"^(?:postgres|postgresql)(?:\+[A-Za-z0-9_]+)?://", re.IGNORECASE)


def psycopg2_url(url: str) -> str:
    """A PostgreSQL URL in any of its spellings, as SQLAlchemy's psycopg2 URL; others unchanged.

    Every place that reads a database URL goes through here (the setting's validator, engines
    made from an explicit URL, Alembic's environment)."""
    return _POSTGRES_SCHEME.sub("postgresql+psycopg2://", url.strip(), count=1)



class Settings(BaseSettings):
    """Everything configurable, read once from `MARKETPLACE_*` variables."""

    model_config = SettingsConfigDict(env_prefix="MARKETPLACE_", env_file=None, extra="ignore")

    env: Literal["development", "production", "test"] = "development"

    # Storage and transports.
    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/marketplace"
    # DATABASE_URL is a transaction-mode pooler (PgBouncer `pool_mode = transaction`): keep no
    # state on a server connection (no prepared statements, no session SET); see the README.
    database_transaction_pooling: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None  # defaults to redis_url
    result_backend: str | None = None  # defaults to redis_url
    s3_endpoint_url: str | None = None
    s3_bucket: str = "marketplace"
    s3_region: str = "us-east-1"
    storage_dir: Path | None = None  # local object store, used when no S3 endpoint is set
    kafka_bootstrap_servers: str | None = None

    # Secrets (SecretStr keeps them out of reprs and logs).
    jwt_secret: SecretStr = SecretStr("dev-insecure-jwt-secret-change-me-0123456789")
    audit_signing_key: SecretStr | None = None
    access_token_minutes: int = 15
    refresh_token_days: int = 7

    # Catalog and scheduling.
    catalog_path: Path = PACKAGE_DIR.parent / "config" / "models.yaml"
    schedule_timeout: float = 300.0  # seconds a task may wait for a capable worker
    schedule_retry_delay: float = 1.0
    subtask_max_retries: int = 3
    subtask_retry_backoff: float = 1.0  # seconds, doubled per retry
    heartbeat_interval: float = 5.0
    heartbeat_ttl: float = 15.0
    worker_capacity_check: bool = True  # scheduler refuses queues with no live worker

    # PyTorch threads per pool process; 0 = the node's cores divided by its pool size.
    torch_threads: int = 0

    # Sandboxes for `generic`.
    sandbox: Literal["gvisor", "bwrap", "docker", "none"] | None = None
    docker_runtime: str | None = None

    # Compute nodes.
    model_cache_dir: Path = Path("~/.cache/marketplace")  # verified model weights, per node
    warmup_models: bool = True  # load served models in worker_process_init

    # API. Rate limits (`marketplace/ratelimit.py`) hold for REST and gRPC together, on the same
    # Redis counters: a client does not get a second budget by using the other door.
    rate_limit: str = "1200/minute"  # requests per user (a valid access token)
    anonymous_rate_limit: str = "120/minute"  # requests per address without one
    signup_rate_limit: str = "5/hour"  # accounts created per address: each gets signup_credits
    login_failure_rate_limit: str = "20/hour"  # failed logins per account, then every login refused till the window ends
    # Reverse proxies in front of the API that set X-Forwarded-For/-Proto (a load balancer, an
    # ingress: 1). 0 trusts none, so a client cannot pick its own address for the per-address
    # limits; behind a proxy with 0, every client shares the proxy's address and budget.
    trusted_proxies: int = Field(default=0, ge=0, le=5)
    grpc_streams_per_user: int = 4  # open gRPC server streams (WatchTask, ...) per user or address
    max_body_bytes: int = 16 * 1024 * 1024
    max_inputs: int = 200_000
    webhook_timeout: float = 10.0
    webhook_max_retries: int = 5  # retries after the first attempt, backoff doubling each time
    webhook_retry_backoff: float = 1.0  # seconds before the first retry
    # Whose webhooks may go to loopback, private and link-local addresses: nobody's (`none`), so a
    # user's webhook cannot reach what only the cluster reaches (`marketplace/webhook_targets.py`);
    # `admins` (also spelled `true`): admins' tasks only, what `marketplace standalone` sets; `all`:
    # every user's (tests, a machine with one trusted user).
    webhook_allow_private: Literal["none", "admins", "all"] = "none"
    signup_credits: Decimal = Decimal("100")
    default_max_active_tasks: int = 20
    default_max_items_per_task: int = 200_000
    # Subtasks of one user in flight (running or sent to the broker) per queue; None: no cap.
    default_max_running_subtasks: int | None = None
    default_daily_spend: Decimal = Decimal("1000")

    # Recovery.
    recovery_stall_seconds: float = 120.0

    # Ops.
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("change-me")
    log_level: str = "INFO"
    log_json: bool = True
    # Worker-node Prometheus exporter (marketplace.observability); 0 disables it.
    metrics_port: int = 9808
    # It has no auth: an internal address (`marketplace standalone` sets 127.0.0.1; compose, 0.0.0.0 in containers).
    metrics_host: str = "0.0.0.0"
    # Parent of the prometheus-client multiprocess dirs (`marketplace api`, worker nodes); temp dir if unset.
    prometheus_multiproc_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "MARKETPLACE_PROMETHEUS_MULTIPROC_DIR")
    )
    # Standard OpenTelemetry variables (no prefix): spans are exported only when an endpoint is set.
    otel_exporter_otlp_endpoint: str | None = Field(default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    otel_service_name: str | None = Field(default=None, validation_alias="OTEL_SERVICE_NAME")
    otel_sdk_disabled: bool = Field(default=False, validation_alias="OTEL_SDK_DISABLED")

    # Events.
    topic_tasks: str = "marketplace.tasks"
    topic_subtasks: str = "marketplace.subtasks"
    topic_audit: str = "marketplace.audit"
    topic_submissions: str = "marketplace.submissions"
    topic_submissions_dlq: str = "marketplace.submissions.dlq"
    outbox_retention_hours: float = 24.0

    # Live progress (`GET /v1/tasks/<id>/events`, `marketplace.events.feed`).
    event_stream_heartbeat: float = 15.0  # seconds of silence before a comment line (proxies close idle streams)
    event_feed_interval: float = 0.2  # seconds between a process's outbox reads while it has open streams
    # Open streams per API worker process, each holding one of its threads beside the `--threads`
    # that serve requests (`marketplace api`); one more gets 503 and Retry-After (clients poll then).
    event_streams_per_worker: int = 256

    @field_validator("database_url")
    @classmethod
    def _psycopg2_url(cls, value: str) -> str:
        return psycopg2_url(value)

    # Warm nodes: a node announces a model only once every pool process has loaded it and run one
    # small inference (`workers/node.py`); a model that fails to load is refused, with the reason.
    embedding_model_path: Path | None = None  # a sentence-transformers directory; unset: the shipped all-MiniLM-L6-v2
    warmup_timeout: float = 600.0  # seconds a node waits for a load, then refuses the model until it arrives
    # Node hostnames (comma-separated) that must have announced their models before /readyz says
    # ready: `marketplace standalone` names its own nodes; empty, /readyz checks the stores only.
    ready_nodes: str = ""

    # Audit for outsiders (signed checkpoints of the audit chain): a checkpoint is written once
    # this many records were chained since the last one, or once this many seconds passed with
    # any new record (beat looks every few seconds); receipts wait for the next one.
    audit_checkpoint_every: int = Field(default=10000, ge=1)
    audit_checkpoint_interval: float = Field(default=60.0, gt=0)

    # Providers and nodes (issue 28): a provider's share of each settled charge, where the platform's
    # gRPC door is for nodes (written into node credentials), and the credential a node runs from
    # (`marketplace worker --credentials FILE`: set, this process is a node with no platform secrets).
    provider_share: Decimal = Decimal("0.8")
    public_grpc_address: str = "127.0.0.1:50051"
    public_api_url: str = "http://127.0.0.1:8000"
    public_broker_url: str | None = None  # the broker as nodes reach it (default: the broker URL)
    node_credentials: Path | None = None
    # The broker's ACL command, under the name it was renamed to where it is hidden from whoever
    # holds the broker password (the standalone's embedded Redis: `rename-command ACL <secret>`).
    broker_acl_command: SecretStr = SecretStr("ACL")

    # Verified results (issue 29): the least redundancy of every task (a user's own minimum may be
    # higher), how many runs past k a batch whose replicas disagree may get, the share of
    # redundancy-1 subtasks re-run on another node at the platform's cost, and a node's standing:
    # below this score (Wilson lower bound of its agreed replicas) after a disagreement, it gets
    # no solo work.
    min_redundancy: int = Field(default=1, ge=1, le=5)
    extra_replicas: int = Field(default=2, ge=0, le=5)
    spot_check_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    reputation_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    # A node that has disagreed and scores this much under a live node of its queue with a free
    # slot gets no solo work while that node has one (`scheduling.standing.better_free`).
    reputation_margin: float = Field(default=0.1, ge=0.0, le=1.0)

    @field_validator("webhook_allow_private", mode="before")
    @classmethod
    def _private_webhooks(cls, value: object) -> object:
        # The setting was a boolean: its spellings keep working, `true` as the safe reading.
        spelled = str(value).strip().lower()
        if spelled in ("false", "0", "no", "off", ""):
            return "none"
        if spelled in ("true", "1", "yes", "on"):
            return "admins"
        return spelled

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Secrets never in reprs: SecretStr hides its own, the passwords inside URLs are masked here."""
        from kombu.utils.url import maybe_sanitize_url

        for name, value in super().__repr_args__():
            yield name, maybe_sanitize_url(value) if isinstance(value, str) else value

    @property
    def is_node(self) -> bool:
        """This process runs from a node credential: no database, no Redis of ours, no object store."""
        return self.node_credentials is not None

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def celery_result_backend(self) -> str:
        return self.result_backend or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use (never at import)."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings (tests and the standalone launcher change the env)."""
    get_settings.cache_clear()


__all__ = ["Settings", "get_settings", "psycopg2_url", "reset_settings", "Field"]
