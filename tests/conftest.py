"""Fixtures shared by every test folder: private redis-servers.

Every Redis-backed test runs against a redis-server the suite started itself
(never one it found running). If the binary is missing the tests fail rather
than skip, so CI cannot go green without the Redis cases; set
``ESTUARY_ALLOW_NO_REDIS=1`` to skip them on a machine without Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# tests/ is on pytest's pythonpath (pyproject.toml).
from redis_server import RedisServer, find_redis_server
from run_order import RUN_FIRST

# Under pytest-xdist (`make test` runs two workers on what may be a 2-core machine) each
# worker, and every process it starts, gets one intra-op thread unless the caller chose:
# torch's default (a thread per core) in each of two workers, with other processes
# competing, spends its time in the thread pool's spin-waits (the serving tests' module
# fixture took over 300 s that way beside four busy loops, 49 s alone). Set before any
# test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Hypothesis times each example (200 ms deadline) and fails a test whose data generation is
# slow (HealthCheck.too_slow): both depend on the machine's speed, and a clean-clone run on
# a loaded 2-core machine failed test_pacing on a 725 ms example. Tests here never depend on
# speed; a test that hangs is stopped by pytest-timeout instead.
settings.register_profile("estuary", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("estuary")


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of redis-server; fails the test (skips only if allowed) when missing."""
    found = find_redis_server()
    if found is None:
        message = (
            "redis-server is not installed, so the Redis contract cases cannot run. "
            "Install it (apt-get install redis-server, or `make test` does it) or set "
            "ESTUARY_ALLOW_NO_REDIS=1 to skip them."
        )
        if os.environ.get("ESTUARY_ALLOW_NO_REDIS") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return found


@pytest.fixture(scope="session")
def redis_server(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A redis-server shared by the suite; tests isolate themselves by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"), binary=redis_binary)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_redis_server(redis_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, which it may kill and restart."""
    server = RedisServer(tmp_path / "redis", binary=redis_binary)
    server.start()
    yield server
    server.kill()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many Redis-backed tests ran, so a green run visibly includes them."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "redis" in getattr(report, "keywords", {}) and report.when in ("call", "setup"):
                if outcome == "passed" and report.when != "call":
                    continue
                counts[outcome] = counts.get(outcome, 0) + 1
    line = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "none ran"
    terminalreporter.write_line(f"Redis-backed tests (real redis-server): {line}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the modules of :data:`RUN_FIRST` first, in its order (a stable sort)."""
    rank = {path: i for i, path in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
