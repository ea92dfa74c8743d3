"""Iris client: ``from iris_client import Client`` (blocking) or
``from iris_client.aio import Client`` (asyncio); both over the sans-IO
codec in :mod:`iris_client.codec` and session in :mod:`iris_client.session`.

    c = Client("127.0.0.1:7070", user="alice", token=None, tls_ca=None)
    msg_id = c.send("bob", b"hi")          # once STORED; raises Rejected
    for m in c.messages(timeout=5.0):      # .seq .msg_id .sender .sent_ms .body
        print(m.sender, m.body)
    c.close()
"""

from .client import Client
from .codec import Message
from .errors import (
    AuthenticationFailed,
    ClientClosed,
    ConnectionLost,
    FrameTooLarge,
    IdleTimeout,
    IrisError,
    ProtocolError,
    ProtocolViolation,
    Rejected,
    ServerError,
    ServerShuttingDown,
    Timeout,
    TooManyConnections,
    UnsupportedVersion,
)
from .session import new_msg_id

__all__ = [
    "AuthenticationFailed",
    "Client",
    "ClientClosed",
    "ConnectionLost",
    "FrameTooLarge",
    "IdleTimeout",
    "IrisError",
    "Message",
    "ProtocolError",
    "ProtocolViolation",
    "Rejected",
    "ServerError",
    "ServerShuttingDown",
    "Timeout",
    "TooManyConnections",
    "UnsupportedVersion",
    "new_msg_id",
]
__version__ = "0.1.0"
