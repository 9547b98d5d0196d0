"""Whole sessions: bit-exact sums under any drop pattern, abort below t, privacy checks."""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from secagg_harness import Harness, expected_sum

from secure_agg import CohortAborted, Stage, run_local
from secure_agg.messages import MaskedInput, UnmaskResponse
from secure_agg.numerics import quantize, unpack

DROP_STAGES = [
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASKING,
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 8),
    m=st.integers(1, 40),
    bits=st.integers(12, 32),
    clip=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_sum_is_bit_exact_or_the_cohort_aborts(
    n: int, m: int, bits: int, clip: float, seed: int, data: st.DataObject
) -> None:
    # Prepare
    t = data.draw(st.integers(n // 2 + 1, n))  # more than half: SessionConfig refuses less
    drop = data.draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(DROP_STAGES)))
    weights = data.draw(st.none() | st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    active = data.draw(st.booleans())
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(scale=clip, size=m) for _ in range(n)]
    alive = [sum(1 for i in range(n) if drop.get(i, Stage.COMPLETED) > s) for s in DROP_STAGES]
    # Execute / Assert
    if min(alive) < t:
        event("aborted")
        with pytest.raises(CohortAborted):
            run_local(
                inputs,
                threshold=t,
                clip=clip,
                bits=bits,
                weights=weights,
                drop=drop,
                seed=seed,
                active=active,
            )
        return
    result = run_local(
        inputs,
        threshold=t,
        clip=clip,
        bits=bits,
        weights=weights,
        drop=drop,
        seed=seed,
        active=active,
    )
    survivors = tuple(i for i in range(n) if drop.get(i, Stage.COMPLETED) > Stage.MASKED_INPUT)
    assert result.survivors == survivors
    expected = expected_sum(
        inputs, survivors, fixed_point=result.fixed_point, seed=seed, weights=weights
    )
    assert np.array_equal(result.integer_sum, expected)
    assert result.weight_sum == pytest.approx(
        sum(1.0 if weights is None else weights[i] for i in survivors)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(6, 16), seed=st.integers(0, 2**16), data=st.data())
