"""Billing: estimates and holds at submit, per-subtask charges, settlement at the end.

Charges never touch the balance row: a subtask inserts one ledger row (unique per
subtask and kind) and moves on, so subtasks of one user never wait on each other.
The balance moves once per task, at settlement, under the user's row lock.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from marketplace.billing import quotas
from marketplace.billing.models import HOLD_ACTIVE, HOLD_RELEASED, Hold, LedgerEntry
from marketplace.billing.money import q
from marketplace.catalog import ModelSpec, Price
from marketplace.infra.db import utcnow
from marketplace.infra.errors import InvalidInput, NotFound, PaymentRequired
from marketplace.infra.prepared import Prepared
from marketplace.settings import get_settings
from marketplace.tasks.models import ACTIVE_TASK_STATUSES
from marketplace.users.models import User


def price_for(spec: ModelSpec, device: str) -> Price:
    return spec.price[device]  # type: ignore[index]


def subtask_cost(price: Price, *, seconds: float, items: int, ok: bool) -> Decimal:
    """Start fee + seconds × price + items × price; failed subtasks per the price card."""
    full = price.start_fee + Decimal(str(round(seconds, 6))) * price.per_second + items * price.per_item
    if ok or price.failed == "full":
        return q(full)
    if price.failed == "start_fee":
        return q(price.start_fee)
    return Decimal("0")


def estimate_cost(spec: ModelSpec, device: str, *, items: int, subtasks: int) -> Decimal:
    """The most a task of `items` items in `subtasks` subtasks can cost: every subtask running to
    its time limit. Counts only, so a submit knows it before it reads an item."""
    price = price_for(spec, device)
    per_subtask = price.start_fee + Decimal(str(spec.time_limit)) * price.per_second
    return q(per_subtask * subtasks + price.per_item * items)


def grant_signup_credits(session: Session, *, user: User) -> None:
    amount = q(Decimal(get_settings().signup_credits))
    if amount <= 0:
        return
    session.add(LedgerEntry(user_id=user.id, kind="signup", amount=amount, settled=True))
    user.balance = (user.balance or Decimal("0")) + amount


def _held_sum(user_id: Any) -> Any:
    return select(func.coalesce(func.sum(Hold.amount), 0)).where(Hold.user_id == user_id, Hold.status == HOLD_ACTIVE)


def held_amount(session: Session, *, user_id: uuid.UUID) -> Decimal:
    return Decimal(session.scalar(_held_sum(user_id)) or 0)


def available_balance(session: Session, *, user: User) -> Decimal:
    return q(user.balance - held_amount(session, user_id=user.id))


# place_hold's two statements, prepared once per connection (`marketplace/prepared.py`): built
# through SQLAlchemy, compiling and binding them cost more CPU than running them, and PostgreSQL
# planned the sums anew on every submit.
# FOR NO KEY UPDATE (key_share): the task row this transaction already inserted holds a FOR KEY
# SHARE lock on the user through its foreign key; plain FOR UPDATE conflicts with that and two
# concurrent submits of one user deadlock (measured: 503s under 8 clients).
def lock_balance_sql(user_param: str) -> str:
    """The user's balance, row locked: `place_hold`'s first step, for a statement that takes it itself."""
    return f"SELECT balance FROM users WHERE id = :{user_param} FOR NO KEY UPDATE"


_LOCK_BALANCE = Prepared("mp_lock_balance", lock_balance_sql("uid"), types={"uid": "uuid"})
# The user's active holds (`_held_sum`), the settled charges of the day (one `daily_spend` row,
# kept by settlement) and the active tasks (`quotas.active_tasks_count`).
_SUMS = f"""
    (SELECT COALESCE(SUM(amount), 0) FROM holds WHERE user_id = :uid AND status = '{HOLD_ACTIVE}') AS held,
    (SELECT COALESCE(MAX(charged), 0) FROM daily_spend WHERE user_id = :uid AND day = :today) AS settled,
    (SELECT count(*) FROM tasks WHERE user_id = :uid
       AND status IN ({", ".join(sorted(f"'{s.value}'" for s in ACTIVE_TASK_STATUSES))})) AS active
