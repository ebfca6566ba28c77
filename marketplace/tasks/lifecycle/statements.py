"""The lifecycle's own statements. Each move on a subtask's hot path is one statement that
commits by itself (`infra.db.autocommit`) and writes, beside the moved row, what the move owes
the other domains: its event (`events.payloads`), its charge (`billing.charges`), its audit
records (`audit.service.pending_cte`) and the user's use of the queue (the fair dispatcher's).
Prepared once per connection: their CTEs took PostgreSQL longer to plan than to run.

Statuses come from the moves table (`moves.sources`), never spelt out twice.
"""
from __future__ import annotations

from sqlalchemy import text

from marketplace.audit.service import pending_cte, record_select, record_types
from marketplace.billing import charges
from marketplace.events import payloads
from marketplace.infra.prepared import Prepared
from marketplace.tasks.lifecycle.moves import sources, sql_in
from marketplace.tasks.models import SubTaskStatus, TaskStatus

ACTIVE = sql_in((TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value))  # a subtask of these may run
PENDING, RUNNING = SubTaskStatus.PENDING.value, SubTaskStatus.RUNNING.value
assert sources("subtask", SubTaskStatus.CANCELLED) == (PENDING, RUNNING)  # CANCEL_OPEN and STOP

# -- claim: Pending -> Running (and the task Scheduled -> InProgress) --------------------------------
# Verified results: a node never runs two replicas of one batch, nor (where its queue has enough live
# providers: `tasks.spread_providers`) one of a batch a node of its provider runs or ran, until the
# batch has runs from k providers; a node that has disagreed (`registry.reputation`) takes solo work
# (the first run of a redundancy-1 task's batch) only once the checked path found no better-scored
# node with room, and a demoted one none. Spot checks and replicas it still gets, so it can earn its
# standing back. `t` is the task's row, `subtasks` the claimed one. Where it does not hold, the
# checked path decides (`work._claim_checked`). A node without a record pays one index probe.
_SIBLING_HERE = """EXISTS (SELECT 1 FROM subtasks o WHERE o.task_id = subtasks.task_id AND o.index = subtasks.index
                              AND o.id <> subtasks.id AND o.worker = :worker)"""
_DEMOTED = "EXISTS (SELECT 1 FROM node_reputation r WHERE r.worker = :worker AND r.demoted)"
_DISAGREED = "EXISTS (SELECT 1 FROM node_reputation r WHERE r.worker = :worker AND (r.demoted OR r.disagreed > 0))"
# A spot check runs after its batch's first run was taken by another node (so that it checks one).
_PRIMARY_TAKEN = """EXISTS (SELECT 1 FROM subtasks p WHERE p.task_id = subtasks.task_id AND p.index = subtasks.index
                               AND p.replica = 0 AND p.worker IS NOT NULL)"""


def _runs_of_batch(row: str) -> str:
    """The other runs of `row`'s batch that a node holds or ran (`x`), with their node's enrolment (`n`:
    none for the operator's nodes, which are one provider)."""
    return f"""subtasks x LEFT JOIN nodes n ON n.hostname = x.worker
        WHERE x.task_id = {row}.task_id AND x.index = {row}.index AND x.id <> {row}.id AND x.worker IS NOT NULL"""


def spread_short(row: str) -> str:
    """Whether `row`'s batch is to spread over providers (its task `t`) and its other runs come from
    fewer than the task's redundancy providers (the operator's nodes counting as one)."""
    return f"""(t.redundancy > 1 AND t.spread_providers
        AND (SELECT count(DISTINCT n.provider_id) + COALESCE(bool_or(n.hostname IS NULL), false)::int
             FROM {_runs_of_batch(row)}) < t.redundancy)"""


def same_provider(row: str) -> str:
    """Whether a node of this node's (`:worker`) provider holds or ran another run of `row`'s batch,
    while that batch has runs from fewer than its task's (`t`) redundancy providers."""
    return f"""({spread_short(row)}
        AND EXISTS (SELECT 1 FROM {_runs_of_batch(row)}
                    AND n.provider_id IS NOT DISTINCT FROM (SELECT provider_id FROM nodes WHERE hostname = :worker)))"""


