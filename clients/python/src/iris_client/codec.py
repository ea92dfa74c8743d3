"""The Iris wire protocol, version 1, sans-IO (docs/PROTOCOL.md).

Frames in, frames out: ``encode_*`` build the bytes of client frames and
:class:`Decoder` turns received bytes into server frames. No sockets, no
clocks; the blocking and the asyncio clients share it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Union

from .errors import ProtocolError

VERSION = 1
#: ``max_frame`` until the server's WELCOME says otherwise.
DEFAULT_MAX_FRAME = 65536
#: A DELIVER may carry 34 bytes and a 64-byte sender besides a body of
#: ``max_frame - 64`` (section 6): accept server frames up to this much over
#: ``max_frame``.
SERVER_FRAME_SLACK = 34 + 64
#: User ids: 1..=64 bytes of UTF-8, no ASCII control characters.
USER_ID_BYTES_MAX = 64
#: HELLO token bytes.
TOKEN_BYTES_MAX = 4096
STR_BYTES_MAX = 255

HELLO = 0x01
WELCOME = 0x02
SEND = 0x10
STORED = 0x11
REJECTED = 0x12
DELIVER = 0x20
ACK = 0x21
PING = 0x30
PONG = 0x31
BYE = 0x40
ERROR = 0x7F


@dataclass(frozen=True)
class Welcome:
    version: int
    server_time_ms: int
    max_frame: int
    pending: int


@dataclass(frozen=True)
class Stored:
    msg_id: bytes


@dataclass(frozen=True)
class RejectedFrame:
    msg_id: bytes
    code: int
    reason: str


@dataclass(frozen=True)
class Message:
    """A delivered message (DELIVER)."""

    seq: int
    msg_id: bytes
    sender: str
    sent_ms: int
    body: bytes


@dataclass(frozen=True)
class Pong:
    nonce: int


@dataclass(frozen=True)
class ErrorFrame:
    code: int
    reason: str


ServerFrame = Union[Welcome, Stored, RejectedFrame, Message, Pong, ErrorFrame]


def check_user_id(user: str) -> bytes:
    """The UTF-8 bytes of a valid user id, or ValueError."""
    raw = user.encode("utf-8")
    if not 1 <= len(raw) <= USER_ID_BYTES_MAX:
        raise ValueError(f"user id must be 1..{USER_ID_BYTES_MAX} bytes of UTF-8: {user!r}")
    if any(b < 0x20 or b == 0x7F for b in raw):
        raise ValueError(f"user id must not contain control characters: {user!r}")
    return raw


def _str(raw: bytes) -> bytes:
    if len(raw) > STR_BYTES_MAX:
        raise ValueError("str field over 255 bytes")
    return bytes([len(raw)]) + raw


def _frame(ty: int, payload: bytes) -> bytes:
    return struct.pack("<IB", 1 + len(payload), ty) + payload


def encode_hello(user: str, token: Optional[str]) -> bytes:
    tok = (token or "").encode("utf-8")
    if len(tok) > TOKEN_BYTES_MAX:
        raise ValueError(f"token over {TOKEN_BYTES_MAX} bytes")
    return _frame(HELLO, bytes([VERSION]) + _str(check_user_id(user)) + struct.pack("<H", len(tok)) + tok)


def encode_send(msg_id: bytes, to: str, body: bytes) -> bytes:
    if len(msg_id) != 16:
        raise ValueError("msg_id must be 16 bytes")
    return _frame(SEND, bytes(msg_id) + _str(check_user_id(to)) + bytes(body))


def encode_ack(seq: int) -> bytes:
    return _frame(ACK, struct.pack("<Q", seq))


def encode_ping(nonce: int) -> bytes:
    return _frame(PING, struct.pack("<Q", nonce))


def encode_bye() -> bytes:
    return _frame(BYE, b"")


def send_frame_len(to: str, body: bytes) -> int:
    """``len`` of the SEND frame for this recipient and body (must be at
    most ``max_frame``)."""
    return 1 + 16 + 1 + len(to.encode("utf-8")) + len(body)


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.buf):
            raise ProtocolError("frame field runs past the frame")
        out = bytes(self.buf[self.at : self.at + n])
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def str(self) -> str:
        raw = self.take(self.u8())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("str field is not UTF-8") from None

    def rest(self) -> bytes:
        return self.take(len(self.buf) - self.at)

    def done(self) -> None:
        if self.at != len(self.buf):
            raise ProtocolError("bytes left over after the frame's last field")


def decode_frame(ty: int, payload: memoryview) -> ServerFrame:
    r = _Reader(payload)
    frame: ServerFrame
    if ty == WELCOME:
        frame = Welcome(r.u8(), r.u64(), r.u32(), r.u64())
    elif ty == STORED:
        frame = Stored(r.take(16))
    elif ty == REJECTED:
        frame = RejectedFrame(r.take(16), r.u16(), r.str())
    elif ty == DELIVER:
        seq = r.u64()
        msg_id = r.take(16)
        sender = r.str()
        sent_ms = r.u64()
        frame = Message(seq, msg_id, sender, sent_ms, r.rest())
    elif ty == PONG:
        frame = Pong(r.u64())
    elif ty == ERROR:
        frame = ErrorFrame(r.u16(), r.str())
    else:
        raise ProtocolError(f"unknown server frame type {ty:#04x}")
    r.done()
    return frame


class Decoder:
    """Server frames from a byte stream, bounded: a frame whose ``len`` is 0
    or over ``max_frame`` + the DELIVER slack is a ProtocolError as soon as
    its 4 length bytes arrive, and at most one frame is buffered."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> List[ServerFrame]:
        self._buf += data
        frames: List[ServerFrame] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from("<I", self._buf)
            if length == 0 or length > self.max_frame + SERVER_FRAME_SLACK:
                raise ProtocolError(f"server frame length {length} out of bounds")
            if len(self._buf) < 4 + length:
                break
            view = memoryview(self._buf)
            try:
                frame = decode_frame(view[4], view[5 : 4 + length])
            finally:
                view.release()
            del self._buf[: 4 + length]
            if isinstance(frame, Welcome):
                self.max_frame = frame.max_frame
            frames.append(frame)
        return frames
