"""What the blocking and the asyncio clients share: their settings, the
sans-IO session, and the address and TLS setup."""

from __future__ import annotations

import ssl
from typing import List, Optional, Tuple

from .errors import ClientClosed
from .session import Session


def parse_addrs(addr: str) -> List[Tuple[str, int]]:
    """``HOST:PORT``, or several separated by commas (e.g. every edge)."""
    addrs = [parse_addr(a.strip()) for a in addr.split(",") if a.strip()]
    if not addrs:
        raise ValueError(f"no address in {addr!r}")
    return addrs


def parse_addr(addr: str) -> Tuple[str, int]:
    """``host:port`` or ``[v6]:port``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def tls_context(tls_ca: Optional[str]) -> ssl.SSLContext:
    """A client TLS context trusting ``tls_ca`` (a PEM file; the system's
    roots when None), hostname checked, TLS 1.2 at least."""
    ctx = ssl.create_default_context(cafile=tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ClientBase:
    """The constructor both clients take, and what reads the same on both."""

    def __init__(
        self,
        addr: str,
        user: str,
        token: Optional[str] = None,
        tls_ca: Optional[str] = None,
        *,
        tls: Optional[bool] = None,
        server_name: Optional[str] = None,
        connect_timeout: float = 10.0,
        send_timeout: float = 30.0,
        reconnect: bool = True,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
    ) -> None:
        self.addr = addr
        self._addrs = parse_addrs(addr)
        self._addr_index = 0
        self._session = Session(user, token)
        use_tls = tls if tls is not None else tls_ca is not None
        self._tls = tls_context(tls_ca) if use_tls else None
        self._server_name_given = server_name
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        #: How many times a connection was made (1 after the first).
        self.connections = 0
        self._closed = False

    @property
    def _host(self) -> str:
        return self._addrs[self._addr_index][0]

    @property
    def _port(self) -> int:
        return self._addrs[self._addr_index][1]

    @property
    def _server_name(self) -> str:
        return self._server_name_given or self._host

    def _next_addr(self) -> None:
        """After a failed attempt or a lost connection: the next address
        in turn (the same one when there is only one)."""
        self._addr_index = (self._addr_index + 1) % len(self._addrs)

    @property
    def user(self) -> str:
        return self._session.user

    @property
    def repeats_dropped(self) -> int:
        """Deliveries dropped as repeats (same msg_id) so far, e.g. what a
        server sent again after a reconnect that the app already had."""
        return self._session.repeats_dropped

    @property
    def pending_at_login(self) -> int:
        """WELCOME's ``pending`` on the latest connection."""
        return self._session.pending_at_login

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
