"""`marketplace models ...`: manage model weights in the object store."""
from __future__ import annotations

from pathlib import Path

import click


@click.group()
def models() -> None:
    """Model weights in the object store (models/<name>/<version>/...)."""


@models.command("push")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--version", default="v1", show_default=True, help="version the nodes load (params.version)")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="class labels, one per line (default: the labels the node ships)")
def push(name: str, path: Path, version: str, labels_path: Path | None) -> None:
    """Upload weights PATH for model NAME with a sha256 manifest nodes verify."""
    from marketplace.infra.errors import InvalidInput
    from marketplace.infra.storage import StorageError, get_store
    from marketplace.registry.weights import push_weights

    labels = None
    if labels_path is not None:
        labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    try:
        manifest = push_weights(get_store(), name=name, path=path, version=version, labels=labels)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from exc
    except StorageError as exc:
        raise click.ClickException(f"object store: {exc}") from exc
    click.echo(f"pushed {name} {version}: {manifest['size']} bytes, sha256 {manifest['sha256']}")
