"""``estuary simulate``: a whole federation on one machine, over real gRPC on loopback.

One process holds the coordinator (its gRPC server, the federation service and a local
cloud worker), and every simulated device is an :class:`edge_client.agent.EdgeAgent`
running as an asyncio task that talks to the coordinator through a loopback channel,
exactly as a device would across the network: enrolment with a one-time token, signed
requests, pacing, artifact download, secure aggregation, masked upload.

Clients are standard-library packages (one package's text = one device's private data),
split into device classes round-robin. A client vanishes from its cohort task (after
training, as it joins the key exchange) with probability ``dropout``; its cohort goes
on without it (secure aggregation tolerates dropouts down to the threshold). Each
committed version is scored on every client's held-out text; at the end the run folder
holds the effective config, ``metrics.jsonl``, ``summary.json`` and the plots.

A preset base is pretrained once, before the federation starts, and cached under
``out_dir/.cache``; that one-off pretraining logs its progress and is timed apart:
``time_limit_s`` and ``federation_wall_time_s`` count the federation alone. A run that
commits fewer versions than asked records why in ``summary.json`` (``shortfall``), and
the command exits non-zero with that reason.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.config.models import (
    CoordinatorSettings,
    ServerSettings,
    ServerTLSSettings,
    SimulationSettings,
)
from estuary.data.stdlib import DEFAULT_CLIENT_PACKAGES
from estuary.data.windows import client_seed
from simulation.machine_clock import ContentionProbe, DilatedClock, LoadGovernor, RateStats
from simulation.report import StalenessHistogram, progress_note

if TYPE_CHECKING:
    from torch import nn

    from estuary.data import ClientData

log = logging.getLogger(__name__)

#: Standard-library packages that back simulated clients, in order of use: the data
#: module's default twelve, then more packages present in every CPython 3.10+.
SIM_PACKAGES = (
    *DEFAULT_CLIENT_PACKAGES,
    "html",
    "ctypes",
    "xmlrpc",
    "wsgiref",
    "encodings",
    "tkinter",
    "idlelib",
    "curses",
    "dbm",
    "zoneinfo",
    "venv",
    "pydoc_data",
)

#: Training bytes per client in the scarce regime: about two pages of text, where pooling
#: knowledge across devices pays off over training alone.
SCARCE_TRAIN_BYTES = 4096

#: Held-out windows per client used to score every version (evenly spaced).
EVAL_WINDOWS_PER_CLIENT = 8

#: Pretraining steps of a preset base when the settings name no model directory.
PRETRAIN_STEPS = 200
#: Seed of that pretraining (initialisation and sampling): one cached base per preset.
PRETRAIN_SEED = 0


@dataclass
class RunStats:
    """What the observer saw during the run.

    ``staleness`` counts *accepted* updates (those that entered an aggregate) by how many
    versions behind they trained, so its total is ``accepted``. A member is handed its
    weight before it uploads (``weight_assigned``) and may still drop out after that; its
    staleness is held until its cohort finishes and counted only if the member is among
    the survivors of an accepted cohort sum (``update_accepted``).
    """

    dropouts: int = 0
    rejected: int = 0
    accepted: int = 0
    #: Of ``accepted``: retired at a commit without being folded in (too stale by then).
    dropped: int = 0
    cohorts: dict[str, int] = field(default_factory=dict)
    #: Aborted cohorts by reason, numbers replaced by ``#`` so like reasons add up.
    abort_reasons: dict[str, int] = field(default_factory=dict)
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)
    #: Updates folded into a version, by the staleness the commit priced them at (``v −
    #: t_c``, never below the relay's): its total lags ``accepted`` by the updates still
    #: buffered and those dropped at a commit.
    folded: StalenessHistogram = field(default_factory=StalenessHistogram)
    #: Staleness of each member handed a weight, by cohort, until the cohort finishes.
    _assigned: dict[str, dict[int, int]] = field(default_factory=dict, repr=False)

    def observe(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Count one coordinator event (:class:`coordinator.outcomes.ServiceObserver`)."""
        if kind == "weight_assigned":
            members = self._assigned.setdefault(str(fields["cohort_id"]), {})
            members[int(fields["member"])] = int(fields["staleness"])
        elif kind == "update_accepted":
            cohort_id = str(fields["cohort_id"])
            updates = int(fields["updates"])
            self.accepted += updates
            self.dropouts += int(fields.get("dropouts", 0))
            assigned = self._assigned.pop(cohort_id, {})
            known = [assigned[int(m)] for m in fields["survivors"] if int(m) in assigned]
            if len(known) != updates:
                # One replica hands out every weight of a simulation, so this is a bug.
                log.warning(
                    "cohort %s: %d updates accepted but the staleness of %d is known; the "
                    "staleness histogram misses the others",
                    cohort_id,
                    updates,
                    len(known),
                )
            for staleness in known:
                self.staleness.add(staleness)
        elif kind == "update_rejected":
            self.rejected += 1
        elif kind == "update_dropped":
            self.dropped += int(fields["updates"])
        elif kind == "version_committed":
            for staleness, updates in fields.get("folded_staleness", ()):
                self.folded.add(int(staleness), int(updates))
        elif kind == "cohort_finished":
            self._assigned.pop(str(fields["cohort_id"]), None)
            status = str(fields["status"])
            self.cohorts[status] = self.cohorts.get(status, 0) + 1
            if status == "aborted":
                self.dropouts += int(fields.get("size", 0))
                reason = re.sub(r"\d+", "#", str(fields.get("reason") or "no reason given"))
                self.abort_reasons[reason] = self.abort_reasons.get(reason, 0) + 1


