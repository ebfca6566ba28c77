"""Celery settings, derived from `marketplace.settings` (the only reader of the environment).

Why each reliability setting is what it is:
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only after
  its task returns, so a SIGKILLed pool child's subtask is redelivered (~50 ms) instead
  of lost. Subtasks are idempotent (deterministic result keys, one ledger row per
  subtask), so a redelivery is safe.
- `visibility_timeout` (Redis transport): an unacked message is redelivered to another
  worker after this long. It must exceed the longest subtask (the largest catalog
  `time_limit`, the hard limit) or a slow subtask would run twice while still running.
- `unacked_restore_interval` / `unacked_restore_throttle`: how often kombu sweeps the
  unacked set of a dead worker back onto the queues; lowered from 10 × 10 ≈ 100 s so a
  whole lost node is noticed sooner. The recovery beat job covers what Redis loses.
- `result_expires`: chord counters and results live in Redis; they must outlive the
  longest task (schedule timeout + all subtask retries), so two days.
- `worker_prefetch_multiplier = 1` and `-O fair` on model queues: a node takes only what
  it can run now, so a slow GPU batch never holds other messages hostage.
- Priorities: kombu's Redis transport serves *lower* numbers first; the REST API's
  `priority` is 0–9 with 9 most urgent, inverted when the subtask is published.
"""
from kombu import Exchange, Queue

from marketplace.catalog import CONTROL_QUEUES, get_catalog
from marketplace.infra import names
from marketplace.settings import get_settings

_settings = get_settings()
_catalog = get_catalog()
_longest_subtask = max((m.time_limit for m in _catalog.models.values()), default=600)

broker_url = _settings.celery_broker_url
result_backend = _settings.celery_result_backend
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": int(max(3600, _longest_subtask * 2)),
    "queue_order_strategy": "priority",
    "priority_steps": list(range(10)),
    "sep": ":",
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 5,
    "socket_keepalive": True,
    "health_check_interval": 10,
}
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}, "health_check_interval": 10}
result_expires = 2 * 24 * 3600
result_extended = False

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_max_tasks_per_child = None
worker_cancel_long_request_on_connection_loss = True

# Flower and the events-based monitors need worker events (received, started, succeeded, ...).
worker_send_task_events = True
# No `task-sent` event per publish (Celery's default): it doubled the Redis work of every
# publish, a fan-out's thousand subtasks and each submit's scheduling message included
# (measured: the event cost 80% of the message itself). Flower shows a task from the
# moment a worker receives it; the API knows every task from its row.
task_send_sent_event = False

task_default_queue = names.SCHEDULER_QUEUE
task_create_missing_queues = False
_queue_names = list(CONTROL_QUEUES) + _catalog.queues
task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in _queue_names]
task_routes = {
    "marketplace.scheduling.*": {"queue": "marketplace.scheduler"},
    "marketplace.results.*": {"queue": "marketplace.results"},
    "marketplace.maintenance.*": {"queue": "marketplace.maintenance"},
    "marketplace.webhooks.*": {"queue": "marketplace.maintenance"},
    "marketplace.registry.*": {"queue": "marketplace.maintenance"},
    "marketplace.audit.*": {"queue": "marketplace.maintenance"},
    "marketplace.events.*": {"queue": "marketplace.maintenance"},
}
# Subtask time limits per queue come from the catalog; see workers.tasks.
task_soft_time_limit = None
task_time_limit = None

# Each operator's node also consumes its own queue (`<hostname>.dq2`): a subtask that the node
# given it may not run (verified results: a replica of its batch ran there) goes straight to one
# that may (`scheduling.dispatch.redirect`), not back to the shared queue and its other consumers.
worker_direct = True

# A credentialed node (`marketplace worker --credentials FILE`): its own broker user, limited by
# a Redis ACL to its queues' keys (marketplace/providers/broker_acl.py); kombu's unacked
# bookkeeping under its own keys; no result backend (nothing reads a subtask's Celery result);
# no remote control (pidbox) and no events (celeryev): both are broker-wide fanouts.
if _settings.is_node:
    from marketplace.providers import credential as _credential

    _node = _credential.load(str(_settings.node_credentials))
    broker_url = _node["broker_url"]
    result_backend = "workers.backends:NodeResultBackend"
    broker_transport_options = {**broker_transport_options, **_credential.unacked_keys(_node["node_id"])}
    worker_enable_remote_control = False
    worker_send_task_events = False
    worker_direct = False  # its broker user reaches its queues' keys only

beat_schedule = {
    "recover-stalled-tasks": {"task": names.RECOVER, "schedule": 30.0},
    # The fair dispatcher's backstop: nodes ask for more work as they finish (scheduling/dispatch.py).
    "release-queued-subtasks": {"task": names.RELEASE, "schedule": 2.0,
                                "options": {"queue": names.SCHEDULER_QUEUE, "expires": 10}},
    # A backstop too: each task's end asks for its records to be chained a second later, and every
    # reader of the chain chains first. Every 2 s it chained a running job's records in the middle
    # of the job (two per subtask, each hashed and signed), in one of the node's pool slots: on the
    # standalone, a fan-out of 1,000 one-item subtasks lost a slot for about a second to it.
    "audit-chain-pending": {"task": names.CHAIN_AUDIT, "schedule": 30.0,
                            "options": {"queue": names.MAINTENANCE_QUEUE}},
    "sweep-workers": {"task": names.SWEEP_WORKERS, "schedule": 15.0},
    # Signs and publishes a checkpoint when MARKETPLACE_AUDIT_CHECKPOINT_EVERY / _INTERVAL say one is due.
    "audit-checkpoint": {"task": names.CHECKPOINT_AUDIT, "schedule": 5.0,
                         "options": {"queue": names.MAINTENANCE_QUEUE, "expires": 30}},
    "audit-verify": {"task": names.VERIFY_AUDIT, "schedule": 300.0,
                     "options": {"queue": names.MAINTENANCE_QUEUE}},
    "prune-outbox": {"task": names.PRUNE_OUTBOX, "schedule": 3600.0,
                     "options": {"queue": names.MAINTENANCE_QUEUE}},
}
