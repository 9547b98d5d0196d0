"""Learning benchmark: does federation with the exact aggregation rule help?

Usage::

    python bench/learning.py --json                    # pretrains a tiny base first
    python bench/learning.py --base DIR --json         # base from `estuary model init`

On the standard-library corpus (one client per package) and the tiny preset, in a
*scarce* regime (each client's training bytes capped) and an *ample* one (all of them),
compares held-out bits/byte of:

- ``base``: the pretrained base, no adapter;
- ``local_only``: each client trains its own adapter for the whole step budget and is
  scored on its own held-out data;
- ``exact_rule``: federated rounds; every client trains its rank's columns of B from the
  current global adapter, the server adds ``server_lr · Σ w_i ΔB_i / Σ w_i`` (a plain
  sum, as secure aggregation would reveal it; no network), optionally through server
  momentum (FedAvgM: the velocity ``β·v + mean ΔB`` is added instead);
- ``centralized``: one rank-r_max adapter trained on the pooled training data with the
  same number of samples as all clients together.

The baselines and the held-out scoring are those of ``estuary simulate``
(:mod:`simulation.baselines`, :mod:`simulation.evaluation`).
Baselines get the best client learning rate of ``--baseline-lrs`` (by union score); the
federation uses ``--lr``. Clients train on the int8-compressed base (as on the edge)
and are evaluated on it.
"union" is the token-weighted mean over all clients' held-out windows (for local-only,
each client's windows scored by its own adapter). ``gap_closed`` is
``(local_only − exact_rule) / (local_only − centralized)`` on the union.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.train import train_adapter
from estuary.adapters import (
    AdapterConfig,
    GlobalAdapter,
    mean_from_sum,
    merge_into_base,
    weighted_sum,
)
from estuary.compress import compress_model
from estuary.data import ClientData, stdlib_clients
from estuary.model import load_model
from estuary.model.pretrain import pretrained_preset
from simulation.baselines import centralized, local_only
from simulation.evaluation import HeldOut, Scores

CLIENTS = ("email", "asyncio", "json", "xml", "unittest", "http", "logging", "multiprocessing")
SEQ_LEN = 128
BATCH = 8
R_MAX = 16
#: torch threads of every training run (train_adapter's default), baselines and
#: federation alike, so their step costs and results are comparable; ``--threads``
#: sets the threads of everything else (pretraining, evaluation).
TRAIN_THREADS = 2


@dataclass(frozen=True)
class FedVariant:
    name: str
    rounds: int
    local_steps: int
    server_lr: float
    ranks: tuple[int, ...]
    reseed_every: int = 0  # merge B·A into the base and draw a new A every k rounds; 0 = never
    server_momentum: float = 0.0  # FedAvgM: velocity = β·velocity + mean ΔB; 0 = plain


def progress(message: str) -> None:
    print(f"[learning] {message}", file=sys.stderr, flush=True)


def run_federated(
    server_base: nn.Module,
    edge_base: nn.Module,
    clients: list[ClientData],
    held_out: HeldOut,
    variant: FedVariant,
    *,
    lr: float,
) -> tuple[Scores, int]:
    """``edge_base`` is ``server_base`` compressed to int8; it is used as is, not changed.

    Only a variant that re-seeds A changes the base: it merges into a copy of
    ``server_base`` (full precision, as in the cloud) and compresses that copy afresh.
    """
    server = copy.deepcopy(server_base) if variant.reseed_every else server_base
    adapter = GlobalAdapter.for_model(edge_base, AdapterConfig(r_max=R_MAX))
    upload = sum(b.nbytes for b in adapter.b.values())  # ΔB is zero-padded to r_max
    velocity = {n: np.zeros_like(b) for n, b in adapter.b.items()}
    for round_ in range(variant.rounds):
        updates = []
        weights = []
        for i, client in enumerate(clients):
            result = train_adapter(
                edge_base,
                adapter,
                client.train,
                rank=variant.ranks[i % len(variant.ranks)],
                steps=variant.local_steps,
                lr=lr,
                batch_size=BATCH,
                seq_len=SEQ_LEN,
                seed=10_000 * (round_ + 1) + i,
            )
            updates.append(result.delta_b)
            weights.append(float(len(client.train)))
        total, weight_sum = weighted_sum(updates, weights)  # what secure aggregation reveals
        mean = mean_from_sum(total, weight_sum)
        velocity = {n: variant.server_momentum * velocity[n] + mean[n] for n in mean}
        adapter = adapter.apply_update(velocity, server_lr=variant.server_lr)
        if variant.reseed_every and (round_ + 1) % variant.reseed_every == 0:
            adapter = merge_into_base(server, adapter, reseed=True)
            # The velocity lives in the old A's coordinates; it means nothing after re-seeding.
            velocity = {n: np.zeros_like(b) for n, b in adapter.b.items()}
            edge_base = compress_model(copy.deepcopy(server), scheme="int8")
    return held_out.score(edge_base, adapter), upload * variant.rounds


def run_regime(
    server_base: nn.Module,
    *,
    max_train_bytes: int | None,
    variants: list[FedVariant],
    local_steps_total: int,
    lr: float,
    baseline_lrs: tuple[float, ...],
    eval_windows_per_client: int,
) -> dict[str, Any]:
    start = time.perf_counter()
    clients = stdlib_clients(CLIENTS, max_train_bytes=max_train_bytes)
    held_out = HeldOut(clients, seq_len=SEQ_LEN, max_windows_per_client=eval_windows_per_client)
    edge_base = compress_model(copy.deepcopy(server_base), scheme="int8")
    zero = GlobalAdapter.for_model(edge_base, AdapterConfig(r_max=R_MAX))
    ranks = variants[0].ranks
    # Each baseline gets the best client learning rate of the grid (by union score), so
    # the federated variants are compared against tuned baselines, not weakened ones.
    local_runs = {
        rate: local_only(
            edge_base,
            zero,
            clients,
            steps={c.name: local_steps_total for c in clients},
            ranks={c.name: ranks[i % len(ranks)] for i, c in enumerate(clients)},
            lr=rate,
            batch_size=BATCH,
            seq_len=SEQ_LEN,
            threads=TRAIN_THREADS,
            seed=1000,
            held_out=held_out,
        )
        for rate in baseline_lrs
    }
    central_runs = {
        rate: centralized(
            edge_base,
            zero,
            clients,
            steps=local_steps_total * len(clients),
            rank=R_MAX,
            lr=rate,
            batch_size=BATCH,
            seq_len=SEQ_LEN,
            threads=TRAIN_THREADS,
            seed=2000,
            held_out=held_out,
        )
        for rate in baseline_lrs
    }
    best_local = min(local_runs, key=lambda r: local_runs[r].union)
    best_central = min(central_runs, key=lambda r: central_runs[r].union)
    results: dict[str, Any] = {
        "train_bytes_per_client": {c.name: len(c.train) for c in clients},
        "base": held_out.score(edge_base, zero).as_dict(),
        "local_only": {
            **local_runs[best_local].as_dict(),
            "lr": best_local,
            "union_by_lr": {str(r): v.union for r, v in local_runs.items()},
        },
        "centralized": {
            **central_runs[best_central].as_dict(),
            "lr": best_central,
            "union_by_lr": {str(r): v.union for r, v in central_runs.items()},
        },
    }
    local = results["local_only"]["union"]
    central = results["centralized"]["union"]
    fed: dict[str, Any] = {}
    progress(f"local-only {local:.3f}, centralized {central:.3f}")
    for variant in variants:
        scores, upload = run_federated(server_base, edge_base, clients, held_out, variant, lr=lr)
        entry: dict[str, Any] = dict(scores.as_dict())
        entry["settings"] = {
            "rounds": variant.rounds,
            "local_steps": variant.local_steps,
            "server_lr": variant.server_lr,
            "ranks": list(variant.ranks),
            "reseed_every": variant.reseed_every,
            "server_momentum": variant.server_momentum,
        }
        entry["upload_bytes_per_client"] = upload
        entry["gap_closed"] = (
            (local - entry["union"]) / (local - central) if local != central else None
        )
        fed[variant.name] = entry
        progress(f"{variant.name}: {entry['union']:.3f}, gap closed {entry['gap_closed']}")
    results["exact_rule"] = fed
    results["seconds"] = time.perf_counter() - start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, help="HF model dir; default: pretrain tiny")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--save-base", type=Path, help="save the pretrained base here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scarce-bytes", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2, help="client lr of the federation")
    parser.add_argument(
        "--baseline-lrs", default="3e-3,1e-2", help="client lrs tried for the baselines"
    )
    parser.add_argument("--eval-windows", type=int, default=16, help="per client")
    parser.add_argument("--sweep", action="store_true", help="also try the other variants")
    parser.add_argument("--regimes", default="scarce,ample", help="comma-separated subset")
    parser.add_argument("--json", action="store_true", help="print compact JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.base is not None:
        base = load_model(args.base)
        source = str(args.base)
    else:
        base = pretrained_preset("tiny", steps=args.pretrain_steps, seed=0)
        source = f"tiny pretrained {args.pretrain_steps} steps"
        if args.save_base is not None:
            base.save_pretrained(str(args.save_base), safe_serialization=True)

    mixed = (4, 8, 16)
    rounds, local = args.rounds, args.local_steps
    main_variant = FedVariant("mixed_ranks", rounds, local, 1.0, mixed)
    momentum_variant = FedVariant(
        "mixed_ranks_momentum_0.5", rounds, local, 1.0, mixed, server_momentum=0.5
    )
    scarce_variants = [
        main_variant,
        momentum_variant,
        FedVariant("all_rank_16", rounds, local, 1.0, (16,)),
        FedVariant("all_rank_16_momentum_0.5", rounds, local, 1.0, (16,), server_momentum=0.5),
    ]
    if args.sweep:
        scarce_variants += [
            FedVariant("server_lr_2", rounds, local, 2.0, mixed),
            FedVariant("fewer_rounds_more_local", rounds // 2, local * 2, 1.0, mixed),
            FedVariant("reseed_A_every_2", rounds, local, 1.0, mixed, reseed_every=2),
        ]
    common = {
        "local_steps_total": rounds * local,
        "lr": args.lr,
        "baseline_lrs": tuple(float(x) for x in args.baseline_lrs.split(",")),
        "eval_windows_per_client": args.eval_windows,
    }
    report: dict[str, Any] = {
        "base_model": source,
        "clients": list(CLIENTS),
        "batch": f"{BATCH}x{SEQ_LEN}",
        "r_max": R_MAX,
        "client_lr": args.lr,
        "samples_per_client": rounds * local * BATCH,
        "target": "exact rule closes >= 50% of the local-only -> centralized gap (scarce)",
    }
    regimes = args.regimes.split(",")
    if "scarce" in regimes:
        report["scarce"] = run_regime(
            base, max_train_bytes=args.scarce_bytes, variants=scarce_variants, **common
        )
    if "ample" in regimes:
        report["ample"] = run_regime(
            base, max_train_bytes=None, variants=[main_variant, momentum_variant], **common
        )
    report["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
