"""The edge agent against an in-test coordinator: a fake EdgeService on a loopback gRPC
server that verifies every request's signature, speaks the train-first protocol (a
training task, then a cohort task once GetTask names the trained update) and runs the
real secure_agg.Server for a cohort of three in active-adversary mode, the coordinator's
default (the agent is member 0 and signs with its enrolled identity key; members 1 and 2
are driven in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from recording_clock import RecordingClock

from edge_client.agent import AgentError, AgentHooks, EdgeAgent
from edge_client.state import EdgeState
from estuary.auth import (
    AuthError,
    device_id_for,
    raw_public_key,
    request_body_sha256,
    signed_auth_from,
    verify_request,
)
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.proto.session import identities_from_proto, session_from_proto
from estuary.proto.stages import stage_to_proto
from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from estuary.transport import MAX_LONG_POLL_MS
from secure_agg import Client, FixedPoint, Server, Stage

TEXT = b"def add(a, b):\n    return a + b\n\n" * 40
TOKEN = "good-token"
S = edge_pb2.SecAggStage
CHUNK = 64 * 1024
W_DEVICE = 0.5
W_OTHER = 1.0
CLIP = 4.0  # exactly representable in float32, the proto's type
#: Heartbeat interval of the tests on a virtual clock: a value no other wait has, so the
#: heartbeats can be told apart from the waits under test.
HEARTBEAT_S = 5.0


@dataclass
class Artifact:
    manifest_sha: str
    manifest_size: int
    blobs: dict[str, bytes]
    files: dict[str, str]
    tensors: list[tuple[str, int]]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """A real edge artifact of the tiny preset, built by the cloud worker's job code."""
    from cloud_workers.executor import ModelJobExecutor
    from cloud_workers.group import WorkerGroup
    from estuary.adapters import AdapterConfig, GlobalAdapter, put_adapter
    from estuary.jobs import make_job, submit_job
    from estuary.model.presets import build_preset
    from estuary.state import open_store
    from estuary.state.blobs import BlobStore
    from estuary.state.keys import version_key

    base = build_preset("tiny", seed=0)
    store = open_store("memory://")
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"), fsync=False)
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4, seed=0))
    digest = put_adapter(blobs, adapter)
    store.put(version_key(1), json.dumps({"version": 1, "adapter_sha256": digest}).encode())
    executor = ModelJobExecutor(
        store, blobs=blobs, base=base, eval_windows=torch.zeros((1, 9), dtype=torch.long)
    )
    # The ONNX export is a job of its own; an artifact built after it names it.
    group = WorkerGroup(store, executor=executor, name="g", heartbeat_s=1.0, reclaim_idle_s=5.0)
    submit_job(store, make_job("export_onnx", version=1))
    assert group.step(block_s=0) == 1
    out = executor.build_artifacts(make_job("build_artifacts", version=1, device_class="phone"))
    manifest_sha = out["artifact_sha256"]
    manifest = json.loads(blobs.read(manifest_sha))
    files = manifest["files"]
    served = manifest["onnx"]
    data = {d: blobs.read(d) for d in [manifest_sha, *files.values(), *served.values()]}
    tensors = [(n, s[0] * adapter.config.r_max) for n, s in adapter.shapes.items()]
    return Artifact(manifest_sha, len(data[manifest_sha]), data, files, tensors)


OTHERS = (1, 2)
"""Members driven in-process beside the agent (member 0)."""


def training_task(art: Artifact, *, task_id: str = "t1", version: int = 1) -> edge_pb2.Task:
    """A training task: no cohort, no secure-aggregation parameters."""
    return edge_pb2.Task(
        task_id=task_id,
        version=version,
        artifact=common_pb2.BlobRef(sha256=art.manifest_sha, size_bytes=art.manifest_size),
        rank=2,
        local_steps=2,
        learning_rate=1e-2,
        grad_clip_norm=1.0,
        batch_size=2,
        seq_len=16,
        deadline_ms=int(time.time() * 1000) + 600_000,
    )


def cohort_task(
    art: Artifact,
    *,
    task_id: str = "k1",
    cohort_id: str = "c1",
    trained_task_id: str = "t1",
    version: int = 1,
) -> edge_pb2.Task:
    """The cohort task of the update of ``trained_task_id``; the fake adds the members'
    identity keys once the agent enrolled. It carries no training parameters: the agent
    must not need them."""
    fp = FixedPoint.for_cohort(3, bits=32, clip=CLIP)
    return edge_pb2.Task(
        task_id=task_id,
        cohort_id=cohort_id,
        version=version,
        deadline_ms=int(time.time() * 1000) + 600_000,
        member_index=0,
        trained_task_id=trained_task_id,
        secagg=edge_pb2.SecAggParams(
            cohort=cohort_id.encode(),
            cohort_size=3,
            threshold=2,
            bits=fp.bits,
            frac_bits=fp.frac_bits,
            clip=fp.clip,
            neighbours=0,
            tensors=[edge_pb2.TensorSpec(name=n, length=m) for n, m in art.tensors],
            active=True,
        ),
    )


