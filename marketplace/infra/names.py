"""Celery task and queue names, in one place: messages are sent by name (`send_task`,
`signature`), so `marketplace` never imports `workers` and no domain imports another's tasks."""
from __future__ import annotations

# Queues of the control plane (compute queues are `<device>.<model>`, from the catalog).
SCHEDULER_QUEUE = "marketplace.scheduler"
RESULTS_QUEUE = "marketplace.results"
MAINTENANCE_QUEUE = "marketplace.maintenance"
CONTROL_QUEUES = (SCHEDULER_QUEUE, RESULTS_QUEUE, MAINTENANCE_QUEUE)

RUN_SUBTASK = "workers.run_subtask"
SCHEDULE = "marketplace.scheduling.schedule"
WAKE = "marketplace.scheduling.wake"
RELEASE = "marketplace.scheduling.release"
LOST_RUN = "marketplace.scheduling.lost_run"
FINALIZE = "marketplace.results.finalize"
RECOVER = "marketplace.maintenance.recover"
DELIVER_WEBHOOK = "marketplace.webhooks.deliver"
CHAIN_AUDIT = "marketplace.audit.chain_pending"
VERIFY_AUDIT = "marketplace.audit.verify"
CHECKPOINT_AUDIT = "marketplace.audit.checkpoint"
SWEEP_WORKERS = "marketplace.registry.sweep"
PRUNE_OUTBOX = "marketplace.events.prune"
