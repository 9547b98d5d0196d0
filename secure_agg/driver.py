"""In-process driver: every client and the server in one process, messages relayed as bytes.

Used by the tests, the benchmark and the simulator. Every message goes through ``encode`` and
``decode`` exactly as a transport would carry it, so byte counts are the wire sizes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secure_agg.client import SINGLE_TENSOR, Client, as_tensors
from secure_agg.config import SessionConfig
from secure_agg.numerics import FixedPoint
from secure_agg.server import Server
from secure_agg.stages import Stage

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating]
Inputs = Sequence[FloatArray] | Sequence[Mapping[str, FloatArray]]

LOCAL_COHORT = b"estuary-local-cohort"
"""Cohort id of in-process sessions; any fixed value works because keys are fresh per run."""


@dataclass
class LocalResult:
    """Outcome and cost of one in-process session.

    Attributes
    ----------
    float_sum
        Σ w_i x_i over the survivors (array, or dict name → array), decoded from fixed point.
    integer_sum
        The exact signed integer sum of the survivors' quantised inputs, same layout.
    survivors
        Indices of the clients whose inputs are in the sum (U3).
    weight_sum
        Σ w_i over the survivors.
    fixed_point
        The encoding used (it carries the scale 2^f).
    client_seconds
        Stage name → per-client handler seconds (clients that acted in that stage).
    server_seconds
        Stage name → server seconds (handling, closing, encoding outgoing messages).
    bytes_up, bytes_down
        Per client, wire bytes sent to and received from the server.
    """

    float_sum: npt.NDArray[np.float64] | dict[str, npt.NDArray[np.float64]]
    integer_sum: npt.NDArray[np.int64] | dict[str, npt.NDArray[np.int64]]
    survivors: tuple[int, ...]
    weight_sum: float
    fixed_point: FixedPoint
    client_seconds: dict[str, list[float]] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)


def _normalise(inputs: Inputs) -> tuple[list[dict[str, FloatArray]], dict[str, tuple[int, ...]]]:
    if not inputs:
        raise ValueError("inputs must hold at least one client's update")
    as_dicts = [as_tensors(item) for item in inputs]
    shapes = {name: arr.shape for name, arr in as_dicts[0].items()}
    for i, update in enumerate(as_dicts):
        if {n: a.shape for n, a in update.items()} != shapes:
            raise ValueError(f"inputs[{i}] has tensors or shapes different from inputs[0]")
    return as_dicts, shapes


def run_local(
    inputs: Inputs,
    *,
    threshold: int,
    clip: float,
    bits: int,
    neighbours: int | None = None,
    weights: Sequence[float] | None = None,
    drop: Mapping[int, Stage] | None = None,
    seed: int | None = None,
    frac_bits: int | None = None,
    active: bool = False,
    per_tensor: bool = False,
) -> LocalResult:
    """Run one complete session in process.

    Parameters
    ----------
    inputs
        One float array per client, or one name → array mapping per client.
    threshold
        t (global, or per neighbourhood with ``neighbours``).
    clip
        L2 clipping bound.
    bits
        Modulus exponent b.
    neighbours
        k for SecAgg+, or None for the complete graph.
    weights
        Client-side weight of each client (default 1.0 each).
    drop
        Client index → the stage whose message that client never sends (it is gone from then
        on). ``Stage.ADVERTISE_KEYS`` means it never joins.
    seed
        Seeds client i's stochastic rounding with ``numpy.random.default_rng([seed, i])``, so a
        caller can recompute the quantised inputs. Keys and masks always come from the OS CSPRNG.
    frac_bits
        Scale exponent f; by default the largest that cannot overflow for ``len(inputs)``.
    active
        Active-adversary mode (Ed25519 identities generated here, consistency check stage).
    per_tensor
        Clip each tensor separately instead of the whole update.

    Raises
    ------
    CohortAborted
        If fewer than t clients survive a stage; no unmasking share has been sent then.
    OverflowRefused
        If the configuration could wrap.
    """
    updates, shapes = _normalise(inputs)
    n = len(updates)
    if weights is not None and len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} inputs")
    drops = dict(drop or {})
    fp = (
        FixedPoint.for_cohort(n, bits=bits, clip=clip, per_tensor=per_tensor)
        if frac_bits is None
        else FixedPoint(bits=bits, frac_bits=frac_bits, clip=clip, per_tensor=per_tensor)
    )
    config = SessionConfig(
        cohort=LOCAL_COHORT,
        cohort_size=n,
        threshold=threshold,
        tensors=tuple((name, int(np.prod(shape))) for name, shape in shapes.items()),
        fixed_point=fp,
        neighbours=neighbours,
        active=active,
    )
    identities = [Ed25519PrivateKey.generate() for _ in range(n)] if active else []
    publics = {i: key.public_key() for i, key in enumerate(identities)} if active else None
    clients = [
        Client(
            i, config=config, identity=identities[i] if active else None, peer_identities=publics
        )
        for i in range(n)
    ]
    server = Server(config, members=range(n), peer_identities=publics)
    for i in range(n):
        server.assign_weight(i, 1.0 if weights is None else float(weights[i]))
    rngs = [np.random.default_rng(None if seed is None else [seed, i]) for i in range(n)]
    client_seconds: dict[str, list[float]] = {s.name: [0.0] * n for s in Stage}
    server_seconds: dict[str, float] = {s.name: 0.0 for s in Stage}
    up = [0] * n
    down = [0] * n

    def present(i: int, stage: Stage) -> bool:
        return drops.get(i, Stage.COMPLETED) > stage

    def to_server(i: int, data: bytes) -> None:
        up[i] += len(data)
        stage = server.stage
        start = time.perf_counter()
        server.handle(i, data)
        server_seconds[stage.name] += time.perf_counter() - start

    def from_server() -> list[tuple[int, bytes]]:
        stage = server.stage
        start = time.perf_counter()
        encoded = server.drain_encoded()  # a broadcast is encoded once, as a transport would
        server_seconds[stage.name] += time.perf_counter() - start
        return encoded

    for i in range(n):
        if present(i, Stage.ADVERTISE_KEYS):
            start = time.perf_counter()
            advert = clients[i].advertise().encode()
            client_seconds[Stage.ADVERTISE_KEYS.name][i] += time.perf_counter() - start
            to_server(i, advert)
    while server.stage not in (Stage.COMPLETED, Stage.ABORTED):
        stage = server.stage
        if stage is not Stage.ADVERTISE_KEYS:
            for recipient, data in from_server():
                if not present(recipient, stage):
                    continue
                down[recipient] += len(data)
                start = time.perf_counter()
                reply = clients[recipient].handle(data)
                if stage is Stage.MASKED_INPUT:
                    reply = clients[recipient].submit(
                        updates[recipient],
                        weight=1.0 if weights is None else float(weights[recipient]),
                        rng=rngs[recipient],
                    )
                data_out = reply.encode() if reply is not None else None
                client_seconds[stage.name][recipient] += time.perf_counter() - start
                if data_out is not None:
                    to_server(recipient, data_out)
        if server.stage is stage:
            start = time.perf_counter()
            server.deadline()
            server_seconds[stage.name] += time.perf_counter() - start
    assert server.result is not None
    result = server.result
    single = list(shapes) == [SINGLE_TENSOR] and all(
        not isinstance(item, Mapping) for item in inputs
    )
    floats = {name: result.float_sum[name].reshape(shape) for name, shape in shapes.items()}
    ints = {name: result.integer_sum[name].reshape(shape) for name, shape in shapes.items()}
    return LocalResult(
        float_sum=floats[SINGLE_TENSOR] if single else floats,
        integer_sum=ints[SINGLE_TENSOR] if single else ints,
        survivors=result.survivors,
        weight_sum=result.weight_sum,
        fixed_point=fp,
        client_seconds={k: v for k, v in client_seconds.items() if any(v)},
        server_seconds={k: v for k, v in server_seconds.items() if v},
        bytes_up=up,
        bytes_down=down,
    )


__all__ = ["LOCAL_COHORT", "LocalResult", "run_local"]