def test_secagg_plus_is_bit_exact_or_aborts(n: int, seed: int, data: st.DataObject) -> None:
    k = data.draw(st.sampled_from([2, 4]))
    t = data.draw(st.integers((k + 1) // 2 + 1, k + 1))
    drop = data.draw(
        st.dictionaries(st.integers(0, n - 1), st.sampled_from(DROP_STAGES), max_size=n // 3)
    )
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(scale=0.1, size=9) for _ in range(n)]
    try:
        result = run_local(
            inputs, threshold=t, clip=1.0, bits=24, neighbours=k, drop=drop, seed=seed
        )
    except CohortAborted:
        event("aborted")
        assert drop, "a SecAgg+ cohort without dropouts must complete"
        return
    # The server may leave out a client whose neighbourhood lost too many share holders.
    possible = {i for i in range(n) if drop.get(i, Stage.COMPLETED) > Stage.MASKED_INPUT}
    assert set(result.survivors) <= possible
    assert len(result.survivors) >= t
    expected = expected_sum(inputs, result.survivors, fixed_point=result.fixed_point, seed=seed)
    assert np.array_equal(result.integer_sum, expected)


def test_float_sum_is_the_weighted_sum_within_rounding() -> None:
    rng = np.random.default_rng(3)
    inputs = [rng.uniform(-0.01, 0.01, size=500) for _ in range(6)]
    weights = [1.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    result = run_local(
        inputs,
        threshold=4,
        clip=1.0,
        bits=32,
        weights=weights,
        seed=3,
        drop={1: Stage.MASKED_INPUT},
    )
    expected = sum(w * x for i, (w, x) in enumerate(zip(weights, inputs, strict=True)) if i != 1)
    step = 2.0**-result.fixed_point.frac_bits
    assert np.max(np.abs(result.float_sum - expected)) <= 5 * step
    assert result.weight_sum == pytest.approx(3.0)


def test_named_tensors_in_any_order() -> None:
    rng = np.random.default_rng(5)
    inputs = []
    for i in range(4):
        a, b = rng.normal(size=(3, 2)) * 0.1, rng.normal(size=7) * 0.1
        inputs.append({"lora_A": a, "lora_B": b} if i % 2 else {"lora_B": b, "lora_A": a})
    result = run_local(inputs, threshold=3, clip=5.0, bits=24, seed=1)
    assert isinstance(result.integer_sum, dict) and isinstance(result.float_sum, dict)
    assert result.float_sum["lora_A"].shape == (3, 2)
    for name in ("lora_A", "lora_B"):
        total = np.zeros(inputs[0][name].size, dtype=np.int64)
        for i, update in enumerate(inputs):
            q = quantize(
                update,
                fixed_point=result.fixed_point,
                weight=1.0,
                rng=np.random.default_rng([1, i]),
            )
            total += q[name]
        assert np.array_equal(result.integer_sum[name].ravel(), total)


def test_secagg_plus_graph_is_exact_with_dropouts() -> None:
    rng = np.random.default_rng(8)
    inputs = [rng.normal(size=30) * 0.1 for _ in range(20)]
    drop = {2: Stage.MASKED_INPUT, 9: Stage.UNMASKING, 15: Stage.SHARE_KEYS}
    result = run_local(inputs, threshold=4, clip=1.0, bits=24, neighbours=6, drop=drop, seed=2)
    survivors = tuple(i for i in range(20) if i not in (2, 15))
    assert result.survivors == survivors
    expected = expected_sum(inputs, survivors, fixed_point=result.fixed_point, seed=2)
    assert np.array_equal(result.integer_sum, expected)
    # SecAgg+: each client sent shares to its 6 neighbours only.
    assert max(result.bytes_up) < 5_000


def test_below_threshold_aborts_and_nothing_is_revealed(harness: Callable[..., Harness]) -> None:
    h = harness(n=5, t=4)
    with pytest.raises(CohortAborted):
        h.run(skip_at={Stage.MASKED_INPUT: (0, 1)})
    assert h.server.stage is Stage.ABORTED and h.server.result is None
    assert not [m for _, m in h.sent if isinstance(m, UnmaskResponse)]
    assert h.server.drain() == []


def test_one_masked_upload_is_uniform() -> None:
    # Prepare: an all-zero update is the most structured input there is.
    h = Harness(n=3, t=2, m=40_000, bits=8)
    h.updates = [np.zeros(40_000) for _ in range(3)]
    h.run()
    masked = next(m for _, m in h.sent if isinstance(m, MaskedInput))
    values = unpack(masked.tensors[0][1], bits=8, length=40_000)
    # Execute: chi-square against uniform over 256 values.
    counts = np.bincount(values, minlength=256)
    expected = values.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # Assert: 255 degrees of freedom; mean 255, sd sqrt(510); 6 sd is p < 1e-6.
    assert chi2 < 255 + 6 * math.sqrt(510)
    assert h.server.result is not None
    assert not h.server.result.integer_sum["update"].any()


def test_logs_hold_no_key_seed_share_or_value(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG, logger="secure_agg")
    h = Harness(n=4, t=3, m=4)
    h.updates = [np.array([0.123456789, -0.987654321, 0.5, 0.25]) for _ in range(4)]
    relays = h.step(h.step_advertise())
    secrets: list[bytes] = []
    for c in h.clients:
        assert c._seed is not None and c._c_sk is not None and c._s_sk is not None
        secrets += [c._seed, c._c_sk.private_bytes_raw(), c._s_sk.private_bytes_raw()]
        secrets += list(c._seed_shares.values()) + list(c._key_shares.values())
    # Execute
    inbox = h.step(relays)
    h.step(inbox)
    # Assert
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "closing" in text and h.server.result is not None
    for secret in secrets:
        for form in (secret.hex(), repr(secret), base64.b64encode(secret).decode()):
            assert form not in text
    for value in ("0.123456789", "0.987654321", "0.12345"):
        assert value not in text
