"""Learning benchmark: held-out bits/byte curves of federation against its references.

Usage::

    python bench/learning.py --json                  # defaults (see below), prints JSON
    python bench/learning.py --quick --json          # smoke test: a few minutes
    python bench/learning.py --variants all_rank_16,mixed_ranks,mixed_ranks_rotating_ratio --json

Corpus: the Python standard library, one client per package (8 packages), the tiny
preset pretrained 200 steps on the top-level modules (cached in ``--cache``), clients
training on its int8-compressed copy as on the edge. Each client's bytes are split three
ways (:func:`learning_arms.make_splits`): **test** (never trained on, never used for a
choice), **validation** (chooses every hyperparameter and every early-stopping point)
and **training** (capped at ``--scarce-bytes``: the scarce regime, where federation
should beat local-only).

Arms, all scored on the same windows (union = token-weighted over all clients' windows):

- ``federated`` per variant: synchronous rounds of every client, ``--local-steps`` Adam
  steps each, the server adds ``η · Σ w s ΔB / Σ w`` with optional server momentum β.
  Variants: ``all_rank_16``; ``mixed_ranks`` (ranks 4/8/16 cycled over the clients, as
  Estuary trains them by default: a rank-r client trains the block of r columns
  :func:`estuary.adapters.trained_columns` gives it, moving on each round, under the
  plain mean); optional: ``mixed_ranks_nested`` (the first r columns, the rule before),
  ``mixed_ranks_flat_lr`` (nested, every rank at lr), and earlier candidates
  ``mixed_ranks_rotating`` (sums × ``r_max / r``), ``…_rotating_plain`` (= ``mixed_ranks``
  with power 0), ``…_rotating_ratio`` (each column over the weight that trained it).
- ``local_only``: every client trains its own rank-16 adapter for as many steps as it
  takes in the federation, early-stopped on its **own** validation windows.
- ``centralized``: one rank-16 adapter on the pooled training bytes, early-stopped on
  validation. Read off one run: at equal *sequential* steps (rounds × local steps), at
  equal *samples* (× clients), and run to convergence (until ``--patience`` checkpoints
  bring no validation gain, or ``--central-max-steps``): the **ceiling**.

Every arm's optimizer ramps its rate linearly over its first ``--warmup-steps`` steps
(the product's ``training.warmup_steps``): each federated task, and the local-only and
centralized learners once, at the start of their single run.

Tuning: every arm gets the same client/learner learning-rate grid ``--lrs``; federated
arms also ``--server-lrs`` × ``--momentums``. Every grid point runs on seed 0 (the
federated ones for ``--tune-rounds`` rounds), the choice reads **validation only**
(:func:`learning_arms.select_best`), and the chosen setting runs on ``--seeds`` seeds
(seed 0's run reused where it ran the full horizon). Reported: test mean ± sd over seeds.

Headline per variant (under ``variants``): ``rounds_to_beat_local_only`` (first round at
which the federated mean test score is below local-only's best) and
``gap_closed_at_64_rounds`` ((local-only − federated) / (local-only − ceiling)), plus
``time_to_target_s``: simulated wall-clock for each arm to reach local-only's best, with
federated time = rounds × (local steps × step time + transfer time), centralized time =
steps × step time (``--step-time-s``, ``--bandwidth-mbps``).

Cost. A training step (8 × 128 bytes, tiny preset, int8 base, 1 thread) measured 0.13-0.14
CPU seconds on a 2-core machine at load average 20-28. The defaults (``--rounds 64
--seeds 3``, two variants, grid 4 lrs, federated also momentum {0, 0.5} for 16 rounds) train
at most ~120 000 steps, fewer with early stopping, of which the federated seed runs alone
are 30 720 (2 variants × 3 seeds × 64 rounds × 8 clients × 10 steps) and federated tuning
20 480: about two hours of a 2-core machine with ``--jobs 2`` (45-55 minutes at 5 local
steps), not 20 minutes; fewer seeds or rounds than the issue asks for would be needed for
that. Why 10 local steps per round: it is ``estuary simulate``'s own default (the
coordinator's is 20), and a round is a communication round, which more local work per
round exists to save. At 5 (the default before) mixed ranks passed
local-only's best at round 16, not 8 (seed 0 at round 8: 3.061 at 5 steps, 2.974 at 10,
local-only's best at 5 steps 3.050); the reference arms move with it (local-only and centralized get
the same sequential steps and samples as the federation: twice as many). Why 16 tuning rounds and
2e-2 in the grid: at 8 rounds validation picked lr 1e-2 (the grid had no 2e-2), which at
16 rounds is 0.04 bits/byte behind 2e-2 on validation (all rank 16, seed 0, momentum 0.5:
3.117 vs 3.078); the horizon that counts is 64 rounds, and 16 is the longest the tuning
budget allows. ``--quick`` (3 clients, 2 rounds,
2 seeds, 2 lrs) checks the plumbing in ~30 CPU seconds. The JSON records the CPU
seconds, training steps, wall time and load average of the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.config.models import TrainingSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # learning_arms beside us

import learning_arms as arms

#: The product's ``training.warmup_steps``: the bench trains as Estuary does.
PRODUCT_WARMUP_STEPS: int = TrainingSettings().warmup_steps

CLIENTS = ("email", "asyncio", "json", "xml", "unittest", "http", "logging", "multiprocessing")
#: Variant name -> (ranks cycled over the clients, column rule of learning_arms.RULES,
#: rank learning-rate power: a rank-r client trains at lr · (16 / r)^power, as
#: ``training.rank_lr_power`` makes the coordinator hand out). ``mixed_ranks`` is what
#: Estuary does by default (rotating columns under the plain mean, power 1:
#: ``training.column_rule = "rotating"``); ``mixed_ranks_nested`` the ``nested`` rule (the
#: default before); ``mixed_ranks_flat_lr`` nested with every rank at lr (before issue
#: 15's rank-scaled rate); the other rotating rules are earlier candidates.
VARIANTS: dict[str, tuple[tuple[int, ...], str, float]] = {
    "all_rank_16": ((16,), "nested", 1.0),
    "mixed_ranks": ((4, 8, 16), "rotating_plain", 1.0),
    "mixed_ranks_nested": ((4, 8, 16), "nested", 1.0),
    "mixed_ranks_flat_lr": ((4, 8, 16), "nested", 0.0),
    "mixed_ranks_rotating": ((4, 8, 16), "rotating", 0.0),
    "mixed_ranks_rotating_plain": ((4, 8, 16), "rotating_plain", 0.0),  # power 0
    "mixed_ranks_rotating_ratio": ((4, 8, 16), "rotating_ratio", 0.0),
}


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (what the JSON's ``settings`` records)."""

    base_dir: str
    rounds: int = 64
    local_steps: int = 10  # estuary simulate's own default (training.local_steps there)
    warmup_steps: int = PRODUCT_WARMUP_STEPS  # every arm's optimizer warms up
    seeds: int = 3
    scarce_bytes: int = 8192
    lrs: tuple[float, ...] = (3e-3, 1e-2, 2e-2, 3e-2)
    server_lrs: tuple[float, ...] = (1.0,)
    momentums: tuple[float, ...] = (0.0, 0.5)
    tune_rounds: int = 16
    variants: tuple[str, ...] = ("all_rank_16", "mixed_ranks")
    val_windows: int = 16
    test_windows: int = 32
    eval_every: int = 8
    central_max_steps: int = 0  # 0: equal samples at the full horizon
    patience: int = 3
    step_time_s: float = 0.0  # 0: the measured CPU seconds per training step
    bandwidth_mbps: float = 20.0
    jobs: int = 2
    clients: tuple[str, ...] = CLIENTS

    @property
    def fed_points(self) -> list[int]:
        return arms.eval_points(self.rounds, every=self.eval_every)

    @property
    def local_points(self) -> list[int]:
        return [r * self.local_steps for r in self.fed_points]

    @property
    def central_steps(self) -> int:
        equal_samples = self.rounds * self.local_steps * len(self.clients)
        return self.central_max_steps or equal_samples


