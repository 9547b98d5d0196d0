"""Benchmark of one in-process secure aggregation session.

Usage: ``python -m secure_agg.bench --clients N --size M --dropout P [--neighbours K] --json``.

Runs one in-process session (every message encoded and decoded) and prints one JSON object:
mean and max client seconds per stage and in total (over the clients that finished), server
seconds per stage and in total, bytes up and down per client, the expansion factor of the upload
against a plain float32 update, and ``exact``: whether the unmasked integer sum equals the sum of
the survivors' quantised inputs bit for bit. Dropped clients disappear after sharing keys (the
costliest point for the server: it must rebuild their pairwise masks) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from secure_agg.client import SINGLE_TENSOR
from secure_agg.driver import run_local
from secure_agg.numerics import quantize
from secure_agg.stages import Stage

_INPUT_NORM = 0.5
"""L2 norm of the synthetic updates: inside the clip bound of 1.0 so clipping does not hide
quantisation errors, large enough to use most of the fixed-point range."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m secure_agg.bench", description=__doc__)
    parser.add_argument("--clients", type=int, required=True, help="cohort size n")
    parser.add_argument("--size", type=int, required=True, help="elements per update m")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction of clients dropping")
    parser.add_argument("--neighbours", type=int, default=None, help="SecAgg+ k (even)")
    parser.add_argument(
        "--threshold",
        type=int,
        default=None,
        help="t; default n//2 + 1 (complete graph) or k//2 + 1",
    )
    parser.add_argument("--bits", type=int, default=24, help="modulus exponent b")
    parser.add_argument(
        "--drop-stage",
        default="MASKED_INPUT",
        choices=[s.name for s in Stage][:5],
        help="stage whose message dropped clients never send",
    )
    parser.add_argument("--active", action="store_true", help="active-adversary mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs, dropouts, rounding")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error("--clients must be >= 2")
    if args.size < 1:
        parser.error("--size must be >= 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its JSON report; returns the exit code (1 if not exact)."""
    args = _parse(argv)
    n, m = args.clients, args.size
    rng = np.random.default_rng(args.seed)
    # float32 inputs: n=500 × m=1M would be 4 GB in float64.
    inputs = []
    for _ in range(n):
        x = rng.standard_normal(m, dtype=np.float32)
        inputs.append(x * np.float32(_INPUT_NORM / max(float(np.linalg.norm(x)), 1e-12)))
    dropped = rng.choice(n, size=math.floor(args.dropout * n), replace=False)
    drop = {int(i): Stage[args.drop_stage] for i in dropped}
    if args.threshold is not None:
        threshold = args.threshold
    elif args.neighbours is not None and args.neighbours < n - 1:
        threshold = args.neighbours // 2 + 1
    else:
        threshold = n // 2 + 1
    wall = time.perf_counter()
    result = run_local(
        inputs,
        threshold=threshold,
        clip=1.0,
        bits=args.bits,
        neighbours=args.neighbours,
        drop=drop,
        seed=args.seed,
        active=args.active,
    )
    wall = time.perf_counter() - wall
    fp = result.fixed_point
    expected = np.zeros(m, dtype=np.int64)
    for i in result.survivors:
        q = quantize(
            {SINGLE_TENSOR: inputs[i]},
            fixed_point=fp,
            weight=1.0,
            rng=np.random.default_rng([args.seed, i]),
        )
        expected += q[SINGLE_TENSOR]
    survivors = list(result.survivors)
    per_stage = {
        stage: [seconds[i] for i in survivors] for stage, seconds in result.client_seconds.items()
    }
    totals = [sum(per_stage[s][j] for s in per_stage) for j in range(len(survivors))]
    up = [result.bytes_up[i] for i in survivors]
    down = [result.bytes_down[i] for i in survivors]
    report = {
        "clients": n,
        "size": m,
        "dropout": args.dropout,
        "drop_stage": args.drop_stage,
        "neighbours": args.neighbours,
        "threshold": threshold,
        "bits": fp.bits,
        "frac_bits": fp.frac_bits,
        "active": args.active,
        "survivors": len(survivors),
        "client_seconds": {
            "mean": {s: float(np.mean(v)) for s, v in per_stage.items()},
            "max": {s: float(np.max(v)) for s, v in per_stage.items()},
            "total_mean": float(np.mean(totals)),
            "total_max": float(np.max(totals)),
        },
        "server_seconds": {**result.server_seconds, "total": sum(result.server_seconds.values())},
        "bytes_up_per_client": float(np.mean(up)),
        "bytes_down_per_client": float(np.mean(down)),
        "expansion": float(np.mean(up)) / (4 * m),
        "exact": bool(np.array_equal(np.asarray(result.integer_sum), expected)),
        "wall_seconds": wall,
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
