"""Estuary's Flower ClientApp: a LoRA adapter of the node's rank trained on the compressed base.

Each node holds the base compressed as on an Estuary device (``int8`` or ``nf4`` weights,
dequantised on the fly in the backward pass) and trains ``rank`` columns of ``B`` of the
shared adapter (``column-rule``: a block that moves on each round, or the first ``rank``)
with Estuary's edge trainer (:func:`edge_client.train.train_adapter`) on its own data,
then replies ``ΔB`` zero-padded to ``r_max`` (or ``B + ΔB`` to a stock Flower strategy;
see :mod:`simulation.flower.protocol`).

What a node brings comes from its ``node_config`` (``flower-supernode --node-config``):

- ``data-path``: its training text, a folder or a ``.jsonl`` file
  (:func:`estuary.data.load_user_data`); ``heldout-path`` likewise, for ``evaluate``;
- ``rank``: the adapter rank it trains (its device class), ``1..r_max``.

A node without ``data-path`` is a simulated partition (the simulation engine sets
``partition-id``): partition ``i`` holds standard-library package ``i``'s text, split
into train and held-out as ``estuary simulate`` does, and trains rank
``ranks[i % len(ranks)]`` unless ``rank`` is given.

The compressed base is built once per process and kept (a simulation actor serves many
nodes one after another; a SuperNode serves one).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from edge_client.train import train_adapter
from estuary.adapters.lora import (
    AdapterConfig,
    GlobalAdapter,
    rank_learning_rate,
    trained_columns,
)
from estuary.data.stdlib import ClientData, stdlib_client
from estuary.data.user import load_user_data
from estuary.data.windows import client_seed, window_seed
from simulation.flower import protocol
from simulation.flower.settings import FlowerSettings, Preset, Scheme

logger = logging.getLogger(__name__)

#: Held-out windows a node scores in ``evaluate``: as many as ``estuary simulate`` uses
#: per client, so the two report comparable bits/byte.
EVAL_WINDOWS = 8


@dataclass(frozen=True)
class NodeSetup:
    """What one node trains with: its name, rank, data and window seed.

    ``seed``: a simulation partition ``i`` has ``estuary simulate``'s seed of client ``i``
    (:func:`~estuary.data.windows.client_seed` of ``data-seed``); a node with its own data
    one derived from ``data-seed`` and its name.
    """

    name: str
    rank: int
    data: ClientData
    seed: int
    member: int  # stands in for a cohort member index (rotating columns): its partition


def _int_entry(config: dict[str, object], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"node_config: {key} must be an integer, got {value!r}")
    return value


def node_setup(settings: FlowerSettings, node_config: dict[str, object]) -> NodeSetup:
    """Return the rank and data of the node whose ``node_config`` is given.

    Raises
    ------
    ValueError
        If the node names neither ``data-path`` nor ``partition-id``, a partition beyond
        the configured packages, or a rank outside ``1..r_max`` (the message names it).
    FileNotFoundError
        If ``data-path`` or ``heldout-path`` does not exist.
    """
    rank = _int_entry(node_config, "rank")
    data_path = node_config.get("data-path")
    if data_path:
        name = Path(str(data_path)).name or str(data_path)
        heldout_path = node_config.get("heldout-path")
        heldout = load_user_data(str(heldout_path)) if heldout_path else b""
        data = ClientData(name=name, train=load_user_data(str(data_path)), heldout=heldout)
        if rank is None:
            rank = settings.ranks[0]
        key = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
        seed = int(np.random.SeedSequence([settings.data_seed, key]).generate_state(1)[0])
        member = seed % 65536
    else:
        partition = _int_entry(node_config, "partition-id")
        if partition is None:
            raise ValueError(
                "node_config: a node needs 'data-path' (its own data) or, in a simulation, "
                "'partition-id'"
            )
        packages = settings.stdlib_packages
        if not 0 <= partition < len(packages):
            raise ValueError(
                f"partition-id: {partition} but stdlib-packages names {len(packages)} "
                f"partitions ({', '.join(packages)})"
            )
        data = _partition_data(
            packages[partition], max_train_bytes=settings.max_train_bytes, seed=settings.data_seed
        )
        name = data.name
        seed = client_seed(settings.data_seed, partition)
        member = partition
        if rank is None:
            rank = settings.rank_of_partition(partition)
    if not 1 <= rank <= settings.r_max:
        raise ValueError(f"rank: {rank} outside 1..r-max={settings.r_max}")
    return NodeSetup(name=name, rank=rank, data=data, seed=seed, member=member)


@functools.lru_cache(maxsize=64)
def _partition_data(package: str, *, max_train_bytes: int, seed: int) -> ClientData:
    return stdlib_client(package, max_train_bytes=max_train_bytes or None, seed=seed)


@functools.lru_cache(maxsize=2)
def compressed_base(base: Path | None, preset: Preset, scheme: Scheme) -> nn.Module:
    """Return the base compressed with ``scheme`` (built once per process and kept)."""
    from estuary.compress import compress_model
    from estuary.config.models import ModelSettings
    from estuary.model.loading import load_base

    model = ModelSettings(path=base) if base is not None else ModelSettings(preset=preset)
    started = time.perf_counter()
    edge = compress_model(load_base(model), scheme=scheme)
    logger.info("compressed base (%s) ready in %.1f s", scheme, time.perf_counter() - started)
    return edge


@functools.lru_cache(maxsize=4)
def _template(
    base: Path | None, preset: Preset, scheme: Scheme, config: AdapterConfig
) -> GlobalAdapter:
    return GlobalAdapter.for_model(compressed_base(base, preset, scheme), config)


def _seed(server_round: int, node: NodeSetup) -> int:
    """Window-sampling seed of one node in one round.

    Round ``r`` trains from the model of ``r − 1`` aggregations, which ``estuary
    simulate`` calls version ``r − 1``: the same client draws the same windows in both.
    """
    return window_seed(node.seed, max(0, server_round - 1))


def _global_adapter(settings: FlowerSettings, msg: Message) -> tuple[GlobalAdapter, ConfigRecord]:
    config = msg.content.config_records.get(protocol.CONFIG_KEY, ConfigRecord())
    adapter_config = protocol.adapter_config_from(
        config, r_max=settings.r_max, seed=settings.adapter_seed
    )
    arrays = msg.content.array_records.get(protocol.ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"message: no ArrayRecord under {protocol.ARRAYS_KEY!r}")
    template = _template(settings.base, settings.preset, settings.scheme, adapter_config)
    return protocol.adapter_from(template, arrays), config


def train(msg: Message, context: Context, settings: FlowerSettings) -> Message:
    """Train this node's rank on its data from the global adapter; reply ΔB or B + ΔB."""
    node = node_setup(settings, dict(context.node_config))
    adapter, config = _global_adapter(settings, msg)
    server_round = config.get(protocol.ROUND_KEY, 0)
    if not isinstance(server_round, int) or isinstance(server_round, bool):
        raise ValueError(f"config: {protocol.ROUND_KEY} must be an integer, got {server_round!r}")
    base = compressed_base(settings.base, settings.preset, settings.scheme)
    result = train_adapter(
        base,
        adapter,
        node.data.train,
        rank=node.rank,
        steps=settings.local_steps,
        lr=rank_learning_rate(
            settings.learning_rate,
            rank=node.rank,
            r_max=settings.r_max,
            power=settings.rank_lr_power,
        ),
        grad_clip_norm=settings.grad_clip_norm,
        batch_size=settings.batch_size,
        seq_len=settings.seq_len,
        threads=settings.client_threads,
        seed=_seed(server_round, node),
        optimizer=settings.optimizer,
        columns=trained_columns(
            settings.column_rule,
            node.rank,
            settings.r_max,
            version=max(0, server_round - 1),
            member=node.member,
        ),
        warmup_steps=settings.warmup_steps,
    )
    if config.get(protocol.REPLY_KEY) == protocol.REPLY_DELTA:
        payload = result.delta_b
    else:  # a stock Flower strategy averages what it gets: the new weights
        payload = adapter.apply_update(result.delta_b).b
    metrics = MetricRecord(
        {
            protocol.WEIGHT_KEY: len(node.data.train),
            protocol.RANK_KEY: node.rank,
            "train-loss-first": result.metrics.loss_first,
            "train-loss-last": result.metrics.loss_last,
            "train-seconds": result.metrics.seconds,
        }
    )
    content = RecordDict(
        {protocol.ARRAYS_KEY: protocol.b_to_arrays(payload), protocol.METRICS_KEY: metrics}
    )
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, settings: FlowerSettings) -> Message:
    """Reply the held-out bits/byte of the global adapter on this node's held-out data."""
    from simulation.evaluation import HeldOut

    node = node_setup(settings, dict(context.node_config))
    if not node.data.heldout:
        raise ValueError(f"node {node.name}: no held-out data (set node_config 'heldout-path')")
    adapter, _ = _global_adapter(settings, msg)
    held_out = HeldOut([node.data], seq_len=settings.seq_len, max_windows_per_client=EVAL_WINDOWS)
    base = compressed_base(settings.base, settings.preset, settings.scheme)
    scores = held_out.score(base, adapter, threads=settings.client_threads)
    metrics = MetricRecord(
        {"bits-per-byte": scores.union, protocol.WEIGHT_KEY: held_out.tokens[node.data.name]}
    )
    return Message(content=RecordDict({protocol.METRICS_KEY: metrics}), reply_to=msg)


def make_client_app(settings: FlowerSettings | None = None) -> ClientApp:
    """Return Estuary's ClientApp.

    Parameters
    ----------
    settings
        The run's settings, for ``flwr.simulation.run_simulation`` (which passes no run
        config); ``None`` reads them from each message's ``context.run_config`` (what
        ``flwr run`` provides).
    """
    app = ClientApp()

    def resolve(context: Context) -> FlowerSettings:
        if settings is not None:
            return settings
        return FlowerSettings.from_run_config(context.run_config)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, resolve(context))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, resolve(context))

    return app


#: The ClientApp ``flwr run`` loads (``clientapp = "simulation.flower.client_app:app"``).
app = make_client_app()

__all__ = ["EVAL_WINDOWS", "NodeSetup", "app", "compressed_base", "make_client_app", "node_setup"]
