"""One fleet comparison: build the shared environment, run each policy, summarise, plot.

The three policies run one after another on the same trace, fleet, seed, base and data
(each on its own virtual clock and store). Time to target is read off each policy's
held-out curve: the target is the base's bits/byte minus 95 % of the best final
improvement any policy reached; a policy that never reaches it has ``None``.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from simulation.fleet.engine import Recorder
from simulation.fleet.policies import (
    EstuaryPolicy,
    FedBuffPolicy,
    FleetConfig,
    FleetEnv,
    Policy,
    SyncFedAvgPolicy,
)
from simulation.fleet.trace import DeviceTrace, sample_fleet
from simulation.fleet.training import TrainContext, make_trainer
from simulation.report import StalenessHistogram

log = logging.getLogger(__name__)

__all__ = ["POLICIES", "TARGET_FRACTION", "build_env", "compare", "summarise"]

POLICIES: dict[str, type[Policy]] = {
    "sync_fedavg": SyncFedAvgPolicy,
    "fedbuff": FedBuffPolicy,
    "estuary": EstuaryPolicy,
}
#: The target is this fraction of the best policy's improvement over the base.
TARGET_FRACTION = 0.95
#: Standard-library packages whose text backs the devices (device i uses package i mod P).
FLEET_PACKAGES = 12


def build_env(
    trace: DeviceTrace,
    config: FleetConfig,
    *,
    workdir: Path,
    base: Any = None,
    workers: int = 2,
    ray_address: str | None = None,
    packages: int = FLEET_PACKAGES,
) -> FleetEnv:
    """Draw the fleet, load data and base, start the trainer, measure artifact sizes.

    ``base`` is the full-precision model (default: the tiny preset initialised with seed 0).
    """
    import torch

    from cloud_workers.executor import ModelJobExecutor
    from cloud_workers.group import WorkerGroup
    from coordinator.service import FederationService
    from estuary.adapters import AdapterConfig, GlobalAdapter
    from estuary.clock import VirtualClock
    from estuary.compress import compress_model
    from estuary.data import stdlib_clients
    from estuary.state.blobs import BlobStore
    from estuary.state.memory import MemoryStore
    from simulation.evaluation import HeldOut
    from simulation.fleet.policies import estuary_settings
    from simulation.run import select_packages

    for c in trace.classes:
        if c.rank > config.r_max:
            raise ValueError(f"trace class {c.name!r}: rank {c.rank} exceeds r_max={config.r_max}")
    workdir.mkdir(parents=True, exist_ok=True)
    if base is None:
        from estuary.model.presets import build_preset

        # Pretraining the preset (as `estuary simulate` does) takes minutes on a busy
        # 2-core machine; the fleet comparison fine-tunes the preset's seeded
        # initialisation instead: the learning is real, only its starting point is weak.
        base = build_preset("tiny", seed=0)
    torch.manual_seed(config.seed)
    clients = stdlib_clients(select_packages(packages), seed=config.seed)
    edge_base = compress_model(copy.deepcopy(base), scheme="int8")
    held_out = HeldOut(clients, seq_len=config.seq_len, max_windows_per_client=config.eval_windows)
    adapter0 = GlobalAdapter.for_model(base, AdapterConfig(r_max=config.r_max))
    context = TrainContext(edge_base=edge_base, client_bytes=tuple(c.train for c in clients))
    fleet = sample_fleet(trace, config.devices, seed=config.seed)
    trainer = make_trainer(context, workers=workers, ray_address=ray_address)
    env = FleetEnv(
        trace=trace,
        fleet=fleet,
        config=config,
        trainer=trainer,
        context=context,
        base=base,
        adapter0=adapter0,
        held_out=held_out,
        eval_windows=held_out._all[: max(2, config.eval_windows)],
        workdir=workdir,
    )
    # The edge artifact each class downloads, built once by the real worker path.
    clock = VirtualClock()
    store = MemoryStore(clock=clock.time)
    blobs = BlobStore(workdir / "artifact-probe", fsync=False)
    service = FederationService(
        estuary_settings(env), store=store, blobs=blobs, initial_adapter=adapter0, clock=clock
    )
    service.start()
    group = WorkerGroup(
        store,
        executor=ModelJobExecutor(
            store, blobs=blobs, base=base, eval_windows=env.eval_windows, onnx=False
        ),
        name="probe",
        heartbeat_s=1.0,
        reclaim_idle_s=3.0,
        clock=clock,
    )
    while group.step(block_s=0.0):
        pass
    for c in trace.classes:
        record = service.admission.artifact_for(c.name)
        if record is None:
            raise RuntimeError(f"no edge artifact was built for class {c.name!r}")
        manifest = json.loads(blobs.read(record[1]))
        files = {name: blobs.size(digest) for name, digest in manifest["files"].items()}
        adapter = sum(size for name, size in files.items() if "adapter" in name)
        env.artifact_bytes[c.name] = int(record[2]) + adapter
        env.base_bytes[c.name] = sum(files.values()) - adapter
    return env


def time_to_target(
    curve: list[tuple[float, int, int, float]], target: float
) -> tuple[float | None, int | None]:
    """First ``(virtual s, device updates)`` at which the curve is at or below ``target``."""
    for t, updates, _v, bpb in curve:
        if bpb <= target:
            return t, updates
    return None, None


def _histogram(hist: StalenessHistogram) -> dict[str, int]:
    """Return ``hist`` as JSON: versions behind (a string) -> updates."""
    return {str(k): v for k, v in hist.as_dict().items()}


def _mean_training(rec: Recorder) -> float:
    """Device-seconds of training (finished or cut by a dropout) per virtual second."""
    ended = next((t for t, kind, d, _x in reversed(rec.log) if kind == "end" and d < 0), None)
    if not ended:
        return 0.0
    return (rec.work_s + rec.dropout_s) / ended


def summarise(
    records: dict[str, Recorder], *, target_fraction: float = TARGET_FRACTION
) -> dict[str, Any]:
    """Return the comparison's JSON (see ``bench/time_to_target.py`` for the keys)."""
    base = next(iter(records.values())).curve[0][3]
    best = min(min(p[3] for p in r.curve) for r in records.values())
    target = base - target_fraction * (base - best)
    out: dict[str, Any] = {
        "base_bits_per_byte": base,
        "target_bits_per_byte": target,
        "policies": {},
    }
    for name, rec in records.items():
        t, updates = time_to_target(rec.curve, target)
        trained = max(rec.trained, 1)
        ov = rec.overhead
        out["policies"][name] = {
            "time_to_target_s": t,
            "updates_to_target": updates,
            "final_bits_per_byte": rec.curve[-1][3],
            "best_bits_per_byte": min(p[3] for p in rec.curve),
            "versions": rec.curve[-1][2],
            "virtual_time_s": rec.curve[-1][0] if rec.curve else 0.0,
            "wasted_fraction": rec.wasted_fraction,
            # Throughput is devices training at once over device time per update: these
            # two say which of the two a policy loses on (slots held for other things, or
            # a fleet sampled more evenly than by who finishes first).
            "mean_training_at_once": _mean_training(rec),
            "train_s_per_update": rec.work_s / trained,
            "dropout_work_s": rec.dropout_s,
            "work_s": rec.work_s,
            "tasks": rec.tasks,
            "trained": rec.trained,
            "accepted": rec.accepted,
            "refused": rec.refused,
            "discarded": rec.discarded,
            "aborted_cohorts_or_rounds": rec.aborted,
            "dropouts": rec.dropouts,
            "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down,
            "max_training_at_once": rec.max_training,
            "staleness_histogram": _histogram(rec.staleness),
            "waits_s": {k: round(v, 3) for k, v in sorted(rec.waits.items())},
            "curve": [
                {"t": p[0], "updates": p[1], "version": p[2], "bpb": p[3]} for p in rec.curve
            ],
            "wall_s": {
                "total": ov.total_s,
                "training_wait": ov.training_wait_s,
                "evaluation": ov.evaluation_s,
                "cloud_jobs": ov.cloud_jobs_s,
                "service": ov.service_s,
                "device_secagg": ov.device_secagg_s,
            },
            "overhead_ms_per_update": 1000 * ov.core_s() / trained,
            "overhead_ms_per_update_excl_device_secagg": 1000 * ov.simulator_s() / trained,
        }
        if rec.weight_staleness.total:  # Estuary: also the staleness its weights were fixed at
            out["policies"][name]["staleness_at_weight_histogram"] = _histogram(
                rec.weight_staleness
            )
    pol = out["policies"]
    est = pol.get("estuary", {}).get("time_to_target_s")
    for other, key in (("sync_fedavg", "ratio_vs_sync"), ("fedbuff", "ratio_vs_fedbuff")):
        ref = pol.get(other, {}).get("time_to_target_s")
        out[key] = est / ref if est is not None and ref else None
    return out


