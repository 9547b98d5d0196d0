"""Side by side with Flower, on this machine, in one run: secure aggregation and learning.

Usage::

    python bench/flower.py --json                        # both parts (a few minutes)
    python bench/flower.py --json --parts secagg --clients 10,20

Needs the ``flower`` and ``sim`` extras (``make test``'s environment has both).

**secagg**: one round of Flower's SecAgg+ workflow (``SecAggPlusWorkflow`` in a
``DefaultWorkflow``, clients behind ``secaggplus_mod``) against one session of
``secure_agg`` (:func:`secure_agg.run_local`), for every ``--clients`` n × ``--size``
parameters (float32 updates of L2 norm 0.5), full graph (Flower ``num_shares = n``;
``secure_agg`` complete graph), threshold ``n // 2 + 1``, 32-bit modulus for both, and
every ``--dropouts`` fraction of clients gone after sharing keys (they never send their
masked input: the costliest dropout for the server, which must rebuild their masks).
Both run every party in this process with every message serialised and parsed (Flower
messages through its protobuf ``Message``, ours through ``encode``/``decode``), clients
one after another, so neither pays for a transport. Reported per cell:

- ``flower_s`` / ``estuary_s``: protocol seconds per round as a deployment sees it:
  the server's seconds plus, per stage, the slowest client's (clients run in parallel);
- ``speedup``: ``flower_s / estuary_s``;
- ``*_server_s``, ``*_client_s`` (mean seconds of a client over the round),
  ``*_client_max_s``, ``*_wall_s`` (everything sequential in one process);
- ``*_bytes_up``: mean bytes a client sends over the round (serialised messages);
- ``*_max_error``: the largest deviation of the revealed mean from the survivors' true
  mean (both quantise), and ``survivors``.

**learning**: Flower FedAvg (Flower's own ``FedAvg`` strategy, synchronous rounds, its
simulation engine with the Ray backend, Estuary's ClientApp: every client trains its
rank's columns of ``B`` on the int8 base) against ``estuary simulate`` (asynchronous
buffered aggregation, secure aggregation per cohort, real gRPC on loopback), on the same
clients (standard-library packages, the scarce regime), the same pretrained base, the
same ranks (device classes round-robin), local steps, learning rate and batch, and the
same sample budget: Flower runs as many rounds as Estuary needed client tasks, divided
by the number of clients. Both are scored on the same held-out windows (the union
bits/byte of ``estuary simulate``). Both arms run ``--learning-repeats`` times, repeat k on
data seed ``seed + k`` (the clients' data slices and training order), the same for both.
Each client draws the same training windows in both arms whenever it trains from the same
model: client ``i``'s seed is :func:`~estuary.data.windows.client_seed` of the data seed,
and its windows on version ``v`` (Flower: round ``v + 1``) come from
:func:`~estuary.data.windows.window_seed` (common random numbers: what differs between the
curves is the systems, not which batches were drawn).

Reported per arm: ``final_bits_per_byte`` (mean over repeats, and ``_sd``), the mean curve
(per round / version: bits/byte ± sd at each count of client updates every repeat reached),
``wall_s``, ``bytes_up_per_client``, ``client_updates`` and every repeat under ``runs``;
``at_equal_updates`` sets the mean curves side by side and says whether Estuary's is at or
below Flower's at every shared count (``estuary_at_least_flower``), allowing
``ROUNDING_TOLERANCE`` for secure aggregation's fixed-point sums: where Estuary builds each
version from every client once on the newest version, as FedAvg's round does, the two
curves agree to that rounding; staleness would show as a difference beyond it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

SECAGG_CLIENTS = (10, 20, 50)
SECAGG_SIZE = 100_000
SECAGG_DROPOUTS = (0.0, 0.1)
#: L2 norm of the synthetic updates, inside secure_agg's clip of 1.0 (as secure_agg.bench).
INPUT_NORM = 0.5
#: Both protocols sum in Z_(2^32): Flower's default modulus_range, our ``bits``.
MODULUS_BITS = 32

#: Bits/byte by which Estuary's curve may exceed Flower's and still count as at least as
#: good: secure aggregation sums in fixed point (32-bit ring, clip 10, 2^-26 resolution),
#: which moved the curve by at most 3e-5 over 6 versions when measured.
ROUNDING_TOLERANCE = 1e-3

LEARNING_CLIENTS = 8
LEARNING_VERSIONS = 6
LEARNING_REPEATS = 3


def progress(message: str) -> None:
    print(f"[flower-bench] {message}", file=sys.stderr, flush=True)


def inputs_for(n: int, m: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(m, dtype=np.float32)
        out.append(x * np.float32(INPUT_NORM / max(float(np.linalg.norm(x)), 1e-12)))
    return out


def dropped_clients(n: int, dropout: float, seed: int) -> set[int]:
    rng = np.random.default_rng([seed, n])
    return {int(i) for i in rng.choice(n, size=math.floor(dropout * n), replace=False)}


def critical_path(server_s: float, stage_client_s: Iterable[Sequence[float]]) -> float:
    """Server seconds plus, per stage, the slowest client's: clients act in parallel."""
    return server_s + sum(max(s, default=0.0) for s in stage_client_s)


