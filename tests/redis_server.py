"""Start, kill and restart a private redis-server for tests.

Used by the store contract suite and by integration tests. Each server runs
on a free loopback port in its own directory, with the durability settings
production uses (``appendonly yes``, ``appendfsync always``, no RDB
snapshots), so "acknowledged writes survive ``kill -9``" can be tested for
real. Only servers started through this class are ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

__all__ = ["RedisServer", "ServerTLS", "find_redis_server", "free_port"]

# A fresh redis-server answers PING within ~50 ms; after a restart it first
# replays the AOF. 15 s is far beyond both on a slow CI runner, yet a broken
# binary still fails the test run quickly.
START_TIMEOUT_S = 15.0


def find_redis_server() -> str | None:
    """Return the path of the ``redis-server`` binary, or ``None`` if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in (
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
        "/usr/local/bin/redis-server",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerTLS:
    """Certificate files for a TLS-only server (clients are not asked for certificates).

    Attributes
    ----------
    cert_file, key_file
        The server's certificate chain and private key (PEM).
    ca_file
        The CA that signed ``cert_file``; clients verify against it.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path


def _server_pid(port: int, tls: ServerTLS | None = None) -> int | None:
    """Return the process id of the server answering on ``port``, or None if none is ready.

    ``INFO server`` names the process: a server that answers is only ours if that is the
    pid we started (with tests running in parallel, another test's server may hold a port
    that was free a moment ago). None while nothing listens, or the server still loads.
    """
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        ssl=tls is not None,
        ssl_ca_certs=str(tls.ca_file) if tls is not None else None,
    )
    try:
        return int(client.info("server")["process_id"])
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return None  # nothing listens yet, or it still loads (BusyLoadingError)
    finally:
        client.close()


class RedisServer:
    """One redis-server process on 127.0.0.1, owned by the test that made it.

    Parameters
    ----------
    directory
        Where the server keeps its AOF and log; reused across restarts.
    binary
        The redis-server executable; found on PATH if ``None``.
    tls
        Serve only TLS (on :attr:`port`) with these files; plain TCP if ``None``.
    """

    def __init__(
        self, directory: Path, *, binary: str | None = None, tls: ServerTLS | None = None
    ) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError("redis-server not found on PATH")
        self.binary = found
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (``rediss://`` with TLS)."""
        scheme = "redis" if self.tls is None else "rediss"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process this object started is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (same port and directory as before) and wait until it answers.

        The first start picks another free port if the one chosen was taken meanwhile
        (tests running in parallel); a restart keeps its port, as clients expect.
        """
        if self.running:
            raise RuntimeError("redis-server already running")
        for attempt in range(3):
            lost = self._start_once()
            if lost is None:
                self._started = True
                return
            if self._started or attempt == 2:
                raise RuntimeError(lost)
            self.port = free_port()

    def _start_once(self) -> str | None:
        """Start the process once; None once it answers, else why it lost its port."""
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert_file),
                "--tls-key-file", str(self.tls.key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            self.binary,
            *listen,
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        self._process = process = subprocess.Popen(
            args, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = _server_pid(self.port, self.tls)
            if pid == process.pid:
                return None
            if process.poll() is not None or pid is not None:
                # It exited, or another server (another test's, in a parallel run)
                # answers on the port: never talk to a server we did not start.
                self.kill()
                who = "exited at start" if pid is None else f"found process {pid} there"
                return f"redis-server on port {self.port} {who}; see {self.directory}/redis.log"
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S} s")

    def kill(self) -> None:
        """Kill the server with SIGKILL (no shutdown, no final fsync) and reap it."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)  # also ends a paused server
            self._process.wait(timeout=START_TIMEOUT_S)
        self._process = None

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open, nothing is answered."""
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """``kill -9`` the server and start it again on the same port and directory."""
        self.kill()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
