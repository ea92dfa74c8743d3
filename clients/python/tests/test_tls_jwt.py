"""TLS with a CA file and JWT logins, against a real `iris serve`."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import Server, run_iris
from iris_client import AuthenticationFailed, Client, ConnectionLost
from iris_client import aio


@pytest.fixture
def secure():  # type: ignore[no-untyped-def]
    d = Path(tempfile.mkdtemp(prefix="iris-py-sec-"))
    run_iris("certs", "--out", str(d / "certs"))
    run_iris("keygen", "--out", str(d / "keys"))
    server = Server(
        [
            "--tls-cert", str(d / "certs" / "server.pem"),
            "--tls-key", str(d / "certs" / "server.key"),
            "--auth", "jwt",
            "--jwt-keys", str(d / "keys"),
        ]
    )
    server.ca = str(d / "certs" / "ca.pem")
    server.key = str(d / "keys" / "iris.key")
    yield server
    server.close()
    shutil.rmtree(d, ignore_errors=True)


def token(server, user: str) -> str:  # type: ignore[no-untyped-def]
    return run_iris("token", "--key", server.key, "--user", user).strip()


def test_tls_and_jwt_log_in_send_and_receive(secure):
    alice = Client(secure.tls_addr, user="alice", token=token(secure, "alice"), tls_ca=secure.ca)
    hank = Client(secure.tls_addr, user="hank", token=token(secure, "hank"), tls_ca=secure.ca)
    msg_id = alice.send("hank", b"over TLS")
    assert [m.msg_id for m in hank.messages(timeout=1.0)] == [msg_id]
    alice.close()
    hank.close()

    async def main() -> None:
        async with aio.Client(secure.tls_addr, user="ivy", token=token(secure, "ivy"), tls_ca=secure.ca) as ivy:
            await ivy.send("hank", b"async over TLS")

    asyncio.run(main())


def test_a_wrong_token_is_authentication_failed_not_a_retry_loop(secure):
    with pytest.raises(AuthenticationFailed) as err:
        Client(secure.tls_addr, user="alice", token=token(secure, "mallory"), tls_ca=secure.ca)
    assert "wrong_sub" in err.value.reason

    async def main() -> None:
        c = aio.Client(secure.tls_addr, user="alice", token="not a jwt", tls_ca=secure.ca)
        with pytest.raises(AuthenticationFailed):
            await c.connect()
        await c.close()

    asyncio.run(main())


def test_a_server_certificate_from_another_ca_is_refused(secure):
    other = Path(tempfile.mkdtemp(prefix="iris-py-other-ca-"))
    run_iris("certs", "--out", str(other))
    try:
        # Every attempt fails the certificate check until the connect timeout.
        with pytest.raises(ConnectionLost) as err:
            Client(secure.tls_addr, user="alice", token=token(secure, "alice"),
                   tls_ca=str(other / "ca.pem"), connect_timeout=2.0)
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    finally:
        shutil.rmtree(other, ignore_errors=True)