# --------------------------------------------------------------------------- secure_agg


def run_estuary_secagg(inputs: list[np.ndarray], dropped: set[int]) -> dict[str, Any]:
    from secure_agg import Stage, run_local

    n = len(inputs)
    start = time.perf_counter()
    result = run_local(
        inputs,
        threshold=n // 2 + 1,
        clip=1.0,
        bits=MODULUS_BITS,
        neighbours=None,
        drop={i: Stage.MASKED_INPUT for i in dropped},
        seed=0,
    )
    wall = time.perf_counter() - start
    survivors = list(result.survivors)
    server = sum(result.server_seconds.values())
    per_client = [sum(v[i] for v in result.client_seconds.values()) for i in survivors]
    mean = np.asarray(result.float_sum) / result.weight_sum
    truth = np.mean([inputs[i] for i in survivors], axis=0)
    return {
        "s": critical_path(server, result.client_seconds.values()),
        "server_s": server,
        "client_s": float(np.mean(per_client)),
        "client_max_s": float(np.max(per_client)),
        "wall_s": wall,
        "bytes_up": float(np.mean([result.bytes_up[i] for i in survivors])),
        "max_error": float(np.max(np.abs(mean - truth))),
        "survivors": len(survivors),
    }


# --------------------------------------------------------------------------- Flower SecAgg+


class _Parties:
    """Flower's SecAgg+ with every party in this process (a Grid that calls ClientApps)."""

    def __init__(self, inputs: list[np.ndarray], dropped: set[int]) -> None:
        from flwr.app import Context, RecordDict
        from flwr.client import ClientApp, NumPyClient
        from flwr.client.mod import secaggplus_mod

        class Synthetic(NumPyClient):
            def __init__(self, update: np.ndarray) -> None:
                self.update = update

            def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
                return [self.update], 1, {}

        self.node_ids = list(range(100, 100 + len(inputs)))
        self.inputs = dict(zip(self.node_ids, inputs, strict=True))
        self.dropped = {self.node_ids[i] for i in dropped}

        def client_fn_for(update: np.ndarray) -> Any:
            def client_fn(context: Context) -> Any:  # Flower checks this exact signature
                return Synthetic(update).to_client()

            return client_fn

        self.apps = {
            nid: ClientApp(client_fn=client_fn_for(x), mods=[secaggplus_mod])
            for nid, x in self.inputs.items()
        }
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
            for nid in self.node_ids
        }
        self.calls = 0  # send_and_receive calls: one per protocol stage
        self.stage_client_s: list[list[float]] = []
        self.client_s = dict.fromkeys(self.node_ids, 0.0)
        self.bytes_up = dict.fromkeys(self.node_ids, 0)

    def deliver(self, messages: Iterable[Any]) -> list[Any]:
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        stage = self.calls
        self.calls += 1
        seconds: list[float] = []
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            wire = message_to_proto(msg).SerializeToString()  # server side: encode
            # Dropped clients vanish once keys are shared: no masked input, no unmasking.
            if nid in self.dropped and stage >= 2:
                continue
            start = time.perf_counter()
            received = message_from_proto(ProtoMessage.FromString(wire))
            reply = self.apps[nid](received, self.contexts[nid])
            up = message_to_proto(reply).SerializeToString()
            took = time.perf_counter() - start
            seconds.append(took)
            self.client_s[nid] += took
            self.bytes_up[nid] += len(up)
            replies.append(message_from_proto(ProtoMessage.FromString(up)))  # server: decode
        self.stage_client_s.append(seconds)
        return replies


