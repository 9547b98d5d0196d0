"""Fixed point: overflow refusal at the exact boundary, unbiased rounding, ring and packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_agg import FixedPoint, OverflowRefused, SessionConfig
from secure_agg.numerics import (
    clip_update,
    from_ring,
    pack,
    quantize,
    reduce_ring,
    stochastic_round,
    to_ring,
    unpack,
)


def _config(n: int, fp: FixedPoint) -> SessionConfig:
    return SessionConfig(
        cohort=b"c", cohort_size=n, threshold=n // 2 + 1, tensors=(("u", 4),), fixed_point=fp
    )


@pytest.mark.parametrize(
    ("bits", "frac_bits", "clip", "weight_bound"),
    [(16, 8, 1.0, 1.0), (24, 10, 2.5, 0.5), (32, 20, 1.0, 1.0)],
)
def test_largest_cohort_passes_and_one_more_is_refused(
    bits: int, frac_bits: int, clip: float, weight_bound: float
) -> None:
    # Prepare
    fp = FixedPoint(bits=bits, frac_bits=frac_bits, clip=clip, weight_bound=weight_bound)
    q_max = math.ceil(weight_bound * clip * 2**frac_bits)
    largest = (2 ** (bits - 1) - 1) // q_max
    # Execute / Assert
    assert fp.max_clients() == largest
    assert _config(largest, fp).cohort_size == largest
    with pytest.raises(OverflowRefused) as info:
        _config(largest + 1, fp)
    assert str(largest + 1) in str(info.value) and str(q_max) in str(info.value)


def test_worst_case_inputs_at_the_boundary_decode_without_wrapping() -> None:
    # Prepare: every client at +clip with weight 1, the largest allowed cohort.
    fp = FixedPoint(bits=12, frac_bits=4, clip=1.0, per_tensor=True)
    n = fp.max_clients()
    rng = np.random.default_rng(0)
    update = {"a": np.array([1.0]), "b": np.array([-1.0])}
    # Execute
    sums = {"a": np.zeros(1, dtype=np.uint32), "b": np.zeros(1, dtype=np.uint32)}
    for _ in range(n):
        q = quantize(update, fixed_point=fp, weight=1.0, rng=rng)
        for name in sums:
            sums[name] = sums[name] + to_ring(q[name], bits=12)
    totals = {k: from_ring(reduce_ring(v, bits=12), bits=12).tolist() for k, v in sums.items()}
    # Assert
    assert totals == {"a": [16 * n], "b": [-16 * n]}
    assert 16 * n <= 2**11 - 1 < 16 * (n + 1)


def test_for_cohort_picks_the_largest_scale_that_fits() -> None:
    fp = FixedPoint.for_cohort(100, bits=24, clip=1.0)
    assert fp.max_clients() >= 100
    bigger = FixedPoint(bits=24, frac_bits=fp.frac_bits + 1, clip=1.0)
    assert bigger.max_clients() < 100


def test_constructor_names_the_bad_parameter() -> None:
    with pytest.raises(ValueError, match="bits"):
        FixedPoint(bits=33, frac_bits=0, clip=1.0)
    with pytest.raises(ValueError, match="clip"):
        FixedPoint(bits=16, frac_bits=0, clip=float("nan"))
    with pytest.raises(ValueError, match="weight_bound"):
        FixedPoint(bits=16, frac_bits=0, clip=1.0, weight_bound=0.0)


def test_stochastic_rounding_is_unbiased() -> None:
    # Prepare
    rng = np.random.default_rng(1234)
    values = np.full(200_000, 0.3)
    # Execute
    rounded = stochastic_round(values, rng=rng)
    # Assert: only floor/ceil, and the mean within 5 standard errors of 0.3.
    assert set(np.unique(rounded).tolist()) == {0, 1}
    stderr = math.sqrt(0.3 * 0.7 / values.size)
    assert abs(rounded.mean() - 0.3) < 5 * stderr


def test_weight_is_applied_before_quantisation() -> None:
    fp = FixedPoint(bits=24, frac_bits=10, clip=10.0)
    q = quantize({"u": np.array([2.0])}, fixed_point=fp, weight=0.25, rng=np.random.default_rng(0))
    assert q["u"].tolist() == [512]  # 2.0 × 0.25 × 2^10 exactly
    with pytest.raises(ValueError, match="weight"):
        quantize({"u": np.array([2.0])}, fixed_point=fp, weight=1.5, rng=np.random.default_rng(0))


def test_global_and_per_tensor_clipping() -> None:
    update = {"a": np.array([3.0, 4.0]), "b": np.array([0.0, 1.0])}
    glob = clip_update(update, clip=1.0, per_tensor=False)
    total = math.sqrt(sum(float(np.sum(v**2)) for v in glob.values()))
    assert total == pytest.approx(1.0)
    per = clip_update(update, clip=1.0, per_tensor=True)
    assert float(np.linalg.norm(per["a"])) == pytest.approx(1.0)
    assert per["b"].tolist() == [0.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 32), data=st.data())
def test_ring_and_packing_round_trip(bits: int, data: st.DataObject) -> None:
    half = 2 ** (bits - 1)
    values = data.draw(st.lists(st.integers(-half, half - 1), min_size=1, max_size=40))
    signed = np.array(values, dtype=np.int64)
    ring = to_ring(signed, bits=bits)
    assert int(ring.max()) < 2**bits
    packed = pack(ring, bits=bits)
    assert len(packed) == len(values) * ((bits + 7) // 8)
    assert from_ring(unpack(packed, bits=bits, length=len(values)), bits=bits).tolist() == values
