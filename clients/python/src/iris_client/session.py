"""What a client remembers across connections, sans-IO: the SENDs not yet
answered (sent again, with the same msg_id, after a reconnect), the
messages delivered and not yet handed to the application, and what has been
acknowledged. The blocking and asyncio clients only move bytes and wait.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Tuple, Union

from . import codec
from .codec import Message, RejectedFrame, Stored
from .errors import ProtocolError, server_error

#: SENDs a client keeps unanswered at once; more wait (asyncio) for room.
IN_FLIGHT_MAX = 1024
#: msg_ids remembered to drop a message delivered twice (after a failover).
RECENT_IDS_MAX = 10_000
#: Consumed messages acknowledged in one ACK at most (the server's delivery
#: window is 512 by default: ACK well before it).
ACK_EVERY = 64


def new_msg_id() -> bytes:
    """A fresh random 16-byte msg_id."""
    return os.urandom(16)


def backoff_delays(initial: float, cap: float) -> "BackoffIter":
    return BackoffIter(initial, cap)


class BackoffIter:
    """Capped exponential backoff with full jitter: each delay is uniform in
    [0, min(cap, initial * 2**n)]."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial = initial
        self.cap = cap
        self.n = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self.n))
        self.n = min(self.n + 1, 32)
        return random.uniform(0, ceiling)


Answer = Union[Stored, RejectedFrame]


class Session:
    def __init__(self, user: str, token: Optional[str]) -> None:
        codec.check_user_id(user)
        self.user = user
        self.token = token
        self.max_frame = codec.DEFAULT_MAX_FRAME
        self.welcomed = False
        self.pending_at_login = 0
        # msg_id -> encoded SEND, in send order.
        self.unanswered: "OrderedDict[bytes, bytes]" = OrderedDict()
        self.answers: Dict[bytes, Answer] = {}
        self.inbox: Deque[Message] = deque()
        self.recent_ids: "OrderedDict[bytes, None]" = OrderedDict()
        #: Deliveries dropped as repeats of a msg_id already delivered.
        self.repeats_dropped = 0
        self.consumed = 0
        # Per connection: the highest seq delivered on it (an ACK above it
        # is a protocol violation) and the last ACK sent on it.
        self.conn_seq_max = 0
        self.conn_first_seq = 0
        self.conn_acked = 0
        # Connections made so far; a PING belongs to the one it went out on.
        self.conn_id = 0
        # nonce -> (connection id, answered)
        self.pongs: Dict[int, Tuple[int, bool]] = {}
        self._nonce = 0

    # -- connecting --------------------------------------------------------

    def hello(self) -> bytes:
        self.welcomed = False
        self.conn_id += 1
        self.conn_seq_max = 0
        self.conn_first_seq = 0
        self.conn_acked = 0
        # PINGs of the old connection stay unanswered: pong_state says "lost".
        self.pongs = {n: p for n, p in self.pongs.items() if p[1]}
        return codec.encode_hello(self.user, self.token)

    def resend(self) -> bytes:
        """After WELCOME on a new connection: every unanswered SEND again, in
        order (the server's msg_id dedup makes that safe). Messages the
        server sends again from its last ACK are dropped here and ACKed."""
        return b"".join(self.unanswered.values())

    # -- sending -----------------------------------------------------------

    def send_frame(self, msg_id: bytes, to: str, body: bytes) -> bytes:
        if codec.send_frame_len(to, body) > self.max_frame:
            raise ValueError(
                f"SEND of {len(body)} bytes to {to!r} exceeds the server's max_frame {self.max_frame}"
            )
        frame = codec.encode_send(msg_id, to, body)
        self.unanswered[msg_id] = frame
        return frame

    def forget(self, msg_id: bytes) -> None:
        self.unanswered.pop(msg_id, None)
        self.answers.pop(msg_id, None)

    def take_answer(self, msg_id: bytes) -> Optional[Answer]:
        return self.answers.pop(msg_id, None)

    def ping_frame(self) -> Tuple[int, bytes]:
        self._nonce += 1
        self.pongs[self._nonce] = (self.conn_id, False)
        return self._nonce, codec.encode_ping(self._nonce)

    def pong_state(self, nonce: int) -> str:
        """"answered", "pending", or "lost" (its connection is gone)."""
        conn, answered = self.pongs.get(nonce, (0, False))
        if answered:
            return "answered"
        return "pending" if conn == self.conn_id else "lost"

    def forget_pong(self, nonce: int) -> None:
        self.pongs.pop(nonce, None)

    def ack_caught_up(self) -> bool:
        """Whether this connection can acknowledge everything consumed: the
        server delivered up to it here, or already had it acknowledged (it
        has nothing pending, or its first delivery here is past it)."""
        if not self.welcomed:
            return False
        c = self.consumed
        return (
            c <= self.conn_acked
            or self.conn_seq_max >= c
            or (self.pending_at_login == 0 and self.conn_seq_max == 0)
            or self.conn_first_seq > c
        )

    # -- receiving ---------------------------------------------------------

    def on_frames(self, frames: List[codec.ServerFrame]) -> None:
        """Applies frames from the server. Raises the ServerError of an ERROR
        frame, ProtocolError on frames that break the session rules."""
        for f in frames:
            if isinstance(f, codec.Welcome):
                if f.version != codec.VERSION:
                    raise ProtocolError(f"server speaks version {f.version}")
                self.welcomed = True
                self.max_frame = f.max_frame
                self.pending_at_login = f.pending
            elif not self.welcomed and not isinstance(f, codec.ErrorFrame):
                raise ProtocolError(f"{type(f).__name__} before WELCOME")
            elif isinstance(f, (Stored, RejectedFrame)):
                # An answer to a SEND we gave up on (timeout) is dropped.
                if self.unanswered.pop(f.msg_id, None) is not None:
                    self.answers[f.msg_id] = f
            elif isinstance(f, Message):
                self._deliver(f)
            elif isinstance(f, codec.Pong):
                if f.nonce in self.pongs:
                    self.pongs[f.nonce] = (self.conn_id, True)
            elif isinstance(f, codec.ErrorFrame):
                raise server_error(f.code, f.reason)

    def _deliver(self, m: Message) -> None:
        self.conn_seq_max = max(self.conn_seq_max, m.seq)
        if not self.conn_first_seq:
            self.conn_first_seq = m.seq
        # A resend after a reconnect, or a repeat after a failover: dropped
        # by msg_id (not by seq: a new primary that lacked the old one's
        # last messages numbers new ones with the same seqs).
        if m.msg_id in self.recent_ids:
            self.repeats_dropped += 1
            return
        if m.seq <= self.consumed:
            # The server's numbering went back (that failover): what it
            # numbers from here on has not been consumed.
            self.consumed = m.seq - 1
            self.conn_acked = min(self.conn_acked, self.consumed)
        self.recent_ids[m.msg_id] = None
        if len(self.recent_ids) > RECENT_IDS_MAX:
            self.recent_ids.popitem(last=False)
        self.inbox.append(m)

    def next_message(self) -> Optional[Message]:
        return self.inbox.popleft() if self.inbox else None

    def consume(self, seq: int) -> None:
        """The application is done with the message of ``seq``."""
        self.consumed = max(self.consumed, seq)

    def ack_frame(self, force: bool = False) -> bytes:
        """An ACK of what was consumed, when due: every ACK_EVERY messages,
        or whenever the client is about to wait (``force``)."""
        target = min(self.consumed, self.conn_seq_max)
        if target > self.conn_acked and (force or target - self.conn_acked >= ACK_EVERY):
            self.conn_acked = target
            return codec.encode_ack(target)
        return b""
