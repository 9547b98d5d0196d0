from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from estuary.adapters import AdapterConfig, GlobalAdapter, LoRALinear
from estuary.compress import compress_model
from estuary.data import ClientData, eval_windows
from estuary.model.evaluate import bits_per_byte
from estuary.model.presets import build_preset
from simulation.evaluation import HeldOut, Scores, token_weighted_union

SEQ = 16


def _client(name: str, heldout_windows: int, seed: int) -> ClientData:
    rng = np.random.default_rng(seed)
    heldout = bytes(rng.integers(32, 127, size=heldout_windows * (SEQ + 1)).astype(np.uint8))
    return ClientData(name=name, train=b"x" * 100, heldout=heldout)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return compress_model(build_preset("tiny", seed=0), scheme="int8")


@pytest.fixture(scope="module")
def clients() -> list[ClientData]:
    # Unequal window counts, so a plain mean and the token-weighted mean differ.
    return [_client("a", 2, 1), _client("b", 7, 2), _client("c", 3, 3)]


@pytest.fixture(scope="module")
def held(clients: list[ClientData]) -> HeldOut:
    return HeldOut(clients, seq_len=SEQ, max_windows_per_client=None)


def _random_adapter(base: nn.Module, seed: int) -> GlobalAdapter:
    zero = GlobalAdapter.for_model(base, AdapterConfig(r_max=8, seed=0))
    rng = np.random.default_rng(seed)
    return zero.with_b({n: rng.normal(0.0, 0.05, v.shape) for n, v in zero.b.items()})


def test_union_is_the_token_weighted_mean_of_per_client_scores(
    base: nn.Module, held: HeldOut, clients: list[ClientData]
) -> None:
    # Prepare
    adapter = _random_adapter(base, 1)

    # Execute
    scores = held.score(base, adapter)

    # Assert: 2, 7 and 3 windows of SEQ predicted tokens each.
    assert held.tokens == {"a": 2 * SEQ, "b": 7 * SEQ, "c": 3 * SEQ}
    by_hand = (
        scores.per_client["a"] * 2 + scores.per_client["b"] * 7 + scores.per_client["c"] * 3
    ) / 12
    assert scores.union == pytest.approx(by_hand, rel=1e-12)
    assert scores.union != pytest.approx(np.mean(list(scores.per_client.values())), rel=1e-6)
    # ...and each per-client score is the library's bits/byte on that client's windows.
    no_adapter = held.score(base, None)
    for client in clients:
        windows = eval_windows(client.heldout, seq_len=SEQ)
        assert no_adapter.per_client[client.name] == pytest.approx(
            bits_per_byte(base, windows), rel=1e-5
        )


def test_zero_adapter_scores_exactly_as_the_base(base: nn.Module, held: HeldOut) -> None:
    zero = GlobalAdapter.for_model(base, AdapterConfig(r_max=8))

    with_zero = held.score(base, zero)
    alone = held.score(base, None)

    assert with_zero == alone


def test_adapter_changes_scores_and_leaves_the_model_as_it_was(
    base: nn.Module, held: HeldOut
) -> None:
    before = held.score(base, None)

    adapted = held.score(base, _random_adapter(base, 2))
    after = held.score(base, None)

    assert adapted.union != pytest.approx(before.union, abs=1e-4)
    assert after == before
    assert not any(isinstance(m, LoRALinear) for m in base.modules())


def test_score_each_with_one_adapter_for_all_equals_score(base: nn.Module, held: HeldOut) -> None:
    adapter = _random_adapter(base, 3)

    each = held.score_each(base, {n: adapter for n in held.clients}, rank=4)
    together = held.score(base, adapter)

    assert each.per_client == pytest.approx(together.per_client, rel=1e-6)
    assert each.union == pytest.approx(together.union, rel=1e-6)


def test_score_each_uses_each_clients_own_adapter(base: nn.Module, held: HeldOut) -> None:
    zero = GlobalAdapter.for_model(base, AdapterConfig(r_max=8))
    other = _random_adapter(base, 4)

    mixed = held.score_each(base, {"a": other, "b": zero, "c": zero})

    assert mixed.per_client["a"] == pytest.approx(held.score(base, other).per_client["a"], 1e-6)
    assert mixed.per_client["b"] == pytest.approx(held.score(base, None).per_client["b"], 1e-6)


def test_score_each_needs_an_adapter_per_client(base: nn.Module, held: HeldOut) -> None:
    zero = GlobalAdapter.for_model(base, AdapterConfig(r_max=8))
    with pytest.raises(ValueError, match="adapters"):
        held.score_each(base, {"a": zero, "b": zero})


def test_windows_are_capped_and_evenly_spaced() -> None:
    client = _client("big", 40, 5)

    held = HeldOut([client], seq_len=SEQ, max_windows_per_client=4)

    assert held.tokens == {"big": 4 * SEQ}
    expected = eval_windows(client.heldout, seq_len=SEQ, max_windows=4)
    assert torch.equal(held.windows["big"], expected)


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="clients"):
        HeldOut([], seq_len=SEQ)
    with pytest.raises(ValueError, match="clients"):
        HeldOut([_client("a", 2, 1), _client("a", 2, 2)], seq_len=SEQ)
    with pytest.raises(ValueError, match="clients: 'short'"):
        HeldOut([ClientData("short", b"x", b"y" * SEQ)], seq_len=SEQ)
    with pytest.raises(ValueError, match="max_windows_per_client"):
        HeldOut([_client("a", 2, 1)], seq_len=SEQ, max_windows_per_client=0)


def test_scores_as_dict() -> None:
    scores = Scores(per_client={"a": 1.5}, union=1.5)
    assert scores.as_dict() == {"per_client": {"a": 1.5}, "union": 1.5}


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=20.0, allow_nan=False),
            st.integers(min_value=1, max_value=10_000),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_union_weighting_invariants(rows: list[tuple[float, int]]) -> None:
    per_client = {f"c{i}": v for i, (v, _) in enumerate(rows)}
    tokens = {f"c{i}": n for i, (_, n) in enumerate(rows)}

    union = token_weighted_union(per_client, tokens)

    values = [v for v, _ in rows]
    assert min(values) - 1e-9 <= union <= max(values) + 1e-9
    expected = sum(v * n for v, n in rows) / sum(n for _, n in rows)
    assert union == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # Scaling every count by the same factor leaves the union unchanged.
    scaled = token_weighted_union(per_client, {k: 3 * n for k, n in tokens.items()})
    assert scaled == pytest.approx(union, rel=1e-12, abs=1e-12)


def test_union_rejects_mismatched_or_empty_counts() -> None:
    with pytest.raises(ValueError, match="tokens"):
        token_weighted_union({"a": 1.0}, {"b": 1})
    with pytest.raises(ValueError, match="tokens"):
        token_weighted_union({"a": 1.0}, {"a": 0})
