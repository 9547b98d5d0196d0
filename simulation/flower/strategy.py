"""Estuary's Flower strategy: exact aggregation of mixed-rank LoRA updates (message API).

Every client trains ``r`` columns of ``B`` (the first ``r``, or a block that rotates:
``column-rule``) against the *same* frozen ``A`` (derived from a seed, never sent) and
replies ``ΔB`` zero-padded to ``r_max``. Because ``A`` is shared and fixed,
``ΔW_i = ΔB_i A`` is linear in ``ΔB_i``, so

    Σ w_i ΔB_i A / Σ w_i  =  (Σ w_i ΔB_i / Σ w_i) · A

for any mix of ranks: the server's step ``B ← B + server_lr · Σ w_i ΔB_i / Σ w_i`` is the
weighted mean of the clients' weight changes, exactly (the rule of
:mod:`estuary.adapters.lora`, which Estuary's coordinator applies to securely aggregated
sums). Averaging LoRA ``A`` and ``B`` factors separately, as a plain FedAvg of both would,
is *not* the average of ``B·A``.

:class:`NestedLoRA` is Flower's :class:`~flwr.serverapp.strategy.FedAvg` (its sampling,
configuration and evaluation) with that aggregation: it keeps the global adapter, sends
its ``B`` with the adapter's identity and ``estuary.reply = "delta"``, checks every reply
(module names and shapes, finite values, a weight, a rank in ``1..r_max`` and no more
columns trained than the rank) and drops a malformed one with a warning rather than let it
into the sum, and writes every new version (:mod:`simulation.flower.versions`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from estuary.adapters.lora import GlobalAdapter, mean_from_sum, weighted_sum
from simulation.flower import protocol
from simulation.flower.versions import VersionInfo, VersionWriter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted reply: who sent it, its weight, its rank and its ΔB."""

    node_id: int
    weight: float
    rank: int
    delta_b: dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class RoundAggregate:
    """What one round of aggregation did (given to the ``on_aggregate`` callback).

    Attributes
    ----------
    server_round
        The round, from 1.
    updates
        The accepted updates, in reply order.
    rejected
        Replies refused as malformed (each logged with its reason).
    failed
        Replies that carried an error instead of content (a node that failed).
    previous, adapter
        The global adapter before and after the round.
    version
        The version written, or ``None`` without a writer.
    """

    server_round: int
    updates: tuple[ClientUpdate, ...]
    rejected: int
    failed: int
    previous: GlobalAdapter
    adapter: GlobalAdapter
    version: VersionInfo | None


