"""The blocking client."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Iterator, Optional

from . import codec
from ._base import ClientBase
from .codec import Message, RejectedFrame, Stored
from .errors import (
    ConnectionLost,
    IrisError,
    ProtocolError,
    Rejected,
    ServerError,
    Timeout,
    reconnectable,
)
from .session import backoff_delays, new_msg_id

#: Bytes read from the socket at once.
READ_CHUNK = 65536


class Client(ClientBase):
    """A connection to Iris as one user, made again whenever it fails.

    ``Client("127.0.0.1:7070", user="alice", token=None, tls_ca=None)``
    connects (raising AuthenticationFailed, or ConnectionLost after
    ``connect_timeout``), then:

    * ``send(to, body)`` returns the msg_id once the server answered STORED,
      or raises Rejected with its code;
    * ``messages(timeout=5.0)`` yields delivered messages in order, each
      once, and ACKs them as the next one is asked for;
    * ``close()`` acknowledges what was consumed and says BYE.

    A connection that fails (reset, server restart, ERROR 5/6/7) is made
    again with capped exponential backoff and jitter; SENDs not yet answered
    are sent again with the same msg_id (the server's dedup makes that safe).
    Every wait is bounded by a timeout. The address may list several
    servers, comma-separated (``"10.0.0.1:7070,10.0.0.2:7070"``, e.g. every
    edge): each new attempt after a failure goes to the next one in turn.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sock: Optional[socket.socket] = None
        self._decoder = codec.Decoder()
        self._connect(time.monotonic() + self.connect_timeout)

    # -- public ------------------------------------------------------------

    def send(self, to: str, body: bytes, msg_id: Optional[bytes] = None, timeout: Optional[float] = None) -> bytes:
        """Sends ``body`` to ``to``; returns the msg_id once STORED (durable
        by the server's policy). Raises Rejected (with ``code``), Timeout or
        ConnectionLost. Reuse the msg_id to retry the same message safely."""
        self._check_open()
        msg_id = msg_id if msg_id is not None else new_msg_id()
        frame = self._session.send_frame(msg_id, to, bytes(body))
        deadline = time.monotonic() + (timeout if timeout is not None else self.send_timeout)
        try:
            self._write(frame, deadline)
            self._pump(deadline, lambda: msg_id in self._session.answers)
        except Timeout:
            self._session.forget(msg_id)
            raise
        answer = self._session.take_answer(msg_id)
        if isinstance(answer, RejectedFrame):
            raise Rejected(answer.code, answer.reason, msg_id)
        assert isinstance(answer, Stored)
        return msg_id

    def messages(self, timeout: float = 5.0) -> Iterator[Message]:
        """Delivered messages, in seq order, each once (repeats after a
        reconnect or failover are dropped). A message counts as processed
        when the next one is asked for: it is then ACKed (cumulatively,
        batched). Ends after ``timeout`` seconds without a message."""
        self._check_open()
        while True:
            m = self._session.next_message()
            if m is None:
                self._write(self._session.ack_frame(force=True), time.monotonic() + self.send_timeout)
                deadline = time.monotonic() + timeout
                try:
                    self._pump(deadline, lambda: bool(self._session.inbox))
                except Timeout:
                    return
                continue
            yield m
            self._session.consume(m.seq)
            ack = self._session.ack_frame()
            if ack:
                self._write(ack, time.monotonic() + self.send_timeout)

    def sync(self, timeout: Optional[float] = None) -> None:
        """ACKs what was consumed and waits until the server applied it (a
        PING after the ACK; docs/PROTOCOL.md rule 5). After a reconnect it
        first lets the server resend up to what was consumed, so the ACK can
        be given on the new connection."""
        self._check_open()
        deadline = time.monotonic() + (timeout if timeout is not None else self.send_timeout)
        s = self._session
        while True:
            while not s.ack_caught_up():
                seen = s.conn_seq_max
                self._write(s.ack_frame(force=True), deadline)
                self._pump(deadline, lambda: s.ack_caught_up() or s.conn_seq_max > seen)
            nonce, ping = s.ping_frame()
            self._write(s.ack_frame(force=True) + ping, deadline)
            self._pump(deadline, lambda: s.pong_state(nonce) != "pending")
            answered = s.pong_state(nonce) == "answered"
            s.forget_pong(nonce)
            if answered:
                return
            # The connection was replaced before the PONG: again on the new one.

    def close(self) -> None:
        """ACKs what was consumed (waiting until it counts), says BYE and
        closes. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._sock is not None:
                self.sync(timeout=min(self.send_timeout, 5.0))
                self._sock.sendall(codec.encode_bye())
        except (IrisError, OSError):
            pass
        finally:
            self._closed = True
            self._drop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection ----------------------------------------------------------

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _open_socket(self, deadline: float) -> socket.socket:
        remaining = max(0.001, deadline - time.monotonic())
        sock = socket.create_connection((self._host, self._port), timeout=remaining)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self._server_name)
        return sock

    def _connect(self, deadline: float) -> None:
        """Connects, says HELLO, waits for WELCOME and sends the unanswered
        SENDs again; retries with backoff until ``deadline``. An ERROR that
        reconnecting cannot fix (authentication, version) is raised at once."""
        self._drop()
        if self.connections > 0:
            self._next_addr()  # the one we had failed: try another first
        delays = backoff_delays(self.backoff_initial, self.backoff_max)
        last_error: Optional[BaseException] = None
        while True:
            try:
                self._sock = self._open_socket(deadline)
                self._decoder = codec.Decoder()
                self._sock.sendall(self._session.hello())
                self._read_until(deadline, lambda: self._session.welcomed)
                self.connections += 1
                resend = self._session.resend()
                if resend:
                    self._sock.sendall(resend)
                return
            except ServerError as e:
                self._drop()
                if not reconnectable(e):
                    raise
                last_error = e
            except (OSError, ProtocolError, Timeout) as e:
                self._drop()
                last_error = e
            self._next_addr()
            if not self.reconnect and self.connections > 0:
                raise ConnectionLost(f"connection to {self.addr} lost: {last_error}")
            delay = delays.next()
            if time.monotonic() + delay > deadline:
                raise ConnectionLost(f"cannot connect to {self.addr}: {last_error}")
            time.sleep(delay)

    def _read_until(self, deadline: float, done: Callable[[], bool]) -> None:
        """Reads and applies frames on the current socket until ``done()``;
        Timeout at ``deadline``; OSError/ServerError when the connection fails."""
        assert self._sock is not None
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout("timed out waiting for the server")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(READ_CHUNK)
            except socket.timeout:
                raise Timeout("timed out waiting for the server") from None
            if not data:
                raise ConnectionResetError("the server closed the connection")
            self._session.on_frames(self._decoder.feed(data))

    def _pump(self, deadline: float, done: Callable[[], bool]) -> None:
        """Like _read_until, reconnecting (until ``deadline``) when the
        connection fails."""
        while True:
            try:
                if self._sock is None:
                    self._reconnect(deadline)
                self._read_until(deadline, done)
                return
            except ServerError as e:
                if not reconnectable(e):
                    self._drop()
                    raise
                self._reconnect(deadline)
            except (OSError, ProtocolError) as e:
                if isinstance(e, ProtocolError):
                    self._drop()
                    raise
                self._reconnect(deadline)

    def _reconnect(self, deadline: float) -> None:
        if not self.reconnect:
            self._drop()
            raise ConnectionLost(f"connection to {self.addr} lost")
        self._connect(deadline)

    def _write(self, data: bytes, deadline: float) -> None:
        if not data:
            return
        while True:
            if self._sock is None:
                self._reconnect(deadline)
                # The session resent every unanswered SEND; an ACK or PING is
                # not worth resending.
                return
            try:
                self._sock.settimeout(max(0.001, deadline - time.monotonic()))
                self._sock.sendall(data)
                return
            except socket.timeout:
                # Part of a frame may be out: this connection cannot carry
                # another frame. Unanswered SENDs go again on the next one.
                self._drop()
                raise Timeout("timed out writing to the server") from None
            except OSError:
                self._reconnect(deadline)
                return