# ------------------------------------------------------------------------ one task


_STATE: dict[str, Any] = {}


def _setup(settings: Settings) -> None:
    """Load the base and build the splits once per worker process."""
    if _STATE.get("settings") == settings:
        return
    from estuary.compress import compress_model
    from estuary.model import load_model

    torch.set_num_threads(1)
    base = load_model(settings.base_dir)
    edge = compress_model(copy.deepcopy(base), scheme="int8")
    splits = arms.make_splits(
        settings.clients,
        max_train_bytes=settings.scarce_bytes,
        val_windows=settings.val_windows,
        test_windows=settings.test_windows,
    )
    _STATE.update(settings=settings, edge=edge, splits=splits)


@dataclass(frozen=True)
class Task:
    arm: str  # a variant name, "local_only" or "centralized"
    config: tuple[tuple[str, float], ...]
    seed: int
    rounds: int  # federated horizon (tuning may be shorter)


def run_task(settings: Settings, task: Task) -> arms.Run:
    _setup(settings)
    edge, splits = _STATE["edge"], _STATE["splits"]
    config = dict(task.config)
    started = time.process_time()

    def score(adapter: Any) -> tuple[float, float]:
        return splits.validation.score(edge, adapter).union, splits.test.score(edge, adapter).union

    extra: dict[str, Any] = {}
    if task.arm == "local_only":
        curve, stopped = arms.train_local_only(
            edge,
            splits,
            lr=config["lr"],
            seed=task.seed,
            checkpoints=settings.local_points,
            patience=settings.patience,
            warmup_steps=settings.warmup_steps,
        )
        extra = stopped
    elif task.arm == "centralized":
        curve = _centralized(settings, edge, splits, lr=config["lr"], seed=task.seed, score=score)
    else:
        ranks, rule, lr_power = VARIANTS[task.arm]
        curve = arms.train_federated(
            edge,
            splits,
            arms.FedConfig(
                ranks,
                rule,
                settings.local_steps,
                lr_power=lr_power,
                warmup_steps=settings.warmup_steps,
            ),
            rounds=task.rounds,
            lr=config["lr"],
            server_lr=config["server_lr"],
            momentum=config["momentum"],
            seed=task.seed,
            checkpoints=[p for p in settings.fed_points if p <= task.rounds] + [task.rounds],
            score=score,
        )
    steps = _train_steps(settings, task)
    extra["cpu_seconds"] = time.process_time() - started
    extra["train_steps"] = steps
    return arms.Run(task.arm, config, task.seed, curve, extra["cpu_seconds"], extra)


