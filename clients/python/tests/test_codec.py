"""The sans-IO codec against docs/PROTOCOL.md's worked examples, and its bounds."""

import re
from pathlib import Path

import pytest

from iris_client import codec
from iris_client.errors import ProtocolError
from iris_client.session import Session

DOC = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"
MSG_ID = bytes(range(0x10, 0x20))


def example(name: str) -> bytes:
    text = DOC.read_text()
    block = re.search(r"<!-- example: " + name + r" -->\s*```text\n(.*?)```", text, re.S)
    assert block, f"no example {name} in {DOC}"
    out = b""
    for line in block.group(1).splitlines():
        out += bytes.fromhex(line.split("|")[0])
    return out


def test_hello_and_send_match_the_protocol_doc():
    assert codec.encode_hello("alice", "s3cr3t") == example("hello")
    assert codec.encode_send(MSG_ID, "bob", b"hello") == example("send")


def test_deliver_from_the_protocol_doc_decodes():
    frames = codec.Decoder().feed(example("deliver"))
    assert frames == [codec.Message(1, MSG_ID, "alice", 1700000000000, b"hello")]


def test_frames_split_anywhere_decode_the_same():
    wire = example("deliver") * 3
    for cut in range(len(wire) + 1):
        d = codec.Decoder()
        frames = d.feed(wire[:cut]) + d.feed(wire[cut:])
        assert len(frames) == 3


def test_bad_frames_are_protocol_errors():
    with pytest.raises(ProtocolError):
        codec.Decoder().feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        codec.Decoder().feed((10_000_000).to_bytes(4, "little"))
    with pytest.raises(ProtocolError):
        codec.Decoder().feed(b"\x01\x00\x00\x00\x55")  # unknown type
    with pytest.raises(ProtocolError):
        codec.Decoder().feed(b"\x03\x00\x00\x00\x31\x00\x00")  # PONG cut short
    with pytest.raises(ProtocolError):
        # STORED with a trailing byte
        codec.Decoder().feed((18).to_bytes(4, "little") + b"\x11" + MSG_ID + b"\x00")


def test_user_ids_are_checked_before_sending():
    for bad in ["", "x" * 65, "tab\there", "del\x7f"]:
        with pytest.raises(ValueError):
            codec.encode_send(MSG_ID, bad, b"")
    codec.encode_send(MSG_ID, "é" * 32, b"")  # 64 bytes of UTF-8


def test_session_drops_repeats_and_acks_only_what_this_connection_delivered():
    s = Session("bob", None)
    s.hello()
    s.on_frames([codec.Welcome(1, 0, 65536, 2)])
    m1 = codec.Message(1, b"a" * 16, "alice", 0, b"1")
    m2 = codec.Message(2, b"b" * 16, "alice", 0, b"2")
    s.on_frames([m1, m2, m1])
    assert [s.next_message(), s.next_message(), s.next_message()] == [m1, m2, None]
    s.consume(2)
    assert s.ack_frame(force=True) == codec.encode_ack(2)
    assert s.ack_frame(force=True) == b""
    # A new connection: nothing delivered on it yet, so no ACK until the
    # server's resends come (and are dropped as repeats).
    s.hello()
    s.on_frames([codec.Welcome(1, 0, 65536, 2)])
    assert s.ack_frame(force=True) == b""
    s.on_frames([m1, m2])
    assert s.next_message() is None
    assert s.repeats_dropped == 3
    assert s.ack_frame(force=True) == codec.encode_ack(2)


def test_unanswered_sends_go_again_after_a_reconnect_in_order():
    s = Session("alice", None)
    s.hello()
    s.on_frames([codec.Welcome(1, 0, 65536, 0)])
    f1 = s.send_frame(b"1" * 16, "bob", b"x")
    f2 = s.send_frame(b"2" * 16, "bob", b"y")
    s.on_frames([codec.Stored(b"1" * 16)])
    s.hello()
    assert s.resend() == f2
    s.on_frames([codec.Welcome(1, 0, 65536, 0), codec.Stored(b"2" * 16)])
    assert s.resend() == b""
    assert f1 != f2


def test_a_seq_numbered_again_after_a_failover_is_not_dropped_nor_acked_early():
    s = Session("bob", None)
    s.hello()
    s.on_frames([codec.Welcome(1, 0, 65536, 3)])
    old = [codec.Message(i, bytes([i]) * 16, "alice", 0, b"") for i in (1, 2, 3)]
    s.on_frames(old)
    for m in old:
        assert s.next_message() == m
        s.consume(m.seq)
    # A new primary that lacked seq 3 numbers a new message 3.
    s.hello()
    s.on_frames([codec.Welcome(1, 0, 65536, 1)])
    new3 = codec.Message(3, b"n" * 16, "carol", 0, b"new")
    s.on_frames([new3])
    assert s.next_message() == new3
    # Not consumed yet: nothing past 2 may be ACKed.
    assert s.ack_frame(force=True) in (b"", codec.encode_ack(2))
    s.consume(3)
    assert s.ack_frame(force=True) == codec.encode_ack(3)


def test_a_ping_of_a_replaced_connection_is_lost_not_answered():
    s = Session("bob", None)
    s.hello()
    s.on_frames([codec.Welcome(1, 0, 65536, 0)])
    nonce, _ = s.ping_frame()
    assert s.pong_state(nonce) == "pending"
    s.hello()
    assert s.pong_state(nonce) == "lost"
    s.on_frames([codec.Welcome(1, 0, 65536, 0)])
    nonce2, _ = s.ping_frame()
    s.on_frames([codec.Pong(nonce2)])
    assert s.pong_state(nonce2) == "answered"
