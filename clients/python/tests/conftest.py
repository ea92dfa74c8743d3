"""A real `iris serve` per test (the release binary: IRIS_BIN, else
target/release/iris of this repository)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
READY_TIMEOUT = 30.0


def iris_bin() -> str:
    path = os.environ.get("IRIS_BIN") or str(REPO / "target" / "release" / "iris")
    if not Path(path).exists():
        pytest.fail(f"iris binary not found at {path}: build it (cargo build --release) or set IRIS_BIN")
    return path


class Server:
    """One `iris serve` process on loopback; restartable on the same ports
    and data directory."""

    def __init__(self, extra: Optional[List[str]] = None) -> None:
        self.data = tempfile.mkdtemp(prefix="iris-py-data-")
        self.extra = list(extra or [])
        self.addr = ""
        self.tls_addr = ""
        self.proc: Optional[subprocess.Popen] = None
        self.listen = "127.0.0.1:0"
        self.tls_listen = "127.0.0.1:0" if "--tls-cert" in self.extra else None
        self.start()

    def start(self) -> None:
        args = [iris_bin(), "serve", "--data", self.data, "--cores", "2", "--listen", self.listen]
        if self.tls_listen:
            args += ["--tls-listen", self.tls_listen]
        args += self.extra
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
        lines: "queue.Queue[str]" = queue.Queue()

        def pump(out) -> None:  # type: ignore[no-untyped-def]
            for line in out:
                lines.put(line.strip())

        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        want_tls = self.tls_listen is not None
        while True:
            try:
                line = lines.get(timeout=READY_TIMEOUT)
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"iris did not start: {args}")
            if line.startswith("iris listening on "):
                self.addr = line.rsplit(" ", 1)[1]
                self.listen = self.addr
            elif line.startswith("iris tls listening on "):
                self.tls_addr = line.rsplit(" ", 1)[1]
                self.tls_listen = self.tls_addr
            if self.addr and (self.tls_addr or not want_tls):
                return

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill9()
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def run_iris(*args: str) -> str:
    return subprocess.run([iris_bin(), *args], check=True, capture_output=True, text=True).stdout
