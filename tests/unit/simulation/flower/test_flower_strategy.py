"""NestedLoRA's aggregation, on replies built by hand (no simulation engine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr", reason="the flower extra (flwr) is not installed")

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from estuary.adapters.lora import AdapterConfig, GlobalAdapter
from simulation.flower import protocol
from simulation.flower.strategy import NestedLoRA, RoundAggregate
from simulation.flower.versions import VersionWriter

R_MAX = 4
SHAPES = {"layers.0.q_proj": (6, 8), "layers.0.down_proj": (5, 8)}


def make_adapter(seed: int = 0) -> GlobalAdapter:
    rng = np.random.default_rng(seed)
    return GlobalAdapter(
        config=AdapterConfig(r_max=R_MAX, targets=("q_proj", "down_proj")),
        shapes=dict(SHAPES),
        b={n: rng.normal(size=(s[0], R_MAX)).astype(np.float32) for n, s in SHAPES.items()},
    )


def delta(rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (rows, _) in SHAPES.items():
        value = np.zeros((rows, R_MAX), dtype=np.float32)
        value[:, :rank] = rng.normal(size=(rows, rank))
        out[name] = value
    return out


def metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=1,
        reply_to_message_id="instruction",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )


def reply(node_id: int, update: dict[str, np.ndarray], *, weight: object, rank: object) -> Message:
    entries = {protocol.WEIGHT_KEY: weight, protocol.RANK_KEY: rank}
    metrics = MetricRecord({k: v for k, v in entries.items() if v is not None})
    content = RecordDict(
        {protocol.ARRAYS_KEY: protocol.b_to_arrays(update), protocol.METRICS_KEY: metrics}
    )
    return Message(content=content, metadata=metadata(node_id))


def test_mixed_ranks_aggregate_to_the_weighted_mean_of_the_updates() -> None:
    adapter = make_adapter()
    seen: list[RoundAggregate] = []
    strategy = NestedLoRA(adapter, on_aggregate=seen.append)
    updates = [delta(1, 1), delta(4, 2), delta(2, 3)]
    weights = [100.0, 300.0, 50.0]
    replies = [
        reply(10 + i, u, weight=w, rank=r)
        for i, (u, w, r) in enumerate(zip(updates, weights, (1, 4, 2), strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    got = protocol.arrays_to_b(arrays)
    for name in SHAPES:
        mean = np.average(np.stack([u[name] for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(got[name], adapter.b[name] + mean, rtol=1e-6, atol=1e-6)
        # Weighting matters here: the unweighted mean is far from the result.
        plain = np.mean(np.stack([u[name] for u in updates]), axis=0)
        assert np.abs(adapter.b[name] + plain - got[name]).max() > 1e-2
    assert metrics["updates"] == 3 and metrics["weight-sum"] == pytest.approx(450.0)
    assert [u.node_id for u in seen[0].updates] == [10, 11, 12]
    assert all(np.array_equal(strategy.adapter.b[n], got[n]) for n in SHAPES)


def test_server_lr_scales_the_step() -> None:
    adapter = make_adapter()
    strategy = NestedLoRA(adapter, server_lr=0.5)
    update = delta(4, 7)
    arrays, _ = strategy.aggregate_train(1, [reply(3, update, weight=1.0, rank=4)])
    assert arrays is not None
    got = protocol.arrays_to_b(arrays)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], adapter.b[name] + 0.5 * update[name], atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: {**u, "layers.0.q_proj": u["layers.0.q_proj"][:, :2]}, "shape"),
        (lambda u: {"layers.0.q_proj": u["layers.0.q_proj"]}, "module names differ"),
        (lambda u: {**u, "extra.v_proj": np.zeros((2, R_MAX), np.float32)}, "module names"),
        (
            lambda u: {**u, "layers.0.q_proj": np.full((6, R_MAX), np.nan, np.float32)},
            "non-finite",
        ),
    ],
)
def test_malformed_arrays_are_refused_and_left_out(mutate: object, reason: str) -> None:
    adapter = make_adapter()
    seen: list[RoundAggregate] = []
    strategy = NestedLoRA(adapter, on_aggregate=seen.append)
    good = delta(2, 1)
    bad = mutate(delta(2, 2))
    with pytest.raises(ValueError, match=reason):
        strategy.read_update(reply(5, bad, weight=1.0, rank=2))
    arrays, metrics = strategy.aggregate_train(
        1, [reply(4, good, weight=1.0, rank=2), reply(5, bad, weight=1.0, rank=2)]
    )
    assert arrays is not None and metrics is not None
    assert metrics["rejected"] == 1 and metrics["updates"] == 1
    got = protocol.arrays_to_b(arrays)
    for name in SHAPES:  # the good update alone
        np.testing.assert_allclose(got[name], adapter.b[name] + good[name], atol=1e-6)


@pytest.mark.parametrize(
    ("weight", "rank", "reason"),
    [
        (-1.0, 2, "num-examples"),
        (float("inf"), 2, "num-examples"),
        (None, 2, "num-examples"),
        (1.0, None, "estuary.rank"),
        (1.0, 2.0, "estuary.rank"),
        (1.0, 0, "estuary.rank"),
        (1.0, R_MAX + 1, "estuary.rank"),
        (1.0, 1, "beyond its rank 1"),  # the update has 2 trained columns
    ],
)
def test_bad_weight_or_rank_is_refused(weight: object, rank: object, reason: str) -> None:
    strategy = NestedLoRA(make_adapter())
    with pytest.raises(ValueError, match=reason):
        strategy.read_update(reply(5, delta(2, 1), weight=weight, rank=rank))


def test_a_rotating_block_is_accepted_and_one_column_too_many_is_not() -> None:
    # A rank-2 node under the rotating rule trains a block such as columns 2-3; the
    # strategy holds it to two columns in all, wherever they are, across every module.
    strategy = NestedLoRA(make_adapter())
    block = {n: np.roll(v, 2, axis=1) for n, v in delta(2, 1).items()}

    update = strategy.read_update(reply(5, block, weight=1.0, rank=2))

    assert all(np.array_equal(update.delta_b[n], block[n]) for n in block)
    spread = {n: np.roll(v, i, axis=1) for i, (n, v) in enumerate(delta(2, 1).items())}
    with pytest.raises(ValueError, match=r"3 columns trained \[0, 1, 2\], beyond its rank 2"):
        strategy.read_update(reply(5, spread, weight=1.0, rank=2))


def test_failed_replies_and_nothing_left_keep_the_version() -> None:
    adapter = make_adapter()
    strategy = NestedLoRA(adapter)
    failed = Message(Error(code=0, reason="node crashed"), metadata=metadata(9))
    assert strategy.aggregate_train(1, [failed]) == (None, None)
    assert all(np.array_equal(strategy.adapter.b[n], adapter.b[n]) for n in SHAPES)
    assert strategy.aggregate_train(1, [reply(3, delta(2, 1), weight=0.0, rank=2)]) == (
        None,
        None,
    )


def test_server_lr_must_be_positive() -> None:
    with pytest.raises(ValueError, match="server_lr"):
        NestedLoRA(make_adapter(), server_lr=0.0)


def test_each_round_writes_a_loadable_version(tmp_path: Path) -> None:
    adapter = make_adapter()
    writer = VersionWriter(tmp_path, base=None, write_model="never", final_version=2)
    strategy = NestedLoRA(adapter, writer=writer)
    for round_ in (1, 2):
        arrays, _ = strategy.aggregate_train(
            round_, [reply(1, delta(4, round_), weight=2.0, rank=4)]
        )
        assert arrays is not None
        loaded = GlobalAdapter.load(tmp_path / f"v{round_:04d}" / "adapter.safetensors")
        for name, value in protocol.arrays_to_b(arrays).items():
            np.testing.assert_array_equal(loaded.b[name], value)
    assert (tmp_path / "LATEST").read_text().strip() == "2"


def test_configure_sends_the_adapter_identity_and_asks_for_deltas() -> None:
    class TwoNodeGrid:
        def get_node_ids(self) -> list[int]:
            return [7, 8]

    import flwr.supercore.task_identity as identity

    identity.TaskIdentity.run_id = 1
    identity.TaskIdentity.node_id = 1
    identity.TaskIdentity.task_id = 0
    adapter = make_adapter()
    strategy = NestedLoRA(adapter)
    stale = ArrayRecord()  # what Flower passes is ignored: the strategy owns the adapter
    messages = list(strategy.configure_train(3, stale, ConfigRecord({"x": 1}), TwoNodeGrid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == [7, 8]
    config = messages[0].content.config_records[protocol.CONFIG_KEY]
    assert config[protocol.REPLY_KEY] == protocol.REPLY_DELTA
    assert config[protocol.R_MAX_KEY] == R_MAX and config["x"] == 1
    assert config[protocol.ROUND_KEY] == 3
    sent = protocol.arrays_to_b(messages[0].content.array_records[protocol.ARRAYS_KEY])
    assert all(np.array_equal(sent[n], adapter.b[n]) for n in SHAPES)


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.integers(1, R_MAX), min_size=1, max_size=6),
    weights=st.lists(st.floats(0.5, 1e4), min_size=6, max_size=6),
    server_lr=st.floats(0.1, 2.0),
)
def test_aggregate_is_the_weighted_mean_for_any_rank_mix(
    ranks: list[int], weights: list[float], server_lr: float
) -> None:
    adapter = make_adapter(1)
    strategy = NestedLoRA(adapter, server_lr=server_lr)
    updates = [delta(r, 100 + i) for i, r in enumerate(ranks)]
    used = weights[: len(ranks)]
    replies = [
        reply(i + 2, u, weight=w, rank=r)
        for i, (u, w, r) in enumerate(zip(updates, used, ranks, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    got = protocol.arrays_to_b(arrays)
    top = max(ranks)
    for name in SHAPES:
        mean = np.average(np.stack([u[name] for u in updates]), axis=0, weights=used)
        np.testing.assert_allclose(
            got[name], adapter.b[name] + server_lr * mean, rtol=1e-5, atol=1e-5
        )
        # Columns nobody trained keep their value: nested ranks never touch them.
        np.testing.assert_array_equal(got[name][:, top:], adapter.b[name][:, top:])
