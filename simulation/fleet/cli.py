"""``estuary simulate-fleet``: the virtual-time fleet comparison from the command line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import fail
from simulation.fleet.policies import FleetConfig

__all__ = ["simulate_fleet_command"]

log = logging.getLogger(__name__)

_POLICY_NAMES = "sync_fedavg,fedbuff,estuary"
_D = FleetConfig()  # the defaults of every option below


def simulate_fleet_command(
    trace: Annotated[
        str,
        typer.Option(
            help="Device trace: a name under deploy/traces/ (phones-laptops, "
            "phones-laptops-slow, stragglers) "
            "or a path to a trace JSON file.",
        ),
    ] = "phones-laptops",
    devices: Annotated[
        int, typer.Option(min=1, help="Registered devices drawn from the trace.")
    ] = _D.devices,
    hours: Annotated[
        float, typer.Option(min=0.01, help="Virtual hours each policy runs (at most).")
    ] = _D.duration_s / 3600.0,
    max_updates: Annotated[
        int,
        typer.Option(min=1, help="Stop a policy once this many device updates were accepted."),
    ] = _D.max_updates,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the fleet, data and every draw.")
    ] = _D.seed,
    buffer_size: Annotated[
        int, typer.Option(min=1, help="K: updates per version (Estuary and FedBuff).")
    ] = _D.buffer_size,
    target_staleness: Annotated[
        float, typer.Option(min=0.1, help="Pacer target: concurrency = K x this.")
    ] = _D.target_staleness,
    sync_clients: Annotated[
        int, typer.Option(min=2, help="N: reports a synchronous round aggregates.")
    ] = _D.sync_clients,
    local_steps: Annotated[
        int, typer.Option(min=1, help="Local training steps per update.")
    ] = _D.local_steps,
    policies: Annotated[
        str, typer.Option(help=f"Comma-separated policies to run: {_POLICY_NAMES}.")
    ] = _POLICY_NAMES,
    workers: Annotated[
        int,
        typer.Option(min=0, help="Local training processes (0: train in this process)."),
    ] = 2,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Train device updates on this Ray cluster (address, or 'local' to start "
            "one on loopback, its workers at normal priority) instead of the local pool.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Parent folder of `fleet-<stamp>/`.")] = Path("runs"),
) -> None:
    """Compare sync FedAvg, FedBuff and Estuary on a device trace, on virtual time.

    The real coordinator service (pacer, cohorts, secure aggregation, staleness weights,
    ledger) runs on a virtual clock with the in-memory store; devices are events drawn
    from the trace; every device update is real adapter training on the device's own
    slice of the standard-library corpus. Writes summary.json (time to target, wasted
    work, bytes, staleness, overhead per update), events.jsonl and PNG plots to
    `OUT/fleet-<stamp>/`.
    """
    from simulation.fleet.policies import FleetConfig
    from simulation.fleet.run import POLICIES, run_comparison
    from simulation.fleet.trace import TraceError, load_trace

    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    unknown = [p for p in chosen if p not in POLICIES]
    if not chosen or unknown:
        fail(f"--policies: unknown {unknown or 'empty'}; choose from {_POLICY_NAMES}")
        raise typer.Exit(ExitCode.USAGE)
    try:
        loaded = load_trace(trace)
        config = FleetConfig(
            devices=devices,
            seed=seed,
            duration_s=hours * 3600.0,
            max_updates=max_updates,
            buffer_size=buffer_size,
            target_staleness=target_staleness,
            sync_clients=sync_clients,
            local_steps=local_steps,
        )
    except (TraceError, ValueError) as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.USAGE) from None
    out_dir = out / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
    summary = run_comparison(
        loaded, config, out_dir=out_dir, workers=workers, ray_address=ray, policies=chosen
    )
    table = {
        name: {
            k: pol[k]
            for k in ("time_to_target_s", "final_bits_per_byte", "wasted_fraction", "accepted")
        }
        for name, pol in summary["policies"].items()
    }
    typer.echo(json.dumps({"out": str(out_dir), "policies": table,
                           "ratio_vs_sync": summary["ratio_vs_sync"],
                           "ratio_vs_fedbuff": summary["ratio_vs_fedbuff"]}, indent=2))  # fmt: skip
