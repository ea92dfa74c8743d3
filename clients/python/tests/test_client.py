"""The blocking client against a real `iris serve`."""

from __future__ import annotations

import threading
import time

import pytest

from iris_client import Client, ConnectionLost, Rejected, new_msg_id


def test_send_returns_the_msg_id_once_stored_and_the_recipient_gets_it(server):
    bob = Client(server.addr, user="bob")
    alice = Client(server.addr, user="alice")
    msg_id = alice.send("bob", b"hi bob")
    assert len(msg_id) == 16
    got = list(bob.messages(timeout=1.0))
    assert [(m.seq, m.msg_id, m.sender, m.body) for m in got] == [(1, msg_id, "alice", b"hi bob")]
    assert abs(got[0].sent_ms - time.time() * 1000) < 60_000
    alice.close()
    bob.close()


def test_offline_messages_arrive_in_order_on_the_next_login_and_acks_count(server):
    with Client(server.addr, user="alice") as alice:
        ids = [alice.send("carol", f"m{i}".encode()) for i in range(200)]
    carol = Client(server.addr, user="carol")
    assert carol.pending_at_login == 200
    got = []
    for m in carol.messages(timeout=1.0):
        got.append(m)
        if len(got) == 120:
            break
    # The 120th was handed out but not yet processed: it comes again; the
    # first 119 were ACKed (close waits until the ACK counts).
    carol.close()
    carol = Client(server.addr, user="carol")
    assert carol.pending_at_login == 200 - 119
    rest = list(carol.messages(timeout=1.0))
    carol.close()
    seen = [m.msg_id for m in got[:119]] + [m.msg_id for m in rest]
    assert seen == ids
    assert [m.seq for m in rest] == list(range(120, 201))
    with Client(server.addr, user="carol") as carol:
        assert carol.pending_at_login == 0


def test_a_resent_msg_id_is_stored_once_and_delivered_once(server):
    alice = Client(server.addr, user="alice")
    msg_id = new_msg_id()
    assert alice.send("dave", b"once", msg_id=msg_id) == msg_id
    assert alice.send("dave", b"once", msg_id=msg_id) == msg_id
    dave = Client(server.addr, user="dave")
    assert [m.msg_id for m in dave.messages(timeout=1.0)] == [msg_id]
    alice.close()
    dave.close()


def test_rejected_carries_the_code(server):
    alice = Client(server.addr, user="alice")
    too_big = b"x" * 65_473  # over max_body (65472), the frame within max_frame
    with pytest.raises(Rejected) as err:
        alice.send("b", too_big)
    assert err.value.code == Rejected.TOO_LARGE
    assert not err.value.retryable
    with pytest.raises(ValueError):
        alice.send("", b"no recipient")
    # The connection stays usable.
    alice.send("bob", b"still here")
    alice.close()


def test_sends_and_receives_go_on_across_a_server_restart(server):
    alice = Client(server.addr, user="alice", backoff_max=0.5)
    erin = Client(server.addr, user="erin", backoff_max=0.5)
    before = [alice.send("erin", f"before {i}".encode()) for i in range(20)]
    server.stop()  # SIGTERM: every STORED is durable
    restarted = threading.Timer(0.5, server.start)
    restarted.start()
    # Sent while the server is down: the client reconnects and sends it then.
    after = [alice.send("erin", f"after {i}".encode(), timeout=30) for i in range(20)]
    restarted.join()
    assert alice.connections >= 2
    got = [m.msg_id for m in erin.messages(timeout=2.0)]
    assert got == before + after
    alice.close()
    erin.close()


def test_without_reconnect_a_lost_server_is_connection_lost(server):
    alice = Client(server.addr, user="alice", reconnect=False)
    server.kill9()
    with pytest.raises(ConnectionLost):
        alice.send("bob", b"nobody there", timeout=5)


def test_close_after_a_server_restart_still_makes_the_acks_count(server):
    with Client(server.addr, user="alice") as alice:
        ids = [alice.send("ken", f"k{i}".encode()) for i in range(5)]
    ken = Client(server.addr, user="ken", backoff_max=0.5)
    got = []
    for m in ken.messages(timeout=1.0):
        got.append(m)
        if len(got) == 4:
            break  # the 4th is handed out, not processed: 3 consumed
    server.stop()
    server.start()
    # close() reconnects, lets the server resend up to what was consumed,
    # ACKs 3 there and waits for the PONG.
    ken.close()
    with Client(server.addr, user="ken") as again:
        assert again.pending_at_login == 2
        assert [m.msg_id for m in again.messages(timeout=1.0)] == ids[3:]
