"""The asyncio client: the same as :class:`iris_client.Client`, with
``await`` and ``async for``.

One task per client keeps the connection: it connects (with capped
exponential backoff and jitter), reads frames into the shared sans-IO
session, and connects again when the connection fails, sending every
unanswered SEND again with its msg_id. Many coroutines may ``send`` at
once (at most ``IN_FLIGHT_MAX`` unanswered; more wait for room).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Optional

from . import codec
from ._base import ClientBase
from .codec import Message, RejectedFrame, Stored
from .errors import (
    ClientClosed,
    ConnectionLost,
    IrisError,
    ProtocolError,
    Rejected,
    ServerError,
    Timeout,
    reconnectable,
)
from .session import IN_FLIGHT_MAX, backoff_delays, new_msg_id

READ_CHUNK = 65536

__all__ = ["Client"]


class Client(ClientBase):
    """``c = Client("127.0.0.1:7070", user="alice")``; ``await c.send("bob",
    b"hi")``; ``async for m in c.messages(timeout=5.0)``; ``await
    c.close()``. Connects on first use (or ``await c.connect()``); also an
    ``async with`` context manager."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer: Optional[asyncio.StreamWriter] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._changed: Optional[asyncio.Condition] = None
        self._drain_lock: Optional[asyncio.Lock] = None
        self._fatal: Optional[BaseException] = None

    # -- public ------------------------------------------------------------

    async def connect(self) -> None:
        """Connects now (else the first operation does); raises
        AuthenticationFailed, or ConnectionLost after ``connect_timeout``."""
        self._check_open()
        if self._task is None:
            self._changed = asyncio.Condition()
            self._drain_lock = asyncio.Lock()
            self._task = asyncio.ensure_future(self._keep())
        await self._wait(lambda: self._writer is not None, self.connect_timeout, "connecting")

    async def send(
        self, to: str, body: bytes, msg_id: Optional[bytes] = None, timeout: Optional[float] = None
    ) -> bytes:
        """Returns the msg_id once STORED; raises Rejected (with ``code``),
        Timeout or ConnectionLost."""
        await self.connect()
        msg_id = msg_id if msg_id is not None else new_msg_id()
        limit = timeout if timeout is not None else self.send_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        await self._wait(lambda: len(self._session.unanswered) < IN_FLIGHT_MAX, limit, "room to send")
        frame = self._session.send_frame(msg_id, to, bytes(body))
        # Not connected now: the connection task sends it after WELCOME.
        await self._write(frame)
        try:
            await self._wait(
                lambda: msg_id in self._session.answers, max(0.0, deadline - loop.time()), "STORED"
            )
        except Timeout:
            self._session.forget(msg_id)
            raise
        answer = self._session.take_answer(msg_id)
        await self._notify()
        if isinstance(answer, RejectedFrame):
            raise Rejected(answer.code, answer.reason, msg_id)
        assert isinstance(answer, Stored)
        return msg_id

    async def messages(self, timeout: float = 5.0) -> AsyncIterator[Message]:
        """Delivered messages, in order, each once; each is ACKed when the
        next is asked for. Ends after ``timeout`` seconds without one."""
        await self.connect()
        while True:
            m = self._session.next_message()
            if m is None:
                await self._write(self._session.ack_frame(force=True))
                try:
                    await self._wait(lambda: bool(self._session.inbox), timeout, "a message")
                except Timeout:
                    return
                continue
            yield m
            self._session.consume(m.seq)
            await self._write(self._session.ack_frame())

    async def sync(self, timeout: Optional[float] = None) -> None:
        """ACKs what was consumed and waits until the server applied it
        (after a reconnect, once the server resent up to it)."""
        await self.connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.send_timeout)
        s = self._session

        def left() -> float:
            return max(0.0, deadline - loop.time())

        while True:
            while not s.ack_caught_up():
                seen = s.conn_seq_max
                await self._write(s.ack_frame(force=True))
                await self._wait(lambda: s.ack_caught_up() or s.conn_seq_max > seen, left(), "resends")
            nonce, ping = s.ping_frame()
            await self._write(s.ack_frame(force=True) + ping)
            await self._wait(lambda: s.pong_state(nonce) != "pending", left(), "PONG")
            answered = s.pong_state(nonce) == "answered"
            s.forget_pong(nonce)
            if answered:
                return

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if self._writer is not None:
                await self.sync(timeout=min(self.send_timeout, 5.0))
                await self._write(codec.encode_bye())
        except (IrisError, OSError):
            pass
        finally:
            self._closed = True
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except (asyncio.CancelledError, Exception):
                    pass
            self._close_writer()

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``done()``; raises the fatal error, ClientClosed, or Timeout."""
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            while True:
                if done():
                    return
                if self._fatal is not None:
                    raise self._fatal
                if self._closed:
                    raise ClientClosed("the client is closed")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Timeout(f"timed out waiting for {what}")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    raise Timeout(f"timed out waiting for {what}") from None

    async def _write(self, data: bytes) -> None:
        writer = self._writer
        if not data or writer is None:
            return
        assert self._drain_lock is not None
        try:
            writer.write(data)
            async with self._drain_lock:
                await asyncio.wait_for(writer.drain(), self.send_timeout)
        except (OSError, RuntimeError, asyncio.TimeoutError):
            # This connection is done; the connection task connects again
            # and sends every unanswered SEND then. Only this writer is
            # closed: a newer connection may be in place already.
            writer.close()
            if self._writer is writer:
                self._writer = None

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _keep(self) -> None:
        """Connects, reads, and connects again, until closed or a fatal error."""
        delays = backoff_delays(self.backoff_initial, self.backoff_max)
        loop = asyncio.get_running_loop()
        # Each outage (and the first connection) gets connect_timeout.
        deadline: Optional[float] = None
        while not self._closed:
            if deadline is None:
                deadline = loop.time() + self.connect_timeout
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._server_name if self._tls else None,
                    ),
                    max(0.001, deadline - loop.time()),
                )
                decoder = codec.Decoder()
                writer.write(self._session.hello())
                await writer.drain()
                while not self._session.welcomed:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), max(0.001, deadline - loop.time()))
                    if not data:
                        raise ConnectionResetError("closed before WELCOME")
                    self._session.on_frames(decoder.feed(data))
                writer.write(self._session.resend())
                self._writer = writer
                self.connections += 1
                deadline = None
                delays = backoff_delays(self.backoff_initial, self.backoff_max)
                await self._notify()
                await self._drain_safely()
                while True:
                    data = await reader.read(READ_CHUNK)
                    if not data:
                        raise ConnectionResetError("the server closed the connection")
                    self._session.on_frames(decoder.feed(data))
                    await self._notify()
            except asyncio.CancelledError:
                raise
            except ServerError as e:
                self._close_writer()
                if not reconnectable(e):
                    await self._fail(e)
                    return
            except ProtocolError as e:
                self._close_writer()
                await self._fail(e)
                return
            except (OSError, asyncio.TimeoutError):
                self._close_writer()
            except Exception as e:  # a bug of ours: fail every waiter, loudly
                self._close_writer()
                await self._fail(e)
                return
            self._next_addr()  # the one that failed: try another first
            if not self.reconnect and self.connections > 0:
                await self._fail(ConnectionLost(f"connection to {self.addr} lost"))
                return
            if deadline is None:
                deadline = loop.time() + self.connect_timeout
            delay = delays.next()
            if loop.time() + delay > deadline:
                await self._fail(ConnectionLost(f"cannot connect to {self.addr}"))
                return
            await asyncio.sleep(delay)

    async def _drain_safely(self) -> None:
        writer = self._writer
        if writer is None:
            return
        assert self._drain_lock is not None
        async with self._drain_lock:
            await asyncio.wait_for(writer.drain(), self.send_timeout)

    async def _fail(self, err: BaseException) -> None:
        self._fatal = err
        await self._notify()
