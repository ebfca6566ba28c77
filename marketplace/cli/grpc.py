"""`marketplace grpc`: serve every gRPC service on one port."""
from __future__ import annotations

import logging

import click


@click.command("grpc")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; 0.0.0.0 (or ::) for every interface, as in docker-compose.yml")
@click.option("--port", default=50051, show_default=True, type=int)
@click.option("--workers", "max_workers", default=16, show_default=True, type=int, help="handler threads")
def grpc_command(host: str, port: int, max_workers: int) -> None:
    """Serve the gRPC API (tasks, scheduler, workers, results, billing, audit, users) with health and reflection."""
    from marketplace.rpc.server import serve
    from marketplace.settings import get_settings

    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from marketplace.observability.metrics import serve_process_metrics

    serve_process_metrics("grpc")
    click.echo(f"gRPC serving on {host}:{port}")
    serve(host=host, port=port, max_workers=max_workers)
