"""The fleet simulator tests' shared trace and environment builder.

A module of its own, not ``conftest``: the tests import these by name, and a bare
``from conftest import ...`` finds whichever test directory's conftest was imported first
when pytest runs several directories together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from estuary.model.presets import build_preset
from simulation.fleet.policies import FleetConfig, FleetEnv
from simulation.fleet.run import build_env
from simulation.fleet.trace import parse_trace

#: One class, no spread, no dropout, always online: every time is computable by hand.
HAND_TRACE: dict[str, Any] = {
    "schema": "estuary-device-trace/1",
    "name": "hand",
    "start_hour": 0.0,
    "classes": [
        {
            "name": "laptop",
            "fraction": 1.0,
            "rank": 2,
            "step_s": {"median": 2.0, "sigma": 0.0},
            "bandwidth_up": {"median": 1.0e6, "sigma": 0.0},
            "bandwidth_down": {"median": 1.0e6, "sigma": 0.0},
            "latency_s": 0.5,
            "dropout": 0.0,
            "availability": {"kind": "always"},
        }
    ],
}

#: Training kept to the minimum that still learns: the tests check timing and exactness.
SMALL = {"local_steps": 1, "batch_size": 2, "seq_len": 16, "eval_windows": 1, "r_max": 4}


def small_env(tmp: Path, trace: dict[str, Any], **overrides: Any) -> FleetEnv:
    config = FleetConfig(**{**SMALL, **overrides})
    return build_env(
        parse_trace(json.loads(json.dumps(trace))),
        config,
        workdir=tmp,
        base=build_preset("tiny", seed=0),
        workers=0,
        packages=3,
    )
