from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from estuary.adapters import (
    AdapterConfig,
    GlobalAdapter,
    LoRALinear,
    aggregate,
    attach_adapters,
    coverage_scale,
    delta_b,
    derive_a,
    detach_adapters,
    mean_from_sum,
    merge_into_base,
    owned_columns,
    rank_learning_rate,
    trained_columns,
    weighted_sum,
)
from estuary.compress import QuantLinear, compress_model
from estuary.model import CheckpointError
from estuary.model.presets import build_preset

R_MAX = 16


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return build_preset("tiny", seed=0)


@pytest.fixture(scope="module")
def adapter(tiny: nn.Module) -> GlobalAdapter:
    return GlobalAdapter.for_model(tiny, AdapterConfig(r_max=R_MAX, seed=7))


def _random_update(adapter: GlobalAdapter, rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, b in adapter.b.items():
        value = np.zeros_like(b)
        value[:, :rank] = rng.normal(0, 0.1, (b.shape[0], rank))
        out[name] = value
    return out


def test_a_has_orthonormal_rows_and_is_seed_derived() -> None:
    a = derive_a(seed=1, epoch=0, name="m.q_proj", r_max=16, in_features=128)

    np.testing.assert_allclose(a @ a.T, np.eye(16), atol=1e-5)
    np.testing.assert_array_equal(
        a, derive_a(seed=1, epoch=0, name="m.q_proj", r_max=16, in_features=128)
    )
    for other in (
        derive_a(seed=2, epoch=0, name="m.q_proj", r_max=16, in_features=128),
        derive_a(seed=1, epoch=1, name="m.q_proj", r_max=16, in_features=128),
        derive_a(seed=1, epoch=0, name="m.k_proj", r_max=16, in_features=128),
    ):
        assert np.abs(a - other).max() > 0.1


def test_r_max_wider_than_a_module_is_refused() -> None:
    with pytest.raises(ValueError, match="r_max"):
        derive_a(seed=0, epoch=0, name="x", r_max=9, in_features=8)


@pytest.mark.parametrize("rank", [0, R_MAX + 1])
def test_rank_outside_one_to_r_max_is_refused(
    tiny: nn.Module, adapter: GlobalAdapter, rank: int
) -> None:
    model = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match=r"rank.*r_max=16"):
        attach_adapters(model, adapter, rank=rank)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_only_first_rank_columns_train_and_update_is_zero_padded(
    tiny: nn.Module, adapter: GlobalAdapter
) -> None:
    model = copy.deepcopy(tiny)
    modules = attach_adapters(model, adapter, rank=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 256, (2, 17))

    logits = model(input_ids=ids[:, :-1]).logits
    nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    with torch.no_grad():
        for m in modules:
            m.lora_delta.add_(1.0)
    update = delta_b(model)

    assert len(modules) == 28
    assert {id(p) for p in trainable} == {id(m.lora_delta) for m in modules}
    assert all(m.lora_delta.shape[1] == 4 for m in modules)
    for name, value in update.items():
        assert value.shape == adapter.b[name].shape
        assert np.all(value[:, :4] == 1.0) and np.all(value[:, 4:] == 0.0)


