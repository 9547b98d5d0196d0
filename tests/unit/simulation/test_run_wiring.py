"""What a simulation hands its coordinator and agents: one load-following clock, fast artifacts.

On a busy machine the federation's deadlines only stretch if *every* reader of time in
the process reads the same :class:`~simulation.machine_clock.DilatedClock`: the
coordinator (stage deadlines, silence), its local worker (leases), the in-memory store
(lease expiry, job idle times) and each agent (heartbeats, backoff, signed timestamps).
And devices only train on recent versions if each version's artifact is built at once,
without the ONNX export that made artifacts lag several versions behind the head.

The coordinator and the agents are replaced by recorders: this checks the wiring, the
clock's behaviour has its own tests (``test_machine_clock.py``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

import coordinator.server
import edge_client.agent
from estuary.clock import SYSTEM_CLOCK
from estuary.config.models import SimulationSettings
from simulation.machine_clock import DilatedClock
from simulation.run import Simulation, _Fleet


def _settings(out_dir: Path) -> SimulationSettings:
    return SimulationSettings.model_validate(
        {
            "clients": 3,
            "out_dir": out_dir,
            "device_classes": [{"name": "phone", "rank": 4, "expected_task_s": 1.0}],
            "model": {"preset": "tiny", "r_max": 4},
            "cohort": {"min_size": 3, "max_size": 3},
        }
    )


class _Recorder:
    """Stands in for a class; remembers the keyword arguments of each instance."""

    made: ClassVar[list[dict[str, Any]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).made.append(kwargs)
        self.port = 1
        self.service = SimpleNamespace(
            registry=SimpleNamespace(issue_token=lambda device_class: "token")
        )

    async def start(self) -> None:
        return None

    async def enroll(self, token: str, device_class: str) -> None:
        return None

    async def run(self, *, stop: asyncio.Event) -> None:
        return None


class _Server(_Recorder):
    made: ClassVar[list[dict[str, Any]]] = []


class _Agent(_Recorder):
    made: ClassVar[list[dict[str, Any]]] = []


def test_coordinator_worker_store_and_agents_read_the_one_dilated_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator.server, "CoordinatorServer", _Server)
    monkeypatch.setattr(edge_client.agent, "EdgeAgent", _Agent)
    _Server.made, _Agent.made = [], []
    sim = Simulation(_settings(tmp_path), live=False)
    clients = [SimpleNamespace(name=f"c{i}", train=b"x" * 64) for i in range(3)]
    setup = SimpleNamespace(store=object(), base=object(), clients=clients)

    async def wire() -> None:
        server = await sim._start_coordinator(setup, metrics=None)  # type: ignore[arg-type]
        fleet = _Fleet()
        await sim._start_agents(setup, server, fleet)  # type: ignore[arg-type]
        await asyncio.gather(*fleet.tasks)

    asyncio.run(wire())

    assert isinstance(sim.clock, DilatedClock) and sim.governor is not None
    assert sim.federation_clock is sim.clock and sim.wall is SYSTEM_CLOCK
    (server,) = _Server.made
    assert server["clock"] is sim.clock
    worker = server["local_worker"]
    assert worker.keywords == {"onnx": False, "clock": sim.clock}
    assert [a["clock"] for a in _Agent.made] == [sim.clock] * 3