# What a claim records as `spread_provider` (unique per batch: `uq_subtasks_replica_provider`).
_SPREAD_PROVIDER = """CASE WHEN t.redundancy > 1 AND t.spread_providers AND subtasks.replica < t.redundancy
                           THEN COALESCE((SELECT provider_id::text FROM nodes WHERE hostname = :worker), '') END"""
ELIGIBLE = f"""NOT {_SIBLING_HERE}
          AND (t.redundancy > 1 OR subtasks.replica > 0 OR NOT {_DISAGREED})
          AND (t.redundancy = 1 OR NOT {same_provider("subtasks")})
          AND (t.redundancy > 1 OR subtasks.replica = 0 OR {_PRIMARY_TAKEN})"""
# Why the checked path's Pending row was not claimable here: a replica of it ran here, a node of this
# node's provider ran one, demoted, solo work to a node that has disagreed (its record), an early check.
REFUSAL = text(f"""
    SELECT {_SIBLING_HERE} AS sibling_here, {same_provider("subtasks")} AS same_provider,
           (t.redundancy = 1 AND subtasks.replica = 0 AND {_DEMOTED}) AS demoted,
           (t.redundancy = 1 AND subtasks.replica = 0) AS solo, t.redundancy,
           COALESCE(r.agreed, 0) AS agreed, COALESCE(r.disagreed, 0) AS disagreed,
           (t.redundancy = 1 AND subtasks.replica > 0 AND NOT {_PRIMARY_TAKEN}) AS early_check
    FROM subtasks JOIN tasks t ON t.id = subtasks.task_id LEFT JOIN node_reputation r ON r.worker = :worker
    WHERE subtasks.id = :id
""")
# A release's verified tasks (`scheduling.replicas.place`), each marked for a spread over providers where the queue has as many live
# providers as its redundancy (written only when that changes).
MARK_SPREAD = text("""
    WITH v AS (SELECT id, redundancy, redundancy <= :providers AS spread FROM tasks
               WHERE id = ANY(CAST(:ids AS uuid[])) AND redundancy > 1),
    u AS (UPDATE tasks SET spread_providers = v.spread FROM v
          WHERE tasks.id = v.id AND tasks.spread_providers <> v.spread RETURNING tasks.id)
    SELECT id::text, redundancy, spread FROM v
""")

