"""`marketplace nodes`: a provider's compute nodes (enroll, list, disable, rotate) and earnings, over the API."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from marketplace.cli.user import _api_call, _echo_json, config_dir_option


def write_credential(path: str, credential: dict[str, Any]) -> Path:
    """The credential, readable by its owner only: it holds the node's secret and private key."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(credential, fh, indent=2)
    os.chmod(out, 0o600)
    return out


@click.group()
def nodes() -> None:
    """Your compute nodes (the provider role): enroll one, list, disable, rotate its credential."""


def _saved(doc: dict[str, Any], output: str | None) -> None:
    path = write_credential(output or f"{doc['node']['name']}.node.json", doc["credential"])
    click.echo(f"node {doc['node']['name']} ({doc['node']['id']}): credential written to {path} (shown once; "
               f"start the node with: marketplace worker --credentials {path} -Q {','.join(doc['node']['queues'])})")


@nodes.command("enroll")
@click.option("--name", required=True, help="the node's name (lowercase letters, digits, '-')")
@click.option("--queues", "-Q", default=None, help="comma-separated compute queues (default: every one)")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="where to write the credential (default: NAME.node.json)")
@config_dir_option
def nodes_enroll(name: str, queues: str | None, output: str | None, config_dir: str) -> None:
    """Enroll a node: its credential file is written once, here."""
    doc = _api_call(config_dir, lambda c: c.enroll_node(name, queues=queues.split(",") if queues else None))
    _saved(doc, output)


@nodes.command("list")
@click.option("--json", "as_json", is_flag=True)
@config_dir_option
def nodes_list(as_json: bool, config_dir: str) -> None:
    """Your nodes."""
    rows = _api_call(config_dir, lambda c: c.nodes())
    if as_json:
        _echo_json(rows)
        return
    for n in rows:
        state = ("online" if n.get("online") else "offline") if n["enabled"] else "disabled"
        click.echo(f"{n['name']:<24} {state:<9} {','.join(n['queues'])}")


@nodes.command("disable")
@click.argument("name")
@config_dir_option
def nodes_disable(name: str, config_dir: str) -> None:
    """Refuse the node from now on (its calls, its parts, its broker user)."""
    doc = _api_call(config_dir, lambda c: c.disable_node(name))
    click.echo(f"node {doc['name']} disabled")


@nodes.command("rotate")
@click.argument("name")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False))
@config_dir_option
def nodes_rotate(name: str, output: str | None, config_dir: str) -> None:
    """A new secret, key and broker password for the node; the old credential is refused."""
    _saved(_api_call(config_dir, lambda c: c.rotate_node(name)), output)


@nodes.command("earnings")
@config_dir_option
def nodes_earnings(config_dir: str) -> None:
    """Your earnings, per node and per day."""
    _echo_json(_api_call(config_dir, lambda c: c.earnings()))


# What a credentialed node keeps of its environment: how it runs, never where the platform's data is.
NODE_SETTINGS = (
    "ENV", "SANDBOX", "DOCKER_RUNTIME", "MODEL_CACHE_DIR", "WARMUP_MODELS", "TORCH_THREADS", "LOG_LEVEL", "LOG_JSON",
    "METRICS_PORT", "METRICS_HOST", "CATALOG_PATH", "HEARTBEAT_INTERVAL", "HEARTBEAT_TTL", "SUBTASK_MAX_RETRIES",
    "SUBTASK_RETRY_BACKOFF", "PROMETHEUS_MULTIPROC_DIR",
)


def node_environment(environ: dict[str, str], credential_path: str) -> dict[str, str]:
    """The node's environment: every MARKETPLACE_* setting but how it runs is dropped (database,
    Redis, broker, object store, JWT secret, audit key, Flower password), and so are AWS_* keys."""
    keep = {f"MARKETPLACE_{name}" for name in NODE_SETTINGS}
    env = {k: v for k, v in environ.items()
           if not (k.startswith(("MARKETPLACE_", "AWS_", "DATABASE_", "PG")) and k not in keep)}
    env["MARKETPLACE_NODE_CREDENTIALS"] = str(Path(credential_path).resolve())
    # The pool forks after the main process opened its gRPC channel (heartbeats).
    env["GRPC_ENABLE_FORK_SUPPORT"] = "true"
    env["GRPC_POLL_STRATEGY"] = "poll"
    return env


def node_worker_command(credential_path: str, *, queues: str | None, concurrency: int, celery: str
                        ) -> tuple[list[str], dict[str, str]]:
    """`celery -A marketplace worker` as a provider's node: (argv, environment)."""
    from marketplace.providers.credential import load

    try:
        cred = load(credential_path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--credentials") from None
    wanted = queues.split(",") if queues else list(cred["queues"])
    outside = [q for q in wanted if q not in cred["queues"]]
    if outside:
        raise click.BadParameter(f"not queues of node {cred['name']}: {', '.join(outside)} "
                                 f"(its queues: {', '.join(cred['queues'])})", param_hint="--queues")
    args = [celery, "-A", "marketplace", "worker", "-Q", ",".join(wanted), "-c", str(concurrency),
            "-n", f"{cred['name']}@%h", "-O", "fair", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    return args, node_environment(dict(os.environ), credential_path)