"""
# The hold is inserted by the same statement: its sums read the snapshot from before it, so they
# count the user's *other* holds; if a check in place_hold fails the transaction rolls back.
_HOLD_AND_SUMS = Prepared("mp_hold_and_sums", f"""
    WITH new_hold AS (
        INSERT INTO holds (user_id, task_id, amount, status, created_at)
        VALUES (:uid, :tid, :amount, '{HOLD_ACTIVE}', :now)
        RETURNING id
    )
    SELECT {_SUMS}
""", types={"uid": "uuid", "tid": "uuid", "amount": "numeric", "now": "timestamptz", "today": "date"})
# `check_hold`'s read: the balance and the same sums, no lock, nothing written.
_HOLD_CHECK = Prepared("mp_hold_check", f"""
    SELECT (SELECT balance FROM users WHERE id = :uid) AS balance, {_SUMS}
""", types={"uid": "uuid", "today": "date"})


def check_hold(session: Session, *, user_id: uuid.UUID, amount: Decimal) -> None:
    """`place_hold`'s refusals (402, the daily spend and active task quotas' 429), read without
    its lock and without writing: a big submit asks first, before it builds a row, so what the
    balance cannot cover is refused in milliseconds and never waits on the user's lock. Passing
    promises nothing; `place_hold` decides, under the lock."""
    from marketplace.billing import quotas

    balance, held, settled_today, active = _HOLD_CHECK.execute(session.connection(), {
        "uid": user_id, "today": quotas.today_start().date()}).one()
    user = session.get(User, user_id)
    if balance is None or user is None:  # no such user: place_hold's lock says so
        return
    # The new task is not stored yet: every active task is another.
    _refuse_unless_covered(user, amount=amount, balance=balance, held=Decimal(held or 0),
                           settled_today=Decimal(settled_today or 0), other_active=active or 0)


def _refuse_unless_covered(
    user: User, *, amount: Decimal, balance: Decimal, held: Decimal, settled_today: Decimal, other_active: int
) -> None:
    """PaymentRequired naming balance and estimate, or QuotaExceeded (daily spend, active tasks)."""
    from marketplace.billing import quotas

    available = q(balance - held)
    if amount > available:
        raise PaymentRequired(
            f"estimated cost {amount} exceeds available balance {available}",
            balance=str(available),
            estimate=str(amount),
        )
    quotas.check_daily_spend(user=user, amount=amount, held=held, settled_today=settled_today)
    quotas.check_active_tasks(user, active=other_active)


def place_hold(
    session: Session, *, user_id: uuid.UUID, task_id: uuid.UUID, amount: Decimal, balance: Decimal | None = None
) -> None:
    """Reserve `amount` for a task: 402 naming balance and estimate, or 429 over the daily spend quota.

    The user's row lock serializes one user's submits, so two of them cannot both
    pass a check that only one of them fits. `balance`: the caller's statement took that
    lock already (`lock_balance_sql`) and read it.
    """
    # The balance is read by the locking statement itself: the request loaded the user before.
    session.flush()  # what session.execute would do first: anything pending is written before the lock
    conn = session.connection()
    if balance is None:
        balance = _LOCK_BALANCE.execute(conn, {"uid": user_id}).scalar_one()
    user = session.get(User, user_id)  # its quota settings (the API's request already loaded it)
    assert user is not None
    # The three sums and the new hold in one round trip, in a statement after the lock: a statement's snapshot is
    # taken when it starts, so sums read by the locking statement itself would miss the task a
    # concurrent submit committed while this one waited (measured: 24 of 32 accepted, quota 20).
    held, settled_today, active = _HOLD_AND_SUMS.execute(conn, {
        "uid": user_id, "today": quotas.today_start().date(), "tid": task_id, "amount": q(amount), "now": utcnow(),
    }).one()
    # The new task is already in this transaction and counts itself: the others are active - 1.
    _refuse_unless_covered(user, amount=amount, balance=balance, held=Decimal(held or 0),
                           settled_today=Decimal(settled_today or 0), other_active=(active or 0) - 1)


def record_subtask_charge(
    session: Session,
    *,
    user_id: uuid.UUID,
    task_id: uuid.UUID,
    subtask_id: uuid.UUID,
    amount: Decimal,
    ok: bool,
    detail: str | None = None,
    hold_locked: bool = False,
) -> bool:
    """Insert the subtask's charge once; False when it was already charged (redelivery).

    The hold row is read FOR SHARE: charges never wait on each other, but settlement
    (which locks the hold FOR UPDATE first) either sees this charge or runs before it,
    in which case the task is already settled and the caller settles this late charge
    with `settle_late` after commit (a subtask still running when its task was cancelled).
    """
    kind = "charge" if ok else "charge_failed"
    # Under settlement's own FOR UPDATE lock (backfill) the hold is active by construction.
    hold_status = HOLD_ACTIVE if hold_locked else session.scalar(
        select(Hold.status).where(Hold.task_id == task_id).with_for_update(read=True))
    stmt = (
        pg_insert(LedgerEntry)
        .values(
            user_id=user_id, task_id=task_id, subtask_id=subtask_id, kind=kind,
            amount=-q(amount), detail=detail, settled=False, created_at=utcnow(),
        )
        .on_conflict_do_nothing(constraint="uq_ledger_subtask_kind")
        .returning(LedgerEntry.id)
    )
    inserted = session.execute(stmt).first() is not None
    if inserted:
        from marketplace.audit import service as audit

        audit.enqueue(
            session, actor="billing", action=f"billing.{kind}", subject=f"subtask:{subtask_id}", task_id=task_id,
            data={"user_id": str(user_id), "subtask_id": str(subtask_id), "amount": str(-q(amount)), "detail": detail},
        )
        if hold_status == HOLD_RELEASED:
            # Settled in a second transaction (settle_late): upgrading this FOR SHARE lock
            # here could deadlock with another late charge of the same task.
            session.info.setdefault(LATE_KEY, set()).add(task_id)
    return inserted


LATE_KEY = "marketplace.billing.late_tasks"


def settle_late(session: Session, *, task_id: uuid.UUID) -> None:
    """Settle charges that arrived after their task was settled."""
    from marketplace.tasks.models import Task

    task = session.get(Task, task_id)
    if task is not None:
        settle_task(session, task=task)


def settle_late_now(task_id: uuid.UUID | str) -> None:
    """`settle_late` in a transaction of its own: a charge that landed after its task was settled
    (its outcome's statement answered so), settled right after that statement's commit."""
    from marketplace.infra.db import session_scope

    with session_scope() as session:
        settle_late(session, task_id=uuid.UUID(str(task_id)))


# How long WatchTask and a webhook delivery wait for a final task to settle before they go on.
SETTLE_WAIT_SECONDS = 60.0


def still_settling(session: Session, *, task_id: uuid.UUID) -> bool:
    """Whether a final task's cost may still change: a subtask still running (a cancelled task's
    finish and are charged afterwards), or a charge not yet in its cost (`settle_late`, the
    transaction after the subtask's own). WatchTask and webhooks wait for it to be over, at most
    SETTLE_WAIT_SECONDS."""
    from marketplace.tasks.models import SubTask, SubTaskStatus

    running = select(SubTask.id).where(SubTask.task_id == task_id, SubTask.status == SubTaskStatus.RUNNING.value)
    unsettled = select(LedgerEntry.id).where(LedgerEntry.task_id == task_id, LedgerEntry.settled.is_(False),
                                             LedgerEntry.kind != "earning")
    return bool(session.scalar(select(running.exists() | unsettled.exists())))


def tasks_with_stray_charges(session: Session, *, recorded_before: datetime, limit: int = 200) -> list[uuid.UUID]:
    """Tasks whose hold is released but which hold charges still unsettled, recorded before the cutoff.

    A charge landing after settlement is settled by `settle_late` right after its commit; a
    process that died in between left it here, never taken from the balance.
    """
    return list(session.scalars(
        select(LedgerEntry.task_id).join(Hold, Hold.task_id == LedgerEntry.task_id)
        .where(LedgerEntry.settled.is_(False), Hold.status == HOLD_RELEASED, LedgerEntry.created_at < recorded_before,
               LedgerEntry.kind != "earning")
        .distinct().limit(limit)
    ))


def task_charges(session: Session, *, task_id: uuid.UUID) -> Decimal:
    total = session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
            LedgerEntry.task_id == task_id, LedgerEntry.kind.in_(("charge", "charge_failed"))
        )
    )
    return q(-Decimal(total or 0))


# The charges it settles also go to `daily_spend`, by the UTC day each was recorded: what the
# daily spend quota reads at submit (`_HOLD_AND_SUMS`). The same statement applies the
# delta to the user's balance (its row lock is taken here, after the caller's hold lock: lock
# order hold, then user) and releases the hold: one round trip where there were three. Prepared
# once per connection, as its five CTEs took PostgreSQL longer to plan than to run.
_SETTLE = Prepared("mp_settle", f"""
    WITH s AS (
        UPDATE ledger_entries SET settled = true WHERE task_id = :task_id AND NOT settled AND kind <> 'earning'
        RETURNING amount, kind, user_id, created_at, subtask_id, task_id
    ), e AS (
        -- The provider's share of each charge settled now whose run was a provider's node's: an
        -- `earning` (once per subtask: the ledger's unique key), credited to its balance after the
        -- commit (`credit_earnings`). Nothing for a failed or refused part: only `charge` rows; nothing
        -- for a replica its quorum judged wrong (`results.quorum`).
        INSERT INTO ledger_entries (user_id, task_id, subtask_id, kind, amount, detail, settled, created_at, node_id)
        SELECT n.provider_id, s.task_id, s.subtask_id, 'earning', round(-s.amount * :share, 6),
               'node ' || n.name, false, :now, n.id
        FROM s JOIN subtasks st ON st.id = s.subtask_id JOIN nodes n ON n.hostname = st.worker
        WHERE s.kind = 'charge' AND st.agreed IS NOT FALSE  -- a replica that disagreed earns nothing
        ON CONFLICT ON CONSTRAINT uq_ledger_subtask_kind DO NOTHING
        RETURNING user_id
    ), d AS (
        INSERT INTO daily_spend (user_id, day, charged)
        SELECT user_id, CAST(created_at AT TIME ZONE 'UTC' AS date), -SUM(amount)
        FROM s WHERE kind IN ('charge', 'charge_failed')
        GROUP BY 1, 2
        ON CONFLICT (user_id, day) DO UPDATE SET charged = daily_spend.charged + EXCLUDED.charged
    ), delta AS (
        SELECT COALESCE(SUM(amount), 0) AS amount FROM s
    ), u AS (
        -- The hold covered the worst case, so this stays >= 0; GREATEST is the last guard.
        UPDATE users SET balance = GREATEST(0, users.balance + delta.amount)
        FROM delta WHERE users.id = :user_id AND delta.amount <> 0
        RETURNING users.balance
    ), h AS (
        UPDATE holds SET status = '{HOLD_RELEASED}', released_at = :now
        WHERE task_id = :task_id AND status = '{HOLD_ACTIVE}'
        RETURNING id
    )
    SELECT (SELECT amount FROM delta) AS delta,
           (SELECT COALESCE(SUM(amount), 0) FROM s WHERE kind IN ('charge', 'charge_failed'))
           + (SELECT COALESCE(SUM(amount), 0) FROM ledger_entries
              WHERE task_id = :task_id AND settled AND kind IN ('charge', 'charge_failed')) AS charges,
           (SELECT balance FROM u) AS balance,
           (SELECT array_agg(DISTINCT user_id::text) FROM e) AS providers
""", types={"task_id": "uuid", "user_id": "uuid", "now": "timestamptz", "share": "numeric"})


# Prepared, on the session's connection: it runs in every task's last step (finalize, cancel).
_LOCK_HOLD = Prepared("mp_lock_hold", "SELECT id FROM holds WHERE task_id = :task_id FOR UPDATE",
                      types={"task_id": "uuid"})


def lock_hold(session: Session, *, task_id: uuid.UUID) -> None:
    """Lock the task's hold row FOR UPDATE: settlement's first step (lock order: hold, then user).

    Without a flush, as `_SETTLE`: the caller's pending changes (finalize's task row) are
    written once, at commit."""
    _LOCK_HOLD.execute(session.connection(), {"task_id": task_id})


def settle_task(session: Session, *, task: Any, hold_locked: bool = False) -> Decimal:
    """Apply the task's unsettled charges to the balance and release its hold; idempotent.

    `hold_locked`: the caller already ran `lock_hold` in this transaction.
    """
    # Lock order everywhere: hold, then user (see record_subtask_charge).
    if not hold_locked:
        lock_hold(session, task_id=task.id)
    # One statement marks the unsettled rows settled and sums them (the delta applied now), and
    # sums all the task's charges: the rows settled before, read from the statement's snapshot
    # (where they are the settled ones), plus the charges among the rows it just marked.
    # On the session's connection, without a flush: finalize writes the task row once, at commit.
    row = _SETTLE.execute(session.connection(), {"task_id": task.id, "user_id": task.user_id, "now": utcnow(),
                                                 "share": get_settings().provider_share}).one()
    if row.providers:
        from marketplace.infra.after_commit import defer

        defer(session, credit_earnings_now, list(row.providers))
    delta = Decimal(row.delta)
    balance = row.balance
    if delta:
        # A User this session loaded (the request's caller) reads the new balance, as an ORM update would.
        loaded = session.identity_map.get(identity_key(User, task.user_id))
        if loaded is not None:
            set_committed_value(loaded, "balance", balance)
    task.cost = q(-Decimal(row.charges))
    if delta:
        from marketplace.audit import service as audit

        audit.enqueue(session, actor="billing", action="billing.settled", subject=f"task:{task.id}", task_id=task.id,
                      data={"user_id": str(task.user_id), "cost": str(task.cost), "applied": str(q(delta)),
                            "balance": str(q(balance))})
    return task.cost


# A provider's earnings not yet in its balance, applied under its row lock alone (settlement holds
# the buyer's: taking the provider's there too could deadlock two settlements that buy from each
# other's nodes).
_CREDIT_EARNINGS = Prepared("mp_credit_earnings", """
    WITH e AS (
        UPDATE ledger_entries SET settled = true WHERE user_id = :uid AND kind = 'earning' AND NOT settled
        RETURNING amount
    )
    UPDATE users SET balance = users.balance + (SELECT COALESCE(SUM(amount), 0) FROM e)
    WHERE users.id = :uid AND EXISTS (SELECT 1 FROM e)
    RETURNING (SELECT COALESCE(SUM(amount), 0) FROM e) AS credited
""", types={"uid": "uuid"})


def credit_earnings(session: Session, *, provider_id: uuid.UUID | str) -> Decimal:
    """Apply the provider's unapplied earnings to its balance; what was credited (idempotent)."""
    row = _CREDIT_EARNINGS.execute(session.connection(), {"uid": uuid.UUID(str(provider_id))}).first()
    return Decimal(row.credited) if row else Decimal("0")


def credit_earnings_now(provider_ids: list[str]) -> None:
    """`credit_earnings` for each provider, each in its own transaction (after a settlement's commit)."""
    import logging

    from marketplace.infra.db import session_scope

    for pid in provider_ids:
        try:
            with session_scope() as session:
                credit_earnings(session, provider_id=pid)
        except Exception:  # the provider's next settlement credits them
            logging.getLogger(__name__).exception("billing: could not credit the earnings of %s", pid)


def charge_detail(model: str, device: str, items: Any, seconds: float | None) -> str:
    """A subtask charge's ledger `detail`, the same from every path that records one."""
    return f"{model}/{device} {items} items {seconds or 0:.3f}s"


# --- balance, ledger and top-ups --------------------------------------------------------

MAX_TOPUP = Decimal("1000000000")


def parse_amount(raw: Any, *, field: str = "amount") -> Decimal:
    """A positive credit amount from a decimal string (or integer); never from a float."""
    if isinstance(raw, bool) or isinstance(raw, float) or not isinstance(raw, (str, int)):
        raise InvalidInput.field(field, 'must be a decimal string, e.g. "12.50"')
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation:
        raise InvalidInput.field(field, f"{raw!r} is not a decimal number") from None
    if not amount.is_finite() or amount <= 0:
        raise InvalidInput.field(field, "must be greater than 0")
    # The bound first: quantizing 1e22 or more overflows the 28-digit context (InvalidOperation).
    if amount > MAX_TOPUP:
        raise InvalidInput.field(field, f"at most {MAX_TOPUP}")
    if amount != q(amount):
        raise InvalidInput.field(field, "at most 6 decimal places")
    return q(amount)


def balance_document(session: Session, *, user: User) -> dict[str, str]:
    """`{balance, held, available}` as decimal strings."""
    held = q(held_amount(session, user_id=user.id))
    balance = q(user.balance)
    return {"balance": str(balance), "held": str(held), "available": str(q(balance - held))}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def entry_document(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id, "kind": entry.kind, "amount": str(q(entry.amount)),
        "task_id": str(entry.task_id) if entry.task_id else None,
        "subtask_id": str(entry.subtask_id) if entry.subtask_id else None,
        "detail": entry.detail, "settled": bool(entry.settled), "created_at": _iso(entry.created_at),
    }


def ledger_page(
    session: Session, *, user_id: uuid.UUID, task_id: uuid.UUID | None = None, limit: int = 50,
    cursor: int | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first, keyset-paginated by id; returns (entries, next cursor or None)."""
    stmt = select(LedgerEntry).where(LedgerEntry.user_id == user_id).order_by(LedgerEntry.id.desc()).limit(limit + 1)
    if task_id is not None:
        stmt = stmt.where(LedgerEntry.task_id == task_id)
    if cursor is not None:
        stmt = stmt.where(LedgerEntry.id < cursor)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return [entry_document(r) for r in rows], (rows[-1].id if more and rows else None)


def topup(session: Session, *, user_id: uuid.UUID | str, amount: Decimal, actor: str) -> LedgerEntry:
    """Credit a user (admin action): a settled `topup` ledger row and the balance, under the user's lock."""
    try:
        uid = uuid.UUID(str(user_id))
    except ValueError:
        raise NotFound(f"user {user_id} not found", field="user_id") from None
    # populate_existing: an admin topping up their own account has this row in the session already
    # (the request's user), and the locked read handed back that object with its stale balance:
    # concurrent top-ups overwrote each other (8 x 25 of 1 credit left 38 of 200).
    user = session.execute(select(User).where(User.id == uid).with_for_update(key_share=True)
                           .execution_options(populate_existing=True)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"user {user_id} not found", field="user_id")
    entry = LedgerEntry(user_id=uid, kind="topup", amount=q(amount), settled=True, detail=f"top-up by {actor}",
                        created_at=utcnow())
    session.add(entry)
    user.balance = q(user.balance + amount)
    session.flush()
    from marketplace.audit import service as audit

    audit.append(session, actor=actor, action="billing.topup", subject=f"user:{uid}",
                 data={"amount": str(q(amount)), "balance": str(user.balance), "ledger_id": entry.id})
    return entry


def charge(
    session: Session, *, task_id: uuid.UUID | str, subtask_id: uuid.UUID | str | None, amount: Decimal,
    kind: str = "charge", detail: str | None = None,
) -> tuple[LedgerEntry, bool]:
    """An operator's charge (gRPC `Charge`): (entry, created). `charge`/`charge_failed` are
    per subtask and idempotent like the signal's; an `adjustment` is a task-level entry,
    settled with the task (or at once, via settle_late, when the task is already settled)."""
    from marketplace.tasks.models import SubTask, Task

    if kind not in ("charge", "charge_failed", "adjustment"):
        raise InvalidInput.field("kind", "one of charge, charge_failed, adjustment")
    try:
        tid = uuid.UUID(str(task_id))
        sid = uuid.UUID(str(subtask_id)) if subtask_id else None
    except ValueError:
        raise InvalidInput.field("task_id" if subtask_id is None else "subtask_id", "not a valid id") from None
    task = session.get(Task, tid)
    if task is None:
        raise NotFound(f"task {task_id} not found")
    if sid is not None and session.scalar(select(SubTask.id).where(SubTask.id == sid, SubTask.task_id == tid)) is None:
        raise NotFound(f"subtask {subtask_id} of task {task_id} not found")
    if kind == "adjustment":
        entry = LedgerEntry(user_id=task.user_id, task_id=tid, subtask_id=sid, kind=kind, amount=-q(amount),
                            detail=detail, settled=False)
        session.add(entry)
        session.flush()
        if task.cost is not None:  # already settled: this entry is late
            session.info.setdefault(LATE_KEY, set()).add(tid)
        return entry, True
    if sid is None:
        raise InvalidInput.field("subtask_id", f"a {kind} belongs to one subtask")
    created = record_subtask_charge(session, user_id=task.user_id, task_id=tid, subtask_id=sid, amount=amount,
                                    ok=kind == "charge", detail=detail)
    entry = session.scalar(select(LedgerEntry).where(LedgerEntry.subtask_id == sid, LedgerEntry.kind == kind))
    assert entry is not None
    return entry, created
