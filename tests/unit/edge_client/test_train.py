from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from edge_client.train import train_adapter, warmup_factor
from estuary.adapters import AdapterConfig, GlobalAdapter, LoRALinear, owned_columns
from estuary.compress import compress_model
from estuary.model.presets import build_preset

TEXT = b"def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return compress_model(build_preset("tiny", seed=0), scheme="int8")


@pytest.fixture(scope="module")
def adapter(base: nn.Module) -> GlobalAdapter:
    return GlobalAdapter.for_model(base, AdapterConfig(r_max=8, seed=1))


def test_training_is_deterministic_and_returns_zero_padded_delta(
    base: nn.Module, adapter: GlobalAdapter
) -> None:
    kwargs = {"rank": 4, "steps": 3, "batch_size": 2, "seq_len": 32, "threads": 1}

    first = train_adapter(base, adapter, TEXT, seed=5, **kwargs)  # type: ignore[arg-type]
    second = train_adapter(base, adapter, TEXT, seed=5, **kwargs)  # type: ignore[arg-type]
    other = train_adapter(base, adapter, TEXT, seed=6, **kwargs)  # type: ignore[arg-type]

    assert set(first.delta_b) == set(adapter.shapes)
    for name, value in first.delta_b.items():
        np.testing.assert_array_equal(value, second.delta_b[name])
        assert value.shape == adapter.b[name].shape
        assert np.abs(value[:, :4]).max() > 0 and not value[:, 4:].any()
    assert any(not np.array_equal(first.delta_b[n], other.delta_b[n]) for n in first.delta_b)
    assert first.metrics.tokens == 3 * 2 * 32 and first.metrics.steps == 3
    assert first.metrics.seconds > 0


def test_owned_columns_train_in_place_of_the_first_rank(
    base: nn.Module, adapter: GlobalAdapter
) -> None:
    # Rotating ownership: a rank-2 member trains columns (4, 5) of an r_max-8 B, and its
    # ΔB is zero everywhere else (the first two columns included).
    columns = owned_columns(2, 8, version=1, member=1)
    assert columns == (4, 5)

    result = train_adapter(
        base, adapter, TEXT, rank=2, steps=2, batch_size=2, seq_len=32, threads=1, columns=columns
    )

    for value in result.delta_b.values():
        assert np.abs(value[:, [4, 5]]).min() > 0
        assert not np.delete(value, [4, 5], axis=1).any()


def test_training_reduces_loss_and_leaves_base_untouched(
    base: nn.Module, adapter: GlobalAdapter
) -> None:
    ids = torch.randint(0, 256, (1, 16))
    before = base(input_ids=ids).logits
    state = copy.deepcopy(base.state_dict())

    result = train_adapter(base, adapter, TEXT, rank=8, steps=30, lr=1e-2, batch_size=4, seq_len=32)

    assert result.metrics.loss_last < result.metrics.loss_first - 1.0
    assert not any(isinstance(m, LoRALinear) for m in base.modules())
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    torch.testing.assert_close(base(input_ids=ids).logits, before, rtol=0, atol=0)


def test_sgd_update_is_minus_lr_times_gradient_for_one_step(
    base: nn.Module, adapter: GlobalAdapter
) -> None:
    small = train_adapter(
        base, adapter, TEXT, rank=2, steps=1, lr=1e-3, batch_size=2, seq_len=16, optimizer="sgd"
    )
    large = train_adapter(
        base, adapter, TEXT, rank=2, steps=1, lr=2e-3, batch_size=2, seq_len=16, optimizer="sgd"
    )

    # One plain SGD step from zero: ΔB = -lr · clipped gradient, linear in lr.
    for name, value in small.delta_b.items():
        np.testing.assert_allclose(large.delta_b[name], 2 * value, rtol=1e-5, atol=1e-12)
    assert any(np.abs(v).max() > 0 for v in small.delta_b.values())


def test_memory_mapped_file_trains(tmp_path: Path, base: nn.Module, adapter: GlobalAdapter) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(TEXT)

    from_file = train_adapter(
        base, adapter, path, rank=2, steps=2, batch_size=2, seq_len=16, seed=3
    )
    from_bytes = train_adapter(
        base, adapter, TEXT, rank=2, steps=2, batch_size=2, seq_len=16, seed=3
    )

    for name, value in from_file.delta_b.items():
        np.testing.assert_array_equal(value, from_bytes.delta_b[name])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 9}, r"rank: 9 exceeds r_max=8"),
        ({"rank": 0}, "rank"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
        ({"threads": 0}, "threads"),
        ({"seq_len": 5000}, "data"),
        ({"optimizer": "lamb"}, "optimizer"),
    ],
)
def test_bad_arguments_name_the_parameter(
    base: nn.Module, adapter: GlobalAdapter, kwargs: dict[str, float], match: str
) -> None:
    args: dict[str, float] = {"rank": 2, "steps": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        train_adapter(base, adapter, TEXT, **args)  # type: ignore[arg-type]


def test_edge_trainer_imports_no_redis_or_prometheus() -> None:
    code = (
        "import sys, edge_client.train; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('redis', 'prometheus_client')]; "
        "sys.exit(1 if bad else 0)"
    )

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@given(steps=st.integers(1, 40), warmup=st.integers(0, 60))
def test_the_warmup_ramps_linearly_and_ends_every_task_at_the_full_rate(
    steps: int, warmup: int
) -> None:
    factors = [warmup_factor(k, warmup_steps=warmup, steps=steps) for k in range(steps)]

    w = min(warmup, steps)
    assert factors[-1] == 1.0  # the ramp never outlasts the task
    assert all(0 < f <= 1 for f in factors)
    assert factors == sorted(factors)
    if w > 1:
        assert factors[: w - 1] == [(k + 1) / w for k in range(w - 1)]
    else:
        assert factors == [1.0] * steps


def test_a_warmup_changes_the_update_within_the_task_only(
    base: nn.Module, adapter: GlobalAdapter
) -> None:
    kwargs = {"rank": 4, "steps": 3, "batch_size": 2, "seq_len": 32, "threads": 1, "seed": 3}

    def run(**extra: int) -> dict[str, np.ndarray]:
        return train_adapter(base, adapter, TEXT, lr=1e-2, **kwargs, **extra).delta_b  # type: ignore[arg-type]

    none, one, three, long = run(), run(warmup_steps=1), run(warmup_steps=3), run(warmup_steps=50)
    for name, value in none.items():
        np.testing.assert_array_equal(one[name], value)  # 1 step of warm-up: none
        np.testing.assert_array_equal(long[name], three[name])  # capped at the task's steps
    # Adam moves each trained coordinate by about the rate per step: the ramp's
    # 1/3 + 2/3 + 1 is 2 of the 3 steps' worth, so the warmed update is smaller.
    ratio = np.mean([np.abs(three[n][:, :4]).sum() / np.abs(none[n][:, :4]).sum() for n in none])
    assert 0.5 < ratio < 0.85


def test_a_negative_warmup_is_refused_by_name(base: nn.Module, adapter: GlobalAdapter) -> None:
    with pytest.raises(ValueError, match="warmup_steps: must be 0 or more, got -1"):
        train_adapter(base, adapter, TEXT, rank=2, steps=1, warmup_steps=-1)