class Cohort:
    """secure_agg.Server (active mode) for members 0 (the agent) and OTHERS (driven here)."""

    def __init__(self, task: edge_pb2.Task, agent_key: bytes, *, seed: int = 7) -> None:
        identities = {i: Ed25519PrivateKey.generate() for i in OTHERS}
        keys = [agent_key] + [raw_public_key(identities[i]) for i in OTHERS]
        task.secagg.identity_keys[:] = keys
        self.config = session_from_proto(task.secagg)
        assert self.config.active
        peers = identities_from_proto(task.secagg)
        self.server = Server(self.config, members=[0, *OTHERS], peer_identities=peers)
        self.server.assign_weight(0, W_DEVICE)
        rng = np.random.default_rng(seed)
        self.other_updates: dict[int, dict[str, np.ndarray]] = {}
        self.others: dict[int, Client] = {}
        for i in OTHERS:
            self.server.assign_weight(i, W_OTHER)
            self.other_updates[i] = {
                n: rng.normal(0, 1e-3, m).astype(np.float32) for n, m in self.config.tensors
            }
            self.others[i] = Client(
                i, config=self.config, identity=identities[i], peer_identities=peers
            )
        self.mailbox: list[tuple[int, bytes]] = []
        for i in OTHERS:
            self.server.handle(i, self.others[i].advertise().encode())

    def from_device(self, data: bytes) -> None:
        self.server.handle(0, data)
        self.pump()

    def pump(self) -> None:
        while out := self.server.drain_encoded():
            stage = self.server.stage
            for recipient, data in out:
                if recipient == 0:
                    self.mailbox.append((stage_to_proto(stage), data))
                    continue
                reply = self.others[recipient].handle(data)
                if stage is Stage.MASKED_INPUT:
                    reply = self.others[recipient].submit(
                        self.other_updates[recipient], weight=W_OTHER
                    )
                if reply is not None:
                    self.server.handle(recipient, reply.encode())
        if self.server.stage is Stage.COMPLETED and all(
            s != S.SECAGG_STAGE_DONE for s, _ in self.mailbox
        ):
            self.mailbox.append((S.SECAGG_STAGE_DONE, b""))


