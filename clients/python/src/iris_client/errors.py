"""Exceptions: one per REJECTED and ERROR code of docs/PROTOCOL.md section 5."""

from __future__ import annotations

from typing import Dict, Optional, Type


class IrisError(Exception):
    """Base of every exception this package raises."""


class Timeout(IrisError):
    """An operation did not finish within its timeout."""


class ConnectionLost(IrisError):
    """The connection failed and could not be made again in time (or
    reconnecting is off)."""


class ClientClosed(IrisError):
    """The client was closed."""


class ProtocolError(IrisError):
    """The server sent bytes that are not the Iris protocol."""


class Rejected(IrisError):
    """A SEND was answered REJECTED (the connection stays open).

    ``code`` is the REJECTED code (1 bad recipient, 2 too large, 3 rate
    limited, 4 unavailable, 5 inbox full, 6 timed out); ``retryable`` says
    whether sending again with the same msg_id may succeed.
    """

    BAD_RECIPIENT = 1
    TOO_LARGE = 2
    RATE_LIMITED = 3
    UNAVAILABLE = 4
    INBOX_FULL = 5
    TIMED_OUT = 6

    def __init__(self, code: int, reason: str, msg_id: bytes) -> None:
        super().__init__(f"REJECTED {code}: {reason}")
        self.code = code
        self.reason = reason
        self.msg_id = msg_id

    @property
    def retryable(self) -> bool:
        return self.code not in (Rejected.BAD_RECIPIENT, Rejected.TOO_LARGE)


class ServerError(IrisError):
    """The server sent ERROR and closed the connection."""

    code = 0

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"ERROR {code}: {reason}")
        self.code = code
        self.reason = reason


class ProtocolViolation(ServerError):
    code = 1


class AuthenticationFailed(ServerError):
    code = 2


class FrameTooLarge(ServerError):
    code = 3


class UnsupportedVersion(ServerError):
    code = 4


class ServerShuttingDown(ServerError):
    code = 5


class IdleTimeout(ServerError):
    code = 6


class TooManyConnections(ServerError):
    code = 7


_BY_CODE: Dict[int, Type[ServerError]] = {
    c.code: c
    for c in (
        ProtocolViolation,
        AuthenticationFailed,
        FrameTooLarge,
        UnsupportedVersion,
        ServerShuttingDown,
        IdleTimeout,
        TooManyConnections,
    )
}


def server_error(code: int, reason: str) -> ServerError:
    """The exception for ERROR ``code`` (ServerError for codes this version
    does not know)."""
    cls: Optional[Type[ServerError]] = _BY_CODE.get(code)
    return (cls or ServerError)(code, reason)


def reconnectable(err: ServerError) -> bool:
    """ERRORs after which connecting again is the right move: the server is
    stopping (a restart or failover follows), the connection idled out, or
    the server was full for a moment."""
    return isinstance(err, (ServerShuttingDown, IdleTimeout, TooManyConnections))