# The queue has fewer live providers than the task's redundancy now: distinct nodes suffice.
UNSPREAD = text("UPDATE tasks SET spread_providers = false WHERE id = :task_id AND spread_providers")
# A replica this node may not run (another replica of its batch ran here) trades its payload with a
# never-run Pending row of the same task that this node may run (what each row runs is its batch:
# index, replica, inputs; the rows, their messages and sends stay as they are). Without it, two
# nodes taking adjacent replicas would send one back to the queue about every other time.
SWAP_LOCK_ME = text(f"SELECT id FROM subtasks WHERE id = :id AND status = '{PENDING}' AND attempts = 0 FOR UPDATE")
# Three statements, each with a fresh snapshot: the two rows are locked first, then moved only if
# both are still never-run Pending rows (a claim may have taken one just before the lock).
# The other row's batch must be one this node may run, by ELIGIBLE's rules: a spot check whose
# batch's first run has not been taken is not (taking it here first would leave that first run a
# batch no node may run where this node is the only one, and its task would never end).
SWAP_LOCK_OTHER = text(f"""
    SELECT o.id FROM subtasks o JOIN tasks t ON t.id = o.task_id
    WHERE o.task_id = :task_id AND o.status = '{PENDING}' AND o.attempts = 0 AND o.index <> :index
      AND NOT EXISTS (SELECT 1 FROM subtasks x WHERE x.task_id = o.task_id AND x.index = o.index
                      AND x.worker = :worker)
      AND (t.redundancy > 1 OR o.replica > 0 OR NOT {_DEMOTED})
      AND (t.redundancy > 1 OR o.replica = 0 OR {_PRIMARY_TAKEN.replace("subtasks.", "o.")})
      AND NOT {same_provider("o")}
    ORDER BY o.dispatches DESC, o.index LIMIT 1 FOR UPDATE OF o SKIP LOCKED
""")
SWAP = text(f"""
    WITH me AS (
        SELECT id, index, replica, inputs, items, platform_paid FROM subtasks
        WHERE id = :id AND status = '{PENDING}' AND attempts = 0
    ), other AS (
        SELECT id, index, replica, inputs, items, platform_paid FROM subtasks
        WHERE id = :other AND status = '{PENDING}' AND attempts = 0
    )
    UPDATE subtasks SET
        index = CASE WHEN subtasks.id = me.id THEN other.index ELSE me.index END,
        replica = CASE WHEN subtasks.id = me.id THEN other.replica ELSE me.replica END,
        inputs = CASE WHEN subtasks.id = me.id THEN other.inputs ELSE me.inputs END,
        items = CASE WHEN subtasks.id = me.id THEN other.items ELSE me.items END,
        platform_paid = CASE WHEN subtasks.id = me.id THEN other.platform_paid ELSE me.platform_paid END
    FROM me, other WHERE subtasks.id IN (me.id, other.id) AND subtasks.status = '{PENDING}' AND subtasks.attempts = 0
    RETURNING subtasks.id
""")
# The common case in one round trip: a Pending subtask of an active task becomes Running, the task
# InProgress, and task_prerun's carried `subtask.started` record (bound as `c*`, NULL when there is
# none) is written. `first_start_of`: the task's creation time when this claim started it (the wait
# from submit to first start, a metric). Anything else (a redelivery, a task that ended) finds no
# row and takes the checked path (`CLAIM_ANY` after `LOAD`).
# The task's TaskStarted event, when this claim moved it (`t` has its row only then).
_STARTED = payloads.insert_cte("e", type="TaskStarted", key="t.id::text", payload=payloads.task_started(), source="t")
CLAIM_PENDING = Prepared("mp_claim_pending", f"""
    WITH s AS (
        UPDATE subtasks SET status = '{RUNNING}', attempts = subtasks.attempts + 1, worker = :worker,
               worker_incarnation = :inc, celery_id = :mid, started_at = :now, error = NULL,
               spread_provider = {_SPREAD_PROVIDER}
        FROM tasks t
        WHERE subtasks.id = :id AND subtasks.status = '{PENDING}' AND t.id = subtasks.task_id AND t.status IN {ACTIVE}
          AND {ELIGIBLE}
        RETURNING subtasks.task_id, subtasks.index, subtasks.items, subtasks.inputs, subtasks.attempts,
                  subtasks.replica, subtasks.platform_paid, t.user_id, t.model, t.queue, t.params
    ), t AS (
        UPDATE tasks SET status = '{TaskStatus.IN_PROGRESS.value}', started_at = :now
        FROM s WHERE tasks.id = s.task_id AND tasks.status = '{TaskStatus.SCHEDULED.value}'
        RETURNING tasks.id, tasks.user_id, tasks.started_at, tasks.created_at
    ), {_STARTED}, {pending_cte("a", [record_select("c", task_id="s.task_id::text", source="s")])}
    SELECT s.*, (SELECT created_at FROM t) AS first_start_of FROM s
""", types={"id": "uuid", "worker": "text", "inc": "text", "mid": "text", "now": "timestamptz", "topic": "text",
            **record_types("c")})

LOAD = text("""
    SELECT s.task_id, s.index, s.items, s.status, s.inputs, s.result_key, s.result_sha256, s.seconds, s.error,
           s.worker, s.worker_incarnation, s.celery_id, s.started_at, s.attempts, s.replica, s.platform_paid,
           t.status AS task_status, t.user_id, t.model, t.queue, t.params, t.redundancy
    FROM subtasks s JOIN tasks t ON t.id = s.task_id
    WHERE s.id = :id
""")

