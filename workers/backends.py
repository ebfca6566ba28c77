"""Where a node's run of a subtask is claimed, stored and recorded: one runner, two backends.

- `LocalBackend`: an operator's node, started with the platform's environment. The lifecycle's
  one-statement doors run here, and the part goes to the object store from here.
- `NodeBackend`: a credentialed node (`marketplace worker --credentials FILE`), which holds no
  database URL and no object-store key. Each step is a call to the platform's gRPC NodeService,
  which runs the same lifecycle doors and writes the part; the part is signed with the node's
  Ed25519 key over (subtask id, attempt, sha256 of the output).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from celery.backends.base import DisabledBackend

from marketplace.providers import keys
from marketplace.results import followup
from marketplace.tasks import lifecycle

logger = logging.getLogger(__name__)


class Unreachable(Exception):
    """The database (or the platform's gRPC door) is away: retry later, with the infrastructure backoff."""


class Refused(Exception):
    """The platform refused this node's part (not its run any more, a bad signature, a disabled node)."""


class Elsewhere(Exception):
    """Not for this node (its part of it was refused): send the message back for another node."""


class LocalBackend:
    remote = False

    def claim(self, subtask_id: str, *, hostname: str, message_id: str | None, incarnation: str | None
              ) -> tuple[dict[str, Any] | None, lifecycle.Work | None]:
        with _database():
            return lifecycle.claim(subtask_id, node=hostname, message_id=message_id, incarnation=incarnation)

    def redirect(self, subtask_id: str, *, hostname: str) -> str | None:
        from marketplace.scheduling.dispatch import redirect

        try:
            return redirect(subtask_id, refused_by=hostname)
        except Exception:  # the shared queue, then
            logger.warning("could not redirect subtask %s", subtask_id, exc_info=True)
            return None

    def others(self, subtask_id: str, *, hostname: str) -> bool:
        """Whether another live node may run it (one that ran none of its batch)."""
        from marketplace.scheduling.replicas import redirect_target

        try:
            return redirect_target(subtask_id, refused_by=hostname) is not None
        except Exception:
            return True

    def give_up_if_short(self, subtask_id: str) -> bool:
        """Fail a verified task whose queue has fewer live nodes than its redundancy; whether it did."""
        from marketplace.scheduling.replicas import fail_if_short

        try:
            return fail_if_short(subtask_id)
        except Exception:
            logger.warning("could not check the nodes of subtask %s's task", subtask_id, exc_info=True)
            return False

    def drop_check(self, subtask_id: str, *, reason: str) -> bool:
        recorded = lifecycle.drop_check(subtask_id, reason=f"spot check dropped: {reason}")
        if recorded.moved:
            followup.after_drop(recorded)
        return recorded.moved

    def store(self) -> Any:
        from marketplace.infra.storage import get_store

        return get_store()

    def complete(self, work: lifecycle.Work, *, hostname: str, part: bytes, seconds: float) -> dict[str, Any]:
        from marketplace.infra.storage import get_store
        from marketplace.results.service import part_key

        key = part_key(work.task_id, work.index, work.replica)
        sha = get_store().put_bytes(key, part, "application/json")
        with _database():
            recorded = lifecycle.complete(work, node=hostname, key=key, sha256=sha, seconds=seconds)
        outcome = work.outcome(ok=True, key=key, sha256=sha, seconds=seconds)
        followup.after_outcome(task_id=work.task_id, subtask_id=work.subtask_id, queue=work.queue, recorded=recorded)
        if recorded.last:
            outcome["finalized"] = followup.finish(work.task_id, subtasks=recorded.subtasks)
        return outcome

    def retry(self, work: lifecycle.Work, *, hostname: str, error: str) -> None:
        lifecycle.retry(work.subtask_id, error=error)

    def fail(self, work: lifecycle.Work, *, hostname: str, error: str, seconds: float) -> None:
        recorded = lifecycle.fail(work, node=hostname, error=error, seconds=seconds)
        followup.after_outcome(task_id=work.task_id, subtask_id=work.subtask_id, queue=work.queue, recorded=recorded)

    def stop(self, work: lifecycle.Work, *, hostname: str, reason: str, seconds: float) -> None:
        recorded = lifecycle.stop(work, node=hostname, seconds=seconds, reason=reason)
        followup.after_outcome(task_id=work.task_id, subtask_id=work.subtask_id, queue=work.queue, recorded=recorded)

    def stopped(self, task_id: str) -> bool:
        return bool(lifecycle.stopped(task_id))


class _database:
    """DBAPI errors that say the database is away become Unreachable; others go up."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        from sqlalchemy.exc import DBAPIError

        from marketplace.infra.errors import database_unavailable

        if isinstance(exc, DBAPIError) and database_unavailable(exc):
            raise Unreachable(f"database unavailable: {exc.orig}") from exc
        return False


class NodeBackend:
    """The platform's NodeService, authenticated by the credential's node id and secret."""

    remote = True
    TIMEOUT = 60.0

    def __init__(self, credential: dict[str, Any]) -> None:
        self.credential = credential
        self._stub: Any = None
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[str, str]] = {}  # subtask id -> the claim's (sealed facts, ticket)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-node-id", self.credential["node_id"]), ("x-node-secret", self.credential["node_secret"]))

    def stub(self) -> Any:
        with self._lock:
            if self._stub is None:
                import grpc

                from marketplace.pb.worker import worker_pb2_grpc

                channel = grpc.insecure_channel(self.credential["grpc_address"],
                                                options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
                self._stub = worker_pb2_grpc.NodeServiceStub(channel)
            return self._stub

    def call(self, method: str, request: Any) -> Any:
        import grpc

        try:
            return getattr(self.stub(), method)(request, metadata=self.metadata, timeout=self.TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise Unreachable(f"platform {self.credential['grpc_address']}: {code.name}: {exc.details()}"
                                  ) from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise Elsewhere(exc.details()) from None
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise Refused(f"{code.name}: {exc.details()}") from None
            raise

    def claim(self, subtask_id: str, *, hostname: str, message_id: str | None, incarnation: str | None
              ) -> tuple[dict[str, Any] | None, lifecycle.Work | None]:
        from marketplace.pb.worker import worker_pb2

        reply = self.call("ClaimSubtask", worker_pb2.ClaimSubtaskRequest(
            subtask_id=subtask_id, message_id=message_id or "", incarnation=incarnation or ""))
        if not reply.run:
            return json.loads(reply.outcome_json or "{}"), None
        fields = json.loads(reply.work_json)
        self._tickets[subtask_id] = (keys.sealed_fields(fields), reply.ticket)
        return None, lifecycle.Work(**fields)

    def redirect(self, subtask_id: str, *, hostname: str) -> str | None:
        return None  # the platform redirects at the claim (`providers.work.claim`), or answers Elsewhere

    def others(self, subtask_id: str, *, hostname: str) -> bool:
        return True  # the platform decided at the claim (`providers.work.claim`)

    def give_up_if_short(self, subtask_id: str) -> bool:
        return False  # the platform decides at the claim (`providers.work.claim`)

    def drop_check(self, subtask_id: str, *, reason: str) -> bool:
        return False  # the platform drops it at the claim (`providers.work.claim`)

    def _ticket(self, work: lifecycle.Work) -> tuple[str, str]:
        return self._tickets.pop(work.subtask_id, ("", ""))

    def store(self) -> Any:
        return None  # no object-store key here: inputs come with the claim, the part goes to the platform

    def complete(self, work: lifecycle.Work, *, hostname: str, part: bytes, seconds: float) -> dict[str, Any]:
        from marketplace.pb.worker import worker_pb2
        from marketplace.providers.keys import sign_part

        sha = hashlib.sha256(part).hexdigest()
        signature = sign_part(self.credential["private_key"], subtask_id=work.subtask_id, attempt=work.attempts,
                              sha256=sha)
        sealed, seal = self._ticket(work)
        reply = self.call("CompleteSubtask", worker_pb2.CompleteSubtaskRequest(
            subtask_id=work.subtask_id, attempt=work.attempts, output=part, sha256=sha, signature=signature,
            seconds=seconds, work_json=sealed, ticket=seal))
        return dict(json.loads(reply.outcome_json))

    def _end(self, work: lifecycle.Work, *, kind: str, error: str, seconds: float) -> None:
        from marketplace.pb.worker import worker_pb2

        sealed, seal = self._ticket(work)
        self.call("FailSubtask", worker_pb2.FailSubtaskRequest(subtask_id=work.subtask_id, attempt=work.attempts,
                                                               error=error, seconds=seconds, kind=kind,
                                                               work_json=sealed, ticket=seal))

    def retry(self, work: lifecycle.Work, *, hostname: str, error: str) -> None:
        self._end(work, kind="retry", error=error, seconds=0.0)

    def fail(self, work: lifecycle.Work, *, hostname: str, error: str, seconds: float) -> None:
        self._end(work, kind="fail", error=error, seconds=seconds)

    def stop(self, work: lifecycle.Work, *, hostname: str, reason: str, seconds: float) -> None:
        self._end(work, kind="stop", error=reason, seconds=seconds)

    def stopped(self, task_id: str) -> bool:
        from marketplace.pb.worker import worker_pb2

        return bool(self.call("CheckStop", worker_pb2.CheckStopRequest(task_id=task_id)).stop)


_backend: dict[str, Any] = {}


def current() -> LocalBackend | NodeBackend:
    """This process's backend: the credential's NodeService when it runs from one, else local."""
    if "b" not in _backend:
        from marketplace.providers import credential

        doc = credential.current()
        _backend["b"] = NodeBackend(doc) if doc else LocalBackend()
    return _backend["b"]  # type: ignore[no-any-return]


def reset() -> None:
    """Forget the backend (a pool child builds its own gRPC channel after fork)."""
    _backend.clear()


class NodeResultBackend(DisabledBackend):  # type: ignore[misc]
    """A credentialed node's result backend: none (nothing reads a subtask's Celery result), and a
    message's `lost_run` errback (a run killed at its hard time limit) goes to the platform's
    NodeService rather than to the scheduler's queue, which the node's broker user cannot reach."""

    def _call_task_errbacks(self, request: Any, exc: Any, traceback: Any) -> None:
        from marketplace.infra import names
        from marketplace.pb.worker import worker_pb2

        for errback in request.errbacks or ():
            name = errback.get("task") if isinstance(errback, dict) else getattr(errback, "task", None)
            if name != names.LOST_RUN:
                logger.warning("errback %s of %s not sent: a credentialed node sends none", name, request.id)
                continue
            try:
                NodeBackend(_credential()).call("FailSubtask", worker_pb2.FailSubtaskRequest(
                    kind="lost", message_id=request.id, subtask_id=str(request.id).rpartition(":")[0],
                    error=f"{type(exc).__name__}: {exc}"[:2000]))
            except Exception:  # recovery re-sends it once its task stalls
                logger.exception("could not report the lost run %s to the platform", request.id)


def _credential() -> dict[str, Any]:
    from marketplace.providers import credential

    doc = credential.current()
    assert doc is not None, "not a credentialed node"
    return doc


class NodeReporter:
    """A credentialed node's registry record, sent to the platform (`registry.signals.set_reporter`)."""

    def __init__(self, backend: NodeBackend) -> None:
        self.backend = backend

    def beat(self, info: dict[str, Any]) -> None:
        from marketplace.pb.worker import worker_pb2

        self.backend.call("Heartbeat", worker_pb2.NodeHeartbeatRequest(info_json=json.dumps(info, default=str)))

    def leave(self) -> None:
        from marketplace.pb.worker import worker_pb2

        self.backend.call("Heartbeat", worker_pb2.NodeHeartbeatRequest(leaving=True))


def install() -> None:
    """In a credentialed node's main process: heartbeats go to the platform; pool children build
    their own backend (a gRPC channel does not survive fork)."""
    from celery.signals import worker_process_init

    from marketplace.providers import credential
    from marketplace.registry.signals import set_reporter

    doc = credential.current()
    if doc is None:
        return
    set_reporter(NodeReporter(NodeBackend(doc)))
    worker_process_init.connect(_reset_in_child, weak=False)


def _reset_in_child(**_: Any) -> None:
    reset()


def _install_on_start(**_: Any) -> None:
    install()


def _connect() -> None:
    from celery.signals import worker_init

    worker_init.connect(_install_on_start, weak=False)


_connect()
