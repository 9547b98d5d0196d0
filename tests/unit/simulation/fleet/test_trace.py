"""Device traces: the shipped files load, a malformed one is refused naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import HAND_TRACE

from simulation.fleet.trace import TRACE_DIR, TraceError, load_trace, parse_trace, sample_fleet


@pytest.mark.parametrize("name", ["phones-laptops", "stragglers"])
def test_shipped_traces_load_and_sample(name: str) -> None:
    trace = load_trace(name)
    fleet = sample_fleet(trace, 1000, seed=3)
    assert [d.index for d in fleet] == list(range(1000))
    for c in trace.classes:
        share = sum(d.device_class == c.name for d in fleet) / 1000
        assert share == pytest.approx(c.fraction, abs=0.001)
        speeds = np.array([d.step_s for d in fleet if d.device_class == c.name])
        # Lognormal: the median of the draws is near the class median.
        assert np.median(speeds) == pytest.approx(c.step_s.median, rel=0.15)
    assert sample_fleet(trace, 1000, seed=3) == fleet
    assert sample_fleet(trace, 1000, seed=4) != fleet


def test_every_shipped_trace_is_valid() -> None:
    files = sorted(TRACE_DIR.glob("*.json"))
    assert {f.stem for f in files} >= {"phones-laptops", "stragglers"}
    for f in files:
        assert load_trace(f).name == f.stem


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(HAND_TRACE)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["schema"], "v0", "schema: must be"),
        (["classes", 0, "rank"], KeyError, "classes[0].rank: missing"),
        (["classes", 0, "rank"], 0, "classes[0].rank: must be an integer"),
        (["classes", 0, "step_s", "sigma"], -1.0, "classes[0].step_s.sigma: must be in"),
        (["classes", 0, "step_s", "median"], "fast", "classes[0].step_s.median: must be a finite"),
        (["classes", 0, "fraction"], 0.5, "classes[*].fraction: must sum to 1"),
        (["classes", 0, "availability", "kind"], "weekly", "classes[0].availability.kind"),
        (["classes", 0, "dropout"], 1.0, "classes[0].dropout: must be in [0, 1)"),
        (["classes", 0, "speed"], 1.0, "classes[0]: unknown field(s) ['speed']"),
        (["classes"], [], "classes: must be a non-empty list"),
        (["start_hour"], 24.0, "start_hour: must be in [0, 24)"),
    ],
)
def test_malformed_trace_names_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_trace(_broken(path, value))
    assert message in str(info.value)


def test_load_trace_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken(["classes", 0, "latency_s"], -1)))
    with pytest.raises(TraceError, match=r"bad\.json: classes\[0\]\.latency_s"):
        load_trace(bad)
    with pytest.raises(TraceError, match="shipped traces"):
        load_trace("no-such-trace")
