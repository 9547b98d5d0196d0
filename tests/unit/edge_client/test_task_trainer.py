"""TaskTrainer's Heartbeats on a virtual clock, with the torch training call replaced.

The training thread blocks until the test releases it, so the number of Heartbeats and
the waits between them are exact, and no test waits in real time.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from offline_rpc import offline_rpc
from recording_clock import RecordingClock

import edge_client.train
from edge_client.download import ArtifactDownloader
from edge_client.errors import AgentError, TaskAbandoned
from edge_client.rpc import EdgeRpc
from edge_client.state import EdgeState
from edge_client.training import TaskTrainer, task_seed
from estuary.auth import raw_public_key, request_body_sha256, signed_auth_from, verify_request
from estuary.clock import VirtualClock
from estuary.data.windows import client_seed, window_seed
from estuary.proto.v1 import edge_pb2

KEY = Ed25519PrivateKey.generate()
CONTINUE = edge_pb2.HeartbeatResponse.ACTION_CONTINUE
ABANDON = edge_pb2.HeartbeatResponse.ACTION_ABANDON
TASK = edge_pb2.Task(task_id="t1", rank=2, local_steps=3, batch_size=2, seq_len=16)


class Stub:
    """Answers Heartbeats with the scripted actions (then CONTINUE); records them."""

    def __init__(self, clock: VirtualClock, actions: list[int]) -> None:
        self.clock = clock
        self.actions = list(actions)
        self.beats: list[tuple[edge_pb2.HeartbeatRequest, int]] = []

    async def Heartbeat(self, request: Any, timeout: float) -> Any:
        copy = edge_pb2.HeartbeatRequest()
        copy.CopyFrom(request)
        self.beats.append((copy, self.clock.time_ms()))
        action = self.actions.pop(0) if self.actions else CONTINUE
        return edge_pb2.HeartbeatResponse(action=action)


def rpc_for(clock: VirtualClock, stub: Stub) -> EdgeRpc:
    return offline_rpc(clock, stub, identity=lambda: KEY, seed=0, max_backoff_s=1.0)


def trainer_for(
    tmp_path: Path, clock: VirtualClock, stub: Stub, *, data: bytes | Path | None = b"x" * 64
) -> TaskTrainer:
    state = EdgeState(tmp_path / "edge")
    rpc = rpc_for(clock, stub)
    return TaskTrainer(
        state,
        downloads=ArtifactDownloader(state, rpc),
        rpc=rpc,
        data=data,
        threads=1,
        seed=11,
        clock=clock,
        heartbeat_s=5.0,
    )


def test_heartbeats_every_interval_of_the_clock_until_told_to_abandon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: training that runs until released; the third Heartbeat says ABANDON.
    release = threading.Event()
    calls: list[dict[str, Any]] = []

    def blocked_training(base: Any, adapter: Any, data: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        release.wait(timeout=30)
        return "never used"

    monkeypatch.setattr(edge_client.train, "train_adapter", blocked_training)
    clock = RecordingClock()
    stub = Stub(clock, [CONTINUE, CONTINUE, ABANDON])
    trainer = trainer_for(tmp_path, clock, stub)

    async def scenario() -> str:
        try:
            await trainer.train(TASK, base=object(), adapter=object())  # type: ignore[arg-type]
        except TaskAbandoned as exc:
            return str(exc)
        finally:
            release.set()
            await trainer.wait_idle()
        return "not abandoned"

    # Execute
    reason = asyncio.run(scenario())

    # Assert
    assert reason == "the coordinator asked to abandon the task (Heartbeat)"
    assert clock.sleeps == [5.0, 5.0, 5.0]
    assert [at for _, at in stub.beats] == [
        1_700_000_005_000,
        1_700_000_010_000,
        1_700_000_015_000,
    ]
    for beat, at in stub.beats:
        assert beat.task_id == "t1"
        verify_request(
            signed_auth_from(beat),
            public_key=raw_public_key(KEY),
            method="Heartbeat",
            body_sha256=request_body_sha256(beat),
            now_ms=at,
        )
    assert len(calls) == 1
    assert calls[0]["rank"] == 2 and calls[0]["steps"] == 3 and calls[0]["threads"] == 1
    # A seeded agent draws its windows by version (the first task on version 0).
    assert calls[0]["seed"] == window_seed(11, TASK.version, 0)


def test_training_result_is_returned_and_waits_are_heartbeat_intervals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_client.train, "train_adapter", lambda *a, **k: "result")
    clock = RecordingClock()
    stub = Stub(clock, [])
    trainer = trainer_for(tmp_path, clock, stub)

    result = asyncio.run(trainer.train(TASK, base=object(), adapter=object()))  # type: ignore[arg-type]

    assert result == "result"
    assert set(clock.sleeps) <= {5.0}
    assert len(stub.beats) <= len(clock.sleeps)


def test_parameters_training_refuses_abandon_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("rank: 9 exceeds r_max=4")

    monkeypatch.setattr(edge_client.train, "train_adapter", refusing)
    trainer = trainer_for(tmp_path, RecordingClock(), Stub(VirtualClock(), []))

    with pytest.raises(TaskAbandoned, match="refused the task's parameters: rank: 9"):
        asyncio.run(trainer.train(TASK, base=object(), adapter=object()))  # type: ignore[arg-type]


def test_missing_training_data_is_an_agent_error(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, VirtualClock(), Stub(VirtualClock(), []), data=tmp_path / "no")

    with pytest.raises(AgentError, match="training data does not exist"):
        asyncio.run(trainer.resolve_data())


def test_task_seed_depends_on_seed_purpose_and_task() -> None:
    other = edge_pb2.Task(task_id="t2")

    seeds = {
        task_seed(11, TASK, "train"),
        task_seed(12, TASK, "train"),
        task_seed(None, TASK, "train"),
        task_seed(11, TASK, "round"),
        task_seed(11, other, "train"),
    }

    assert len(seeds) == 5 and all(0 <= s < 2**32 for s in seeds)
    assert task_seed(None, TASK, "train") == task_seed(None, TASK, "train")


def test_window_seed_depends_on_seed_version_and_task_count_only() -> None:
    seeds = {window_seed(s, v, n) for s in (11, 12) for v in (0, 1, 7) for n in (0, 1)}
    assert len(seeds) == 12 and all(0 <= s < 2**32 for s in seeds)
    # Not on anything random (a task id): two runs, or two systems, draw the same windows.
    assert window_seed(11, 3) == window_seed(11, 3, 0)
    assert client_seed(5, 2) != client_seed(5, 3) != client_seed(6, 2)
    with pytest.raises(ValueError, match="version"):
        window_seed(11, -1)
    with pytest.raises(ValueError, match="index"):
        client_seed(0, 1000)  # would be client 0 of run 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"threads": 0}, "threads"), ({"heartbeat_s": 0.0}, "heartbeat_s")],
)
def test_constructor_names_the_bad_argument(
    tmp_path: Path, kwargs: dict[str, Any], field: str
) -> None:
    state = EdgeState(tmp_path / "edge")
    rpc = rpc_for(VirtualClock(), Stub(VirtualClock(), []))
    args: dict[str, Any] = {
        "downloads": ArtifactDownloader(state, rpc),
        "rpc": rpc,
        "data": b"x",
        "threads": 1,
        "seed": None,
        "clock": VirtualClock(),
    }
    args.update(kwargs)

    with pytest.raises(ValueError, match=f"^{field}:"):
        TaskTrainer(state, **args)


@pytest.mark.parametrize(("columns", "expected"), [([], None), ([2, 3], [2, 3])])
def test_the_task_columns_reach_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    columns: list[int],
    expected: list[int] | None,
) -> None:
    # An empty list is the nested rule (the first `rank` columns); a block is trained as given.
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(edge_client.train, "train_adapter", lambda *a, **k: calls.append(k))
    task = edge_pb2.Task()
    task.CopyFrom(TASK)
    task.columns.extend(columns)
    trainer = trainer_for(tmp_path, RecordingClock(), Stub(VirtualClock(), []))

    asyncio.run(trainer.train(task, base=object(), adapter=object()))  # type: ignore[arg-type]

    assert calls[0]["columns"] == expected


@pytest.mark.parametrize("warmup", [0, 5])
def test_the_task_warmup_reaches_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warmup: int
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(edge_client.train, "train_adapter", lambda *a, **k: calls.append(k))
    task = edge_pb2.Task()
    task.CopyFrom(TASK)
    task.warmup_steps = warmup
    trainer = trainer_for(tmp_path, RecordingClock(), Stub(VirtualClock(), []))

    asyncio.run(trainer.train(task, base=object(), adapter=object()))  # type: ignore[arg-type]

    assert calls[0]["warmup_steps"] == warmup


def test_columns_training_refuses_abandon_the_task(tmp_path: Path) -> None:
    # A coordinator handing out columns the rank cannot train (a duplicate): the real
    # trainer refuses them before any step, and the agent gives the task up.
    from estuary.adapters import AdapterConfig, GlobalAdapter
    from estuary.model.presets import build_preset

    base = build_preset("tiny", seed=0)
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4))
    task = edge_pb2.Task()
    task.CopyFrom(TASK)
    task.learning_rate = 0.01
    task.grad_clip_norm = 1.0
    task.columns.extend([1, 1])
    trainer = trainer_for(tmp_path, RecordingClock(), Stub(VirtualClock(), []), data=b"x" * 4096)

    with pytest.raises(TaskAbandoned, match="columns: need 2 distinct column indices"):
        asyncio.run(trainer.train(task, base=base, adapter=adapter))