def test_adapter_forward_equals_base_plus_b_a(tiny: nn.Module, adapter: GlobalAdapter) -> None:
    update = _random_update(adapter, R_MAX, seed=3)
    moved = adapter.apply_update(update, server_lr=1.0)
    model = copy.deepcopy(tiny)
    attach_adapters(model, moved, rank=8)
    name = "model.layers.1.mlp.up_proj"
    x = torch.randn(3, 128)

    got = model.get_submodule(name)(x)

    base = tiny.get_submodule(name)
    expected = base(x) + x @ torch.from_numpy(moved.delta_w(name)).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_aggregation_of_mixed_ranks_is_exact(adapter: GlobalAdapter) -> None:
    ranks = [4, 8, 16, 4, 16, 8]
    weights = [1.0, 2.5, 0.5, 3.0, 1.0, 0.25]
    updates = [_random_update(adapter, r, seed=i) for i, r in enumerate(ranks)]

    mean = aggregate(updates, weights)
    aggregated = adapter.with_b(mean)

    for name in adapter.shapes:
        a = adapter.a(name).astype(np.float64)
        expected = sum(
            w * (u[name].astype(np.float64) @ a) for u, w in zip(updates, weights, strict=True)
        )
        expected = expected / sum(weights)
        np.testing.assert_allclose(aggregated.delta_w(name), expected, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.sampled_from([4, 8, 16]), min_size=2, max_size=6),
    data=st.data(),
)
def test_aggregation_is_order_independent(ranks: list[int], data: st.DataObject) -> None:
    small = GlobalAdapter(
        config=AdapterConfig(r_max=16, targets=("q_proj",)),
        shapes={"m.q_proj": (8, 32)},
        b={"m.q_proj": np.zeros((8, 16), np.float32)},
    )
    weights = data.draw(st.lists(st.floats(0.01, 10), min_size=len(ranks), max_size=len(ranks)))
    updates = [_random_update(small, r, seed=i) for i, r in enumerate(ranks)]
    order = data.draw(st.permutations(range(len(ranks))))

    forward = aggregate(updates, weights)
    shuffled = aggregate([updates[i] for i in order], [weights[i] for i in order])

    np.testing.assert_allclose(forward["m.q_proj"], shuffled["m.q_proj"], atol=1e-7, rtol=0)


def test_sum_then_divide_equals_aggregate(adapter: GlobalAdapter) -> None:
    updates = [_random_update(adapter, r, seed=10 + r) for r in (4, 16)]

    total, weight_sum = weighted_sum(updates, [2.0, 1.0])

    assert weight_sum == 3.0
    for name, value in aggregate(updates, [2.0, 1.0]).items():
        np.testing.assert_array_equal(mean_from_sum(total, weight_sum)[name], value)


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        ([], [], "updates"),
        ([{"a": np.zeros(2)}], [1.0, 2.0], "weights"),
        ([{"a": np.zeros(2)}], [-1.0], "weights"),
    ],
)
def test_weighted_sum_rejects_bad_input(
    updates: list[dict[str, np.ndarray]], weights: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_sum(updates, weights)


def test_merge_into_full_precision_base_preserves_outputs(
    tiny: nn.Module, adapter: GlobalAdapter
) -> None:
    moved = adapter.apply_update(_random_update(adapter, R_MAX, seed=5))
    ids = torch.randint(0, 256, (2, 12))
    with_adapter = copy.deepcopy(tiny)
    attach_adapters(with_adapter, moved, rank=R_MAX)
    expected = with_adapter(input_ids=ids).logits
    merged = copy.deepcopy(tiny)

    after = merge_into_base(merged, moved, reseed=True)

    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert after.config.epoch == moved.config.epoch + 1
    assert all(not v.any() for v in after.b.values())
    name = "model.layers.0.self_attn.q_proj"
    assert np.abs(after.a(name) - moved.a(name)).max() > 0.1


def test_merge_into_compressed_base_tracks_dequantised_sum(
    tiny: nn.Module, adapter: GlobalAdapter
) -> None:
    moved = adapter.apply_update(_random_update(adapter, R_MAX, seed=6))
    base = compress_model(copy.deepcopy(tiny), scheme="int8")
    name = "model.layers.2.mlp.down_proj"
    module = base.get_submodule(name)
    assert isinstance(module, QuantLinear)
    expected = module.qweight.dequantize() + torch.from_numpy(moved.delta_w(name))

    after = merge_into_base(base, moved)

    merged = base.get_submodule(name)
    assert isinstance(merged, QuantLinear)
    step = float(merged.qweight.scale.float().max())  # type: ignore[operator]
    assert torch.allclose(merged.qweight.dequantize(), expected, atol=step / 2 + 1e-6)
    assert after.config.epoch == moved.config.epoch


def test_flat_helpers_and_file_round_trip(tmp_path: Path, adapter: GlobalAdapter) -> None:
    moved = adapter.apply_update(_random_update(adapter, 8, seed=9), server_lr=0.5)

    flat = moved.to_flat()
    restored = GlobalAdapter.load(moved.save(tmp_path))

    assert set(flat) == set(adapter.shapes)
    assert restored.config == moved.config
    for name, value in flat.items():
        np.testing.assert_array_equal(restored.b[name], value)
        np.testing.assert_array_equal(adapter.with_b(flat).b[name], value)


def test_adapter_file_errors_name_the_file(tmp_path: Path, adapter: GlobalAdapter) -> None:
    file = adapter.save(tmp_path)
    file.write_bytes(file.read_bytes()[:200])

    with pytest.raises(CheckpointError, match=r"adapter\.safetensors"):
        GlobalAdapter.load(file)


def test_update_with_wrong_shape_is_refused(adapter: GlobalAdapter) -> None:
    bad = adapter.to_flat()
    name = next(iter(bad))
    bad[name] = np.zeros((1, 1), np.float32)

    with pytest.raises(ValueError, match=name):
        adapter.apply_update(bad)


def test_detach_restores_the_original_modules(tiny: nn.Module, adapter: GlobalAdapter) -> None:
    model = copy.deepcopy(tiny)
    original = model.get_submodule("model.layers.0.self_attn.v_proj")

    attach_adapters(model, adapter, rank=2)
    detach_adapters(model)

    assert model.get_submodule("model.layers.0.self_attn.v_proj") is original
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


# --------------------------------------------------------------- rotating column ownership


#: (r_max, rank in 1..r_max, version, member index): one draw for the column-rule properties.
COLUMN_CASES = st.sampled_from([1, 2, 4, 8, 16, 32, 64]).flatmap(
    lambda r_max: st.tuples(
        st.just(r_max), st.integers(1, r_max), st.integers(0, 10_000), st.integers(0, 64)
    )
)


@settings(max_examples=60, deadline=None)
@given(case=COLUMN_CASES)
def test_owned_columns_are_rank_distinct_indices_below_r_max(
    case: tuple[int, int, int, int],
) -> None:
    r_max, rank, version, member = case

    cols = owned_columns(rank, r_max, version=version, member=member)

    assert len(cols) == rank == len(set(cols))
    assert all(0 <= c < r_max for c in cols)
    assert cols == tuple(sorted(cols))


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16])
def test_members_of_one_cohort_cover_every_column_equally(rank: int) -> None:
    # r_max / rank members of one class at one version partition B's columns, and one
    # member over r_max / rank versions does too: every column is trained equally often.
    blocks = R_MAX // rank
    for version in (0, 1, 7):
        members = [owned_columns(rank, R_MAX, version=version, member=m) for m in range(blocks)]
        assert sorted(c for cols in members for c in cols) == list(range(R_MAX))
    over_time = [owned_columns(rank, R_MAX, version=v, member=3) for v in range(blocks)]
    assert sorted(c for cols in over_time for c in cols) == list(range(R_MAX))


