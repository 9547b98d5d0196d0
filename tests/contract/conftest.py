"""Fixtures for the store contract suite: both backends over one interface.

The redis-server fixtures (``redis_server``, ``own_redis_server``) live in
``tests/conftest.py`` so integration tests share them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# tests/ is on pytest's pythonpath (pyproject.toml), so the shared redis-server
# helper imports the same way here and in integration tests.
from redis_server import RedisServer

from estuary.state import Store, open_store


@dataclass(frozen=True)
class Backend:
    """How to open (more) clients of one test's store."""

    kind: str
    url: str
    options: dict[str, Any]

    def open(self) -> Store:
        """Open another client of the same store (same data)."""
        return open_store(self.url, **self.options)


@pytest.fixture(
    params=[pytest.param("memory"), pytest.param("redis", marks=pytest.mark.redis)],
)
def backend(request: pytest.FixtureRequest) -> Backend:
    """A fresh, empty store per test: a named MemoryStore, or a unique Redis key prefix."""
    name = f"contract-{uuid.uuid4().hex}"
    if request.param == "memory":
        return Backend(kind="memory", url=f"memory://{name}", options={})
    server: RedisServer = request.getfixturevalue("redis_server")
    return Backend(kind="redis", url=server.url, options={"prefix": f"{name}:"})


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """The store under test."""
    opened = backend.open()
    yield opened
    opened.close()
