"""Where a webhook may be delivered: public addresses only, unless the deployment allows more.

A webhook is a POST that a worker sends to a URL the user chose. Without a check, any user
could aim it at what only the cluster reaches: the cloud's metadata service (169.254.169.254),
MinIO, Flower, a node's /metrics, a database's HTTP port. So a URL whose host is, or resolves
to, a loopback, private, link-local or otherwise non-global address is refused:
at submit when the host is an address literal or `localhost` (a 422 naming `webhook_url`),
and at delivery after resolving the name, since DNS can change in between; the delivery's
HTTP session then checks the address it actually connected to (`public_session`).

`MARKETPLACE_WEBHOOK_ALLOW_PRIVATE` lifts it, for whose tasks (`private_allowed`): `admins`
(what `marketplace standalone` sets: its admin tries webhooks against a receiver on
localhost, while the users who sign up there still reach public addresses only), or `all`
(tests; a machine with one trusted user). The owner decides, at submit and again at delivery,
so REST, gRPC and Kafka submissions go through the one check (`check_submitted`).
"""
from __future__ import annotations

import ipaddress
import socket
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

_LOCAL_NAMES = ("localhost", "localhost.localdomain")


def _not_global(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is link-local anyway
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").rstrip(".").lower()


def private_allowed(*, owner_is_admin: bool) -> bool:
    """Whether a task of this owner may deliver to a non-public address (the setting decides)."""
    from marketplace.settings import get_settings

    allowance = get_settings().webhook_allow_private
    return allowance == "all" or (allowance == "admins" and owner_is_admin)


def check_submitted(session: Session, *, user_id: uuid.UUID, url: str) -> None:
    """At submit, whichever door: InvalidInput naming `webhook_url` when its owner may not use it."""
    from marketplace.infra.errors import InvalidInput
    from marketplace.users.models import User

    owner = session.get(User, user_id)
    refused = literal_refusal(url, private_ok=private_allowed(owner_is_admin=bool(owner and owner.is_admin)))
    if refused:
        raise InvalidInput.field("webhook_url", refused)


def literal_refusal(url: str, *, private_ok: bool = False) -> str | None:
    """Why `url` may not be a webhook, judged without DNS (at submit), else None."""
    if private_ok:
        return None
    host = _host(url)
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return f"webhook host {host!r} is this machine; webhooks go to public addresses only"
    try:
        private = _not_global(host)
    except ValueError:  # a name: checked when it is resolved, at delivery
        return None
    return f"webhook host {host} is not a public address; webhooks go to public addresses only" if private else None


def resolved_refusal(url: str, *, private_ok: bool = False) -> str | None:
    """Why a delivery to `url` is refused now, after resolving its host, else None.

    Raises OSError when the name does not resolve (worth a retry, like a refused connection).
    Every address must be public: the HTTP client may connect to any of them."""
    if private_ok:
        return None
    refused = literal_refusal(url)
    if refused:
        return refused
    parts, host = urlsplit(url), _host(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    private = [a for a in addresses if _not_global(a)]
    if private:
        return (f"webhook host {host} resolves to {', '.join(private)}, not a public address; "
                "webhooks go to public addresses only")
    return None


class _PublicOnly:
    """Mixed into urllib3's connections: the connected peer must be a global address."""

    host: str

    def _new_conn(self):  # type: ignore[no-untyped-def]
        sock = super()._new_conn()  # type: ignore[misc]
        peer = sock.getpeername()[0]
        if _not_global(peer):
            sock.close()
            raise NewConnectionError(self, f"refused: {self.host} connected to {peer}, not a public address")
        return sock


class _PublicHTTPPool(HTTPConnectionPool):
    ConnectionCls = type("PublicHTTPConnection", (_PublicOnly, HTTPConnection), {})


class _PublicHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = type("PublicHTTPSConnection", (_PublicOnly, HTTPSConnection), {})


class _PublicAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicHTTPPool, "https": _PublicHTTPSPool}


def public_session(*, private_ok: bool = False) -> requests.Session:
    """A `requests.Session` that refuses to send anything to a non-global peer.

    `resolved_refusal` checks the name before the POST, but the HTTP client resolves it again:
    a name that answers a public address to the check and a private one to the client (DNS
    rebinding) would get through. This session checks the address it actually connected to,
    before a byte is sent. (Through a proxy, the peer is the proxy, which the deployment chose.)
    `private_ok`: the task's owner may deliver anywhere (`private_allowed`)."""
    session = requests.Session()
    if not private_ok:
        session.mount("http://", _PublicAdapter())
        session.mount("https://", _PublicAdapter())
    return session