def _centralized(
    settings: Settings, edge: Any, splits: Any, *, lr: float, seed: int, score: Any
) -> arms.Curve:
    """Pooled training checkpointed every ``eval_every × local_steps`` steps, with patience."""
    from simulation.baselines import pooled_training_data

    # Past the federation's sequential steps, a checkpoint every 2 × eval_every rounds'
    # worth of steps: each costs a full validation + test pass.
    every = 2 * settings.eval_every * settings.local_steps
    points = sorted(
        set(settings.local_points) | set(range(every, settings.central_steps + 1, every))
    )
    zero = GlobalAdapter.for_model(edge, AdapterConfig(r_max=arms.R_MAX))
    learner = arms._Learner(
        edge,
        zero,
        pooled_training_data(splits.clients),
        rank=arms.R_MAX,
        lr=lr,
        seed=seed,
        warmup_steps=settings.warmup_steps,
    )
    curve = arms.Curve()
    done, best, since = 0, float("inf"), 0
    for point in points:
        learner.train(point - done)
        done = point
        val, test = score(learner.current())
        curve.add(point, point * arms.BATCH, val, test)
        best, since = (val, 0) if val < best else (best, since + 1)
        if point >= settings.local_points[-1] and since >= settings.patience:
            break  # converged on validation: the rest of the budget would not be chosen
    return curve


def _train_steps(settings: Settings, task: Task) -> int:
    if task.arm == "local_only":
        return settings.local_points[-1] * len(settings.clients)
    if task.arm == "centralized":
        return settings.central_steps  # an upper bound: patience may stop it earlier
    return task.rounds * settings.local_steps * len(settings.clients)


# ------------------------------------------------------------------------ the plan


def grid(settings: Settings, arm: str) -> list[tuple[tuple[str, float], ...]]:
    if arm in ("local_only", "centralized"):
        return [(("lr", lr),) for lr in settings.lrs]
    return [
        (("lr", lr), ("server_lr", s), ("momentum", m))
        for lr in settings.lrs
        for s in settings.server_lrs
        for m in settings.momentums
    ]


def choose(tuning: dict[str, list[arms.Run]]) -> dict[str, arms.Run]:
    """The chosen run of every arm, by validation only.

    Local-only is chosen by the union of each client's early-stopped validation score;
    every other arm by the lowest point of its validation curve.
    """
    chosen: dict[str, arms.Run] = {}
    for arm, runs in tuning.items():
        if arm == "local_only":
            chosen[arm] = min(runs, key=lambda r: float(r.extra["val"]))
        else:
            chosen[arm] = arms.select_best(runs)
    return chosen


