"""bench/flower.py's learning comparison: mean curves over repeats, compared point by point."""

from __future__ import annotations

import pytest
from bench_modules import load_bench

flower = load_bench("flower")


def _run(points: list[tuple[int | None, float]]) -> dict[str, object]:
    return {"curve": [{"client_updates": u, "bits_per_byte": b} for u, b in points]}


def test_mean_curve_keeps_only_counts_every_run_reached() -> None:
    runs = [
        _run([(0, 3.0), (8, 2.9), (16, 2.8), (None, 2.7)]),
        _run([(0, 3.0), (8, 2.7), (24, 2.6)]),
    ]
    curve = flower._mean_curve(runs)
    assert [p["client_updates"] for p in curve] == [0, 8]
    assert curve[1]["bits_per_byte"] == pytest.approx(2.8)
    assert curve[1]["sd"] == pytest.approx(0.1414213, rel=1e-5)
    assert curve[1]["runs"] == 2


def test_compare_curves_needs_estuary_at_or_below_flower_everywhere() -> None:
    flw = [
        {"client_updates": 0, "bits_per_byte": 3.0},
        {"client_updates": 8, "bits_per_byte": 2.9},
        {"client_updates": 16, "bits_per_byte": 2.8},
    ]
    better = [
        {"client_updates": 0, "bits_per_byte": 3.0},
        {"client_updates": 8, "bits_per_byte": 2.9},
        {"client_updates": 16, "bits_per_byte": 2.7},
    ]
    out = flower.compare_curves(better, flw)
    assert out["estuary_at_least_flower"] is True
    assert [p["client_updates"] for p in out["points"]] == [8, 16]
    assert out["max_estuary_minus_flower"] == pytest.approx(0.0)

    worse_once = [dict(p) for p in better]
    worse_once[1]["bits_per_byte"] = 2.95
    out = flower.compare_curves(worse_once, flw)
    assert out["estuary_at_least_flower"] is False
    assert out["max_estuary_minus_flower"] == pytest.approx(0.05)
    # Within secure aggregation's fixed-point rounding it still counts; beyond, not.
    rounded = [dict(p) for p in better]
    rounded[1]["bits_per_byte"] = 2.9 + flower.ROUNDING_TOLERANCE / 2
    assert flower.compare_curves(rounded, flw)["estuary_at_least_flower"] is True
    rounded[1]["bits_per_byte"] = 2.9 + flower.ROUNDING_TOLERANCE * 2
    assert flower.compare_curves(rounded, flw)["estuary_at_least_flower"] is False
    # Nothing in common: no claim.
    assert (
        flower.compare_curves([{"client_updates": 5, "bits_per_byte": 1.0}], flw)[
            "estuary_at_least_flower"
        ]
        is False
    )