def run_flower_secagg(inputs: list[np.ndarray], dropped: set[int]) -> dict[str, Any]:
    from flwr.app import Context, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 0
    n, m = len(inputs), inputs[0].size
    parties = _Parties(inputs, dropped)

    class LocalGrid(Grid):
        def set_run(self, run: Any) -> None:
            pass

        @property
        def run(self) -> Any:
            return types.SimpleNamespace(run_id=1)

        def create_message(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("SecAgg+ builds its messages itself")

        def get_node_ids(self) -> list[int]:
            return list(parties.node_ids)

        def push_messages(self, messages: Iterable[Any]) -> list[str]:
            raise NotImplementedError("send_and_receive only")

        def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
            raise NotImplementedError("send_and_receive only")

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Any:
            return parties.deliver(messages)

    # max_weight=1: every client's weight is 1, and a larger bound only costs precision
    # (Flower scales each update by weight / max_weight before quantising).
    secagg = SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=n // 2 + 1, max_weight=1.0)
    timing: dict[str, float] = {}

    def timed_fit(grid: Any, context: Any) -> None:
        start = time.perf_counter()
        secagg(grid, context)
        timing["wall"] = time.perf_counter() - start

    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(m, dtype=np.float32)]),
        accept_failures=True,
    )
    context = LegacyContext(
        context=Context(
            run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    with contextlib.redirect_stderr(io.StringIO()):
        DefaultWorkflow(fit_workflow=timed_fit)(LocalGrid(), context)
    params = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    mean = parameters_to_ndarrays(params)[0]
    survivors = [nid for nid in parties.node_ids if nid not in parties.dropped]
    truth = np.mean([parties.inputs[nid] for nid in survivors], axis=0)
    clients_total = sum(parties.client_s.values())
    server = timing["wall"] - clients_total
    return {
        "s": critical_path(server, parties.stage_client_s),
        "server_s": server,
        "client_s": float(np.mean([parties.client_s[nid] for nid in survivors])),
        "client_max_s": float(np.max([parties.client_s[nid] for nid in survivors])),
        "wall_s": timing["wall"],
        "bytes_up": float(np.mean([parties.bytes_up[nid] for nid in survivors])),
        "max_error": float(np.max(np.abs(mean - truth))),
        "survivors": len(survivors),
    }


def _median_run(run: Any, inputs: list[np.ndarray], dropped: set[int], repeats: int) -> Any:
    """The run of median protocol seconds out of ``repeats`` (timings on a shared machine)."""
    runs = sorted((run(inputs, dropped) for _ in range(repeats)), key=lambda r: r["s"])
    return runs[len(runs) // 2]


def secagg_part(
    clients: Sequence[int], size: int, dropouts: Sequence[float], *, repeats: int
) -> dict[str, Any]:
    # Warm-up: imports, first-use caches and key generation paths, outside every timing.
    warm = inputs_for(4, 16, seed=0)
    run_estuary_secagg(warm, set())
    run_flower_secagg(warm, set())
    out: dict[str, Any] = {
        "repeats": repeats,
        "size": size,
        "graph": "full",
        "threshold": "n // 2 + 1",
        "modulus_bits": MODULUS_BITS,
        "drop_stage": "after sharing keys (no masked input)",
    }
    for n in clients:
        row: dict[str, Any] = {}
        for dropout in dropouts:
            inputs = inputs_for(n, size, seed=n)
            dropped = dropped_clients(n, dropout, seed=0)
            estuary = _median_run(run_estuary_secagg, inputs, dropped, repeats)
            flower = _median_run(run_flower_secagg, inputs, dropped, repeats)
            cell: dict[str, Any] = {"survivors": estuary["survivors"]}
            if flower["survivors"] != estuary["survivors"]:
                raise RuntimeError(f"n={n}: survivors differ ({flower} vs {estuary})")
            for name, result in (("flower", flower), ("estuary", estuary)):
                for key, value in result.items():
                    if key != "survivors":
                        cell[f"{name}_{key}"] = value
            cell["speedup"] = flower["s"] / estuary["s"]
            row[str(dropout)] = cell
            progress(
                f"secagg n={n} dropout={dropout}: flower {flower['s']:.3f} s, "
                f"estuary {estuary['s']:.3f} s, speedup {cell['speedup']:.1f}x"
            )
        out[str(n)] = row
    return out


# --------------------------------------------------------------------------- learning


def _read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_estuary_learning(settings: Any) -> dict[str, Any]:
    """``estuary simulate`` with ``settings``; its curve per version."""
    from simulation.run import Simulation

    start = time.perf_counter()
    run_dir = Simulation(settings, live=False).run()
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    events = _read_events(run_dir / "metrics.jsonl")
    updates_at: dict[int, int] = {0: 0}
    total = 0
    for event in events:
        if event.get("kind") == "version_committed":
            total += int(event["updates"])
            updates_at[int(event["version"])] = total
    curve = [
        {
            "version": int(e["version"]),
            "bits_per_byte": float(e["union"]),
            "client_updates": updates_at.get(int(e["version"])),
            "seconds": float(e["t"]),
        }
        for e in events
        if e.get("kind") == "eval"
    ]
    tasks = sum(int(v) for v in summary["tasks_per_client"].values())
    up = summary["bytes_up_per_client"]
    return {
        "final_bits_per_byte": float(summary["final"]["union"]),
        "initial_bits_per_byte": float(summary["initial"]["union"]),
        "versions": int(summary["versions"]),
        "curve": curve,
        "client_updates": updates_at[max(updates_at)],
        "client_tasks": tasks,
        "wall_s": wall,
        "federation_wall_s": float(summary["federation_wall_time_s"]),
        "bytes_up_per_client": float(np.mean(list(up.values()))),
        "run_dir": str(run_dir),
    }


def run_flower_fedavg(
    sim: Any, *, base_dir: Path, packages: tuple[str, ...], rounds: int, out_dir: Path
) -> dict[str, Any]:
    """Flower's FedAvg in Flower's simulation engine (Ray), Estuary's ClientApp."""
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from estuary.adapters import AdapterConfig, GlobalAdapter
    from estuary.compress import compress_model
    from estuary.data import stdlib_clients
    from estuary.model.loading import load_model
    from simulation.evaluation import HeldOut
    from simulation.flower import protocol
    from simulation.flower.client_app import make_client_app
    from simulation.flower.settings import FlowerSettings
    from simulation.run import EVAL_WINDOWS_PER_CLIENT, SCARCE_TRAIN_BYTES

    n = len(packages)
    training = sim.training
    settings = FlowerSettings(
        num_server_rounds=rounds,
        base=base_dir,
        scheme="int8",
        r_max=sim.model.r_max,
        adapter_seed=sim.model.adapter_seed,
        ranks=tuple(c.rank for c in sim.device_classes),
        local_steps=training.local_steps,
        learning_rate=training.learning_rate,
        rank_lr_power=training.rank_lr_power,
        column_rule=training.column_rule,
        warmup_steps=training.warmup_steps,
        batch_size=training.batch_size,
        seq_len=training.seq_len,
        grad_clip_norm=training.grad_clip_norm,
        client_threads=1,  # as each `estuary simulate` agent
        min_train_nodes=n,
        out_dir=out_dir,
        write_model="never",
        stdlib_packages=packages,
        max_train_bytes=SCARCE_TRAIN_BYTES if sim.scarce else 0,
        data_seed=sim.seed,
    )
    clients = stdlib_clients(
        packages, max_train_bytes=SCARCE_TRAIN_BYTES if sim.scarce else None, seed=sim.seed
    )
    held_out = HeldOut(
        clients, seq_len=training.seq_len, max_windows_per_client=EVAL_WINDOWS_PER_CLIENT
    )
    edge_base = compress_model(load_model(base_dir).float(), scheme="int8")  # type: ignore[no-untyped-call]
    zero = GlobalAdapter.for_model(
        edge_base, AdapterConfig(r_max=sim.model.r_max, seed=sim.model.adapter_seed)
    )
    adapter_bytes = sum(b.nbytes for b in zero.b.values())
    curve: list[dict[str, Any]] = []
    start = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        adapter = zero.with_b(protocol.arrays_to_b(arrays))
        score = held_out.score(edge_base, adapter).union
        curve.append(
            {
                "round": server_round,
                "bits_per_byte": score,
                "client_updates": server_round * n,
                "seconds": time.perf_counter() - start,
            }
        )
        progress(f"flower fedavg round {server_round}: {score:.4f} bits/byte")
        return MetricRecord({"bits-per-byte": score})

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n,
            min_available_nodes=n,
        )
        strategy.start(
            grid,
            initial_arrays=protocol.b_to_arrays(zero.b),
            num_rounds=rounds,
            evaluate_fn=evaluate_fn,
        )

    run_simulation(
        app,
        make_client_app(settings),
        num_supernodes=n,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False},
        },
    )
    wall = time.perf_counter() - start
    if len(curve) != rounds + 1:
        raise RuntimeError(f"flower fedavg: {len(curve) - 1} of {rounds} rounds evaluated")
    return {
        "final_bits_per_byte": curve[-1]["bits_per_byte"],
        "initial_bits_per_byte": curve[0]["bits_per_byte"],
        "rounds": rounds,
        "curve": curve,
        "client_updates": rounds * n,
        "wall_s": wall,
        # Each round a client uploads B + ΔB in float32, (out, r_max) per module.
        "bytes_up_per_client": float(rounds * adapter_bytes),
    }


