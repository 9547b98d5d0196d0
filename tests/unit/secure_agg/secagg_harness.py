"""A step-by-step harness: real clients and a real server, with the messages exposed."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secure_agg import Client, FixedPoint, Server, SessionConfig, Stage, crypto
from secure_agg.client import SINGLE_TENSOR
from secure_agg.messages import Message, decode
from secure_agg.numerics import quantize


def expected_sum(
    inputs: Sequence[npt.NDArray[np.floating]],
    survivors: Collection[int],
    *,
    fixed_point: FixedPoint,
    seed: int | None = None,
    weights: Sequence[float] | None = None,
) -> npt.NDArray[np.int64]:
    """Σ of the survivors' quantised inputs, with the rounding noise each client used.

    Client i rounds with ``default_rng(i)`` (the :class:`Harness`) or, given ``seed``,
    ``default_rng([seed, i])`` (``run_local``).
    """
    total = np.zeros(np.asarray(inputs[0]).size, dtype=np.int64)
    for i in survivors:
        q = quantize(
            {SINGLE_TENSOR: inputs[i]},
            fixed_point=fixed_point,
            weight=1.0 if weights is None else weights[i],
            rng=np.random.default_rng(i if seed is None else [seed, i]),
        )
        total += q[SINGLE_TENSOR]
    return total


class Harness:
    """n clients and one server; each ``step_*`` runs one stage and returns the server's output."""

    def __init__(
        self,
        *,
        n: int = 5,
        t: int = 3,
        m: int = 8,
        bits: int = 16,
        active: bool = False,
        neighbours: int | None = None,
        seed: int = 0,
        verified: crypto.VerifiedSignatures | None = None,
    ) -> None:
        self.fixed_point = FixedPoint.for_cohort(n, bits=bits, clip=1.0)
        self.config = SessionConfig(
            cohort=b"test-cohort",
            cohort_size=n,
            threshold=t,
            tensors=(("update", m),),
            fixed_point=self.fixed_point,
            neighbours=neighbours,
            active=active,
        )
        self.identities = [Ed25519PrivateKey.generate() for _ in range(n)] if active else []
        self.publics = (
            {i: k.public_key() for i, k in enumerate(self.identities)} if active else None
        )
        self.clients = [
            Client(
                i,
                config=self.config,
                identity=self.identities[i] if active else None,
                peer_identities=self.publics,
                verified=verified,
            )
            for i in range(n)
        ]
        self.server = Server(self.config, members=range(n), peer_identities=self.publics)
        rng = np.random.default_rng(seed)
        self.updates = [rng.uniform(-0.2, 0.2, size=m) for _ in range(n)]
        self.sent: list[tuple[int, Message]] = []
        """Every client → server message, to check what left the clients."""

    def expected_sum(self, survivors: Collection[int]) -> list[int]:
        """Σ of the survivors' quantised updates (unit weights), as the server must find it."""
        return expected_sum(self.updates, survivors, fixed_point=self.fixed_point).tolist()

    def _send(self, i: int, message: Message) -> None:
        self.sent.append((i, message))
        self.server.handle(i, message.encode())

    def _outbox(self) -> dict[int, Message]:
        return {o.recipient: decode(o.encode()) for o in self.server.drain()}

    def _close(self, stage: Stage) -> None:
        if self.server.stage is stage:
            self.server.deadline()

    def step_advertise(self, *, skip: Collection[int] = ()) -> dict[int, Message]:
        for i, client in enumerate(self.clients):
            if i not in skip:
                self._send(i, client.advertise())
        self._close(Stage.ADVERTISE_KEYS)
        return self._outbox()

    def step(
        self,
        inbox: Mapping[int, Message],
        *,
        skip: Collection[int] = (),
        weights: Mapping[int, float] | None = None,
    ) -> dict[int, Message]:
        """Deliver ``inbox`` to the clients, send their replies, close the stage."""
        stage = self.server.stage
        for i, message in sorted(inbox.items()):
            if i in skip:
                continue
            reply = self.clients[i].handle(message.encode())
            if stage is Stage.MASKED_INPUT:
                w = 1.0 if weights is None else weights.get(i, 1.0)
                reply = self.clients[i].submit(
                    self.updates[i], weight=w, rng=np.random.default_rng(i)
                )
            if reply is not None:
                self._send(i, reply)
        self._close(stage)
        return self._outbox()

    def run(self, *, skip_at: Mapping[Stage, Collection[int]] | None = None) -> None:
        """Run every stage; ``skip_at[stage]`` clients do not answer in that stage."""
        skips = dict(skip_at or {})
        inbox = self.step_advertise(skip=skips.get(Stage.ADVERTISE_KEYS, ()))
        while self.server.stage not in (Stage.COMPLETED, Stage.ABORTED):
            inbox = self.step(inbox, skip=skips.get(self.server.stage, ()))
