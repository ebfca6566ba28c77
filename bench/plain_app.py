"""The baseline: a plain Celery app with a no-op task, same broker and worker settings."""
from celery import Celery

import celeryconfig

app = Celery("plain")
app.config_from_object(celeryconfig)
app.conf.task_queues = None
app.conf.task_default_queue = "bench.noop"
app.conf.task_routes = {}
app.conf.beat_schedule = {}
app.conf.task_create_missing_queues = True
# Stock kombu, even in a process that imported the marketplace (which swaps in its own transport).
app.conf.broker_transport = "kombu.transport.redis:Transport"
# And Celery's own result backend: celeryconfig names the marketplace's, which the loader reads
# when the configuration loads (here, at the first read).
app.conf.result_backend  # noqa: B018
app.loader.override_backends = {}


@app.task(name="bench.noop")
def noop(*_args: object) -> None:
    return None


@app.task(name="bench.callback")
def callback(*_args: object) -> str:
    return "done"


@app.task(name="bench.echo_batch")
def echo_batch(items: list[object]) -> list[object]:
    """batching.py's baseline: a batch of items out as it came in."""
    return items


@app.task(name="bench.join")
def join(parts: list[list[object]]) -> int:
    """batching.py's baseline callback: the parts in order, as one list (its length returned)."""
    return len([item for part in parts for item in part])
