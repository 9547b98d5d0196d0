"""Test helper: an :class:`~edge_client.rpc.EdgeRpc` over a scripted stub, no network."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_client.hooks import AgentHooks, AgentStats
from edge_client.rpc import EdgeRpc
from estuary.clock import Clock


def offline_rpc(
    clock: Clock,
    stub: Any,
    *,
    identity: Callable[[], Ed25519PrivateKey],
    seed: int = 5,
    max_backoff_s: float = 300.0,
    hooks: AgentHooks | None = None,
) -> EdgeRpc:
    """Return an ``EdgeRpc`` that calls ``stub`` directly, waiting on ``clock``."""
    return EdgeRpc(
        "coordinator.test:443",
        credentials=None,
        identity=identity,
        clock=clock,
        rng=random.Random(seed),
        max_backoff_s=max_backoff_s,
        stats=AgentStats(),
        hooks=AgentHooks() if hooks is None else hooks,
        stub=stub,
    )