def _mean_curve(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd of the runs' bits/byte at each count of client updates all runs reached."""
    by_updates: dict[int, list[float]] = {}
    for run in runs:
        for point in run["curve"]:
            if point["client_updates"] is not None:
                by_updates.setdefault(int(point["client_updates"]), []).append(
                    float(point["bits_per_byte"])
                )
    return [
        {
            "client_updates": u,
            "bits_per_byte": float(np.mean(v)),
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "runs": len(v),
        }
        for u, v in sorted(by_updates.items())
        if len(v) == len(runs)
    ]


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm over its runs: means of the scalar figures, the mean curve, every run."""
    finals = [r["final_bits_per_byte"] for r in runs]
    return {
        "final_bits_per_byte": float(np.mean(finals)),
        "final_bits_per_byte_sd": float(np.std(finals, ddof=1)) if len(runs) > 1 else 0.0,
        "initial_bits_per_byte": float(runs[0]["initial_bits_per_byte"]),
        "client_updates": int(np.mean([r["client_updates"] for r in runs])),
        "wall_s": float(np.mean([r["wall_s"] for r in runs])),
        "bytes_up_per_client": float(np.mean([r["bytes_up_per_client"] for r in runs])),
        "curve": _mean_curve(runs),
        "runs": runs,
    }


def compare_curves(estuary: list[dict[str, Any]], flower: list[dict[str, Any]]) -> dict[str, Any]:
    """Both mean curves at the client-update counts where both have a point."""
    flower_at = {p["client_updates"]: p for p in flower}
    points = [
        {
            "client_updates": p["client_updates"],
            "estuary": p["bits_per_byte"],
            "flower_fedavg": flower_at[p["client_updates"]]["bits_per_byte"],
            "estuary_minus_flower": p["bits_per_byte"]
            - flower_at[p["client_updates"]]["bits_per_byte"],
        }
        for p in estuary
        if p["client_updates"] in flower_at and p["client_updates"] > 0
    ]
    return {
        "points": points,
        # At every shared count of client updates, Estuary's mean is at or below Flower's
        # (up to the fixed-point rounding of secure aggregation).
        "estuary_at_least_flower": bool(points)
        and all(p["estuary_minus_flower"] <= ROUNDING_TOLERANCE for p in points),
        "rounding_tolerance": ROUNDING_TOLERANCE,
        "max_estuary_minus_flower": max((p["estuary_minus_flower"] for p in points), default=None),
    }


def learning_part(*, clients: int, versions: int, repeats: int, work: Path) -> dict[str, Any]:
    from estuary.config.loader import load_settings
    from estuary.config.models import SimulationSettings
    from simulation.run import load_or_pretrain_base, select_packages

    root = Path(__file__).resolve().parents[1]
    loaded = load_settings("simulation", root / "deploy/config/simulation.toml")
    assert isinstance(loaded, SimulationSettings)
    sim = SimulationSettings.model_validate(
        {
            **loaded.model_dump(),
            "clients": clients,
            "versions": versions,
            "dropout": 0.0,  # the secagg part measures dropouts; here both arms see all
            "baselines": False,
            "out_dir": work / "estuary",
        }
    )
    load_or_pretrain_base(sim, sim.out_dir / ".cache")  # pretrain once, outside both timings
    base_dir = next((sim.out_dir / ".cache").glob("base-*"))
    estuary_runs: list[dict[str, Any]] = []
    flower_runs: list[dict[str, Any]] = []
    for k in range(repeats):
        # Each repeat: another seed for the clients' data slices and their training order,
        # the same for both arms.
        run_sim = type(sim).model_validate({**sim.model_dump(), "seed": sim.seed + k})
        progress(
            f"learning {k + 1}/{repeats}: estuary simulate, {clients} clients, "
            f"{versions} versions, seed {run_sim.seed}"
        )
        estuary = run_estuary_learning(run_sim)
        rounds = max(1, round(estuary["client_updates"] / clients))
        progress(f"learning {k + 1}/{repeats}: flower fedavg, {clients} clients, {rounds} rounds")
        flower = run_flower_fedavg(
            run_sim,
            base_dir=base_dir,
            packages=select_packages(clients),
            rounds=rounds,
            out_dir=work / f"flower-versions-{k}",
        )
        estuary["seed"] = flower["seed"] = run_sim.seed
        estuary_runs.append(estuary)
        flower_runs.append(flower)
    est, flw = _summarise(estuary_runs), _summarise(flower_runs)
    return {
        "clients": clients,
        "repeats": repeats,
        "ranks": [c.rank for c in sim.device_classes],
        "local_steps": sim.training.local_steps,
        "learning_rate": sim.training.learning_rate,
        "batch_size": sim.training.batch_size,
        "seq_len": sim.training.seq_len,
        "buffer_size": sim.aggregation.buffer_size,
        "base": "tiny preset, pretrained (estuary simulate's cached base), int8 on clients",
        "samples_per_update": sim.training.local_steps
        * sim.training.batch_size
        * sim.training.seq_len,
        "flower_fedavg": flw,
        "estuary": est,
        "at_equal_updates": compare_curves(est["curve"], flw["curve"]),
    }


def versions() -> dict[str, str]:
    import torch

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "estuary_fl": version("estuary-fl"),
        "flwr": version("flwr"),
        "ray": version("ray"),
        "protobuf": version("protobuf"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="secagg,learning", help="comma-separated subset")
    parser.add_argument("--clients", default=",".join(map(str, SECAGG_CLIENTS)))
    parser.add_argument("--size", type=int, default=SECAGG_SIZE, help="parameters per update")
    parser.add_argument("--dropouts", default=",".join(map(str, SECAGG_DROPOUTS)))
    parser.add_argument(
        "--repeats", type=int, default=3, help="secagg runs per cell; the median is reported"
    )
    parser.add_argument("--learning-clients", type=int, default=LEARNING_CLIENTS)
    parser.add_argument("--learning-versions", type=int, default=LEARNING_VERSIONS)
    parser.add_argument(
        "--learning-repeats",
        type=int,
        default=LEARNING_REPEATS,
        help="learning runs per arm, each on another data seed; means and sd are reported",
    )
    parser.add_argument("--work", type=Path, help="where runs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print compact JSON")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.learning_repeats < 1:
        parser.error(f"--learning-repeats: must be >= 1, got {args.learning_repeats}")
    if not parts <= {"secagg", "learning"}:
        parser.error(f"--parts: unknown {sorted(parts - {'secagg', 'learning'})}")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every stage at INFO
    started = time.perf_counter()
    report: dict[str, Any] = {"versions": versions()}
    if "secagg" in parts:
        report["secagg"] = secagg_part(
            [int(c) for c in args.clients.split(",")],
            args.size,
            [float(d) for d in args.dropouts.split(",")],
            repeats=args.repeats,
        )
    if "learning" in parts:
        with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
            work = args.work or Path(tmp)
            report["learning"] = learning_part(
                clients=args.learning_clients,
                versions=args.learning_versions,
                repeats=args.learning_repeats,
                work=work,
            )
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, sort_keys=True, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