class _SimObserver:
    """Feeds the coordinator's events into ``metrics.jsonl`` and the run totals."""

    def __init__(self, metrics: Any, stats: RunStats) -> None:
        self.metrics = metrics
        self.stats = stats
        # Events arrive from gRPC handler threads and the tick loop at once.
        self._lock = threading.Lock()

    def event(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self.stats.observe(kind, fields)
        if kind == "paced":
            return  # too frequent to log
        self.metrics.event(kind, **fields)


def select_packages(count: int) -> tuple[str, ...]:
    """Return the first ``count`` packages of :data:`SIM_PACKAGES` present here."""
    from estuary.data import stdlib_root

    root = stdlib_root()
    present = tuple(p for p in SIM_PACKAGES if any((root / p).glob("*.py")))
    if count > len(present):
        raise ValueError(
            f"clients: {count} exceeds the {len(present)} standard-library packages available "
            f"as simulated clients ({', '.join(present)})"
        )
    return present[:count]


def coordinator_settings(settings: SimulationSettings) -> CoordinatorSettings:
    """Return the settings of the in-process coordinator of a simulation."""
    return CoordinatorSettings(
        node_id="sim",
        server=ServerSettings(
            listen="127.0.0.1:0",
            metrics_port=0,
            # Simulated devices share one machine: the limit guards replicas from
            # misbehaving devices, which a simulation does not have.
            device_requests_per_s=1000.0,
            device_burst=1000,
        ),
        tls=ServerTLSSettings(allow_plaintext=True),
        state=settings.state,
        model=settings.model,
        device_classes=settings.device_classes,
        aggregation=settings.aggregation,
        pacing=settings.pacing,
        cohort=settings.cohort,
        training=settings.training,
        workers="local",
    )


@dataclass(frozen=True)
class BaseInfo:
    """Where the run's base came from and what making it cost.

    Attributes
    ----------
    path
        The Hugging Face directory the base was loaded from.
    source
        ``"model.path"`` (the settings named it), ``"cache"`` (a preset pretrained by an
        earlier run) or ``"pretrained"`` (pretrained by this run, now cached).
    pretrain_s
        Seconds this run spent pretraining (0 unless ``source`` is ``"pretrained"``).
    """

    path: Path
    source: Literal["model.path", "cache", "pretrained"]
    pretrain_s: float = 0.0


def load_or_pretrain_base(
    settings: SimulationSettings, cache_dir: Path, *, clock: Clock = SYSTEM_CLOCK
) -> tuple[nn.Module, BaseInfo]:
    """Return the full-precision base and where it came from.

    The settings' model directory if they name one; else their preset pretrained on the
    standard library's top-level modules (never on client packages), made once with
    :func:`estuary.model.pretrain.ensure_pretrained_preset` and cached under
    ``cache_dir``. Pretraining logs its progress (step, loss, elapsed) and is timed on
    ``clock``.
    """
    from estuary.config.models import ModelSettings
    from estuary.model.loading import load_base
    from estuary.model.pretrain import ProgressLog, cached_preset_dir, ensure_pretrained_preset

    if settings.model.path is not None:
        return load_base(settings.model), BaseInfo(path=settings.model.path, source="model.path")
    preset = settings.model.preset or "tiny"
    target = cached_preset_dir(cache_dir, preset, steps=PRETRAIN_STEPS, seed=PRETRAIN_SEED)
    if (target / "config.json").is_file():
        info = BaseInfo(path=target, source="cache")
        log.info("base: the %s preset pretrained by an earlier run, from %s", preset, target)
    else:
        log.info(
            "pretraining the %s preset base once: %d steps on the standard library's "
            "top-level modules, cached in %s for later runs; not counted in time_limit_s",
            preset,
            PRETRAIN_STEPS,
            target,
        )
        started = clock.monotonic()
        made = ensure_pretrained_preset(
            cache_dir,
            preset,
            steps=PRETRAIN_STEPS,
            seed=PRETRAIN_SEED,
            progress=ProgressLog(PRETRAIN_STEPS, label=f"the {preset} base", clock=clock.monotonic),
        )
        info = BaseInfo(path=made, source="pretrained", pretrain_s=clock.monotonic() - started)
        log.info("pretrained the %s base in %.0f s", preset, info.pretrain_s)
    return load_base(ModelSettings(path=info.path, r_max=settings.model.r_max)), info


def _client_data(settings: SimulationSettings) -> list[ClientData]:
    from estuary.data import stdlib_clients

    return stdlib_clients(
        select_packages(settings.clients),
        max_train_bytes=SCARCE_TRAIN_BYTES if settings.scarce else None,
        seed=settings.seed,
    )


def _write_config(settings: SimulationSettings, run_dir: Path) -> Path:
    path = run_dir / "config.json"
    path.write_text(json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True))
    return path


