"""``estuary simulate``: a whole federation on one machine, over real gRPC on loopback.

One process holds the coordinator (its gRPC server, the federation service and a local
cloud worker), and every simulated device is an :class:`edge_client.agent.EdgeAgent`
running as an asyncio task that talks to the coordinator through a loopback channel,
exactly as a device would across the network: enrolment with a one-time token, signed
requests, pacing, artifact download, secure aggregation, masked upload.

Clients are standard-library packages (one package's text = one device's private data),
split into device classes round-robin. A client vanishes from a task with probability
``dropout``; its cohort goes on without it (secure aggregation tolerates dropouts down
to the threshold). Each committed version is scored on every client's held-out text;
at the end the run folder holds the effective config, ``metrics.jsonl``,
``summary.json`` and the plots.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estuary.config.models import (
    CoordinatorSettings,
    ServerSettings,
    ServerTLSSettings,
    SimulationSettings,
)
from estuary.data.stdlib import DEFAULT_CLIENT_PACKAGES
from simulation.report import StalenessHistogram

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


@dataclass
class RunStats:
    """What the observer saw during the run."""

    dropouts: int = 0
    rejected: int = 0
    accepted: int = 0
    cohorts: dict[str, int] = field(default_factory=dict)
    staleness: StalenessHistogram = field(default_factory=StalenessHistogram)


class _SimObserver:
    """Feeds the coordinator's events into ``metrics.jsonl`` and the run totals."""

    def __init__(self, metrics: Any, stats: RunStats) -> None:
        self.metrics = metrics
        self.stats = stats

    def event(self, kind: str, **fields: Any) -> None:
        if kind == "weight_assigned":
            self.stats.staleness.add(int(fields["staleness"]))
        elif kind == "update_accepted":
            self.stats.accepted += int(fields["updates"])
            self.stats.dropouts += int(fields.get("dropouts", 0))
        elif kind == "update_rejected":
            self.stats.rejected += 1
        elif kind == "cohort_finished":
            status = str(fields["status"])
            self.stats.cohorts[status] = self.stats.cohorts.get(status, 0) + 1
            if status == "aborted":
                self.stats.dropouts += int(fields.get("size", 0))
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


