"""The three policies compared on one trace: Estuary, plain FedBuff, synchronous FedAvg.

- :class:`EstuaryPolicy` drives the real :class:`coordinator.service.FederationService`
  (pacer, cohort formation and sealing, the secure-aggregation relay and state machines,
  staleness weights, the FedBuff ledger with its lease and fencing) over the in-memory
  store on the virtual clock. Each device runs the real :class:`secure_agg.Client` and the
  edge agent's own clip-and-mask helpers (:mod:`edge_client.exchange`); messages are
  handed to the service directly instead of over gRPC, each delayed by the device's
  latency plus its real size over its bandwidth. The version's cloud jobs (evaluation and
  edge artifacts) run on a real :class:`cloud_workers.executor.ModelJobExecutor`, in this
  process, *without the ONNX export* (about 5 s per version, and no device here serves).
  A device's task runs as the edge agent's does: a training task (download, train,
  heartbeats), then the report, waiting for its cohort of finished devices to seal, key
  exchange, the share relay, the masked upload and the unmask.
- :class:`FedBuffPolicy`: devices train and upload plain ΔB (no cohorts, no secure
  aggregation) into the same :class:`coordinator.versions.VersionLedger` with the same
  buffer size, server learning rate and staleness policy; concurrency is capped at the
  same ``K × target_staleness`` as Estuary's pacer.
- :class:`SyncFedAvgPolicy`: rounds as in Bonawitz et al. (2019): select
  ``ceil(N × (1 + over_selection))`` online devices, keep the first N to report within the
  round deadline, aggregate them with one real secure-aggregation session
  (:func:`secure_agg.driver.run_local`); the late ones' work is discarded. A round with fewer
  than the threshold aborts.

Updates that the simulator knows will be discarded (a sync round's late reporters, a
device that drops out) are not computed; their virtual device time still counts.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from estuary.adapters import COLUMN_RULES, rank_learning_rate, trained_columns
from estuary.clock import VirtualClock
from estuary.config.models import pacer_cap
from simulation.fleet.engine import DeviceState, EventQueue, Recorder, Stopwatch
from simulation.fleet.trace import DeviceSpec, DeviceTrace
from simulation.fleet.training import TrainContext, Trainer, TrainRequest, data_slice

__all__ = ["EstuaryPolicy", "FedBuffPolicy", "FleetConfig", "FleetEnv", "SyncFedAvgPolicy"]


@dataclass(frozen=True)
class FleetConfig:
    """Every knob of a fleet run (units in the names; see ``estuary simulate-fleet --help``)."""

    devices: int = 2000
    seed: int = 0
    duration_s: float = 3 * 3600.0
    max_updates: int = 500
    local_steps: int = 2
    learning_rate: float = 1e-2
    rank_lr_power: float = 1.0  # the product's training.rank_lr_power, for every policy
    column_rule: str = "rotating"  # the product's training.column_rule, for every policy
    warmup_steps: int = 5  # the product's training.warmup_steps, for every policy
    batch_size: int = 4
    seq_len: int = 32
    grad_clip_norm: float = 1.0
    r_max: int = 4
    buffer_size: int = 10
    server_lr: float = 1.0
    staleness_a: float = 0.5
    max_staleness: int = 20
    target_staleness: float = 3.0
    # The timings below are the product's defaults (pacing.retry_after_min_s,
    # cohort.formation_s, cohort.silence_s, the edge agent's heartbeat): the simulator
    # measures the system as shipped. Longer ones cost Estuary seconds per task where a
    # task trains for seconds (issue 13: a 5 s poll while the cohort seals, 10 s of
    # formation, 60 s to notice a silent member).
    retry_after_s: float = 1.0
    # How soon at the earliest a device the pacer deferred asks again, whatever the
    # retry-after (0: no floor; a device asks after the pacer's retry-after stretched by
    # the edge agent's jitter, as the shipped agent does).
    idle_checkin_s: float = 0.0
    cohort_min: int = 5
    cohort_max: int = 10
    formation_s: float = 5.0
    threshold_fraction: float = 0.6
    deadline_s: float = 900.0
    key_timeout_s: float = 60.0
    silence_s: float = 30.0
    heartbeat_s: float = 5.0
    clip_norm: float = 1.0
    # The coordinator server's TICK_INTERVAL_S: sealing, stage deadlines, folding finished
    # cohorts in and commits happen at ticks, so a coarser tick than the product's delays
    # every cohort (2000 devices, pacing.one_task_per_version on: Estuary reached the
    # target at 147 s of virtual time with a 1 s tick, 121 s with 0.25 s).
    tick_s: float = 0.25
    sync_clients: int = 20
    sync_over_selection: float = 0.3
    sync_deadline_s: float = 600.0
    eval_windows: int = 4

    def __post_init__(self) -> None:
        for name in ("devices", "max_updates", "local_steps", "batch_size", "buffer_size",
                     "sync_clients", "eval_windows", "r_max"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("duration_s", "deadline_s", "sync_deadline_s", "tick_s", "heartbeat_s",
                     "silence_s", "key_timeout_s", "retry_after_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.idle_checkin_s >= 0:
            raise ValueError(f"idle_checkin_s: must be >= 0, got {self.idle_checkin_s}")
        if self.column_rule not in COLUMN_RULES:
            raise ValueError(f"column_rule: one of {list(COLUMN_RULES)}, got {self.column_rule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.rank_lr_power <= 2:
            raise ValueError(f"rank_lr_power: must be in [0, 2], got {self.rank_lr_power}")
        if self.cohort_min < 3 or self.cohort_max < self.cohort_min:
            raise ValueError(
                f"cohort_min/cohort_max: need 3 <= cohort_min <= cohort_max, got "
                f"{self.cohort_min}/{self.cohort_max}"
            )
        cap = pacer_cap(self.buffer_size, self.target_staleness)
        if cap < self.cohort_min:
            raise ValueError(
                f"target_staleness: buffer_size × target_staleness = {self.buffer_size} × "
                f"{self.target_staleness:g} lets {cap} devices train at once, fewer than "
                f"cohort_min={self.cohort_min}, so Estuary's cohorts could only fill across "
                "several rounds of training"
            )
        if self.heartbeat_s >= self.silence_s:
            raise ValueError(
                f"heartbeat_s: {self.heartbeat_s} must be below silence_s={self.silence_s} "
                "or every training member is taken as gone"
            )

    def task_seed(self, device: int, task: int) -> int:
        """Seed of a device's ``task``-th update (sampling and stochastic rounding)."""
        digest = hashlib.sha256(f"{self.seed}:{device}:{task}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class FleetEnv:
    """What every policy of one comparison shares: trace, fleet, data, base, held-out set."""

    trace: DeviceTrace
    fleet: list[DeviceSpec]
    config: FleetConfig
    trainer: Trainer
    context: TrainContext
    base: Any
    adapter0: Any
    held_out: Any
    eval_windows: Any
    workdir: Path
    artifact_bytes: dict[str, int] = field(default_factory=dict)
    """Per class, what a task downloads: the edge-artifact manifest plus the adapter blob
    (from a real build). Every policy downloads the same."""
    base_bytes: dict[str, int] = field(default_factory=dict)
    """Per class, the compressed base's blobs: downloaded once, on a device's first task
    (the agent keeps blobs by content hash)."""

    def download_bytes(self, spec: DeviceSpec, *, first: bool) -> int:
        """Bytes a task of ``spec`` downloads (the base too on its ``first`` task)."""
        size = self.artifact_bytes[spec.device_class]
        return size + (self.base_bytes[spec.device_class] if first else 0)

    def request(
        self, spec: DeviceSpec, adapter: Any, task: int, *, columns: tuple[int, ...] | None
    ) -> TrainRequest:
        """Return the training request of ``spec``'s update seeded ``task`` on ``adapter``.

        ``columns``: of ``B``, as the task hands them out (None: the first ``rank``).
        """
        cfg = self.config
        client, start, length = data_slice(
            spec.index,
            devices=len(self.fleet),
            client_sizes=[len(b) for b in self.context.client_bytes],
            seq_len=cfg.seq_len,
        )
        return TrainRequest(
            client=client,
            start=start,
            length=length,
            rank=spec.rank,
            steps=cfg.local_steps,
            lr=rank_learning_rate(
                cfg.learning_rate,
                rank=spec.rank,
                r_max=cfg.r_max,
                power=cfg.rank_lr_power,
            ),
            grad_clip_norm=cfg.grad_clip_norm,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            seed=cfg.task_seed(spec.index, task),
            adapter=adapter,
            columns=columns,
            warmup_steps=cfg.warmup_steps,
        )

    def columns(self, spec: DeviceSpec, *, version: int, member: int) -> tuple[int, ...] | None:
        """Columns a policy without the coordinator gives ``spec`` (``column_rule``).

        ``member`` stands in for a cohort member index: the device's index (FedBuff) or
        its position among a round's selected devices (synchronous FedAvg).
        """
        cfg = self.config
        return trained_columns(
            cfg.column_rule, spec.rank, cfg.r_max, version=version, member=member
        )

    def plain_bytes(self, rank: int) -> int:
        """Bytes of a plain float32 ΔB upload at ``rank`` (its non-zero columns)."""
        return int(sum(shape[0] * rank * 4 for shape in self.adapter0.shapes.values()))


class Policy:
    """Shared machinery: clock, queue, devices, evaluation, stop rule."""

    name = "policy"

    def __init__(self, env: FleetEnv) -> None:
        self.env = env
        self.cfg = env.config
        self.clock = VirtualClock()
        self.q = EventQueue(self.clock)
        self.rec = Recorder(self.name)
        self.states = [DeviceState(s, env.trace, seed=self.cfg.seed) for s in env.fleet]
        self.task_counts = [0] * len(env.fleet)
        self.training_now = 0
        self.pace_rng = random.Random(f"pace:{self.cfg.seed}")

    def paced_delay(self, retry_after_s: float) -> float:
        """Return when a paced device asks again, in seconds from now.

        As the edge agent: the retry-after stretched by up to its ``PACE_JITTER``; and no
        sooner than ``idle_checkin_s``.
        """
        from edge_client.agent import PACE_JITTER

        jittered = retry_after_s * (1.0 + self.pace_rng.uniform(0.0, PACE_JITTER))
        return max(jittered, self.cfg.idle_checkin_s)

    # -- helpers
    def next_task_no(self, index: int) -> int:
        self.task_counts[index] += 1
        return self.task_counts[index]

    def evaluate(self, version: int, adapter: Any) -> None:
        with Stopwatch(self.rec.overhead, "evaluation_s"):
            score = self.env.held_out.score(self.env.context.edge_base, adapter, threads=1).union
        self.rec.curve.append((self.q.now, self.rec.accepted, version, score))
        self.rec.event(self.q.now, "version", -1, f"v{version} bpb={score:.6f}")

    def done(self) -> bool:
        return self.rec.accepted >= self.cfg.max_updates

    def train_time(self, spec: DeviceSpec) -> float:
        return self.cfg.local_steps * spec.step_s

    def dropout_point(self, st: DeviceState, start: float, end: float) -> float | None:
        """When a task running from ``start`` to ``end`` is abandoned, or None."""
        if not st.stays_online(self.env.trace, start, end):
            return max(start, min(end, st.next_switch))
        if st.rng.random() < st.spec.dropout:
            return start + float(st.rng.random()) * (end - start)
        return None

    def run(self) -> Recorder:
        import time

        started = time.perf_counter()
        self.start()
        self.q.run(until=self.cfg.duration_s, stop=self.done)
        self.rec.overhead.total_s += time.perf_counter() - started
        self.rec.event(self.q.now, "end", -1, f"accepted={self.rec.accepted}")
        return self.rec

    def start(self) -> None:
        """Record version 0, score it and schedule the first events."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- Estuary


@dataclass
class _Task:
    """One Estuary task of one device: its training, then its cohort task, and accounting.

    ``offer`` is the training task until the device is given its cohort task, then that
    one; ``training_id`` the training task's id.
    """

    index: int
    offer: Any
    client: Any
    device: Any
    asked_at: float
    offered_at: float
    version: int
    training_id: str = ""
    training_from: float = 0.0
    uploaded_at: float = 0.0
    handle: Any = None
    train_s: float = 0.0
    trained: bool = False
    shared_at: float = 0.0
    accepted: bool = False
    relay_staleness: int = 0
    settled: bool = False
    dead: bool = False
    seed: int = 0
    plain: dict[str, np.ndarray] | None = None
    held: int = 0  # bumped whenever a held report ends: a stale wake-up is ignored


def seeded_cohort_ids(seed: int) -> Callable[[], str]:
    """Return a source of cohort ids drawn from ``seed``, for the service to name cohorts.

    The service names cohorts ``uuid4().hex`` by default and orders some work by cohort
    id (the buffer scan, the active set), so random ids would make two runs of one seed
    fold cohorts in different orders. Seeded ids keep a run a function of its inputs;
    nothing else in the service draws randomness that reaches its behaviour.
    """
    rng = random.Random(seed)
    return lambda: uuid.UUID(int=rng.getrandbits(128), version=4).hex


class _Observer:
    def __init__(self, policy: EstuaryPolicy) -> None:
        self.policy = policy

    def event(self, kind: str, **fields: Any) -> None:
        self.policy.on_service_event(kind, fields)


class EstuaryPolicy(Policy):
    """Secure cohorts per class, pacer, staleness weights: the real service (module doc)."""

    name = "estuary"

    def __init__(self, env: FleetEnv, *, keep_updates: bool = False) -> None:
        super().__init__(env)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from cloud_workers.executor import ModelJobExecutor
        from cloud_workers.group import WorkerGroup
        from coordinator.service import FederationService
        from estuary.auth import raw_public_key
        from estuary.state.blobs import BlobStore
        from estuary.state.memory import MemoryStore
        from secure_agg.crypto import VerifiedSignatures

        self.keep_updates = keep_updates
        # Every member of a cohort checks the same signatures (key broadcast, unmask request);
        # the members share this process, so each distinct signature is verified once.
        self.verified_signatures = VerifiedSignatures()
        self.settings = estuary_settings(env)
        self.store = MemoryStore(clock=self.clock.time)
        blob_dir = env.workdir / "estuary-blobs"
        self.blobs = BlobStore(blob_dir, fsync=False)
        self.service = FederationService(
            self.settings,
            store=self.store,
            blobs=self.blobs,
            initial_adapter=env.adapter0,
            clock=self.clock,
            observer=_Observer(self),
            new_cohort_id=seeded_cohort_ids(self.cfg.seed),
        )
        executor = ModelJobExecutor(
            self.store, blobs=self.blobs, base=env.base, eval_windows=env.eval_windows, onnx=False
        )
        self.group = WorkerGroup(
            self.store,
            executor=executor,
            name="local",
            heartbeat_s=1.0,
            reclaim_idle_s=3.0,
            clock=self.clock,
        )
        self.identities: list[Any] = []
        self.devices: list[Any] = []
        for spec in env.fleet:
            key = Ed25519PrivateKey.from_private_bytes(
                hashlib.sha256(f"estuary-fleet:{self.cfg.seed}:{spec.index}".encode()).digest()
            )
            token = self.service.registry.issue_token(device_class=spec.device_class)
            self.devices.append(
                self.service.enroll(
                    token, public_key=raw_public_key(key), device_class=spec.device_class
                )
            )
            self.identities.append(key)
        self.tasks: dict[tuple[str, int], _Task] = {}
        self.waiters: dict[str, dict[int, tuple[_Task, Any, Callable[[Any], None]]]] = {}
        self.stages: dict[str, Any] = {}
        self.cohort_names: dict[str, int] = {}
        self.adapters: dict[int, Any] = {}
        self.assigned: dict[tuple[str, int], int] = {}
        self.plain_updates: dict[str, tuple[float, dict[str, np.ndarray]]] = {}
        # Reports held open while their forming cohort fills: cohort id -> (task, the
        # hold's token, held since).
        self.holds: dict[str, list[tuple[_Task, int, float]]] = {}

    # -- set-up
    def start(self) -> None:
        """Record version 0, score it and schedule the first events."""
        head = self.service.start()
        self.run_jobs()
        self.adapters[0] = self.service.ledger.adapter(head)
        self.evaluate(0, self.adapters[0])
        for st in self.states:
            self.q.at(
                st.next_online(self.env.trace, 0.0), functools.partial(self.checkin, st.spec.index)
            )
        self.q.after(self.cfg.tick_s, self.tick)

    def run_jobs(self) -> None:
        """Execute every queued cloud job now (evaluation, edge artifacts)."""
        with Stopwatch(self.rec.overhead, "cloud_jobs_s"):
            while self.group.step(block_s=0.0):
                pass

    def cname(self, cohort_id: str) -> int:
        """Return the cohort's number in order of first sight (for the log)."""
        return self.cohort_names.setdefault(cohort_id, len(self.cohort_names))

    # -- service events
    def on_service_event(self, kind: str, fields: dict[str, Any]) -> None:
        """Account for one service event (weights, accepted sums, finished cohorts)."""
        if kind == "weight_assigned":
            self.assigned[(str(fields["cohort_id"]), int(fields["member"]))] = int(
                fields["staleness"]
            )
        elif kind == "update_accepted":
            cid = str(fields["cohort_id"])
            for member in fields["survivors"]:
                task = self.tasks.get((cid, int(member)))
                if task is None:
                    continue
                task.accepted = True
                self.rec.accepted += 1
                task.relay_staleness = self.assigned.pop((cid, int(member)), 0)
                self.rec.weight_staleness.add(task.relay_staleness)
                if task.settled and task.trained:  # settled as wasted before: undo
                    self.rec.wasted_s -= task.train_s
                    self.rec.discarded -= 1
                task.settled = True
            self.rec.event(self.q.now, "accepted", -1, f"c{self.cname(cid)} n={fields['updates']}")
        elif kind == "update_dropped":
            # Buffered, then retired at a commit unused (too stale by then): lost work.
            cid = str(fields["cohort_id"])
            for member in range(self.cfg.cohort_max):
                task = self.tasks.get((cid, member))
                if task is not None and task.accepted:
                    task.accepted = False
                    self.rec.accepted -= 1
                    self.rec.weight_staleness.remove(task.relay_staleness)
                    self.rec.wasted_s += task.train_s
                    self.rec.discarded += 1
            self.rec.event(self.q.now, "dropped", -1, f"c{self.cname(cid)} n={fields['updates']}")
        elif kind == "cohort_sealed":
            self.wake_held(str(fields["cohort_id"]))
        elif kind == "cohort_finished":
            cid = str(fields["cohort_id"])
            self.rec.event(self.q.now, "cohort", -1, f"c{self.cname(cid)} {fields['status']}")
            if fields["status"] == "aborted":
                self.rec.aborted += 1

    # -- devices
    def checkin(self, index: int) -> None:
        """Device ``index`` asks for work (if online and idle): Pace or a training task."""
        from coordinator.service import PaceOffer

        st = self.states[index]
        if st.busy:
            return
        now = self.q.now
        if not st.online_at(self.env.trace, now):
            self.q.at(st.next_online(self.env.trace, now), lambda: self.checkin(index))
            return
        with Stopwatch(self.rec.overhead, "service_s"):
            offer = self.service.get_task(self.devices[index])
        if isinstance(offer, PaceOffer):
            # Deferred for a slot, or awake after a task and waiting for the version
            # under way: it comes back when told.
            delay = self.paced_delay(offer.retry_after_s)
            self.rec.wait(offer.mechanism, delay)
            self.q.after(delay, lambda: self.checkin(index))
            return
        self.start_training(index, offer)

    def start_training(self, index: int, offer: Any) -> None:
        """Start a training task: download the artifact, train, then report it."""
        st = self.states[index]
        st.busy = True
        task = _Task(
            index=index,
            offer=offer,
            client=None,
            device=self.devices[index],
            asked_at=self.q.now,
            offered_at=self.q.now,
            version=offer.version,
            seed=self.cfg.task_seed(index, self.next_task_no(index)),
            training_id=offer.task_id,
        )
        st.task = task
        self.rec.tasks += 1
        self.rec.event(self.q.now, "task", index, f"train v{offer.version}")
        self._train(task)

    def report(self, task: _Task) -> None:
        """Report a trained device's update: wait for its cohort, then run it."""
        from coordinator.errors import FailedPrecondition
        from coordinator.service import PaceOffer

        if task.dead:
            return
        try:
            with Stopwatch(self.rec.overhead, "service_s"):
                offer = self.service.get_task(task.device, trained_task_id=task.training_id)
        except FailedPrecondition as exc:
            # Not wanted any more (expired, too stale): the work is lost.
            self.end_task(task, f"refused: {exc}")
            return
        if isinstance(offer, PaceOffer):
            if offer.forming_cohort_id:
                self.hold(task, offer.forming_cohort_id)
                return
            delay = self.paced_delay(offer.retry_after_s)
            self.rec.wait(offer.mechanism, delay)
            self.q.after(delay, lambda: self.report(task))
            return
        self.start_cohort(task, offer)

    def hold(self, task: _Task, cohort_id: str) -> None:
        """Hold the report open, as the gRPC service does (``wait_ms``), while it forms.

        Woken when ``cohort_id`` is sealed, one poll interval of the held call later (it
        reads the device's assignment every ``AWAIT_POLL_INTERVAL_S``), or at the end of
        the agent's wait (``MAX_LONG_POLL_MS``), when it reports again at once.
        """
        from estuary.transport import MAX_LONG_POLL_MS

        task.held += 1
        token, since = task.held, self.q.now
        self.holds.setdefault(cohort_id, []).append((task, token, since))

        def wait_over() -> None:
            if task.held == token and not task.dead:
                task.held += 1
                self.rec.wait("cohort_formation", self.q.now - since)
                self.report(task)

        self.q.after(MAX_LONG_POLL_MS / 1000, wait_over)

    def wake_held(self, cohort_id: str) -> None:
        """Answer the reports held for ``cohort_id``, which was just sealed."""
        from coordinator.grpc_service import AWAIT_POLL_INTERVAL_S

        for task, token, since in self.holds.pop(cohort_id, []):
            if task.held != token or task.dead:
                continue
            task.held += 1
            self.rec.wait("cohort_formation", self.q.now + AWAIT_POLL_INTERVAL_S - since)
            self.q.after(AWAIT_POLL_INTERVAL_S, functools.partial(self.report, task))

    def start_cohort(self, task: _Task, offer: Any) -> None:
        """Start the cohort task: a fresh secure-aggregation client advertises its keys."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        from secure_agg import Client, Stage

        index = task.index
        peers = (
            {i: Ed25519PublicKey.from_public_bytes(k) for i, k in enumerate(offer.identity_keys)}
            if offer.session.active
            else None
        )
        task.client = Client(
            offer.member_index,
            config=offer.session,
            identity=self.identities[index] if offer.session.active else None,
            peer_identities=peers,
            verified=self.verified_signatures if offer.session.active else None,
        )
        task.offer = offer
        task.offered_at = self.q.now
        self.tasks[(offer.cohort_id, offer.member_index)] = task
        self.rec.event(
            self.q.now,
            "cohort",
            index,
            f"c{self.cname(offer.cohort_id)} m{offer.member_index} v{offer.version}",
        )
        with Stopwatch(self.rec.overhead, "device_secagg_s"):
            advert = task.client.advertise().encode()
        self.send(
            task,
            Stage.ADVERTISE_KEYS,
            advert,
            then=lambda: self.wait_for(
                task, Stage.ADVERTISE_KEYS, lambda r: self._on_share_keys(task, r)
            ),
        )

    def send(self, task: _Task, stage: Any, payload: bytes, *, then: Callable[[], None]) -> None:
        """Deliver a member's message after its latency and upload time, then ``then()``."""
        from coordinator.errors import ServiceError

        spec = self.env.fleet[task.index]
        self.rec.bytes_up += len(payload)

        def deliver() -> None:
            if task.dead:
                return
            cid = task.offer.cohort_id
            try:
                with Stopwatch(self.rec.overhead, "service_s"):
                    after = self.service.send_secagg(task.device, cid, stage, payload)
            except ServiceError as exc:
                self.end_task(task, f"refused: {exc}")
                return
            then()
            self.wake_if_changed(cid, after)

        self.q.after(spec.latency_s + len(payload) / spec.bandwidth_up, deliver)

    def wait_for(self, task: _Task, after: Any, handler: Callable[[Any], None]) -> None:
        """Wait for the member's next message after ``after`` (long poll)."""
        cid = task.offer.cohort_id
        self.waiters.setdefault(cid, {})[task.offer.member_index] = (task, after, handler)
        self.poll(task)

    def poll(self, task: _Task) -> None:
        """Poll once; a reply reaches ``handler`` after its download time."""
        from coordinator.errors import ServiceError
        from secure_agg import Stage

        cid, member = task.offer.cohort_id, task.offer.member_index
        waiting = self.waiters.get(cid, {}).get(member)
        if waiting is None or task.dead:
            return
        _task, after, handler = waiting
        try:
            with Stopwatch(self.rec.overhead, "service_s"):
                reply = self.service.poll_secagg(task.device, cid, after)
        except ServiceError as exc:
            self.end_task(task, f"refused: {exc}")
            return
        if reply is None:
            return
        del self.waiters[cid][member]
        if reply.stage is Stage.ABORTED:
            stale = "too stale" in reply.abort_reason
            self.end_task(task, "refused" if stale else f"aborted: {reply.abort_reason}")
            return
        spec = self.env.fleet[task.index]
        self.rec.bytes_down += len(reply.payload)
        self.q.after(
            spec.latency_s + len(reply.payload) / spec.bandwidth_down,
            lambda: None if task.dead else handler(reply),
        )

    def wake_if_changed(self, cid: str, stage: Any) -> None:
        """Poll the cohort's waiting members again if its stage moved."""
        if self.stages.get(cid) is stage:
            return
        self.stages[cid] = stage
        for member in sorted(self.waiters.get(cid, {})):
            entry = self.waiters[cid].get(member)
            if entry is not None:
                self.poll(entry[0])

    def tick(self) -> None:
        """Do the service's periodic work, then wake the cohorts that moved."""
        with Stopwatch(self.rec.overhead, "service_s"):
            committed = self.service.tick()
        if committed is not None:
            self.on_commit(committed)
        for cid in sorted(self.waiters):
            if not self.waiters[cid]:
                del self.waiters[cid]
                self.stages.pop(cid, None)
                continue
            self.wake_if_changed(cid, self.service.cohort_stage(cid))
        self.q.after(self.cfg.tick_s, self.tick)

    def on_commit(self, head: Any) -> None:
        """Count the updates folded in at their staleness, run the cloud jobs, score it."""
        # Each update at the staleness the commit priced it at (members of a cohort may
        # have trained on different versions).
        for s, n in head.folded_staleness:
            self.rec.staleness.add(s, n)
        self.run_jobs()
        adapter = self.service.ledger.adapter(head)
        self.adapters[head.version] = adapter
        for v in [v for v in self.adapters if v < head.version - self.cfg.max_staleness - 1]:
            del self.adapters[v]
        self.evaluate(head.version, adapter)

    def end_task(self, task: _Task, outcome: str) -> None:
        """Finish a task; wasted work is settled unless the update may still count."""
        if task.dead:
            return
        task.dead = True
        cid, member = task.offer.cohort_id, task.offer.member_index
        self.waiters.get(cid, {}).pop(member, None)
        # A completed member is settled when its cohort's sum is accepted (at a later
        # tick); only work that can no longer count is settled as wasted here.
        if task.trained and not task.accepted and not task.settled and outcome != "completed":
            task.settled = True
            self.rec.wasted_s += task.train_s
            if outcome.startswith("refused"):
                self.rec.refused += 1
            else:
                self.rec.discarded += 1
        self.rec.event(self.q.now, "end", task.index, outcome.split(":")[0])
        st = self.states[task.index]
        st.busy = False
        st.task = None
        self.q.after(0.0, lambda: self.checkin(task.index))

    # -- the per-task protocol steps, after the key broadcast arrives

    def _on_share_keys(self, task: _Task, reply: Any) -> None:
        from secure_agg import Stage

        with Stopwatch(self.rec.overhead, "device_secagg_s"):
            out = task.client.handle(reply.payload)
        self.rec.wait("key_exchange", self.q.now - task.offered_at)
        task.shared_at = self.q.now
        self.send(
            task,
            Stage.SHARE_KEYS,
            out.encode(),
            then=lambda: self.wait_for(task, Stage.SHARE_KEYS, lambda r: self._upload(task, r)),
        )

    def _train(self, task: _Task) -> None:
        st = self.states[task.index]
        spec = st.spec
        now = self.q.now
        size = self.env.download_bytes(spec, first=self.task_counts[task.index] == 1)
        self.rec.bytes_down += size
        download = spec.latency_s + size / spec.bandwidth_down
        train_s = self.train_time(spec)
        end = now + download + train_s
        task.training_from = now + download
        drop = self.dropout_point(st, now, end)
        self.training_now += 1
        self.rec.max_training = max(self.rec.max_training, self.training_now)
        if drop is not None:

            def dropped() -> None:
                self.training_now -= 1
                self.rec.dropouts += 1
                self.rec.dropout_s += max(0.0, drop - now - download)
                self.end_task(task, "dropout")

            self.q.at(drop, dropped)
            return
        adapter = self.adapters[task.version]
        with Stopwatch(self.rec.overhead, "training_wait_s"):
            request = self.env.request(spec, adapter, task.seed, columns=task.offer.columns or None)
            task.handle = self.env.trainer.submit(request)
        task.train_s = train_s
        self._heartbeat(task, end)

        def trained() -> None:
            self.training_now -= 1
            if task.dead:
                return
            task.trained = True
            self.rec.trained += 1
            self.rec.work_s += train_s
            self.rec.wait("training", download + train_s)
            self.report(task)

        self.q.at(end, trained)

    def _heartbeat(self, task: _Task, end: float) -> None:
        step = self.cfg.heartbeat_s

        def beat() -> None:
            if task.dead or task.trained:
                return
            with Stopwatch(self.rec.overhead, "service_s"):
                reply = self.service.heartbeat(task.device, task.offer.task_id)
            if reply.abandon:
                self.training_now -= 1
                # Its version can no longer count: its work so far is lost.
                elapsed = max(0.0, self.q.now - task.training_from)
                self.rec.work_s += elapsed
                self.rec.wasted_s += elapsed
                self.rec.discarded += 1
                task.dead = True
                st = self.states[task.index]
                st.busy = False
                self.rec.event(self.q.now, "end", task.index, "abandoned")
                self.q.after(0.0, lambda: self.checkin(task.index))
                return
            if self.q.now + step < end:
                self.q.after(step, beat)

        if self.q.now + step < end:
            self.q.after(step, beat)

    def _upload(self, task: _Task, reply: Any) -> None:
        from edge_client.exchange import clipped_update, mask
        from secure_agg import Stage

        self.rec.wait("relay_wait", self.q.now - task.shared_at)
        spec = self.env.fleet[task.index]
        with Stopwatch(self.rec.overhead, "device_secagg_s"):
            task.client.handle(reply.payload)
        with Stopwatch(self.rec.overhead, "training_wait_s"):
            outcome = self.env.trainer.result(task.handle)
        with Stopwatch(self.rec.overhead, "device_secagg_s"):
            update = clipped_update(task.offer.session, outcome.delta_b)
            masked = mask(
                task.client, update, weight=reply.weight, rng=np.random.default_rng(task.seed)
            )
        if self.keep_updates:
            task.plain = {n: reply.weight * u for n, u in update.items()}
            self.plain_updates[f"{task.offer.cohort_id}-{task.offer.member_index}"] = (
                reply.weight,
                update,
            )
        self.rec.bytes_up += len(masked)
        sha = hashlib.sha256(masked).hexdigest()
        uploaded_at = self.q.now

        def deliver() -> None:
            from coordinator.errors import ServiceError

            if task.dead:
                return
            cid = task.offer.cohort_id
            try:
                with Stopwatch(self.rec.overhead, "service_s"):
                    self.service.upload_masked(
                        task.device,
                        task_id=task.offer.task_id,
                        cohort_id=cid,
                        payload=masked,
                        sha256=sha,
                    )
            except ServiceError as exc:
                self.end_task(task, f"refused: {exc}")
                return
            task.uploaded_at = uploaded_at
            self.wait_for(task, Stage.MASKED_INPUT, lambda r: self._after_upload(task, r))
            self.wake_if_changed(cid, self.service.cohort_stage(cid))

        self.q.after(spec.latency_s + len(masked) / spec.bandwidth_up, deliver)

    def _after_upload(self, task: _Task, reply: Any) -> None:
        from secure_agg import Stage

        if reply.stage is Stage.CONSISTENCY_CHECK:
            with Stopwatch(self.rec.overhead, "device_secagg_s"):
                out = task.client.handle(reply.payload)
            self.send(task, Stage.CONSISTENCY_CHECK, out.encode(),
                      then=lambda: self.wait_for(task, Stage.CONSISTENCY_CHECK,
                                                 lambda r: self._unmask(task, r)))  # fmt: skip
        else:
            self._unmask(task, reply)

    def _unmask(self, task: _Task, reply: Any) -> None:
        from secure_agg import Stage

        with Stopwatch(self.rec.overhead, "device_secagg_s"):
            out = task.client.handle(reply.payload)

        def done_handler(_reply: Any) -> None:
            self._done(task)

        self.send(
            task,
            Stage.UNMASKING,
            out.encode(),
            then=lambda: self.wait_for(task, Stage.UNMASKING, done_handler),
        )

    def _done(self, task: _Task) -> None:
        self.rec.wait("unmask_wait", self.q.now - task.uploaded_at)
        self.end_task(task, "completed")


def expected_task_s(cfg: FleetConfig, trace: DeviceTrace, device_class: str) -> float:
    """Return what the pacer expects a task of ``device_class`` to take, in seconds.

    The median device's training plus a few seconds of messages.
    """
    (c,) = [c for c in trace.classes if c.name == device_class]
    return cfg.local_steps * c.step_s.median + 10.0


def estuary_settings(env: FleetEnv) -> Any:
    """Return the coordinator settings of an Estuary run on ``env`` (classes from the trace)."""
    from estuary.config.models import CoordinatorSettings

    cfg = env.config
    classes = [
        {
            "name": c.name,
            "rank": min(c.rank, cfg.r_max),
            "expected_task_s": expected_task_s(cfg, env.trace, c.name),
        }
        for c in env.trace.classes
    ]
    return CoordinatorSettings.model_validate(
        dict(
            node_id="fleet",
            tls={"allow_plaintext": True},
            model={"preset": "tiny", "r_max": cfg.r_max},
            device_classes=classes,
            server={"device_requests_per_s": 1e9, "device_burst": 1_000_000},
            aggregation={
                "buffer_size": cfg.buffer_size,
                "server_lr": cfg.server_lr,
                "staleness": "polynomial",
                "staleness_a": cfg.staleness_a,
                "max_staleness": cfg.max_staleness,
            },
            pacing={
                "target_staleness": cfg.target_staleness,
                "retry_after_min_s": cfg.retry_after_s,
            },
            cohort={
                "min_size": cfg.cohort_min,
                "max_size": cfg.cohort_max,
                "threshold_fraction": cfg.threshold_fraction,
                "formation_s": cfg.formation_s,
                "deadline_s": cfg.deadline_s,
                "key_timeout_s": cfg.key_timeout_s,
                "silence_s": cfg.silence_s,
                "bits": 32,
                "clip_norm": cfg.clip_norm,
            },
            training={
                "local_steps": cfg.local_steps,
                "learning_rate": cfg.learning_rate,
                "rank_lr_power": cfg.rank_lr_power,
                "column_rule": cfg.column_rule,
                "warmup_steps": cfg.warmup_steps,
                "batch_size": cfg.batch_size,
                "seq_len": cfg.seq_len,
                "grad_clip_norm": cfg.grad_clip_norm,
            },
        )
    )


def _ledger(policy: Policy, buffer_size: int) -> Any:
    from coordinator.staleness import StalenessPolicy
    from coordinator.versions import VersionLedger
    from estuary.state.blobs import BlobStore
    from estuary.state.memory import MemoryStore

    cfg = policy.cfg
    store = MemoryStore(clock=policy.clock.time)
    blobs = BlobStore(policy.env.workdir / f"{policy.name}-blobs", fsync=False)
    staleness = StalenessPolicy(
        kind="polynomial", a=cfg.staleness_a, b=4, max_staleness=cfg.max_staleness
    )
    ledger = VersionLedger(
        store,
        blobs=blobs,
        holder=policy.name,
        buffer_size=buffer_size,
        server_lr=cfg.server_lr,
        lease_ttl_s=30.0,
        clock=policy.clock,
        staleness=staleness,
    )
    return ledger, staleness


def _clipped(cfg: FleetConfig, delta_b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ΔB clipped to the L2 bound as secure aggregation clips it (same rule for all)."""
    from secure_agg.numerics import clip_update

    flat = {n: np.ascontiguousarray(v).reshape(-1) for n, v in sorted(delta_b.items())}
    clipped = clip_update(flat, clip=cfg.clip_norm, per_tensor=False)
    return {n: clipped[n].reshape(delta_b[n].shape) for n in flat}


class FedBuffPolicy(Policy):
    """Plain FedBuff: no cohorts, no secure aggregation, same buffer and staleness rule."""

    name = "fedbuff"

    def __init__(self, env: FleetEnv) -> None:
        super().__init__(env)
        from coordinator.admission import PaceQueue, pacer_config
        from estuary.state.memory import MemoryStore

        self.ledger, self.staleness = _ledger(self, self.cfg.buffer_size)
        # The pacer Estuary's service runs with, from the same settings.
        settings = estuary_settings(env)
        self.pacer = pacer_config(settings)
        self.concurrency = self.pacer.max_concurrency
        self.queue = PaceQueue(MemoryStore(clock=self.clock.time), clock=self.clock)
        self.task_s = {c.name: c.expected_task_s for c in settings.device_classes}
        self.fastest_task_s = min(self.task_s.values())
        self.active = 0
        self.adapters: dict[int, Any] = {}
        self.updates = 0

    def start(self) -> None:
        """Record version 0, score it and schedule the first events."""
        head = self.ledger.initialise(self.env.adapter0)
        self.adapters[0] = self.ledger.adapter(head)
        self.evaluate(0, self.adapters[0])
        for st in self.states:
            self.q.at(
                st.next_online(self.env.trace, 0.0), functools.partial(self.checkin, st.spec.index)
            )

    def head(self) -> int:
        """Return the head version."""
        head = self.ledger.head()
        return head.version if head else 0

    def checkin(self, index: int) -> None:
        """Device ``index`` asks for work (if online and idle)."""
        st = self.states[index]
        if st.busy:
            return
        now = self.q.now
        if not st.online_at(self.env.trace, now):
            self.q.at(st.next_online(self.env.trace, now), lambda: self.checkin(index))
            return
        if self.active >= self.concurrency:
            # The same pacer rule and queue as Estuary's: this device's turn comes after
            # the ones already waiting, and it asks again then (with the agent's jitter).
            from coordinator.pacing import Defer, decide

            spec = st.spec
            decision = decide(
                self.pacer,
                active=self.active,
                waiting=self.queue.waiting(),
                expected_task_s=self.task_s[spec.device_class],
                fastest_task_s=self.fastest_task_s,
            )
            assert isinstance(decision, Defer)  # the pacer's cap is this concurrency
            if decision.queued:
                self.queue.add(str(index), decision.retry_after_s)
            delay = self.paced_delay(decision.retry_after_s)
            self.rec.wait("pacing", delay)
            self.q.after(delay, lambda: self.checkin(index))
            return
        self.begin(index)

    def begin(self, index: int) -> None:
        """Start a task on the head version: download, train, upload plain ΔB."""
        st = self.states[index]
        spec = st.spec
        st.busy = True
        self.active += 1
        self.rec.tasks += 1
        version = self.head()
        task_no = self.next_task_no(index)
        seed = self.cfg.task_seed(index, task_no)
        now = self.q.now
        size = self.env.download_bytes(spec, first=task_no == 1)
        up = self.env.plain_bytes(min(spec.rank, self.cfg.r_max))
        self.rec.bytes_down += size
        download = 2 * spec.latency_s + size / spec.bandwidth_down
        train_s = self.train_time(spec)
        end = now + download + train_s
        self.rec.event(now, "task", index, f"v{version}")
        self.training_now += 1
        self.rec.max_training = max(self.rec.max_training, self.training_now)
        drop = self.dropout_point(st, now, end)

        def finish(outcome: str) -> None:
            st.busy = False
            self.active -= 1
            self.rec.event(self.q.now, "end", index, outcome)
            self.q.after(0.0, lambda: self.checkin(index))

        if drop is not None:

            def dropped() -> None:
                self.training_now -= 1
                self.rec.dropouts += 1
                self.rec.dropout_s += max(0.0, drop - now - download)
                finish("dropout")

            self.q.at(drop, dropped)
            return
        with Stopwatch(self.rec.overhead, "training_wait_s"):
            columns = self.env.columns(spec, version=version, member=spec.index)
            request = self.env.request(spec, self.adapters[version], seed, columns=columns)
            handle = self.env.trainer.submit(request)

        def trained() -> None:
            self.training_now -= 1
            self.rec.trained += 1
            self.rec.work_s += train_s
            self.rec.wait("training", download + train_s)
            self.rec.bytes_up += up
            self.q.after(spec.latency_s + up / spec.bandwidth_up, lambda: arrive())

        def arrive() -> None:
            from coordinator.staleness import StaleUpdate

            try:
                s = self.staleness.staleness(trained_on=version, current=self.head())
            except StaleUpdate:
                self.rec.refused += 1
                self.rec.wasted_s += train_s
                finish("refused")
                return
            with Stopwatch(self.rec.overhead, "training_wait_s"):
                outcome = self.env.trainer.result(handle)
            w = self.staleness.weight(s)
            update = _clipped(self.cfg, outcome.delta_b)
            self.updates += 1
            self.ledger.add_cohort_sum(
                f"u{self.updates}",
                weighted_sum={n: w * u for n, u in update.items()},
                weight_total=w,
                updates=1,
                trained_on=version,
            )
            self.rec.accepted += 1
            self.rec.staleness.add(s)
            committed = self.ledger.try_commit()
            finish("completed")
            if committed is not None:
                self.adapters[committed.version] = self.ledger.adapter(committed)
                for v in [
                    v for v in self.adapters if v < committed.version - self.cfg.max_staleness - 1
                ]:
                    del self.adapters[v]
                self.evaluate(committed.version, self.adapters[committed.version])

        self.q.at(end, trained)


class SyncFedAvgPolicy(Policy):
    """Synchronous rounds with over-selection, a round deadline and secure aggregation."""

    name = "sync_fedavg"

    def __init__(self, env: FleetEnv) -> None:
        super().__init__(env)
        # Every round commits whatever it gathered, as one mean step (FedAvg).
        self.ledger, _ = _ledger(self, 1)
        self.round = 0
        self.select_rng = np.random.default_rng([self.cfg.seed, 0x5C])
        self.adapter: Any = None

    def start(self) -> None:
        """Record version 0, score it and schedule the first events."""
        head = self.ledger.initialise(self.env.adapter0)
        self.adapter = self.ledger.adapter(head)
        self.evaluate(0, self.adapter)
        self.q.at(0.0, self.run_round)

    def run_round(self) -> None:
        """Run one round from selection to commit (or abort)."""
        from secure_agg import Stage
        from secure_agg.driver import run_local
        from secure_agg.errors import SecAggError

        cfg, trace, now = self.cfg, self.env.trace, self.q.now
        self.round += 1
        online = [st for st in self.states if st.online_at(trace, now)]
        want = math.ceil(cfg.sync_clients * (1 + cfg.sync_over_selection))
        if len(online) < cfg.sync_clients:
            # Not enough devices online for a round: try again a little later.
            self.rec.wait("round_waiting_for_devices", 60.0)
            self.q.after(60.0, self.run_round)
            return
        picks = sorted(
            int(i) for i in self.select_rng.choice(len(online), size=min(want, len(online)),
                                                   replace=False)
        )  # fmt: skip
        selected = [online[i] for i in picks]
        self.rec.max_training = max(self.rec.max_training, len(selected))
        head = self.ledger.head()
        version = head.version if head else 0
        deadline = now + cfg.sync_deadline_s
        finishes: list[tuple[float, int, float]] = []  # (finish time, position, train_s)
        dropped_work = 0.0
        for pos, st in enumerate(selected):
            spec = st.spec
            self.rec.tasks += 1
            size = self.env.download_bytes(spec, first=self.task_counts[spec.index] == 0)
            self.task_counts[spec.index] += 1
            self.rec.bytes_down += size
            # Task and key broadcast down, keys and shares up: two round trips first.
            start_train = now + 4 * spec.latency_s + size / spec.bandwidth_down
            train_s = self.train_time(spec)
            end_train = start_train + train_s
            drop = self.dropout_point(st, now, end_train)
            if drop is not None:
                self.rec.dropouts += 1
                dropped_work += max(0.0, min(drop, deadline) - start_train)
                continue
            finishes.append((end_train + spec.latency_s, pos, train_s))
        finishes.sort()
        survivors = [f for f in finishes if f[0] <= deadline][: cfg.sync_clients]
        self.rec.dropout_s += dropped_work
        threshold = max(2, math.ceil(cfg.threshold_fraction * len(selected)))
        chosen = {pos for _, pos, _ in survivors}
        for f_time, pos, train_s in finishes:
            # Late reporters and stragglers cut at the round's end: discarded work.
            end_round = survivors[-1][0] if len(survivors) == cfg.sync_clients else deadline
            done_s = train_s if f_time <= end_round else max(0.0, train_s - (f_time - end_round))
            self.rec.work_s += done_s
            if pos not in chosen or len(survivors) < threshold:
                self.rec.wasted_s += done_s
                self.rec.discarded += 1
        if len(survivors) == cfg.sync_clients:
            end_round = survivors[-1][0]
            self.rec.wait("round_straggler_wait", end_round - now)
        else:
            end_round = deadline
            self.rec.wait("round_deadline_wait", deadline - now)
        lat = max((selected[pos].spec.latency_s for pos in chosen), default=0.0)
        end_round += 4 * lat  # survivors signed, then unmasking shares
        self.rec.event(now, "round", -1, f"r{self.round} sel={len(selected)} ok={len(survivors)}")
        if len(survivors) < threshold:
            self.rec.aborted += 1
            self.q.at(end_round, self.run_round)
            return
        self.rec.trained += len(survivors)
        handles = []
        with Stopwatch(self.rec.overhead, "training_wait_s"):
            for _, pos, _ in survivors:
                st = selected[pos]
                seed = self.cfg.task_seed(st.spec.index, self.task_counts[st.spec.index])
                columns = self.env.columns(st.spec, version=self.round - 1, member=pos)
                request = self.env.request(st.spec, self.adapter, seed, columns=columns)
                handles.append(self.env.trainer.submit(request))
            outcomes = [self.env.trainer.result(h) for h in handles]
        updates = [_clipped(cfg, o.delta_b) for o in outcomes]
        # One secure-aggregation session over the selected devices that were still there
        # after the key exchange; the late ones never send a masked input.
        inputs: list[dict[str, np.ndarray]] = []
        drop_at: dict[int, Any] = {}
        by_pos = {pos: u for (_, pos, _), u in zip(survivors, updates, strict=True)}
        zeros = {n: np.zeros_like(u) for n, u in updates[0].items()}
        for pos in range(len(selected)):
            inputs.append(by_pos.get(pos, zeros))
            if pos not in by_pos:
                drop_at[len(inputs) - 1] = Stage.MASKED_INPUT
        try:
            # One local driver runs the server and every client: both sides in one figure.
            with Stopwatch(self.rec.overhead, "service_s"):
                result = run_local(
                    inputs,
                    threshold=threshold,
                    clip=cfg.clip_norm,
                    bits=32,
                    drop=drop_at,
                    seed=self.cfg.task_seed(-1, self.round),
                    active=True,
                )
        except SecAggError as exc:
            self.rec.aborted += 1
            self.rec.event(now, "round_aborted", -1, str(exc))
            self.q.at(end_round, self.run_round)
            return
        self.rec.bytes_up += sum(result.bytes_up)
        self.rec.bytes_down += sum(result.bytes_down)
        assert isinstance(result.float_sum, dict)
        n = len(survivors)

        def commit() -> None:
            self.ledger.add_cohort_sum(
                f"r{self.round}",
                weighted_sum=result.float_sum,
                weight_total=float(n),
                updates=n,
                trained_on=version,
            )
            committed = self.ledger.try_commit()
            assert committed is not None
            self.rec.accepted += n
            for _ in range(n):
                self.rec.staleness.add(0)
            self.adapter = self.ledger.adapter(committed)
            self.evaluate(committed.version, self.adapter)
            self.run_round()

        self.q.at(end_round, commit)
