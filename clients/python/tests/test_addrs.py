"""Several addresses: the client tries them in turn."""

from __future__ import annotations

import asyncio
import socket

import pytest

from iris_client import Client
from iris_client import aio
from iris_client._base import parse_addrs


def dead_addr() -> str:
    """A loopback address nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def test_addresses_parse_as_a_comma_separated_list():
    assert parse_addrs("a:1, [::1]:2,b:3") == [("a", 1), ("::1", 2), ("b", 3)]
    assert parse_addrs("a:1") == [("a", 1)]
    for bad in ["", ",", "a", "a:1,b"]:
        with pytest.raises(ValueError):
            parse_addrs(bad)


def test_a_dead_first_address_is_passed_over(server):
    addrs = f"{dead_addr()},{server.addr}"
    with Client(addrs, user="ad-r", connect_timeout=10) as r, Client(addrs, user="ad-s") as s:
        msg_id = s.send("ad-r", b"via the second")
        got = next(r.messages(timeout=10))
        assert (got.msg_id, got.body) == (msg_id, b"via the second")
        assert s.connections == 1


def test_the_asyncio_client_passes_over_a_dead_address_too(server):
    async def run() -> None:
        c = aio.Client(f"{dead_addr()},{server.addr}", user="ad-a", connect_timeout=10)
        await c.send("ad-a", b"to myself")
        async for m in c.messages(timeout=10):
            assert m.body == b"to myself"
            break
        await c.close()

    asyncio.run(run())
