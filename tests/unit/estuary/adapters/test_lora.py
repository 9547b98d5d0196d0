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
    delta_b,
    derive_a,
    detach_adapters,
    mean_from_sum,
    merge_into_base,
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