# The checked path's claim, decided from the row just loaded: Pending or Running (a copy taking over).
CLAIM_ANY = text(f"""
    WITH s AS (
        UPDATE subtasks SET status = '{RUNNING}', attempts = subtasks.attempts + 1, worker = :worker,
               worker_incarnation = :inc, celery_id = :mid, started_at = :now, error = NULL,
               spread_provider = {_SPREAD_PROVIDER}
        FROM tasks t
        WHERE subtasks.id = :id AND subtasks.status IN {sql_in(sources("subtask", RUNNING))} AND t.id = subtasks.task_id
        RETURNING subtasks.task_id, subtasks.attempts, subtasks.index, subtasks.items, subtasks.inputs,
                  subtasks.replica, subtasks.platform_paid
    ), t AS (
        UPDATE tasks SET status = '{TaskStatus.IN_PROGRESS.value}', started_at = :now
        FROM s WHERE tasks.id = s.task_id AND tasks.status IN {sql_in(sources("task", TaskStatus.IN_PROGRESS))}
        RETURNING tasks.id, tasks.user_id, tasks.started_at, tasks.created_at
    ), {_STARTED}
    SELECT s.attempts, s.index, s.items, s.inputs, s.replica, s.platform_paid,
           (SELECT created_at FROM t) AS first_start_of FROM s
""")

# -- outcomes: Running -> Done | Failed | Cancelled ---------------------------------------------------
# The moved row (`s`), its task (`t`), its SubTaskCompleted event (`e`), the user's use of the
# queue (`f`), its charge (`h`, `l`) and the charge's and the outcome's audit records (`a`, the
# outcome bound as `o*`).
_TASK = "t AS (SELECT tasks.user_id, tasks.queue, tasks.subtask_count FROM tasks JOIN s ON tasks.id = s.task_id)"
_USE = """f AS (
        UPDATE fair_shares SET used = used + :seconds, done = done + 1, updated_at = :now,
               avg_seconds = CASE WHEN avg_seconds IS NULL THEN :seconds ELSE avg_seconds * 0.8 + :seconds * 0.2 END
        FROM t WHERE fair_shares.queue = t.queue AND fair_shares.user_id = t.user_id
        RETURNING 1
    )"""


# A credentialed node's outcome (`providers.work`) moves only the run it holds: the claim it made
# (`worker`) and the attempt it signed. NULL for an operator's node: any run of the subtask.
_HELD = """
          AND (CAST(:held_by AS text) IS NULL OR (worker = :held_by AND attempts = :held_attempt))"""


def _outcome(status: str, sets: str) -> str:
    return f"""
    WITH s AS (
        UPDATE subtasks SET status = '{status}', {sets}, seconds = :seconds, finished_at = :now
        WHERE id = :id AND status IN {sql_in(sources("subtask", status))}{_HELD}
        RETURNING *
    ), {_TASK},
    {payloads.insert_cte("e", type="SubTaskCompleted", key="s.task_id::text", payload=payloads.subtask_completed(),
                         source="s, t")},
    {_USE}, {charges.HOLD_CTE}, {charges.ledger_cte("AND EXISTS (SELECT 1 FROM s)")},
    {pending_cte("a", [charges.CHARGE_RECORD, record_select("o", task_id=":task_key", source="s")])}"""


_OUTCOME_TYPES = {"id": "uuid", "seconds": "float8", "topic": "text", "held_by": "text", "held_attempt": "int4",
                  **charges.TYPES, **record_types("o")}

# Also answers which of the task's other subtasks this statement saw open: Pending ones (sent or
# not), and Running ones (see `was_last`). A Pending run at the platform's cost (a spot check) may
# be dropped rather than completed (`DROP_CHECK`), so it counts as a Running one: look again. One
# equality per status, so both columns of ix_subtasks_task_status bound the scan ('Done' sorts before 'Pending': with `IN` the plan walked
# past every Done sibling, O(N) a completion). The Running probe only when no Pending one is left.
COMPLETE = Prepared("mp_complete", _outcome(SubTaskStatus.DONE.value,
                                            "result_key = :key, result_sha256 = :sha, error = NULL") + f"""
    SELECT CASE WHEN EXISTS (SELECT 1 FROM subtasks x WHERE x.task_id = s.task_id AND x.status = '{PENDING}'
                             AND NOT x.platform_paid) THEN 'pending'
                WHEN EXISTS (SELECT 1 FROM subtasks x WHERE x.task_id = s.task_id AND x.status = '{PENDING}')
                  OR EXISTS (SELECT 1 FROM subtasks x WHERE x.task_id = s.task_id AND x.status = '{RUNNING}'
                             AND x.id <> :id) THEN 'running'
           END AS open_left,
           t.subtask_count, s.task_id, t.queue, {charges.RESULT}
    FROM s, t
""", types={**_OUTCOME_TYPES, "key": "text", "sha": "text"})

