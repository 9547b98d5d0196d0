from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from estuary.adapters import AdapterConfig, GlobalAdapter, LoRALinear
from estuary.compress import compress_model
from estuary.data import ClientData
from estuary.model.presets import build_preset
from simulation.baselines import centralized, local_only, pooled_training_data
from simulation.evaluation import HeldOut

SEQ = 32
# Small steps keep every test well under 15 s on 2 CPU cores (about 10 ms a step).
TRAIN = {"lr": 1e-2, "batch_size": 4, "seq_len": SEQ, "threads": 1}


def _code_client(name: str, word: str, seed: int) -> ClientData:
    # Each client writes its own repetitive "style"; train and held-out share it, so an
    # adapter trained on the training half must score better on the held-out half.
    rng = np.random.default_rng(seed)
    lines = [
        f"def {word}_{int(i)}(x):\n    return x + {int(i)}\n\n".encode()
        for i in rng.integers(0, 10, size=80)
    ]
    text = b"".join(lines)
    cut = len(text) * 3 // 4
    return ClientData(name=name, train=text[:cut], heldout=text[cut:])


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return compress_model(build_preset("tiny", seed=0), scheme="int8")


@pytest.fixture(scope="module")
def zero(base: nn.Module) -> GlobalAdapter:
    return GlobalAdapter.for_model(base, AdapterConfig(r_max=8, seed=0))


@pytest.fixture(scope="module")
def clients() -> list[ClientData]:
    return [_code_client("alpha", "alpha", 1), _code_client("beta", "beta", 2)]


@pytest.fixture(scope="module")
def held(clients: list[ClientData]) -> HeldOut:
    return HeldOut(clients, seq_len=SEQ, max_windows_per_client=6)


def test_local_only_with_zero_steps_equals_the_base(
    base: nn.Module, zero: GlobalAdapter, clients: list[ClientData], held: HeldOut
) -> None:
    scores = local_only(
        base,
        zero,
        clients,
        steps={"alpha": 0, "beta": 0},
        ranks={"alpha": 4, "beta": 8},
        seed=0,
        held_out=held,
        **TRAIN,  # type: ignore[arg-type]
    )

    reference = held.score(base, None)
    assert scores.per_client == pytest.approx(reference.per_client, rel=1e-6)
    assert scores.union == pytest.approx(reference.union, rel=1e-6)


def test_local_only_is_deterministic_and_improves_held_out(
    base: nn.Module, zero: GlobalAdapter, clients: list[ClientData], held: HeldOut
) -> None:
    kwargs = {
        "steps": {"alpha": 25, "beta": 25},
        "ranks": {"alpha": 4, "beta": 8},
        "held_out": held,
        **TRAIN,
    }
    done: list[tuple[str, int]] = []

    first = local_only(
        base,
        zero,
        clients,
        seed=7,
        progress=lambda name, n: done.append((name, n)),
        **kwargs,  # type: ignore[arg-type]
    )
    second = local_only(base, zero, clients, seed=7, **kwargs)  # type: ignore[arg-type]
    other = local_only(base, zero, clients, seed=8, **kwargs)  # type: ignore[arg-type]

    assert first == second
    assert first != other
    base_scores = held.score(base, None)
    for name in ("alpha", "beta"):
        assert first.per_client[name] < base_scores.per_client[name] - 0.5
    assert done == [("alpha", 1), ("beta", 2)]
    assert not any(isinstance(m, LoRALinear) for m in base.modules())


def test_local_only_trains_from_adapter0(
    base: nn.Module, zero: GlobalAdapter, clients: list[ClientData], held: HeldOut
) -> None:
    # A non-zero starting adapter with 0 steps is scored as itself, per client.
    rng = np.random.default_rng(0)
    start = zero.with_b({n: rng.normal(0, 0.05, v.shape) for n, v in zero.b.items()})

    scores = local_only(
        base,
        start,
        clients,
        steps={"alpha": 0, "beta": 0},
        ranks={"alpha": 4, "beta": 4},
        seed=0,
        held_out=held,
        **TRAIN,  # type: ignore[arg-type]
    )

    assert scores.union == pytest.approx(held.score(base, start).union, rel=1e-6)


def test_centralized_is_deterministic_and_improves_held_out(
    base: nn.Module, zero: GlobalAdapter, clients: list[ClientData], held: HeldOut
) -> None:
    kwargs = {"steps": 40, "rank": 8, "held_out": held, **TRAIN}

    first = centralized(base, zero, clients, seed=3, **kwargs)  # type: ignore[arg-type]
    second = centralized(base, zero, clients, seed=3, **kwargs)  # type: ignore[arg-type]
    untrained = centralized(
        base,
        zero,
        clients,
        seed=3,
        **{**kwargs, "steps": 0},  # type: ignore[arg-type]
    )

    assert first == second
    assert untrained == held.score(base, zero)
    assert first.union < untrained.union - 0.5


def test_pooled_data_is_every_clients_training_bytes(clients: list[ClientData]) -> None:
    pooled = pooled_training_data(clients)

    assert pooled == clients[0].train + b"\n" + clients[1].train


def test_arguments_are_checked(
    base: nn.Module, zero: GlobalAdapter, clients: list[ClientData], held: HeldOut
) -> None:
    common = {"seed": 0, "held_out": held, **TRAIN}
    with pytest.raises(ValueError, match="steps: no entry"):
        local_only(
            base,
            zero,
            clients,
            steps={"alpha": 1},
            ranks={"alpha": 4, "beta": 4},
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="steps: 'alpha'"):
        local_only(
            base,
            zero,
            clients,
            steps={"alpha": -1, "beta": 1},
            ranks={"alpha": 4, "beta": 4},
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="held_out"):
        centralized(
            base,
            zero,
            clients[:1],
            steps=1,
            rank=8,
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="steps"):
        centralized(base, zero, clients, steps=-1, rank=8, **common)  # type: ignore[arg-type]
