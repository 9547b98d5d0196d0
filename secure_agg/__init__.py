"""Secure aggregation for Estuary: SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020).

Pure state machines and crypto; imports numpy, cryptography and the standard library only.

- :class:`Client` and :class:`Server`: explicit per-stage state machines, advanced by messages
  (``encode()`` / :func:`decode` for any transport) and, on the server, deadlines.
- :class:`SessionConfig` and :class:`FixedPoint`: the public parameters and the encoding,
  refused at construction if the worst-case sum could wrap.
- :func:`run_local`: every party in one process, for tests, benchmarks and the simulator.
- :mod:`secure_agg.graph`: neighbour graphs and how to choose k and t.
"""

from __future__ import annotations

from secure_agg.client import Client
from secure_agg.config import SessionConfig
from secure_agg.driver import LocalResult, run_local
from secure_agg.errors import (
    ClientAborted,
    CohortAborted,
    OverflowRefused,
    ProtocolViolation,
    SecAggError,
)
from secure_agg.graph import choose_neighbours, choose_threshold
from secure_agg.messages import Message, decode
from secure_agg.numerics import FixedPoint
from secure_agg.server import AggregationResult, Outgoing, Server
from secure_agg.stages import Stage

__all__ = [
    "AggregationResult",
    "Client",
    "ClientAborted",
    "CohortAborted",
    "FixedPoint",
    "LocalResult",
    "Message",
    "Outgoing",
    "OverflowRefused",
    "ProtocolViolation",
    "SecAggError",
    "Server",
    "SessionConfig",
    "Stage",
    "choose_neighbours",
    "choose_threshold",
    "decode",
    "run_local",
]
