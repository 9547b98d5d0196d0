from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_client.train import train_adapter
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


@pytest.mark.parametrize("warmup", [2, 4])
def test_one_warmed_up_step_is_a_step_at_the_ramped_rate(
    base: nn.Module, adapter: GlobalAdapter, warmup: int
) -> None:
    # Step 0 of a warm-up over W steps runs at lr / W: bit for bit the step of a run at
    # lr / W without warm-up (Adam's first step moves by the rate whatever the gradient).
    kwargs = {"rank": 4, "steps": 1, "batch_size": 2, "seq_len": 32, "threads": 1, "seed": 3}

    warmed = train_adapter(base, adapter, TEXT, lr=1e-2, warmup_steps=warmup, **kwargs)  # type: ignore[arg-type]
    ramped = train_adapter(base, adapter, TEXT, lr=1e-2 / warmup, **kwargs)  # type: ignore[arg-type]
    plain = train_adapter(base, adapter, TEXT, lr=1e-2, **kwargs)  # type: ignore[arg-type]

    for name, value in warmed.delta_b.items():
        np.testing.assert_array_equal(value, ramped.delta_b[name])
        # Adam's first step is ~lr in every trained coordinate: W times smaller here.
        ratio = np.abs(value[:, :4]).max() / np.abs(plain.delta_b[name][:, :4]).max()
        assert ratio == pytest.approx(1 / warmup, rel=1e-3)


def test_a_one_step_warmup_is_no_warmup(base: nn.Module, adapter: GlobalAdapter) -> None:
    kwargs = {"rank": 4, "steps": 3, "batch_size": 2, "seq_len": 32, "threads": 1, "seed": 3}

    one = train_adapter(base, adapter, TEXT, warmup_steps=1, **kwargs)  # type: ignore[arg-type]
    none = train_adapter(base, adapter, TEXT, **kwargs)  # type: ignore[arg-type]
    longer = train_adapter(base, adapter, TEXT, warmup_steps=3, **kwargs)  # type: ignore[arg-type]

    for name, value in one.delta_b.items():
        np.testing.assert_array_equal(value, none.delta_b[name])
    assert any(not np.array_equal(longer.delta_b[n], none.delta_b[n]) for n in none.delta_b)


def test_a_negative_warmup_is_refused_by_name(base: nn.Module, adapter: GlobalAdapter) -> None:
    with pytest.raises(ValueError, match="warmup_steps: must be 0 or more, got -1"):
        train_adapter(base, adapter, TEXT, rank=2, steps=1, warmup_steps=-1)