def load_or_pretrain_base(settings: SimulationSettings, cache_dir: Path) -> nn.Module:
    """Return the full-precision base: the settings' model directory, or a pretrained preset.

    A preset is pretrained on the standard library's top-level modules (never on client
    packages) once and cached under ``cache_dir``.
    """
    from estuary.config.models import ModelSettings
    from estuary.model.loading import load_base

    if settings.model.path is not None:
        return load_base(settings.model)
    from estuary.model.pretrain import pretrained_preset

    preset = settings.model.preset or "tiny"
    target = cache_dir / f"base-{preset}-{PRETRAIN_STEPS}steps-seed0"
    if not (target / "config.json").is_file():
        log.info(
            "pretraining the %s preset (%d steps), cached in %s", preset, PRETRAIN_STEPS, target
        )
        model = pretrained_preset(preset, steps=PRETRAIN_STEPS, seed=0)
        tmp = target.with_name(target.name + f".tmp{secrets.token_hex(4)}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tmp.rename(target)
    return load_base(ModelSettings(path=target, r_max=settings.model.r_max))


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
    """

    def __init__(self, settings: SimulationSettings, *, live: bool = True) -> None:
        self.settings = settings
        self.live = live
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

        started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=False)
        config_path = _write_config(self.settings, self.run_dir)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        try:
            setup = await self._setup(metrics)
            server = await self._start_coordinator(setup, metrics)
            fleet = _Fleet()
            try:
                await self._start_agents(setup, server, fleet)
                metrics.event("setup", phase="agents", clients=len(fleet.agents))
                display = LiveDisplay(enabled=self.live, target_versions=self.settings.versions)
                try:
                    watch = await self._watch(setup, server.service, fleet, display, started)
                finally:
                    display.close()
            finally:
                await fleet.stop()
                await server.stop(grace=1.0)
            summary = self._summary(setup, fleet, watch, config_path, time.monotonic() - started)
            if self.settings.baselines:
                summary["baselines"] = await asyncio.to_thread(
                    self._baselines, setup, fleet.steps(self.settings.training.local_steps)
                )
            summary["wall_time_s"] = round(time.monotonic() - started, 1)
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
        store = open_state_store(state)
        store.ping()  # a Redis URL that does not answer fails here, before any work
        metrics.event("setup", phase="data")
        clients = _client_data(settings)
        base = load_or_pretrain_base(settings, settings.out_dir / ".cache")
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
            edge_base=edge_base,
            held_out=held_out,
            adapter0=adapter0,
            initial=initial,
            metrics=metrics,
        )

    async def _start_coordinator(self, setup: _Setup, metrics: Any) -> Any:
        """Start the in-process coordinator with its local worker."""
        from cloud_workers.local import local_worker
        from coordinator.server import CoordinatorServer
        from estuary.state.blobs import BlobStore

        server = CoordinatorServer(
            coordinator_settings(self.settings),
            store=setup.store,
            blobs=BlobStore(self.run_dir / "blobs", fsync=False),
            base=setup.base,
            observer=_SimObserver(metrics, self.stats),
            # torch.export, behind the ONNX export, mutates process-wide tracing state and
            # breaks the edge agents training in this process's other threads; deployed
            # workers run in their own processes and do include ONNX in artifacts.
            local_worker=functools.partial(local_worker, onnx=False),
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

            def drop(task: Any, phase: str, _r: random.Random = drop_rng) -> bool:
                return phase == "training" and _r.random() < settings.dropout

            agent = EdgeAgent(
                EdgeState(self.run_dir / "edges" / client.name),
                f"127.0.0.1:{server.port}",
                credentials=None,
                data=client.train,
                threads=1,
                max_backoff_s=5.0,
                hooks=AgentHooks(drop=drop),
                seed=settings.seed * 1000 + i,
            )
            token = server.service.registry.issue_token(device_class=device_class)
            await agent.enroll(token, device_class)
            fleet.add(client.name, agent)
        fleet.start()

    async def _watch(
        self, setup: _Setup, service: Any, fleet: _Fleet, display: Any, started: float
    ) -> _Watch:
        """Score each new version until the target version or the time limit."""
        settings = self.settings
        watch = _Watch(final=setup.initial, points=[(0.0, setup.initial.union)])
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            head = service.ledger.head()
            version = head.version if head else 0
            snapshot = await asyncio.to_thread(service.snapshot)
            display.update(
                version=version,
                cohorts=snapshot["cohorts"],
                devices_active=snapshot["devices_active"],
                staleness=self.stats.staleness.mean or 0.0,
                union_bpb=watch.final.union,
                elapsed_s=time.monotonic() - started,
            )
            if head is not None and version > watch.versions:
                watch.versions = version
                adapter = service.ledger.adapter(head)
                watch.final = await asyncio.to_thread(
                    setup.held_out.score, setup.edge_base, adapter
                )
                watch.points.append((time.monotonic() - started, watch.final.union))
                setup.metrics.event(
                    "eval",
                    version=version,
                    union=watch.final.union,
                    per_client=watch.final.per_client,
                )
            if version >= settings.versions:
                return watch
            if time.monotonic() - started > settings.time_limit_s:
                watch.stopped_by = "time_limit"
                log.warning(
                    "time limit of %.0fs reached at version %d", settings.time_limit_s, version
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
            "initial": {"union": initial.union, "per_client": initial.per_client},
            "final": {"union": final.union, "per_client": final.per_client},
            "versions": watch.versions,
            "updates_accepted": self.stats.accepted,
            "updates_rejected": self.stats.rejected,
            "dropouts": self.stats.dropouts,
            "cohorts": self.stats.cohorts,
            "staleness_histogram": self.stats.staleness.to_json(),
            "bytes_up_per_client": fleet.per_client(lambda a: a.bytes_up),
            "bytes_down_per_client": fleet.per_client(lambda a: a.bytes_down),
            "tasks_per_client": fleet.per_client(lambda a: a.tasks_done),
            "federation_wall_time_s": round(federation_s, 1),
        }

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
            if "baselines" in summary
        }
        plot_bpb(
            points,
            baselines=baselines,
            base=float(summary["initial"]["union"]),
            out_png=self.run_dir / "bits_per_byte.png",
        )
        plot_staleness(
            summary["staleness_histogram"],
            self.run_dir / "staleness.png",
        )


def run_simulation(settings: SimulationSettings, *, live: bool = True) -> Path:
    """Run a simulated federation; return the run folder."""
    return Simulation(settings, live=live).run()


__all__ = ["SIM_PACKAGES", "Simulation", "coordinator_settings", "run_simulation"]
