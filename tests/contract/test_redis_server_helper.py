"""The test suite's redis-server helper talks only to the server it started.

With the suite split over parallel workers (``make test`` runs pytest with xdist), a port
that was free a moment ago may be taken by another test's server before ours binds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis_server import RedisServer

pytestmark = pytest.mark.redis


def _pid(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def test_a_first_start_on_a_taken_port_moves_to_a_free_one(
    redis_binary: str, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "first", binary=redis_binary) as first:
        second = RedisServer(tmp_path / "second", binary=redis_binary)
        second.port = first.port  # taken between free_port() and the bind
        with second:
            assert second.port != first.port
            assert _pid(second) != _pid(first)
            assert second.running and first.running


def test_a_restart_whose_port_was_taken_refuses_instead_of_using_the_other_server(
    redis_binary: str, tmp_path: Path
) -> None:
    ours = RedisServer(tmp_path / "ours", binary=redis_binary)
    ours.start()
    port = ours.port
    ours.kill()
    thief = RedisServer(tmp_path / "thief", binary=redis_binary)
    thief.port = port
    with thief:
        assert thief.port == port  # it took the freed port
        with pytest.raises(RuntimeError, match=f"port {port}"):
            ours.start()
        assert not ours.running
        assert thief.running