def compare(
    env: FleetEnv, *, policies: tuple[str, ...] = tuple(POLICIES), keep_updates: bool = False
) -> dict[str, Recorder]:
    """Run each policy on ``env``; return their records in order."""
    records: dict[str, Recorder] = {}
    for name in policies:
        if name not in POLICIES:
            raise ValueError(f"policies: unknown policy {name!r}; known: {sorted(POLICIES)}")
        log.info("fleet: running %s on %d devices", name, len(env.fleet))
        policy = (
            EstuaryPolicy(env, keep_updates=keep_updates)
            if name == "estuary"
            else POLICIES[name](env)
        )
        records[name] = policy.run()
        records[name].policy_object = policy  # type: ignore[attr-defined]
    return records


def plot(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bits/byte against virtual time and against device updates; staleness histograms."""
    from simulation.report import _new_figure, _save

    paths = []
    for x_key, label, fname in (
        ("t", "virtual time (s)", "bpb_vs_time.png"),
        ("updates", "device updates accepted", "bpb_vs_updates.png"),
    ):
        figure = _new_figure(7.0, 4.2)
        axes = figure.add_subplot(1, 1, 1)
        for i, (name, pol) in enumerate(summary["policies"].items()):
            xs = [p[x_key] for p in pol["curve"]]
            ys = [p["bpb"] for p in pol["curve"]]
            axes.plot(xs, ys, color=f"C{i}", label=name, linewidth=1.2)
        axes.axhline(summary["target_bits_per_byte"], color="0.4", linestyle="--", label="target")
        axes.set_xlabel(label)
        axes.set_ylabel("held-out bits/byte (union)")
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize="small")
        paths.append(_save(figure, out_dir / fname))
    figure = _new_figure(7.0, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    names = list(summary["policies"])
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        hist = summary["policies"][name]["staleness_histogram"]
        xs = [int(k) + i * width for k in hist]
        axes.bar(xs, list(hist.values()), width=width, color=f"C{i}", label=name)
    axes.set_xlabel("staleness (versions)")
    axes.set_ylabel("accepted updates")
    axes.legend(loc="best", fontsize="small")
    paths.append(_save(figure, out_dir / "staleness.png"))
    return paths


def run_comparison(
    trace: DeviceTrace,
    config: FleetConfig,
    *,
    out_dir: Path,
    workers: int,
    ray_address: str | None,
    policies: tuple[str, ...] = tuple(POLICIES),
    base: Any = None,
) -> dict[str, Any]:
    """Build, run, summarise; write ``summary.json``, ``events.jsonl`` and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        env = build_env(
            trace,
            config,
            workdir=Path(tmp),
            base=base,
            workers=workers,
            ray_address=ray_address,
        )
        try:
            records = compare(env, policies=policies)
        finally:
            env.trainer.close()
    summary = summarise(records)
    summary["trace"] = trace.name
    summary["config"] = {k: getattr(config, k) for k in config.__dataclass_fields__}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    with (out_dir / "events.jsonl").open("w") as f:
        for name, rec in records.items():
            for t, kind, device, detail in rec.log:
                f.write(json.dumps([name, t, kind, device, detail]) + "\n")
    summary["plots"] = [str(p) for p in plot(summary, out_dir)]
    return summary