class NestedLoRA(FedAvg):
    """FedAvg whose aggregation is Estuary's exact rule for mixed-rank LoRA.

    Parameters
    ----------
    adapter
        The global adapter of round 0 (shared ``A`` config, starting ``B``).
    server_lr
        Server step: ``B ← B + server_lr · Σ w ΔB / Σ w``; 1 is plain federated averaging.
    writer
        Writes each new version; ``None`` writes nothing.
    on_aggregate
        Called after every aggregation with a :class:`RoundAggregate` (e.g. to record
        the updates for a check, or to log).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes
        As in :class:`~flwr.serverapp.strategy.FedAvg`.

    Raises
    ------
    ValueError
        If ``server_lr`` is not a positive number.
    """

    def __init__(
        self,
        adapter: GlobalAdapter,
        *,
        server_lr: float = 1.0,
        writer: VersionWriter | None = None,
        on_aggregate: Callable[[RoundAggregate], None] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        if not (server_lr > 0 and math.isfinite(server_lr)):
            raise ValueError(f"server_lr: must be a positive number, got {server_lr}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=protocol.WEIGHT_KEY,
            arrayrecord_key=protocol.ARRAYS_KEY,
            configrecord_key=protocol.CONFIG_KEY,
        )
        self._adapter = adapter
        self.server_lr = server_lr
        self.writer = writer
        self.on_aggregate = on_aggregate

    @property
    def adapter(self) -> GlobalAdapter:
        """The current global adapter."""
        return self._adapter

    def initial_arrays(self) -> ArrayRecord:
        """Return the ArrayRecord to pass to :meth:`start` as ``initial_arrays``."""
        return protocol.b_to_arrays(self._adapter.b)

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        config = self._adapter.config
        logger.info(
            "nested LoRA: r_max %d, A seed %d epoch %d, %d modules, server lr %g",
            config.r_max,
            config.seed,
            config.epoch,
            len(self._adapter.shapes),
            self.server_lr,
        )

    def _round_config(self, config: ConfigRecord) -> ConfigRecord:
        merged = ConfigRecord(dict(config))
        for key, value in protocol.adapter_config_record(self._adapter.config).items():
            merged[key] = value
        merged[protocol.REPLY_KEY] = protocol.REPLY_DELTA
        return merged

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current ``B`` and the adapter's identity; ask for ΔB."""
        del arrays  # the strategy's own adapter is the global model
        return super().configure_train(
            server_round, self.initial_arrays(), self._round_config(config), grid
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current ``B`` and the adapter's identity for evaluation."""
        del arrays
        return super().configure_evaluate(
            server_round, self.initial_arrays(), self._round_config(config), grid
        )

    def read_update(self, msg: Message) -> ClientUpdate:
        """Return the update a reply carries, checked against the global adapter.

        Raises
        ------
        ValueError
            If the reply has not exactly one ArrayRecord and one MetricRecord, its arrays
            differ in names or shapes from ``B``, a value is not finite, the weight is
            missing or negative, the rank is outside ``1..r_max``, or more columns are
            non-zero than the rank trains (the message says which).
        """
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise ValueError("expected one ArrayRecord and one MetricRecord")
        delta = protocol.arrays_to_b(next(iter(content.array_records.values())))
        metrics = next(iter(content.metric_records.values()))
        adapter = self._adapter
        if set(delta) != set(adapter.shapes):
            missing = sorted(set(adapter.shapes) - set(delta))[:3]
            extra = sorted(set(delta) - set(adapter.shapes))[:3]
            raise ValueError(f"module names differ (missing {missing}, unexpected {extra})")
        r_max = adapter.config.r_max
        weight = metrics.get(protocol.WEIGHT_KEY)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"{protocol.WEIGHT_KEY}: missing or not a number ({weight!r})")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"{protocol.WEIGHT_KEY}: must be finite and >= 0, got {weight}")
        rank = metrics.get(protocol.RANK_KEY)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
            raise ValueError(f"{protocol.RANK_KEY}: must be an integer in 1..{r_max}, got {rank!r}")
        trained = np.zeros(r_max, dtype=bool)
        for name, value in delta.items():
            expected = (adapter.shapes[name][0], r_max)
            if value.shape != expected:
                raise ValueError(f"{name}: shape {value.shape}, expected {expected}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{name}: non-finite values")
            trained |= np.any(value != 0, axis=0)
        if trained.sum() > rank:
            # A rank-r client trains r columns (the first r, or its rotating block).
            columns = np.flatnonzero(trained).tolist()
            raise ValueError(f"{len(columns)} columns trained {columns}, beyond its rank {rank}")
        return ClientUpdate(
            node_id=msg.metadata.src_node_id, weight=float(weight), rank=rank, delta_b=delta
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply ``server_lr · Σ w ΔB / Σ w`` of the accepted replies; write the version."""
        updates: list[ClientUpdate] = []
        rejected = failed = 0
        for msg in replies:
            if msg.has_error():
                failed += 1
                logger.warning(
                    "round %d: node %d failed: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            try:
                updates.append(self.read_update(msg))
            except ValueError as exc:
                rejected += 1
                logger.warning(
                    "round %d: update of node %d refused: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    exc,
                )
        total_weight = sum(u.weight for u in updates)
        if not updates or total_weight <= 0:
            logger.warning(
                "round %d: nothing to aggregate (%d accepted, weight %g); version unchanged",
                server_round,
                len(updates),
                total_weight,
            )
            return None, None
        total, weight_sum = weighted_sum([u.delta_b for u in updates], [u.weight for u in updates])
        previous = self._adapter
        self._adapter = previous.apply_update(
            mean_from_sum(total, weight_sum), server_lr=self.server_lr
        )
        ranks = Counter(u.rank for u in updates)
        version = (
            self.writer.write(
                server_round,
                self._adapter,
                updates=len(updates),
                weight_sum=weight_sum,
                ranks=ranks,
            )
            if self.writer is not None
            else None
        )
        if self.on_aggregate is not None:
            self.on_aggregate(
                RoundAggregate(
                    server_round=server_round,
                    updates=tuple(updates),
                    rejected=rejected,
                    failed=failed,
                    previous=previous,
                    adapter=self._adapter,
                    version=version,
                )
            )
        metrics = MetricRecord(
            {
                "updates": len(updates),
                "rejected": rejected,
                "failed": failed,
                "weight-sum": weight_sum,
            }
        )
        return self.initial_arrays(), metrics