@given(case=COLUMN_CASES)
def test_trained_columns_rotate_below_full_rank_and_nest_otherwise(
    case: tuple[int, int, int, int],
) -> None:
    r_max, rank, version, member = case

    rotating = trained_columns("rotating", rank, r_max, version=version, member=member)
    nested = trained_columns("nested", rank, r_max, version=version, member=member)

    assert nested is None  # the first `rank` columns
    if rank == r_max:
        assert rotating is None  # every column, whichever rule
    else:
        assert rotating == owned_columns(rank, r_max, version=version, member=member)


def test_an_unknown_column_rule_is_named() -> None:
    with pytest.raises(ValueError, match="column rule: one of \\['rotating', 'nested'\\], got 'x'"):
        trained_columns("x", 2, 4, version=0, member=0)


def test_rotating_ownership_moves_low_ranks_off_the_first_columns() -> None:
    # The point of rotating: a rank-4 member does not train columns 0-3 forever.
    seen = {c for v in range(4) for c in owned_columns(4, R_MAX, version=v, member=0)}

    assert seen == set(range(R_MAX))
    assert owned_columns(R_MAX, R_MAX, version=5, member=2) == tuple(range(R_MAX))


def test_coverage_scale_makes_every_column_a_full_step_in_expectation() -> None:
    # Horvitz-Thompson: a member trains a column with frequency r / r_max; scaled by
    # r_max / r, the column's mean contribution over a rotation equals one update.
    for rank in (4, 8, 16):
        hits = np.zeros(R_MAX)
        versions = R_MAX // rank
        for v in range(versions):
            hits[list(owned_columns(rank, R_MAX, version=v, member=0))] += coverage_scale(
                rank, R_MAX
            )
        np.testing.assert_allclose(hits / versions, np.ones(R_MAX))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0, "r_max": 16, "version": 0, "member": 0}, "rank"),
        ({"rank": 17, "r_max": 16, "version": 0, "member": 0}, "rank"),
        ({"rank": 4, "r_max": 16, "version": -1, "member": 0}, "version"),
        ({"rank": 4, "r_max": 16, "version": 0, "member": -2}, "member"),
    ],
)
def test_owned_columns_refuses_bad_input(kwargs: dict[str, int], field: str) -> None:
    rank, r_max = kwargs.pop("rank"), kwargs.pop("r_max")
    with pytest.raises(ValueError, match=field):
        owned_columns(rank, r_max, **kwargs)


