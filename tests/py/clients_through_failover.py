"""Real clients chatting through one Iris edge while the test fails the
pair's primary over (tests/tests/clients_failover.rs runs this).

    python3 clients_through_failover.py EDGE_ADDR EDGE_MQTT_ADDR
    python3 clients_through_failover.py EDGE_ADDR,EDGE_ADDR,... -

(the second form: the Python client alone, given every edge).

Four users, two per client kind, all through the edge:
- ``py-s`` sends with Iris's Python client (``iris_client.Client``, one
  blocking ``send`` at a time) to ``py-r`` and ``mq-r`` in turn;
- ``mq-s`` publishes QoS 1 with paho-mqtt to ``inbox/py-r`` and
  ``inbox/mq-r`` in turn, one PUBACK at a time;
- ``py-r`` receives with the Python client (``messages()``, which ACKs);
- ``mq-r`` receives with paho-mqtt, subscribed to ``inbox/mq-r/+`` in a
  persistent session (clean session 0), so the topic names the sender; it
  holds its PUBACKs and sends them in batches.

Every body is ``SENDER:INDEX``. A message counts as stored once ``send``
returned its msg_id or paho saw the PUBACK. Every 100 ms a line
``progress STORED RECEIVED`` goes to stdout. A line ``stop`` on stdin stops
the senders; then every stored message must arrive within 60 s, and the
last line is ``result {json}``. Exit status 0 only if each recipient got
every stored message exactly once, each sender's messages in the order sent,
with the right sender, and no send was refused (through an edge a failover
is a pause, never an error: docs/CLUSTER.md). Any other failure exits 1
with the reason.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Dict, List, Set, Tuple

import paho.mqtt.client as mqtt

from iris_client import Client, Rejected

EDGE, MQTT_ADDR = sys.argv[1], sys.argv[2]
# "-": no MQTT side (the Python client alone, e.g. over several edges).
WITH_MQTT = MQTT_ADDR != "-"
if WITH_MQTT:
    MQTT_HOST, MQTT_PORT = MQTT_ADDR.rsplit(":", 1)[0], int(MQTT_ADDR.rsplit(":", 1)[1])
RECIPIENTS = ["py-r", "mq-r"] if WITH_MQTT else ["py-r"]
# Longest a send may wait: a failover through the edge is a pause.
SEND_WAIT_S = 60.0
DRAIN_WAIT_S = 60.0
# PUBACKs the MQTT receiver holds before it sends them (or 250 ms).
MQTT_ACK_BATCH = 48

lock = threading.Lock()
stop_sending = threading.Event()
stop_receiving = threading.Event()
failed = threading.Event()
problems: List[str] = []
stored: Dict[str, Set[str]] = {r: set() for r in RECIPIENTS}
stored_total = 0
# recipient -> [(sender, body)] in arrival order
received: Dict[str, List[Tuple[str, str]]] = {r: [] for r in RECIPIENTS}
iris_seqs: List[Tuple[int, bytes]] = []
counts = {"rejected": 0, "mqtt_connects_s": 0, "mqtt_connects_r": 0, "mqtt_disconnects": 0,
          "py_s_connections": 0, "py_r_connections": 0, "py_r_repeats_dropped": 0}


def fail(why: str) -> None:
    with lock:
        problems.append(why)
    failed.set()


def guarded(name, body):
    def run() -> None:
        try:
            body()
        except BaseException as e:  # report, never die silently
            fail(f"{name}: {type(e).__name__}: {e}")

    return threading.Thread(target=run, name=name, daemon=True)


def note_stored(to: str, body: str) -> None:
    global stored_total
    with lock:
        stored[to].add(body)
        stored_total += 1


def iris_sender() -> None:
    c = Client(EDGE, user="py-s", send_timeout=SEND_WAIT_S)
    i = 0
    while not stop_sending.is_set() and not failed.is_set():
        to = RECIPIENTS[i % len(RECIPIENTS)]
        body = f"py-s:{i}"
        try:
            c.send(to, body.encode())
        except Rejected as e:
            counts["rejected"] += 1
            raise RuntimeError(f"{body} to {to} refused: {e}") from e
        note_stored(to, body)
        i += 1
    counts["py_s_connections"] = c.connections
    c.close()


def iris_receiver() -> None:
    c = Client(EDGE, user="py-r")
    while not stop_receiving.is_set() and not failed.is_set():
        for m in c.messages(timeout=0.3):
            with lock:
                received["py-r"].append((m.sender, m.body.decode()))
                iris_seqs.append((m.seq, m.msg_id))
            if failed.is_set():
                break
    counts["py_r_connections"] = c.connections
    counts["py_r_repeats_dropped"] = c.repeats_dropped
    c.close()


def mqtt_client(
    client_id: str, on_message=None, subscribe: str = "", manual_ack: bool = False
) -> Tuple[mqtt.Client, threading.Event]:
    connected = threading.Event()
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
    )
    c.username_pw_set(client_id.split("/")[0], "")
    c.manual_ack_set(manual_ack)
    c.reconnect_delay_set(min_delay=1, max_delay=2)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.value != 0:
            fail(f"{client_id}: CONNACK {reason_code.value}")
            return
        counts["mqtt_connects_r" if subscribe else "mqtt_connects_s"] += 1
        if subscribe and not flags.session_present:
            client.subscribe(subscribe, qos=1)
        connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        connected.clear()
        counts["mqtt_disconnects"] += 1

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    if on_message is not None:
        c.on_message = on_message
    c.connect(MQTT_HOST, MQTT_PORT, keepalive=30)
    c.loop_start()
    if not connected.wait(30):
        raise RuntimeError(f"{client_id}: no CONNACK within 30 s")
    return c, connected


def mqtt_sender() -> None:
    c, connected = mqtt_client("mq-s/phone")
    i = 0
    while not stop_sending.is_set() and not failed.is_set():
        to = RECIPIENTS[i % len(RECIPIENTS)]
        body = f"mq-s:{i}"
        info = c.publish(f"inbox/{to}", body.encode(), qos=1)
        # Not wait_for_publish: it raises when the connection is down at
        # publish time, yet paho keeps a QoS 1 message and sends it (DUP)
        # once connected again; that is the case under test.
        deadline = time.monotonic() + SEND_WAIT_S
        while not info.is_published():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{body} to {to}: no PUBACK within {SEND_WAIT_S} s")
            time.sleep(0.001)
        note_stored(to, body)
        i += 1
    c.disconnect()
    c.loop_stop()


def mqtt_receiver() -> None:
    # PUBACKs are held and sent in batches (manual acks), as a phone app
    # that acknowledges what it has written to its own storage would: at a
    # failover up to MQTT_ACK_BATCH deliveries are unacknowledged, the new
    # primary sends them again, and the edge must not pass them on twice.
    pending: List[int] = []

    def ack_pending(client) -> None:
        with lock:
            mids = pending[:]
            pending.clear()
        for mid in mids:
            client.ack(mid, 1)

    def on_message(client, userdata, msg):
        sender = msg.topic.rsplit("/", 1)[-1]
        with lock:
            received["mq-r"].append((sender, msg.payload.decode()))
            pending.append(msg.mid)
            full = len(pending) >= MQTT_ACK_BATCH
        if full:
            ack_pending(client)

    c, _ = mqtt_client("mq-r/phone", on_message, subscribe="inbox/mq-r/+", manual_ack=True)
    while not stop_receiving.wait(0.25):
        ack_pending(c)
    ack_pending(c)
    c.disconnect()
    c.loop_stop()


def missing() -> int:
    with lock:
        return sum(len(stored[r] - {b for _, b in received[r]}) for r in RECIPIENTS)


def check() -> None:
    for r in RECIPIENTS:
        got = received[r]
        bodies = [b for _, b in got]
        twice = len(bodies) - len(set(bodies))
        if twice:
            problems.append(f"{r}: {twice} messages delivered twice")
        lost = stored[r] - set(bodies)
        if lost:
            problems.append(f"{r}: {len(lost)} stored messages never delivered, e.g. {sorted(lost)[:3]}")
        last: Dict[str, int] = {}
        for sender, body in got:
            who, i = body.rsplit(":", 1)
            if who != sender:
                problems.append(f"{r}: {body} arrived as from {sender}")
            if who in last and int(i) <= last[who]:
                problems.append(f"{r}: from {who}, #{i} after #{last[who]}")
            last[who] = int(i)
    seqs = [s for s, _ in iris_seqs]
    if any(b <= a for a, b in zip(seqs, seqs[1:])):
        problems.append("py-r: seqs did not rise")
    if len({m for _, m in iris_seqs}) != len(iris_seqs):
        problems.append("py-r: a msg_id delivered twice")


def main() -> int:
    receivers = [guarded("py-r", iris_receiver)]
    senders = [guarded("py-s", iris_sender)]
    if WITH_MQTT:
        receivers.append(guarded("mq-r", mqtt_receiver))
        senders.append(guarded("mq-s", mqtt_sender))
    for t in receivers + senders:
        t.start()

    def progress() -> None:
        while not stop_receiving.is_set():
            with lock:
                n = sum(len(v) for v in received.values())
                line = f"progress {stored_total} {n}"
            print(line, flush=True)
            time.sleep(0.1)

    threading.Thread(target=progress, daemon=True).start()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                stop_sending.set()
                return
        stop_sending.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop_sending.is_set() and not failed.is_set():
        time.sleep(0.05)
    for t in senders:
        t.join(SEND_WAIT_S + 5)
    deadline = time.monotonic() + DRAIN_WAIT_S
    while missing() and time.monotonic() < deadline and not failed.is_set():
        time.sleep(0.05)
    stop_receiving.set()
    for t in receivers:
        t.join(10)
    with lock:
        check()
        summary = {
            "stored": stored_total,
            "received": {r: len(v) for r, v in received.items()},
            **counts,
            "problems": problems,
        }
    print("result " + json.dumps(summary), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
