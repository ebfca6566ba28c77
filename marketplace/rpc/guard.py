"""What every gRPC call passes before its method runs: the shared rate limits and the stream slots.

Rate limits: each call counts against REST's per-request limit, on the same Redis counter
(`marketplace.infra.ratelimit`): per user for a valid access token, else per address. Sign-ups and
failed logins are counted by UserService itself, through the same calls as REST's views. A refusal
is RESOURCE_EXHAUSTED naming the limit, with `retry-after` (seconds) in the trailing metadata, as
REST answers 429 with Retry-After.

Stream slots: the sync server runs every call on one thread pool, and a server stream
(`WatchTask`, reflection) holds its thread for as long as it is open. Sixteen of them took the
whole pool, and every other user's unary call waited until one closed (DEADLINE_EXCEEDED). So
streams get at most `stream_capacity(max_workers)` threads together, always leaving some for
unary calls, and at most MARKETPLACE_GRPC_STREAMS_PER_USER per caller (user, or address when
anonymous), so one caller cannot take every stream slot. A stream over either cap is refused at
once with RESOURCE_EXHAUSTED saying which. This is chosen over moving to `grpc.aio`: the servicers
and every service they call are synchronous (SQLAlchemy sessions, redis-py, Celery publishes), so
an asyncio server would run them in a thread pool anyway, where the same starvation returns; with
caps the bound is explicit. Slots are counted in this process, which is what owns the threads.

The health service passes untouched: probes are never limited, and its Watch does not hold a thread
(`experimental_non_blocking`).
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import grpc

from marketplace.infra import errors, ratelimit

logger = logging.getLogger(__name__)

# NodeService too: a node's calls (a claim and a part per subtask) are paced by the messages its
# queue hands it, not by a person, and the per-address limit (120/minute) would cap a node at one
# subtask a second. Its calls carry a 256-bit node secret, not guessable by trying.
EXEMPT_SERVICES = ("/grpc.health.v1.Health/", "/marketplace.worker.v1.NodeService/")


def stream_capacity(max_workers: int) -> int:
    """Threads that open streams may hold together: a quarter of the pool (at least 2) stays for unary calls."""
    return max(1, max_workers - max(2, max_workers // 4))


def client_address(context: grpc.ServicerContext) -> str:
    """The caller's IP address from the peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`, percent-encoded or not)."""
    peer = unquote(context.peer() or "")
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return rest or peer or "unknown"


def caller_identity(metadata: Any, address: str) -> str:
    """`user:<id>` for a valid access token in `authorization`, else `ip:<address>` (REST's rate key)."""
    from marketplace.users import tokens

    user_id = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                user_id = tokens.subject(token.strip())
            break
    return ratelimit.request_identity(user_id=user_id, address=address)


class StreamSlots:
    """Open streams, in all and per caller; `acquire` refuses over either cap."""

    RETRY_AFTER = 5  # seconds: a hint; slots free as streams end

    def __init__(self, *, total: int, per_caller: Callable[[], int]) -> None:
        self.total = total
        self._per_caller = per_caller
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> None:
        limit = self._per_caller()
        with self._lock:
            if self._open[caller] >= limit:
                raise self._refusal(f"too many open streams: at most {limit} at once per "
                                    f"{'user' if caller.startswith('user:') else 'address'}; "
                                    "close one first", limit="grpc_streams_per_user")
            if sum(self._open.values()) >= self.total:
                raise self._refusal(f"the server's {self.total} stream slots are all in use; try again shortly",
                                    limit="grpc_streams")
            self._open[caller] += 1

    def release(self, caller: str) -> None:
        with self._lock:
            self._open[caller] -= 1
            if self._open[caller] <= 0:
                del self._open[caller]

    def in_use(self) -> int:
        with self._lock:
            return sum(self._open.values())

    def _refusal(self, detail: str, *, limit: str) -> errors.RateLimited:
        logger.info("gRPC stream refused: %s", detail)
        return errors.RateLimited(detail, retry_after=self.RETRY_AFTER, limit=limit)


class GuardInterceptor(grpc.ServerInterceptor):
    """Counts each call against the shared rate limits and holds a stream slot while a stream is open.

    The checks run inside the wrapped handler, on the pool thread that serves the call:
    `intercept_service` itself runs on the server's polling thread, which must not wait on Redis."""

    def __init__(self, *, limits: ratelimit.RateLimits, slots: StreamSlots) -> None:
        self.limits = limits
        self.slots = slots

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(EXEMPT_SERVICES):
            return handler
        metadata = details.invocation_metadata
        streaming = handler.request_streaming or handler.response_streaming

        def admit(context: grpc.ServicerContext) -> str:
            caller = caller_identity(metadata, client_address(context))
            self.limits.request(caller)
            if streaming:
                self.slots.acquire(caller)
            return caller

        if handler.unary_unary:
            return _rebuild(grpc.unary_unary_rpc_method_handler, handler, _unary(admit, handler.unary_unary))
        if handler.stream_unary:
            return _rebuild(grpc.stream_unary_rpc_method_handler, handler,
                            _unary(admit, handler.stream_unary, self.slots.release))
        inner = handler.unary_stream or handler.stream_stream
        build = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return _rebuild(build, handler, _stream(admit, inner, self.slots.release))


def _refuse(context: grpc.ServicerContext, exc: Exception) -> None:
    from marketplace.rpc.calls import to_failure

    failure = to_failure(exc)
    if failure.metadata:
        context.set_trailing_metadata(tuple(failure.metadata))
    context.abort(failure.code, failure.detail)


def _unary(admit: Callable[[grpc.ServicerContext], str], inner: Callable[..., Any],
           release: Callable[[str], None] | None = None) -> Callable[..., Any]:
    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            caller = admit(context)
        except Exception as exc:  # a refusal, or Redis/auth trouble: mapped like any call's error
            _refuse(context, exc)
        try:
            return inner(request, context)
        finally:
            if release is not None:
                release(caller)

    return behavior


def _stream(admit: Callable[[grpc.ServicerContext], str], inner: Callable[..., Iterator[Any]],
            release: Callable[[str], None]) -> Callable[..., Iterator[Any]]:
    def behavior(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            caller = admit(context)
        except Exception as exc:
            _refuse(context, exc)
        # The slot is held until the stream's generator ends (the thread is free only then), not
        # at the RPC's end: a method that notices a cancel late still holds its thread till it does.
        try:
            yield from inner(request, context)
        finally:
            release(caller)

    return behavior


def _rebuild(build: Callable[..., Any], handler: Any, behavior: Callable[..., Any]) -> Any:
    return build(behavior, request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