#: Seconds between the watch loop's looks at the head version (and display refreshes).
WATCH_INTERVAL_S = 0.5
#: Seconds the agents get to finish their current call when the run stops.
AGENT_STOP_S = 30.0


@dataclass
class _Setup:
    """What the federation and the baselines share: store, data, base, version-0 score."""

    store: Any
    clients: list[ClientData]
    base: nn.Module
    base_info: BaseInfo
    edge_base: nn.Module
    held_out: Any
    adapter0: Any
    initial: Any
    metrics: Any


@dataclass
class _Watch:
    """What the watch loop saw: the newest version scored, its score, the curve."""

    final: Any
    points: list[tuple[float, float]]
    #: The version scored at each point after the first (version 0).
    versions_at: list[int] = field(default_factory=list)
    versions: int = 0
    stopped_by: str = "versions"


class _Fleet:
    """The simulated devices: enrolled agents, their run tasks, and their totals."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.agents: list[Any] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()

    def add(self, name: str, agent: Any) -> None:
        self.names.append(name)
        self.agents.append(agent)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(a.run(stop=self._stop)) for a in self.agents]

    def raise_if_failed(self) -> None:
        failed = [t for t in self.tasks if t.done() and t.exception() is not None]
        if failed:
            raise RuntimeError("an edge agent failed") from failed[0].exception()

    async def stop(self) -> None:
        self._stop.set()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=AGENT_STOP_S)
        for agent in self.agents:
            await agent.close()

    def per_client(self, value: Any) -> dict[str, Any]:
        return {n: value(a) for n, a in zip(self.names, self.agents, strict=True)}

    def steps(self, local_steps: int) -> dict[str, int]:
        """Local steps each client trained (its sample budget for the baselines)."""
        return {n: a.tasks_done * local_steps for n, a in zip(self.names, self.agents, strict=True)}


class Simulation:
    """One simulated federation; :meth:`run` does everything and returns the run folder.

    Parameters
    ----------
    settings
        The simulation settings.
    live
        Show the rich live display (a compact line per few seconds without a TTY).
    clock
        The run's clock: ``time_limit_s`` counts on it. ``None`` (what the command
        uses): a :class:`~simulation.machine_clock.DilatedClock` whose rate a
        :class:`~simulation.machine_clock.LoadGovernor` sets from the load it measures
        during the federation, shared with the federation (so its deadlines and the
        limit stretch while other processes hold the cores), with the wall times of the
        summary and the curve's seconds on the wall clock. A clock given (tests) measures
        everything, wall times included.
    federation_clock
        What the coordinator, its local worker, the in-memory store and every agent read
        when ``clock`` is given; default the wall clock. Ignored when ``clock`` is None.
    """

    def __init__(
        self,
        settings: SimulationSettings,
        *,
        live: bool = True,
        clock: Clock | None = None,
        federation_clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.live = live
        self.governor: LoadGovernor | None = None
        if clock is None:
            dilated = DilatedClock(SYSTEM_CLOCK)
            self.governor = LoadGovernor(dilated, ContentionProbe())
            self.clock: Clock = dilated
            self.wall: Clock = SYSTEM_CLOCK
            self.federation_clock: Clock = dilated
        else:
            self.clock = self.wall = clock
            self.federation_clock = SYSTEM_CLOCK if federation_clock is None else federation_clock
        self.load = RateStats()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_id = f"{stamp}-s{settings.seed}-{secrets.token_hex(2)}"
        self.run_dir = settings.out_dir / self.run_id
        self.stats = RunStats()

    def run(self) -> Path:
        """Run the federation and the baselines; write the run folder; return it."""
        return asyncio.run(self._run())

    async def _run(self) -> Path:
        """Set up, federate until the versions (or the time limit), tear down, report."""
        from simulation.report import LiveDisplay, MetricsLog

        wall = self.wall
        started = wall.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=False)
        config_path = _write_config(self.settings, self.run_dir)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", clock=wall.monotonic)
        try:
            setup = await self._setup(metrics)
            # The federation's clock starts here: pretraining the base (in the set-up)
            # is a one-off that neither the time limit nor the federation's time counts.
            federation_started = wall.monotonic()
            if self.governor is not None:
                self.governor.start()
            try:
                server = await self._start_coordinator(setup, metrics)
                fleet = _Fleet()
                try:
                    await self._start_agents(setup, server, fleet)
                    metrics.event("setup", phase="agents", clients=len(fleet.agents))
                    display = LiveDisplay(
                        enabled=self.live,
                        target_versions=self.settings.versions,
                        clock=wall.monotonic,
                    )
                    try:
                        watch = await self._watch(setup, server.service, fleet, display)
                    finally:
                        display.close()
                finally:
                    await fleet.stop()
                    await server.stop(grace=1.0)
            finally:
                if self.governor is not None:
                    self.load = self.governor.stop()
            federation_s = wall.monotonic() - federation_started
            summary = self._summary(setup, fleet, watch, config_path, federation_s)
            if self.settings.baselines and watch.versions == 0:
                # No version: every client's budget is what it trained before the end,
                # and nothing federated to compare with. Say so rather than print scores
                # that all equal the base's.
                summary["baselines"] = None
            elif self.settings.baselines:
                summary["baselines"] = await asyncio.to_thread(
                    self._baselines, setup, fleet.steps(self.settings.training.local_steps)
                )
            summary["progress"] = progress_note(summary)
            summary["wall_time_s"] = round(wall.monotonic() - started, 1)
            self._write_outputs(summary, watch.points)
            metrics.event("done", wall_time_s=summary["wall_time_s"])
        finally:
            metrics.close()
        return self.run_dir

    async def _setup(self, metrics: Any) -> _Setup:
        """Open the store, load the data and the base, score version 0."""
        import torch

        from estuary.adapters import AdapterConfig, GlobalAdapter
        from estuary.compress import compress_model
        from estuary.state.configured import open_state_store
        from simulation.evaluation import HeldOut

        settings = self.settings
        torch.manual_seed(settings.seed)
        # Each run gets its own key prefix: a simulation never resumes another's state
        # (its blobs live in this run's folder) and never touches a deployment's keys.
        state = settings.state.model_copy(
            update={"key_prefix": f"{settings.state.key_prefix}sim:{self.run_id}:"}
        )
        if state.url == "memory://":
            from estuary.state.memory import MemoryStore

            # Leases, job idle times and stream ids on the federation's clock: on the
            # wall clock a store would expire a lease the coordinator, slowed down with
            # its clock on a busy machine, still renews in time by its own count.
            store: Any = MemoryStore(clock=self.federation_clock.time)
        else:
            store = open_state_store(state)
        store.ping()  # a Redis URL that does not answer fails here, before any work
        metrics.event("setup", phase="base")
        base, base_info = load_or_pretrain_base(
            settings, settings.out_dir / ".cache", clock=self.wall
        )
        metrics.event(
            "setup",
            phase="data",
            base=str(base_info.path),
            base_source=base_info.source,
            pretrain_s=round(base_info.pretrain_s, 1),
        )
        clients = _client_data(settings)
        edge_base = compress_model(copy.deepcopy(base), scheme="int8")
        held_out = HeldOut(
            clients,
            seq_len=settings.training.seq_len,
            max_windows_per_client=EVAL_WINDOWS_PER_CLIENT,
        )
        adapter0 = GlobalAdapter.for_model(
            base, AdapterConfig(r_max=settings.model.r_max, seed=settings.model.adapter_seed)
        )
        initial = await asyncio.to_thread(held_out.score, edge_base, adapter0)
        metrics.event("eval", version=0, union=initial.union, per_client=initial.per_client)
        return _Setup(
            store=store,
            clients=clients,
            base=base,
            base_info=base_info,
            edge_base=edge_base,
            held_out=held_out,
            adapter0=adapter0,
            initial=initial,
            metrics=metrics,
        )

    async def _start_coordinator(self, setup: _Setup, metrics: Any) -> Any:
        """Start the in-process coordinator with its local worker."""
        from functools import partial

        from cloud_workers.local import local_worker
        from coordinator.server import CoordinatorServer
        from estuary.state.blobs import BlobStore

        server = CoordinatorServer(
            coordinator_settings(self.settings),
            store=setup.store,
            blobs=BlobStore(self.run_dir / "blobs", fsync=False),
            base=setup.base,
            observer=_SimObserver(metrics, self.stats),
            # Artifacts without the ONNX export: simulated devices train and never serve,
            # and the export (tens of seconds per version in an exporter process) made
            # each version's artifact lag several versions behind the head, so devices
            # kept training on version 0 while versions committed.
            local_worker=partial(local_worker, onnx=False, clock=self.federation_clock),
            clock=self.federation_clock,
        )
        await server.start()
        return server

    async def _start_agents(self, setup: _Setup, server: Any, fleet: _Fleet) -> None:
        """Enrol one edge agent per client (classes round-robin) and start them."""
        from edge_client.agent import AgentHooks, EdgeAgent
        from edge_client.state import EdgeState

        settings = self.settings
        rng = random.Random(settings.seed)
        classes = settings.device_classes
        for i, client in enumerate(setup.clients):
            device_class = classes[i % len(classes)].name
            drop_rng = random.Random(rng.random())

            # Vanish once in the cohort (devices train first): the cohort goes on without
            # it, as secure aggregation is built to.
            def drop(task: Any, phase: str, _r: random.Random = drop_rng) -> bool:
                return phase == "keys" and _r.random() < settings.dropout

            agent = EdgeAgent(
                EdgeState(self.run_dir / "edges" / client.name),
                f"127.0.0.1:{server.port}",
                credentials=None,
                data=client.train,
                threads=1,
                max_backoff_s=5.0,
                hooks=AgentHooks(drop=drop),
                seed=client_seed(settings.seed, i),
                clock=self.federation_clock,
            )
            token = server.service.registry.issue_token(device_class=device_class)
            await agent.enroll(token, device_class)
            fleet.add(client.name, agent)
        fleet.start()

    async def _watch(self, setup: _Setup, service: Any, fleet: _Fleet, display: Any) -> _Watch:
        """Score each new version until the target version or the time limit.

        The time limit counts on the federation's :attr:`clock`, the curve's seconds on
        the wall clock, both from now (the coordinator and the agents have started).
        """
        settings = self.settings
        clock, wall = self.clock, self.wall
        started, wall_started = clock.monotonic(), wall.monotonic()
        watch = _Watch(final=setup.initial, points=[(0.0, setup.initial.union)])
        while True:
            await clock.sleep_async(WATCH_INTERVAL_S)
            head = service.ledger.head()
            version = head.version if head else 0
            snapshot = await asyncio.to_thread(service.snapshot)
            display.update(
                version=version,
                cohorts=snapshot["cohorts"],
                devices_active=snapshot["devices_active"],
                staleness=self.stats.staleness.mean or 0.0,
                union_bpb=watch.final.union,
                elapsed_s=wall.monotonic() - wall_started,
                speed=getattr(clock, "rate", None),
            )
            if head is not None and version > watch.versions:
                watch.versions = version
                adapter = service.ledger.adapter(head)
                watch.final = await asyncio.to_thread(
                    setup.held_out.score, setup.edge_base, adapter
                )
                watch.points.append((wall.monotonic() - wall_started, watch.final.union))
                watch.versions_at.append(version)
                setup.metrics.event(
                    "eval",
                    version=version,
                    union=watch.final.union,
                    per_client=watch.final.per_client,
                )
            if version >= settings.versions:
                return watch
            if clock.monotonic() - started > settings.time_limit_s:
                watch.stopped_by = "time_limit"
                log.warning(
                    "time limit of %.0f s of federation reached at version %d of %d",
                    settings.time_limit_s,
                    version,
                    settings.versions,
                )
                return watch
            fleet.raise_if_failed()

    def _summary(
        self,
        setup: _Setup,
        fleet: _Fleet,
        watch: _Watch,
        config_path: Path,
        federation_s: float,
    ) -> dict[str, Any]:
        """Return the run's ``summary.json`` without baselines and total wall time."""
        initial, final = setup.initial, watch.final
        return {
            "run_id": self.run_id,
            "config": str(config_path),
            "stopped_by": watch.stopped_by,
            "shortfall": self._shortfall(watch),
            "initial": {"union": initial.union, "per_client": initial.per_client},
            "final": {"union": final.union, "per_client": final.per_client},
            "versions": watch.versions,
            "versions_target": self.settings.versions,
            "updates_accepted": self.stats.accepted,
            "updates_rejected": self.stats.rejected,
            "updates_dropped": self.stats.dropped,
            "dropouts": self.stats.dropouts,
            "cohorts": self.stats.cohorts,
            "staleness_histogram": self.stats.staleness.to_json(),
            "folded_staleness_histogram": self.stats.folded.to_json(),
            "bytes_up_per_client": fleet.per_client(lambda a: a.bytes_up),
            "bytes_down_per_client": fleet.per_client(lambda a: a.bytes_down),
            "tasks_per_client": fleet.per_client(lambda a: a.tasks_done),
            "federation_wall_time_s": round(federation_s, 1),
            "machine_load": self._load_json(),
            "curve": [
                {"version": v, "wall_s": round(t, 1), "union": u}
                for v, (t, u) in zip([0, *watch.versions_at], watch.points, strict=True)
            ],
            "pretrain_wall_time_s": round(setup.base_info.pretrain_s, 1),
            "base_model": {"path": str(setup.base_info.path), "source": setup.base_info.source},
        }

    def _load_json(self) -> dict[str, Any]:
        """How busy the machine was during the federation (see :mod:`simulation.machine_clock`)."""
        load = self.load
        return {
            "adjusted": self.governor is not None,
            "federation_clock_s": round(load.clock_s, 1),
            "mean_speed": round(load.mean_rate, 3),
            "min_speed": round(load.min_rate, 3),
        }

    def _shortfall(self, watch: _Watch) -> str | None:
        """Say why the run committed fewer versions than asked; None if it did not.

        The watch loop stops short of the target only at the time limit (an agent that
        fails raises instead), so the limit is always what stopped it; what the federation
        got done by then (and why cohorts aborted, the usual cause of no version at all)
        tells the user which knob to turn.
        """
        settings = self.settings
        if watch.versions >= settings.versions:
            return None
        stats = self.stats
        finished = ", ".join(f"{n} {s}" for s, n in sorted(stats.cohorts.items())) or "none"
        load = self.load
        speed = (
            f" The machine ran the federation at {load.mean_rate:.0%} of an idle machine's "
            f"speed on average ({load.min_rate:.0%} at worst): its clock stretched the "
            "deadlines by as much."
            if self.governor is not None and load.samples
            else ""
        )
        aborts = "; ".join(
            f"{n}× {reason}"
            for reason, n in sorted(stats.abort_reasons.items(), key=lambda kv: -kv[1])
        )
        why = f" Cohorts aborted: {aborts}." if aborts else ""
        headline = (
            "no version was committed, so there is nothing federated to compare"
            if watch.versions == 0
            else f"committed {watch.versions} of {settings.versions} versions"
        )
        return (
            f"{headline}: the time limit (time_limit_s = {settings.time_limit_s:g} s of "
            f"federation on the run's clock; pretraining the base is not counted) ran out. "
            f"Updates accepted: {stats.accepted} (a version needs "
            f"aggregation.buffer_size = {settings.aggregation.buffer_size}); cohorts finished: "
            f"{finished}; dropouts: {stats.dropouts}; updates rejected: {stats.rejected}."
            f"{why}{speed} Raise time_limit_s (or the cohort deadlines) or lower versions; "
            "metrics.jsonl has every event."
        )

    def _baselines(self, setup: _Setup, steps: dict[str, int]) -> dict[str, Any]:
        from simulation.baselines import centralized, local_only

        settings = self.settings
        edge_base, adapter0, clients = setup.edge_base, setup.adapter0, setup.clients
        ranks = {
            c.name: settings.device_classes[i % len(settings.device_classes)].rank
            for i, c in enumerate(clients)
        }
        common: dict[str, Any] = {
            "lr": settings.training.learning_rate,
            "batch_size": settings.training.batch_size,
            "seq_len": settings.training.seq_len,
            "warmup_steps": settings.training.warmup_steps,
            "threads": 2,
            "seed": settings.seed,
            "held_out": setup.held_out,
        }
        local = local_only(edge_base, adapter0, clients, steps=steps, ranks=ranks, **common)
        total = sum(steps.values())
        central = (
            centralized(
                edge_base, adapter0, clients, steps=total, rank=settings.model.r_max, **common
            )
            if total
            else local
        )
        return {
            "sample_budget": {
                "steps_per_client": steps,
                "batch_size": settings.training.batch_size,
                "seq_len": settings.training.seq_len,
            },
            "local_only": {"union": local.union, "per_client": local.per_client},
            "centralized": {"union": central.union, "per_client": central.per_client},
        }

    def _write_outputs(self, summary: dict[str, Any], points: list[tuple[float, float]]) -> None:
        from simulation.report import plot_bpb, plot_staleness, write_summary

        write_summary(self.run_dir / "summary.json", summary)
        baselines = {
            name: float(summary["baselines"][name]["union"])
            for name in ("local_only", "centralized")
            if summary.get("baselines")
        }
        plot_bpb(
            points,
            baselines=baselines,
            base=float(summary["initial"]["union"]),
            out_png=self.run_dir / "bits_per_byte.png",
            note=summary["progress"]["text"],
        )
        plot_staleness(
            summary["staleness_histogram"],
            self.run_dir / "staleness.png",
        )


def run_simulation(settings: SimulationSettings, *, live: bool = True) -> Path:
    """Run a simulated federation; return the run folder."""
    return Simulation(settings, live=live).run()


__all__ = ["SIM_PACKAGES", "Simulation", "coordinator_settings", "run_simulation"]
