"""The asyncio client against a real `iris serve`."""

from __future__ import annotations

import asyncio

from iris_client import Rejected
from iris_client.aio import Client


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_concurrent_sends_are_stored_and_delivered_in_order_per_sender(server):
    async def main() -> None:
        async with Client(server.addr, user="alice") as alice:
            # 100 SENDs in flight at once from one connection.
            ids = await asyncio.gather(*(alice.send("frank", f"{i}".encode()) for i in range(100)))
        frank = Client(server.addr, user="frank")
        got = [m async for m in frank.messages(timeout=1.0)]
        await frank.close()
        assert sorted(m.msg_id for m in got) == sorted(ids)
        assert [m.seq for m in got] == list(range(1, 101))

    run(main())


def test_rejected_and_offline_delivery_and_restart(server):
    async def main() -> None:
        alice = Client(server.addr, user="alice", backoff_max=0.5)
        try:
            await alice.send("b", b"x" * 65_473)
            raise AssertionError("expected Rejected")
        except Rejected as e:
            assert e.code == Rejected.TOO_LARGE
        first = await alice.send("gina", b"first")
        server.stop()
        loop = asyncio.get_running_loop()
        restart = loop.run_in_executor(None, server.start)
        second = await alice.send("gina", b"second", timeout=30)
        await restart
        gina = Client(server.addr, user="gina")
        got = [m async for m in gina.messages(timeout=1.0)]
        assert [m.msg_id for m in got] == [first, second]
        await gina.close()
        async with Client(server.addr, user="gina") as again:
            assert again.pending_at_login == 0
        await alice.close()

    run(main())