OPEN_LEFT = Prepared("mp_open_left", f"""
    SELECT EXISTS (SELECT 1 FROM subtasks WHERE task_id = :task_id AND status = '{PENDING}')
        OR EXISTS (SELECT 1 FROM subtasks WHERE task_id = :task_id AND status = '{RUNNING}')
""", types={"task_id": "uuid"})

# A failure for good, in the transaction that then fails its task; and a run stopped because its
# task ended (cancelled), which commits by itself.
FAIL = Prepared("mp_fail", _outcome(SubTaskStatus.FAILED.value, "error = :error") + f"""
    SELECT s.task_id, s.index, t.queue, {charges.RESULT} FROM s, t
""", types={**_OUTCOME_TYPES, "error": "text"})
STOP = Prepared("mp_stop", _outcome(SubTaskStatus.CANCELLED.value, "error = :error") + f"""
    SELECT s.task_id, s.index, t.queue, {charges.RESULT} FROM s, t
""", types={**_OUTCOME_TYPES, "error": "text"})

# -- retry: Running -> Pending (its message is re-sent by the Celery retry, or by `lost_run`) ----------
RETRY = text(f"""
    UPDATE subtasks SET status = '{PENDING}', error = :error
    WHERE id = :id AND status IN {sql_in(sources("subtask", PENDING))}
      AND (CAST(:held_by AS text) IS NULL OR worker = CAST(:held_by AS text))
    RETURNING task_id
""")

# -- a spot check that no other node can run is dropped (Pending -> Cancelled, nothing charged) -----------
DROP_CHECK = text(f"""
    WITH s AS (
        UPDATE subtasks SET status = '{SubTaskStatus.CANCELLED.value}', finished_at = :now, error = :reason
        FROM tasks t
        WHERE subtasks.id = :id AND subtasks.status = '{PENDING}' AND subtasks.platform_paid
          AND subtasks.replica > 0 AND t.id = subtasks.task_id AND t.redundancy = 1
        RETURNING subtasks.task_id, t.subtask_count, t.queue
    )
    SELECT s.task_id, s.subtask_count, s.queue,
           EXISTS (SELECT 1 FROM subtasks x, s WHERE x.task_id = s.task_id AND x.id <> :id
                   AND x.status IN ('{PENDING}', '{RUNNING}')) AS open_left
    FROM s
""")

# -- a task's end: what has not run is Cancelled ------------------------------------------------------
# Returns the message ids of the ones that were sent (to revoke), and takes the task's backlog. The
# caller holds the task's row. A subtask a node is claiming at this moment (its row locked) is
# skipped, not waited for: that claim waits on the task's row, then runs on a task that ended, and
# its node stops it (`work.stop`), as it stops those already running.
CANCEL_OPEN = text(f"""
    WITH s AS (
        UPDATE subtasks SET status = '{SubTaskStatus.CANCELLED.value}', finished_at = :now,
               error = COALESCE(error, :reason)
        WHERE id IN (SELECT id FROM subtasks WHERE task_id = :task_id AND status = '{PENDING}'
                     FOR UPDATE SKIP LOCKED)
        RETURNING id, dispatches
    ), b AS (
        UPDATE tasks SET backlog = 0 WHERE id = :task_id AND backlog <> 0 RETURNING id
    )
    SELECT id, dispatches FROM s WHERE dispatches > 0
""")

