"""A two-terminal chat over Iris.

    terminal 1: python chat.py 127.0.0.1:7070 alice bob
    terminal 2: python chat.py 127.0.0.1:7070 bob alice

Type a line and press Enter to send it; what the other side sends appears
as it arrives (and what was sent while you were away, on start). Add
--token JWT and --tls-ca ca.pem for a server with TLS and JWT logins.
"""

import argparse
import asyncio
import sys

from iris_client import Rejected
from iris_client.aio import Client


async def receive(client: Client) -> None:
    while True:
        async for m in client.messages(timeout=60.0):
            print(f"\r{m.sender}: {m.body.decode(errors='replace')}\n> ", end="", flush=True)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("addr")
    p.add_argument("me")
    p.add_argument("peer")
    p.add_argument("--token")
    p.add_argument("--tls-ca")
    a = p.parse_args()
    async with Client(a.addr, user=a.me, token=a.token, tls_ca=a.tls_ca) as client:
        receiver = asyncio.ensure_future(receive(client))
        loop = asyncio.get_running_loop()
        print("> ", end="", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            try:
                await client.send(a.peer, line.rstrip("\n").encode())
            except Rejected as e:
                print(f"not sent: {e}")
            print("> ", end="", flush=True)
        receiver.cancel()


if __name__ == "__main__":
    asyncio.run(main())