@dataclass
class Fake(edge_pb2_grpc.EdgeServiceServicer):  # type: ignore[misc]
    """An EdgeService that checks auth on every call and scripts GetTask.

    Each GetTask answers the next script step: ``("pace", ms)``, a status code to fail
    with, or a task (a training task, or a cohort task: then its cohort starts).
    """

    artifact: Artifact
    script: list[Any] = field(default_factory=list)
    task: edge_pb2.Task | None = None  # the cohort task last handed out
    cohort: Cohort | None = None
    abort_reason: str = ""
    fail_fetch_once: set[str] = field(default_factory=set)
    keys: dict[str, bytes] = field(default_factory=dict)
    nonces: set[bytes] = field(default_factory=set)
    calls: list[tuple[str, float]] = field(default_factory=list)
    fetches: list[tuple[str, int]] = field(default_factory=list)
    heartbeat_action: int = edge_pb2.HeartbeatResponse.ACTION_CONTINUE
    clock: Clock = SYSTEM_CLOCK  # the agent's: signatures are checked against its time
    sent_stages: list[str] = field(default_factory=list)  # SendSecAgg stages, in order
    asked: list[str] = field(default_factory=list)  # each GetTask's trained_task_id
    waits: list[int] = field(default_factory=list)  # each GetTask's wait_ms
    beats: list[str] = field(default_factory=list)  # each Heartbeat's task_id
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (task_id, cohort_id)

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    async def _auth(self, method: str, request: Any, context: Any) -> None:
        try:
            auth = signed_auth_from(request)
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        key = self.keys.get(auth.device_id)
        if key is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown device")
        try:
            verify_request(
                auth,
                public_key=key,
                method=method,
                body_sha256=request_body_sha256(request),
                now_ms=self.clock.time_ms(),
            )
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if auth.nonce in self.nonces:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "replayed nonce")
        self.nonces.add(auth.nonce)
        self.calls.append((method, time.monotonic()))

    async def Enroll(self, request: Any, context: Any) -> Any:
        if request.token != TOKEN:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown enrolment token")
        device_id = device_id_for(request.identity_public_key)
        self.keys[device_id] = request.identity_public_key
        return edge_pb2.EnrollResponse(
            device_id=device_id,
            device_class=common_pb2.DeviceClass(name=request.device_class, rank=2),
            r_max=4,
        )

    async def GetTask(self, request: Any, context: Any) -> Any:
        await self._auth("GetTask", request, context)
        self.asked.append(request.trained_task_id)
        self.waits.append(request.wait_ms)
        step = self.script.pop(0) if self.script else ("pace", 50)
        if isinstance(step, grpc.StatusCode):
            await context.abort(step, "scripted failure")
        if isinstance(step, edge_pb2.Task):
            if step.cohort_id:
                self.task = step
                self.cohort = Cohort(step, self.keys[signed_auth_from(request).device_id])
            return edge_pb2.GetTaskResponse(task=step)
        return edge_pb2.GetTaskResponse(pace=edge_pb2.Pace(retry_after_ms=step[1], reason="test"))

    async def FetchArtifact(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await self._auth("FetchArtifact", request, context)
        data = self.artifact.blobs.get(request.sha256)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such blob")
        assert data is not None
        self.fetches.append((request.sha256, request.offset))
        for start in range(request.offset, len(data), CHUNK):
            yield edge_pb2.ArtifactChunk(
                offset=start, data=data[start : start + CHUNK], total_bytes=len(data)
            )
            if request.sha256 in self.fail_fetch_once:
                self.fail_fetch_once.discard(request.sha256)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (scripted)")

    async def SendSecAgg(self, request: Any, context: Any) -> Any:
        await self._auth("SendSecAgg", request, context)
        assert self.cohort is not None and request.cohort_id == self.task.cohort_id  # type: ignore[union-attr]
        self.sent_stages.append(edge_pb2.SecAggStage.Name(request.stage)[len("SECAGG_STAGE_") :])
        self.cohort.from_device(request.payload)
        return edge_pb2.SecAggAck(stage=stage_to_proto(self.cohort.server.stage))

    async def AwaitSecAgg(self, request: Any, context: Any) -> Any:
        await self._auth("AwaitSecAgg", request, context)
        if self.abort_reason:
            return edge_pb2.SecAggServerMessage(
                cohort_id=request.cohort_id,
                stage=S.SECAGG_STAGE_ABORTED,
                abort_reason=self.abort_reason,
            )
        assert self.cohort is not None
        give_up = time.monotonic() + min(request.wait_ms, 2000) / 1000
        while time.monotonic() < give_up:
            for stage, payload in self.cohort.mailbox:
                if stage > request.after_stage:
                    return edge_pb2.SecAggServerMessage(
                        cohort_id=request.cohort_id,
                        stage=stage,
                        payload=payload,
                        weight=W_DEVICE if stage == S.SECAGG_STAGE_MASKED_INPUT else 0.0,
                    )
            await asyncio.sleep(0.005)
        return edge_pb2.SecAggServerMessage(cohort_id=request.cohort_id, pending=True)

    async def UploadMasked(self, request_iterator: Any, context: Any) -> Any:
        header = None
        data = b""
        async for chunk in request_iterator:
            if header is None:
                header = chunk.header
                await self._auth("UploadMasked", header, context)
            else:
                data += chunk.data
        assert header is not None
        self.uploads.append((header.task_id, header.cohort_id))
        assert len(data) == header.total_bytes
        assert hashlib.sha256(data).hexdigest() == header.sha256
        assert self.cohort is not None
        self.cohort.from_device(data)
        return edge_pb2.UploadAck(accepted=True, durable_bytes=len(data))

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        await self._auth("Heartbeat", request, context)
        self.beats.append(request.task_id)
        return edge_pb2.HeartbeatResponse(action=self.heartbeat_action, current_version=1)


@contextlib.asynccontextmanager
async def serving(fake: Fake) -> AsyncIterator[str]:
    server = grpc.aio.server()
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def enrolled(state: EdgeState, target: str, **kwargs: Any) -> EdgeAgent:
    kwargs.setdefault("data", TEXT)
    agent = EdgeAgent(state, target, credentials=None, threads=1, seed=3, **kwargs)
    await agent.enroll(TOKEN, "phone")
    return agent


# --------------------------------------------------------------------------- tests


def test_full_task_trains_first_then_aggregates_to_the_exact_unmasked_sum(
    artifact: Artifact, tmp_path: Path
) -> None:
    # Prepare: a Pace, the training task (the compressed base's first download breaks),
    # a Pace while the cohort forms, then the cohort task.
    base_digest = artifact.files["compressed_model.safetensors"]
    fake = Fake(
        artifact,
        script=[("pace", 300), training_task(artifact), ("pace", 10), cohort_task(artifact)],
        fail_fetch_once={base_digest},
    )
    seen: dict[str, Any] = {}
    offered: list[tuple[str, str]] = []

    def before_upload(t: edge_pb2.Task, update: dict[str, np.ndarray], w: float) -> None:
        seen.update(task_id=t.task_id, update=update, weight=w)

    hooks = AgentHooks(
        before_upload=before_upload, on_task=lambda t: offered.append((t.task_id, t.cohort_id))
    )
    state = EdgeState(tmp_path / "edge")

    async def scenario() -> list[str]:
        async with serving(fake) as target:
            agent = await enrolled(state, target, hooks=hooks, heartbeat_s=0.05)
            outcomes = [await agent.run_once() for _ in range(4)]
            assert agent.bytes_up > 0 and agent.bytes_down > len(artifact.blobs[base_digest])
            await agent.close()
            return outcomes

    # Execute
    outcomes = asyncio.run(scenario())

    # Assert: outcomes, pacing, auth on every method, resumed download.
    assert outcomes == ["paced", "trained", "paced", "done"]
    assert fake.asked == ["", "", "t1", "t1"]
    # Holding its update, it lets the coordinator hold the call until the cohort is sealed.
    assert fake.waits == [0, 0, MAX_LONG_POLL_MS, MAX_LONG_POLL_MS]
    assert offered == [("t1", ""), ("k1", "c1")]
    get_times = [t for m, t in fake.calls if m == "GetTask"]
    assert get_times[1] - get_times[0] >= 0.3
    methods = fake.methods()
    assert {"FetchArtifact", "Heartbeat", "SendSecAgg", "AwaitSecAgg", "UploadMasked"} <= set(
        methods
    )
    # Train first: every download and heartbeat before the cohort task was asked for.
    cohort_asked = [i for i, m in enumerate(methods) if m == "GetTask"][3]
    assert {"FetchArtifact", "Heartbeat"}.isdisjoint(methods[cohort_asked:])
    assert set(fake.beats) == {"t1"}
    assert fake.uploads == [("k1", "c1")]  # the cohort task's id, not the training task's
    assert [o for d, o in fake.fetches if d == base_digest] == [0, CHUNK]
    assert state.has_artifact(base_digest) and state.verify_artifact(base_digest)
    # The unmasked sum is w_device · (what before_upload saw) + w_other · other's update.
    assert fake.cohort is not None and fake.cohort.server.result is not None
    result = fake.cohort.server.result
    assert result.survivors == (0, 1, 2)
    # Active mode end to end: the agent signed the survivor set with its identity key.
    assert "CONSISTENCY_CHECK" in fake.sent_stages
    assert seen["task_id"] == "k1" and seen["weight"] == pytest.approx(W_DEVICE)
    step = 2.0**-fake.cohort.config.fixed_point.frac_bits
    for name, length in fake.cohort.config.tensors:
        plain = seen["update"][name]
        assert plain.dtype == np.float32 and plain.shape == (length // 4, 4)
        assert not plain[:, 2:].any()  # rank 2 of r_max 4: zero padded
        others = sum(fake.cohort.other_updates[i][name] for i in OTHERS)
        device_part = result.float_sum[name] - W_OTHER * others
        np.testing.assert_allclose(device_part, W_DEVICE * plain.ravel(), rtol=0, atol=3 * step)
    assert any(np.abs(v).max() > 10 * step for v in seen["update"].values())
    progress = state.load_progress()
    assert (progress.tasks_done, progress.tasks_abandoned, progress.task_id) == (1, 0, None)
    # The artifact's int8 ONNX export is installed as the device's serving model.
    from edge_client.serving import OrtLM

    served = OrtLM(state.root / "served").logits(np.array([[5, 6, 7]], dtype=np.int64))
    assert served.shape == (1, 3, 256) and np.isfinite(served).all()
    assert progress.bytes_up > 0 and progress.bytes_down > 0


def test_trains_before_any_key_and_names_the_update_on_the_next_get_task(
    artifact: Artifact, tmp_path: Path
) -> None:
    # Prepare: the training task, then a Pace; note what the fake had seen at the moment
    # training finished.
    fake = Fake(artifact, script=[training_task(artifact), ("pace", 10)])
    state = EdgeState(tmp_path / "edge")
    at_trained: list[list[str]] = []

    def on_event(name: str, _details: dict[str, Any]) -> None:
        if name == "task_trained":
            at_trained.append(fake.methods())

    async def scenario() -> tuple[list[str], str | None]:
        async with serving(fake) as target:
            agent = await enrolled(
                state, target, heartbeat_s=0.05, hooks=AgentHooks(on_event=on_event)
            )
            outcomes = [await agent.run_once(), await agent.run_once()]
            held = agent.trained_task_id
            await agent.close()
            return outcomes, held

    # Execute
    outcomes, held = asyncio.run(scenario())

    # Assert: trained (artifact fetched) on one GetTask and no secure-aggregation call,
    # then the next GetTask named the update, which is still held.
    assert outcomes == ["trained", "paced"]
    assert len(at_trained) == 1
    assert at_trained[0].count("GetTask") == 1 and "FetchArtifact" in at_trained[0]
    assert {"SendSecAgg", "AwaitSecAgg", "UploadMasked"}.isdisjoint(fake.methods())
    assert fake.asked == ["", "t1"]
    assert held == "t1"
    progress = state.load_progress()
    assert (progress.task_id, progress.cohort_id, progress.phase) == ("t1", None, "trained")
    assert (progress.tasks_done, progress.tasks_abandoned) == (0, 0)


def test_pace_while_the_cohort_forms_keeps_naming_the_update(
    artifact: Artifact, tmp_path: Path
) -> None:
    fake = Fake(artifact, script=[training_task(artifact), *[("pace", 10)] * 3])

    async def scenario() -> list[str]:
        async with serving(fake) as target:
            agent = await enrolled(EdgeState(tmp_path / "edge"), target)
            outcomes = [await agent.run_once() for _ in range(4)]
            await agent.close()
            return outcomes

    assert asyncio.run(scenario()) == ["trained", "paced", "paced", "paced"]
    assert fake.asked == ["", "t1", "t1", "t1"]
    # Nothing but GetTask once trained: no download again, no heartbeat while waiting.
    methods = fake.methods()
    first_ask_trained = [i for i, m in enumerate(methods) if m == "GetTask"][1]
    assert methods[first_ask_trained:] == ["GetTask"] * 3


def test_failed_precondition_on_the_trained_get_task_drops_the_update(
    artifact: Artifact, tmp_path: Path
) -> None:
    # Prepare: the coordinator forgets the training task once it is trained.
    clock = RecordingClock()
    fake = Fake(
        artifact,
        script=[training_task(artifact), grpc.StatusCode.FAILED_PRECONDITION, ("pace", 10)],
        clock=clock,
    )
    state = EdgeState(tmp_path / "edge")
    abandoned: list[str] = []

    def on_event(name: str, details: dict[str, Any]) -> None:
        if name == "task_abandoned":
            abandoned.append(details["task_id"])

    async def scenario() -> list[str]:
        async with serving(fake) as target:
            agent = await enrolled(
                state,
                target,
                clock=clock,
                heartbeat_s=HEARTBEAT_S,
                hooks=AgentHooks(on_event=on_event),
            )
            outcomes = [await agent.run_once() for _ in range(3)]
            assert agent.trained_task_id is None and agent.tasks_abandoned == 1
            await agent.close()
            return outcomes

    # Execute
    outcomes = asyncio.run(scenario())

    # Assert: dropped, asked again without it, and at once (no backoff was drawn: the
    # only wait besides heartbeats is the Pace, with the seeded stream's first jitter).
    assert outcomes == ["trained", "abandoned", "paced"]
    assert fake.asked == ["", "t1", ""]
    assert abandoned == ["t1"]
    assert "SendSecAgg" not in fake.methods()
    waits = [s for s in clock.sleeps if s != HEARTBEAT_S]
    assert waits == [0.01 * (1.0 + random.Random(3).uniform(0.0, 0.2))]
    progress = state.load_progress()
    assert (progress.tasks_abandoned, progress.task_id, progress.phase) == (1, None, None)


@pytest.mark.parametrize(
    ("mismatch", "reason"),
    [
        ({"trained_task_id": "t0"}, "aggregates training task 't0'"),
        ({"version": 2}, "trained on version 1"),
    ],
)
def test_cohort_task_for_another_update_sends_no_keys_and_drops_it(
    artifact: Artifact, tmp_path: Path, mismatch: dict[str, Any], reason: str
) -> None:
    fake = Fake(
        artifact,
        script=[training_task(artifact), cohort_task(artifact, **mismatch), ("pace", 10)],
    )
    state = EdgeState(tmp_path / "edge")
    abandoned: list[dict[str, Any]] = []

    def on_event(name: str, details: dict[str, Any]) -> None:
        if name == "task_abandoned":
            abandoned.append(details)

    async def scenario() -> list[str]:
        async with serving(fake) as target:
            agent = await enrolled(state, target, hooks=AgentHooks(on_event=on_event))
            outcomes = [await agent.run_once() for _ in range(3)]
            await agent.close()
            return outcomes

    assert asyncio.run(scenario()) == ["trained", "abandoned", "paced"]
    assert {"SendSecAgg", "AwaitSecAgg", "UploadMasked"}.isdisjoint(fake.methods())
    assert fake.asked == ["", "t1", ""]
    assert [d["task_id"] for d in abandoned] == ["t1"]
    assert "cohort task k1 refused" in abandoned[0]["reason"]
    assert reason in abandoned[0]["reason"]
    progress = state.load_progress()
    assert (progress.tasks_done, progress.tasks_abandoned, progress.task_id) == (0, 1, None)


def test_another_training_task_replaces_the_update_held(artifact: Artifact, tmp_path: Path) -> None:
    fake = Fake(
        artifact,
        script=[
            training_task(artifact, task_id="t1"),
            training_task(artifact, task_id="t2"),
            ("pace", 10),
        ],
    )
    state = EdgeState(tmp_path / "edge")

    async def scenario() -> tuple[list[str], str | None, int]:
        async with serving(fake) as target:
            agent = await enrolled(state, target, heartbeat_s=0.05)
            outcomes = [await agent.run_once() for _ in range(3)]
            held, abandoned = agent.trained_task_id, agent.tasks_abandoned
            await agent.close()
            return outcomes, held, abandoned

    assert asyncio.run(scenario()) == (["trained", "trained", "paced"], "t2", 1)
    assert fake.asked == ["", "t1", "t2"]
    progress = state.load_progress()
    assert (progress.task_id, progress.phase, progress.tasks_abandoned) == ("t2", "trained", 1)


def test_the_same_training_task_again_keeps_the_update_held(
    artifact: Artifact, tmp_path: Path
) -> None:
    clock = RecordingClock()
    fake = Fake(
        artifact,
        script=[training_task(artifact), training_task(artifact), ("pace", 10)],
        clock=clock,
    )

    async def scenario() -> tuple[list[str], str | None]:
        async with serving(fake) as target:
            agent = await enrolled(
                EdgeState(tmp_path / "edge"), target, clock=clock, heartbeat_s=HEARTBEAT_S
            )
            outcomes = [await agent.run_once() for _ in range(3)]
            held = agent.trained_task_id
            await agent.close()
            return outcomes, held

    assert asyncio.run(scenario()) == (["trained", "paced", "paced"], "t1")
    assert fake.asked == ["", "t1", "t1"]
    # Not trained twice: nothing between the second and third GetTask, and the repeat
    # was answered with one backoff (ceiling 8 s) before the Pace.
    methods = fake.methods()
    second = [i for i, m in enumerate(methods) if m == "GetTask"][1]
    assert methods[second:] == ["GetTask", "GetTask"]
    rng = random.Random(3)
    expected = [rng.uniform(0.0, 8.0), 0.01 * (1.0 + rng.uniform(0.0, 0.2))]
    assert [s for s in clock.sleeps if s != HEARTBEAT_S] == expected


def test_unavailable_is_retried_with_backoff_and_fresh_signatures(
    artifact: Artifact, tmp_path: Path
) -> None:
    # Prepare: two transport failures, then an hour-long Pace, all on a virtual clock.
    clock = RecordingClock()
    fake = Fake(
        artifact,
        script=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, ("pace", 3_600_000)],
        clock=clock,
    )
    events: list[str] = []
    delays: list[float] = []

    def on_event(name: str, details: dict[str, Any]) -> None:
        events.append(name)
        if name == "retry":
            delays.append(details["delay_s"])

    async def scenario() -> str:
        async with serving(fake) as target:
            agent = await enrolled(
                EdgeState(tmp_path / "edge"),
                target,
                max_backoff_s=300.0,
                clock=clock,
                hooks=AgentHooks(on_event=on_event),
            )
            outcome = await agent.run_once()
            await agent.close()
            return outcome

    # Execute
    started = time.monotonic()
    outcome = asyncio.run(scenario())
    elapsed = time.monotonic() - started

    # Assert
    assert outcome == "paced"
    # Three signed GetTask calls, each with its own nonce (the fake refuses replays).
    assert fake.methods() == ["GetTask"] * 3
    assert events == ["retry", "retry", "paced"]
    # Exactly the waits the agent's seeded stream asks for: full jitter under 0.5 s and
    # 1 s, then the retry-after stretched by up to PACE_JITTER; none of them real.
    rng = random.Random(3)
    expected = [rng.uniform(0.0, 0.5), rng.uniform(0.0, 1.0)]
    expected.append(3600.0 * (1.0 + rng.uniform(0.0, 0.2)))
    assert clock.sleeps == expected and delays == expected[:2]
    assert clock.monotonic() == pytest.approx(sum(expected))
    assert elapsed < 30.0  # an hour of Pace took no real hour


def test_refused_get_task_waits_one_backoff_on_the_clock(
    artifact: Artifact, tmp_path: Path
) -> None:
    clock = RecordingClock()
    fake = Fake(artifact, script=[grpc.StatusCode.FAILED_PRECONDITION], clock=clock)
    events: list[str] = []

    async def scenario() -> str:
        async with serving(fake) as target:
            agent = await enrolled(
                EdgeState(tmp_path / "edge"),
                target,
                clock=clock,
                hooks=AgentHooks(on_event=lambda name, _: events.append(name)),
            )
            outcome = await agent.run_once()
            await agent.close()
            return outcome

    assert asyncio.run(scenario()) == "paced"
    # Not retried as a transport failure: one call, no retry event, one wait whose
    # ceiling is the backoff of attempt 4 (0.5 s x 2**4).
    assert fake.methods() == ["GetTask"]
    assert events == []
    assert clock.sleeps == [random.Random(3).uniform(0.0, 8.0)]


def test_aborted_cohort_abandons_the_task_and_its_update(
    artifact: Artifact, tmp_path: Path
) -> None:
    fake = Fake(
        artifact,
        script=[training_task(artifact), cohort_task(artifact), ("pace", 10)],
        abort_reason="too few",
    )
    state = EdgeState(tmp_path / "edge")

    async def scenario() -> tuple[list[str], int]:
        async with serving(fake) as target:
            agent = await enrolled(state, target)
            outcomes = [await agent.run_once() for _ in range(3)]
            await agent.close()
            return outcomes, agent.tasks_abandoned

    assert asyncio.run(scenario()) == (["trained", "abandoned", "paced"], 1)
    assert fake.sent_stages == ["ADVERTISE_KEYS"]
    assert "UploadMasked" not in fake.methods()
    assert fake.asked == ["", "t1", ""]
    progress = state.load_progress()
    assert (progress.tasks_done, progress.tasks_abandoned, progress.task_id) == (0, 1, None)


@pytest.mark.parametrize(
    ("phase", "script_len", "outcomes"),
    [("training", 1, ["abandoned", "paced"]), ("keys", 2, ["trained", "abandoned", "paced"])],
)
def test_vanishing_sends_nothing_more_for_the_task(
    artifact: Artifact, tmp_path: Path, phase: str, script_len: int, outcomes: list[str]
) -> None:
    tasks = [training_task(artifact), cohort_task(artifact)][:script_len]
    fake = Fake(artifact, script=[*tasks, ("pace", 10)])
    uploads: list[str] = []
    hooks = AgentHooks(
        drop=lambda _task, at: at == phase,
        before_upload=lambda t, _u, _w: uploads.append(t.task_id),
    )

    async def scenario() -> list[str]:
        async with serving(fake) as target:
            agent = await enrolled(EdgeState(tmp_path / "edge"), target, hooks=hooks)
            got = [await agent.run_once() for _ in outcomes]
            assert agent.trained_task_id is None and agent.tasks_abandoned == 1
            await agent.close()
            return got

    assert asyncio.run(scenario()) == outcomes
    # Between the task and the next GetTask only the artifact download (before
    # training), and that GetTask names no update.
    methods = fake.methods()
    asks = [i for i, m in enumerate(methods) if m == "GetTask"]
    assert set(methods[asks[-2] + 1 : asks[-1]]) <= {"FetchArtifact"}
    assert "SendSecAgg" not in methods and uploads == []
    assert fake.asked[-1] == ""


def test_stopping_while_the_cohort_forms_abandons_the_update(
    artifact: Artifact, tmp_path: Path
) -> None:
    # Prepare: trained, then a minute-long Pace during which the agent is told to stop.
    fake = Fake(artifact, script=[training_task(artifact), ("pace", 60_000)])
    state = EdgeState(tmp_path / "edge")

    async def scenario() -> tuple[int, int, float]:
        async with serving(fake) as target:
            stop = asyncio.Event()

            def on_event(name: str, _details: dict[str, Any]) -> None:
                if name == "paced":
                    asyncio.get_running_loop().call_soon(stop.set)

            agent = await enrolled(state, target, hooks=AgentHooks(on_event=on_event))
            started = time.monotonic()
            stats = await agent.run(stop=stop)
            await agent.close()
            return stats.tasks_abandoned, stats.tasks_done, time.monotonic() - started

    abandoned, done, elapsed = asyncio.run(scenario())
    assert (abandoned, done) == (1, 0) and elapsed < 30.0
    assert fake.asked == ["", "t1"]
    progress = state.load_progress()
    assert (progress.tasks_abandoned, progress.task_id, progress.phase) == (1, None, None)


def test_restart_with_an_update_held_counts_it_abandoned_and_names_none(
    artifact: Artifact, tmp_path: Path
) -> None:
    state = EdgeState(tmp_path / "edge")
    fake = Fake(artifact, script=[("pace", 10)])

    async def scenario() -> tuple[str, int]:
        async with serving(fake) as target:
            first = await enrolled(state, target)
            await first.close()
            progress = state.load_progress()
            progress.task_id, progress.phase = "old", "trained"
            state.save_progress(progress)
            agent = EdgeAgent(state, target, credentials=None, data=TEXT)
            outcome = await agent.run_once()
            await agent.close()
            return outcome, agent.tasks_abandoned

    assert asyncio.run(scenario()) == ("paced", 1)
    # The update lived only in memory: the GetTask after the restart names none.
    assert fake.asked == [""]
    progress = state.load_progress()
    assert (progress.tasks_abandoned, progress.task_id, progress.phase) == (1, None, None)


def test_unauthenticated_stops_the_agent(artifact: Artifact, tmp_path: Path) -> None:
    fake = Fake(artifact)

    async def scenario() -> None:
        async with serving(fake) as target:
            agent = await enrolled(EdgeState(tmp_path / "edge"), target)
            fake.keys.clear()  # revoked
            try:
                await agent.run_once()
            finally:
                await agent.close()

    with pytest.raises(AgentError, match="not enrolled or revoked"):
        asyncio.run(scenario())


def test_enrolment_refuses_twice_and_reports_a_bad_token(
    artifact: Artifact, tmp_path: Path
) -> None:
    fake = Fake(artifact)
    state = EdgeState(tmp_path / "edge")

    async def scenario() -> dict[str, Any]:
        async with serving(fake) as target:
            stranger = EdgeAgent(EdgeState(tmp_path / "other"), target, credentials=None, data=None)
            with pytest.raises(AgentError, match="unknown enrolment token"):
                await stranger.enroll("wrong", "phone")
            await stranger.close()
            agent = await enrolled(state, target)
            with pytest.raises(AgentError, match="already enrolled"):
                await agent.enroll(TOKEN, "phone")
            await agent.close()
            enrolment = state.load_enrolment()
            assert enrolment is not None
            return {
                "id": enrolment.device_id,
                "rank": enrolment.rank,
                "class": enrolment.device_class,
            }

    got = asyncio.run(scenario())
    assert got["rank"] == 2 and got["class"] == "phone"
    assert got["id"] in fake.keys
    assert not (tmp_path / "other" / "enrolment.json").exists()


def test_device_without_data_refuses_to_run(artifact: Artifact, tmp_path: Path) -> None:
    fake = Fake(artifact)

    async def scenario() -> None:
        async with serving(fake) as target:
            agent = await enrolled(EdgeState(tmp_path / "edge"), target, data=None)
            try:
                await agent.run(max_tasks=1)
            finally:
                await agent.close()

    with pytest.raises(AgentError, match="no training data"):
        asyncio.run(scenario())
    assert fake.methods() == []


def test_stop_event_ends_run_during_a_pace(artifact: Artifact, tmp_path: Path) -> None:
    fake = Fake(artifact, script=[("pace", 60_000)])

    async def scenario() -> tuple[float, int]:
        async with serving(fake) as target:
            agent = await enrolled(EdgeState(tmp_path / "edge"), target)
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.2, stop.set)
            started = time.monotonic()
            stats = await agent.run(stop=stop)
            await agent.close()
            return time.monotonic() - started, stats.paced

    elapsed, paced = asyncio.run(scenario())
    assert paced == 1 and elapsed < 5.0


def test_stop_event_ends_retries_against_a_dead_coordinator(
    artifact: Artifact, tmp_path: Path
) -> None:
    fake = Fake(artifact)
    state = EdgeState(tmp_path / "edge")

    async def scenario() -> float:
        async with serving(fake) as target:
            first = await enrolled(state, target)
            await first.close()
        # The server is gone: every GetTask fails at once with UNAVAILABLE.
        agent = EdgeAgent(state, target, credentials=None, data=TEXT, max_backoff_s=0.01)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        started = time.monotonic()
        await agent.run(stop=stop)
        await agent.close()
        return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=10)) < 5.0