# -- assign: Created -> Scheduled on a queue with live nodes ------------------------------------------
# The common case in one round trip, with its TaskAssigned event; every subtask goes to the task's
# backlog, which the fair dispatcher releases. The queue is chosen per device beforehand (:cpu,
# :gpu, :any; NULL where none is live). Anything else finds no row and takes the locked path.
_QUEUE = "CASE device WHEN 'cpu' THEN :cpu WHEN 'gpu' THEN :gpu ELSE :any END"
ASSIGN = Prepared("mp_assign_queue", f"""
    WITH t AS (
        UPDATE tasks SET queue = {_QUEUE}, status = '{TaskStatus.SCHEDULED.value}', scheduled_at = :now,
               progress_at = :now, status_reason = NULL, dispatch_count = dispatch_count + 1, backlog = subtask_count
        WHERE id = :id AND status IN {sql_in(sources("task", TaskStatus.SCHEDULED))} AND model = :model
          AND {_QUEUE} IS NOT NULL
        RETURNING *
    ), {payloads.insert_cte("e", type="TaskAssigned", key="t.id::text", payload=payloads.task_assigned(), source="t")}
    SELECT t.queue, t.trace_id FROM t
""", types={"id": "uuid", "model": "text", "cpu": "text", "gpu": "text", "any": "text", "now": "timestamptz",
            "topic": "text"})
# The locked path's assignment, and recovery's re-routing of a task to another queue: its event.
ASSIGNED_EVENT = text(f"""
    WITH t AS (SELECT * FROM tasks WHERE id = :id),
    {payloads.insert_cte("e", type="TaskAssigned", key="t.id::text", payload=payloads.task_assigned(), source="t")}
    SELECT count(*) FROM e
""")

# -- release: the fair dispatcher sends subtasks that waited in the database --------------------------
# :tasks[i] gives :counts[i] of its next subtasks (index order); they become sent (dispatches 1) and
# leave the task's backlog. The caller holds the queue's release lock and the tasks' rows
# (`LOCK_TASKS`, taken first as every task-level door does, so a cancel never waits on a release
# that waits on it).
RELEASE = Prepared("mp_release", f"""
    WITH p AS (
        SELECT * FROM unnest(CAST(:tasks AS uuid[]), CAST(:counts AS integer[])) AS p(task_id, k)
    ), pick AS (
        SELECT x.id FROM p CROSS JOIN LATERAL (
            SELECT id FROM subtasks WHERE task_id = p.task_id AND status = '{PENDING}' AND dispatches = 0
            ORDER BY index, replica LIMIT p.k
        ) x
    ), s AS (
        UPDATE subtasks SET dispatches = 1 FROM pick WHERE subtasks.id = pick.id
        RETURNING subtasks.id, subtasks.task_id, subtasks.index, subtasks.replica
    ), b AS (
        UPDATE tasks SET backlog = GREATEST(0, backlog - c.n)
        FROM (SELECT task_id, count(*) AS n FROM s GROUP BY task_id) c WHERE tasks.id = c.task_id
        RETURNING tasks.id
    )
    SELECT s.id, s.task_id, s.index, s.replica FROM s ORDER BY s.task_id, s.index, s.replica
""", types={"tasks": "text", "counts": "text"})

LOCK_TASKS = text(f"""
    SELECT id FROM tasks WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN {ACTIVE}
    ORDER BY id FOR NO KEY UPDATE SKIP LOCKED
""")

# Recovery and `lost_run` send given subtasks again: a new message id each (`<id>:<dispatches>`), so
# a copy that did go out and runs is told apart. Only subtasks still open and of an active task.
# The task counts one more dispatch and has moved (recovery's stall clock starts again).
RESEND = text(f"""
    WITH s AS (
        UPDATE subtasks SET dispatches = dispatches + 1
        FROM tasks t
        WHERE subtasks.id = ANY(CAST(:ids AS uuid[])) AND t.id = subtasks.task_id AND t.status IN {ACTIVE}
          AND (subtasks.status = '{RUNNING}' OR (subtasks.status = '{PENDING}' AND subtasks.dispatches > 0))
        RETURNING subtasks.id, subtasks.dispatches, subtasks.index, subtasks.task_id
    ), t AS (
        UPDATE tasks SET dispatch_count = dispatch_count + CAST(:count AS integer), progress_at = now()
        WHERE id IN (SELECT task_id FROM s)
        RETURNING id
    )
    SELECT id, dispatches, index FROM s
""")