def test_attached_columns_train_and_pad_into_their_own_places(
    tiny: nn.Module, adapter: GlobalAdapter
) -> None:
    columns = (3, 9, 12, 15)
    model = copy.deepcopy(tiny)
    modules = attach_adapters(model, adapter, rank=4, columns=columns)
    with torch.no_grad():
        for m in modules:
            m.lora_delta.copy_(torch.arange(1.0, 5.0).expand_as(m.lora_delta))

    update = delta_b(model)

    for value in update.values():
        np.testing.assert_array_equal(value[:, list(columns)][0], [1.0, 2.0, 3.0, 4.0])
        others = [c for c in range(R_MAX) if c not in columns]
        assert np.all(value[:, others] == 0.0)


def test_forward_with_owned_columns_equals_base_plus_updated_b_a(
    tiny: nn.Module, adapter: GlobalAdapter
) -> None:
    # The trained ΔB of columns (1, 6, 11) must act through rows (1, 6, 11) of A: the
    # forward pass equals the merged adapter B + padded ΔB applied the plain way.
    columns = (1, 6, 11)
    moved = adapter.apply_update(_random_update(adapter, R_MAX, seed=5))
    model = copy.deepcopy(tiny)
    modules = attach_adapters(model, moved, rank=3, columns=columns)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in modules:
            m.lora_delta.normal_(0, 0.3)
    name = "model.layers.0.self_attn.q_proj"
    x = torch.randn(2, 5, 128)

    got = model.get_submodule(name)(x)

    after = moved.apply_update(delta_b(model))
    expected = tiny.get_submodule(name)(x) + x @ torch.from_numpy(after.delta_w(name)).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("columns", [(0, 1, 2), (0, 1, 2, 2), (0, 1, 2, 16), (-1, 1, 2, 3)])
def test_bad_columns_are_refused_naming_columns(
    tiny: nn.Module, adapter: GlobalAdapter, columns: tuple[int, ...]
) -> None:
    model = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="columns"):
        attach_adapters(model, adapter, rank=4, columns=columns)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@given(
    lr=st.floats(1e-6, 1.0),
    r_max=st.integers(1, 64),
    data=st.data(),
    power=st.floats(0.0, 2.0),
)
def test_rank_learning_rate_scales_by_the_missing_columns(
    lr: float, r_max: int, data: st.DataObject, power: float
) -> None:
    rank = data.draw(st.integers(1, r_max))
    got = rank_learning_rate(lr, rank=rank, r_max=r_max, power=power)
    assert got == pytest.approx(lr * (r_max / rank) ** power)
    # A full-rank client and power 0 keep lr; a lower rank never trains slower.
    assert rank_learning_rate(lr, rank=r_max, r_max=r_max, power=power) == pytest.approx(lr)
    assert rank_learning_rate(lr, rank=rank, r_max=r_max, power=0.0) == pytest.approx(lr)
    if rank > 1:
        assert rank_learning_rate(lr, rank=rank - 1, r_max=r_max, power=power) >= got


@pytest.mark.parametrize(
    ("lr", "rank", "power", "field"),
    [(0.01, 0, 1.0, "rank"), (0.01, 17, 1.0, "rank"), (0.0, 4, 1.0, "lr"), (0.01, 4, -1, "power")],
)
def test_rank_learning_rate_refuses_bad_input(
    lr: float, rank: int, power: float, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        rank_learning_rate(lr, rank=rank, r_max=R_MAX, power=power)