def _map(settings: Settings, tasks: list[Task]) -> list[arms.Run]:
    if settings.jobs <= 1:
        return [run_task(settings, t) for t in tasks]
    import multiprocessing

    with ProcessPoolExecutor(
        settings.jobs, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        return list(pool.map(run_task, [settings] * len(tasks), tasks))


def run(settings: Settings) -> dict[str, Any]:
    arm_names = ["local_only", "centralized", *settings.variants]
    tune_rounds = min(settings.tune_rounds, settings.rounds)
    tuning_tasks = [
        Task(arm, cfg, 0, settings.rounds if arm in ("local_only", "centralized") else tune_rounds)
        for arm in arm_names
        for cfg in grid(settings, arm)
    ]
    progress(f"tuning: {len(tuning_tasks)} runs on seed 0")
    tuning_runs = _map(settings, tuning_tasks)
    tuning: dict[str, list[arms.Run]] = {a: [] for a in arm_names}
    for r in tuning_runs:
        tuning[r.arm].append(r)
    chosen = choose(tuning)
    final_tasks = []
    finals: dict[str, list[arms.Run]] = {a: [] for a in arm_names}
    for arm in arm_names:
        cfg = tuple(chosen[arm].config.items())
        full_seed0 = arm in ("local_only", "centralized") or tune_rounds == settings.rounds
        if full_seed0:
            finals[arm].append(chosen[arm])
        first = 1 if full_seed0 else 0
        final_tasks += [Task(arm, cfg, s, settings.rounds) for s in range(first, settings.seeds)]
    progress(f"chosen { ({a: r.config for a, r in chosen.items()}) }; {len(final_tasks)} seed runs")
    for r in _map(settings, final_tasks):
        finals[r.arm].append(r)
    return report(settings, tuning, chosen, finals)


# ------------------------------------------------------------------------ the report


def _stats(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "per_seed": vals}


def _curve_stats(runs: list[arms.Run]) -> dict[str, Any]:
    xs = runs[0].curve.x
    for r in runs:
        if r.curve.x[: len(xs)] != xs[: len(r.curve.x)]:
            raise ValueError(f"{r.arm}: seeds evaluated at different points")
    n = min(len(r.curve.x) for r in runs)
    test = [[r.curve.test[i] for r in runs] for i in range(n)]
    val = [[r.curve.val[i] for r in runs] for i in range(n)]
    return {
        "x": xs[:n],
        "samples": runs[0].curve.samples[:n],
        "test_mean": [statistics.fmean(t) for t in test],
        "test_sd": [statistics.stdev(t) if len(t) > 1 else 0.0 for t in test],
        "val_mean": [statistics.fmean(v) for v in val],
    }


def _best_before(curve: arms.Curve, limit: int) -> float:
    """Test value at the best-validation point among points ``x ≤ limit``."""
    pairs = [(v, t) for x, v, t in zip(curve.x, curve.val, curve.test, strict=True) if x <= limit]
    return min(pairs)[1]


def report(
    settings: Settings,
    tuning: dict[str, list[arms.Run]],
    chosen: dict[str, arms.Run],
    finals: dict[str, list[arms.Run]],
) -> dict[str, Any]:
    """Assemble the JSON (pure: reads the runs, trains nothing)."""
    seq = settings.local_steps
    n = len(settings.clients)
    local_runs = sorted(finals["local_only"], key=lambda r: r.seed)
    central_runs = sorted(finals["centralized"], key=lambda r: r.seed)
    local_best = _stats([r.extra["test"] for r in local_runs])
    ceiling_per_seed = [_best_before(r.curve, 10**12) for r in central_runs]
    ceiling = _stats(ceiling_per_seed)
    unique = {id(r): r for rs in [*tuning.values(), *finals.values()] for r in rs}.values()
    cpu_steps = sum(int(r.extra["train_steps"]) for r in unique)
    cpu_seconds = sum(r.seconds for r in unique)
    step_time = settings.step_time_s or cpu_seconds / max(cpu_steps, 1)
    some_variant = next(iter(settings.variants))
    adapter_bytes = _adapter_bytes()
    transfer_s = 2 * adapter_bytes * 8 / (settings.bandwidth_mbps * 1e6)  # down B, up ΔB
    round_s = seq * step_time + transfer_s
    target = local_best["mean"]

    central_curve = _curve_stats(central_runs)
    central_time = arms.first_below(central_curve["x"], central_curve["test_mean"], target)
    variants: dict[str, Any] = {}
    for name in settings.variants:
        runs = sorted(finals[name], key=lambda r: r.seed)
        curve = _curve_stats(runs)
        beat = arms.first_below(curve["x"], curve["test_mean"], target)
        at64 = None
        per_seed_gap = []
        if settings.rounds >= 64:
            for r, c, lo in zip(runs, ceiling_per_seed, local_best["per_seed"], strict=True):
                v = arms.at_or_before(r.curve, 64)
                assert v is not None
                per_seed_gap.append(arms.gap_closed(value=v, local_only=lo, ceiling=c))
            at64 = _stats([g for g in per_seed_gap if g is not None])
        final_round = curve["x"][-1]
        final = _stats([r.curve.test[len(curve["x"]) - 1] for r in runs])
        central_equal = {
            "equal_sequential_steps": _stats(
                [_best_before(r.curve, final_round * seq) for r in central_runs]
            ),
            "equal_samples": _stats(
                [_best_before(r.curve, final_round * seq * n) for r in central_runs]
            ),
        }
        variants[name] = {
            "ranks": list(VARIANTS[name][0]),
            "column_rule": VARIANTS[name][1],
            "rank_lr_power": VARIANTS[name][2],
            "chosen": chosen[name].config,
            "tuning_val_min": {json.dumps(r.config): min(r.curve.val) for r in tuning[name]},
            "curves": {
                "federated": curve,
                "federated_sequential_steps": [x * seq for x in curve["x"]],
            },
            "final_round": final_round,
            "final_test": final,
            "local_only_best": local_best,
            "centralized_ceiling": ceiling,
            "centralized_at_final_round": central_equal,
            "rounds_to_beat_local_only": beat,
            "gap_closed_at_64_rounds": at64,
            "gap_closed_at_final_round": arms.gap_closed(
                value=final["mean"], local_only=target, ceiling=ceiling["mean"]
            ),
            "time_to_target_s": {
                "target_bits_per_byte": target,
                "federated": None if beat is None else beat * round_s,
                "centralized": None if central_time is None else central_time * step_time,
            },
        }
    return {
        "settings": dict(settings.__dict__),
        "splits": "test: never trained on or chosen by; validation: chooses every setting",
        "curves": {
            "local_only": _curve_stats(local_runs),
            "centralized": central_curve,
            **{name: variants[name]["curves"]["federated"] for name in settings.variants},
        },
        "local_only_best": {
            **local_best,
            "lr": chosen["local_only"].config["lr"],
            "early_stop_steps": [r.extra["steps"] for r in local_runs],
        },
        "centralized_ceiling": {
            **ceiling,
            "lr": chosen["centralized"].config["lr"],
            "steps_run": [r.curve.x[-1] for r in central_runs],
        },
        "variants": variants,
        "rounds_to_beat_local_only": {
            k: v["rounds_to_beat_local_only"] for k, v in variants.items()
        },
        "gap_closed_at_64_rounds": {k: v["gap_closed_at_64_rounds"] for k, v in variants.items()},
        "simulated_time": {
            "step_time_s": step_time,
            "transfer_s_per_round": transfer_s,
            "adapter_bytes": adapter_bytes,
            "bandwidth_mbps": settings.bandwidth_mbps,
            "variant_for_units": some_variant,
        },
        "cpu_seconds": cpu_seconds,
        "train_steps": cpu_steps,
    }


def _adapter_bytes() -> int:
    edge = _STATE.get("edge")
    if edge is None:
        return 0
    zero = GlobalAdapter.for_model(edge, AdapterConfig(r_max=arms.R_MAX))
    return sum(b.nbytes for b in zero.b.values())


def plot(result: dict[str, Any], path: Path, *, local_steps: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    by_steps, by_samples = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, c in result["curves"].items():
        steps = (
            c["x"] if name in ("local_only", "centralized") else [x * local_steps for x in c["x"]]
        )
        lo = [m - s for m, s in zip(c["test_mean"], c["test_sd"], strict=True)]
        hi = [m + s for m, s in zip(c["test_mean"], c["test_sd"], strict=True)]
        for ax, xs in ((by_steps, steps), (by_samples, c["samples"])):
            (line,) = ax.plot(xs, c["test_mean"], label=name, marker=".")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    for ax in (by_steps, by_samples):
        ax.axhline(
            result["local_only_best"]["mean"], color="grey", ls="--", label="local-only best"
        )
        ax.axhline(
            result["centralized_ceiling"]["mean"],
            color="black",
            ls=":",
            label="centralized ceiling",
        )
        ax.set_ylabel("test bits/byte (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
    by_steps.set_xlabel("sequential optimizer steps (federated: rounds × local steps)")
    by_samples.set_xlabel("training windows, all learners together")
    by_samples.set_xscale("symlog", linthresh=64)
    by_samples.set_xlim(left=0)
    by_steps.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))


def progress(message: str) -> None:
    print(f"[learning] {message}", file=sys.stderr, flush=True)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="HF model dir; default: tiny pretrained, cached")
    parser.add_argument("--cache", type=Path, default=Path("runs/.cache"), help="pretrained bases")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument(
        "--local-steps",
        type=int,
        default=Settings.local_steps,
        help="Adam steps per client per round (estuary simulate's default)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=Settings.warmup_steps,
        help="linear lr warm-up of every arm's optimizer (training.warmup_steps)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scarce-bytes", type=int, default=8192, help="training bytes per client")
    parser.add_argument("--lrs", default="3e-3,1e-2,2e-2,3e-2", help="lr grid of every arm")
    parser.add_argument("--server-lrs", default="1.0", help="federated server lr grid")
    parser.add_argument("--momentums", default="0.0,0.5", help="federated server momentum grid")
    parser.add_argument("--tune-rounds", type=int, default=16, help="federated tuning horizon")
    parser.add_argument(
        "--variants", default="all_rank_16,mixed_ranks", help=f"of {sorted(VARIANTS)}"
    )
    parser.add_argument("--val-windows", type=int, default=16, help="validation windows per client")
    parser.add_argument(
        "--test-windows", type=int, default=32, help="test windows per client (>16)"
    )
    parser.add_argument("--eval-every", type=int, default=8, help="rounds between evaluations")
    parser.add_argument("--central-max-steps", type=int, default=0, help="0: equal samples")
    parser.add_argument("--patience", type=int, default=3, help="early stop: checkpoints w/o gain")
    parser.add_argument("--step-time-s", type=float, default=0.0, help="0: measured CPU s/step")
    parser.add_argument("--bandwidth-mbps", type=float, default=20.0)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, 1 torch thread each")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 3 clients, 2 rounds of 2 steps, 2 seeds, 2 lrs",
    )
    parser.add_argument("--png", type=Path, default=Path("runs/learning_curves.png"))
    parser.add_argument("--json", action="store_true", help="print compact JSON")
    args = parser.parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()
    if args.base is None:
        from estuary.model.pretrain import ensure_pretrained_preset

        base_dir = ensure_pretrained_preset(args.cache, "tiny", steps=args.pretrain_steps, seed=0)
    else:
        base_dir = args.base
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    settings = Settings(
        base_dir=str(base_dir),
        rounds=args.rounds,
        local_steps=args.local_steps,
        warmup_steps=args.warmup_steps,
        seeds=args.seeds,
        scarce_bytes=args.scarce_bytes,
        lrs=_floats(args.lrs),
        server_lrs=_floats(args.server_lrs),
        momentums=_floats(args.momentums),
        tune_rounds=args.tune_rounds,
        variants=variants,
        val_windows=args.val_windows,
        test_windows=args.test_windows,
        eval_every=args.eval_every,
        central_max_steps=args.central_max_steps,
        patience=args.patience,
        step_time_s=args.step_time_s,
        bandwidth_mbps=args.bandwidth_mbps,
        jobs=args.jobs,
    )
    if args.quick:
        settings = replace(
            settings,
            rounds=2,
            local_steps=2,
            seeds=2,
            lrs=(1e-2, 3e-2),
            momentums=(0.0,),
            tune_rounds=1,
            eval_every=1,
            central_max_steps=8,
            patience=1,
            test_windows=17,
            val_windows=4,
            clients=("json", "http", "logging"),
        )
    if settings.test_windows <= 16:
        parser.error("--test-windows: must exceed 16 windows per client")
    if settings.warmup_steps < 0:
        parser.error(f"--warmup-steps: must be >= 0, got {settings.warmup_steps}")
    if settings.seeds < 1 or settings.rounds < 1 or not settings.lrs:
        parser.error("--seeds, --rounds and --lrs need at least one")
    _setup(settings)
    result = run(settings)
    result["wall_seconds"] = time.perf_counter() - started
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    result["base_model"] = str(base_dir)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(result, args.png, local_steps=settings.local_steps)
    result["png"] = str(args.png)
    print(json.dumps(result, indent=None if args.json else 2, default=str))


if __name__ == "__main__":
    main()
