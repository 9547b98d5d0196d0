"""The arms of the learning benchmark (``bench/learning.py``) and how each is tuned.

Kept apart from the command so that the rules that make the numbers trustworthy —
three disjoint data splits, selection on validation only, the headline arithmetic —
are small functions a unit test can hold to account.

Data: each client (one standard-library package) is cut into *test* chunks (the
held-out split of :func:`estuary.data.stdlib_clients`, never trained on and never
used to choose anything), then its remaining bytes into *validation* chunks and
*training* chunks (capped in the scarce regime). Every arm records a curve of union
bits/byte on validation **and** on test at the same points; every choice (learning
rates, server lr, momentum, early-stopping step) reads the validation curve only, and
the test curve of the chosen run is what gets reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.train import warmup_factor
from estuary.adapters import (
    AdapterConfig,
    GlobalAdapter,
    attach_adapters,
    coverage_scale,
    detach_adapters,
    mean_from_sum,
    rank_learning_rate,
    trained_columns,
    weighted_sum,
)
from estuary.data import ClientData, stdlib_clients
from estuary.data.stdlib import split_bytes
from estuary.data.windows import WindowSampler
from estuary.model.pretrain import lm_loss
from simulation.evaluation import HeldOut

R_MAX = 16
SEQ_LEN = 128
BATCH = 8
#: Global gradient-norm clip per local step, as train_adapter's default.
GRAD_CLIP = 1.0
#: Share of each client's non-test bytes kept for validation (whole 1 KiB chunks).
VALIDATION_FRACTION = 0.15


@dataclass(frozen=True)
class Splits:
    """Per client: training bytes (``train``), validation and test held-out sets."""

    clients: list[ClientData]  # .train = training bytes, .heldout = validation bytes
    validation: HeldOut
    test: HeldOut
    test_clients: list[ClientData]  # .heldout = test bytes
    val_windows: int
    test_windows: int

    def own(self, index: int) -> tuple[HeldOut, HeldOut]:
        """Client ``index``'s own validation and test windows (the same windows as above)."""
        val = HeldOut(
            [self.clients[index]], seq_len=SEQ_LEN, max_windows_per_client=self.val_windows
        )
        test = HeldOut(
            [self.test_clients[index]], seq_len=SEQ_LEN, max_windows_per_client=self.test_windows
        )
        return val, test


def make_splits(
    packages: Sequence[str],
    *,
    max_train_bytes: int | None,
    val_windows: int,
    test_windows: int,
) -> Splits:
    """Cut every package into disjoint training, validation and test bytes.

    The test split is :func:`estuary.data.stdlib_clients`'s held-out split; validation
    chunks are drawn (by a keyed hash, like the test split) from the rest, and the
    training bytes are what is left, capped at ``max_train_bytes``.
    """
    full = stdlib_clients(tuple(packages))
    train_val = [
        split_bytes(
            c.train,
            name=f"{c.name}/validation",
            heldout_fraction=VALIDATION_FRACTION,
            max_train_bytes=max_train_bytes,
        )
        for c in full
    ]
    clients = [
        ClientData(name=c.name, train=tv.train, heldout=tv.heldout)
        for c, tv in zip(full, train_val, strict=True)
    ]
    validation = HeldOut(clients, seq_len=SEQ_LEN, max_windows_per_client=val_windows)
    test = HeldOut(full, seq_len=SEQ_LEN, max_windows_per_client=test_windows)
    return Splits(
        clients=clients,
        validation=validation,
        test=test,
        test_clients=full,
        val_windows=val_windows,
        test_windows=test_windows,
    )


@dataclass
class Curve:
    """Union bits/byte at evaluation points, on validation and on test.

    ``x`` is the arm's own progress unit (rounds for federated arms, sequential
    optimizer steps for the single-learner arms); ``samples`` the training windows
    consumed by then, all learners together.
    """

    x: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)

    def add(self, x: int, samples: int, val: float, test: float) -> None:
        self.x.append(x)
        self.samples.append(samples)
        self.val.append(val)
        self.test.append(test)


@dataclass
class Run:
    """One training run of one arm under one hyperparameter setting and seed."""

    arm: str
    config: dict[str, float]
    seed: int
    curve: Curve
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def select_best(runs: Sequence[Run]) -> Run:
    """Return the run whose **validation** curve reaches the lowest value.

    Reads ``curve.val`` only; the test curve plays no part, so a choice made here can
    never have peeked at the test split. Ties go to the first run.
    """
    if not runs:
        raise ValueError("runs: at least one run is needed")
    return min(runs, key=lambda r: min(r.curve.val) if r.curve.val else math.inf)


def early_stopped(curve: Curve) -> tuple[int, float]:
    """Return ``(index, test value)`` at the point of lowest validation score."""
    if not curve.val:
        raise ValueError("curve: empty")
    index = int(np.argmin(curve.val))
    return index, curve.test[index]


def at_or_before(curve: Curve, x: int, *, use: str = "test") -> float | None:
    """Return the curve's value at the last point with ``curve.x ≤ x`` (None: none)."""
    values = curve.test if use == "test" else curve.val
    best: float | None = None
    for xi, v in zip(curve.x, values, strict=True):
        if xi <= x:
            best = v
    return best


def first_below(xs: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """Return the first ``x`` whose value is strictly below ``target`` (None: never)."""
    for x, v in zip(xs, values, strict=True):
        if v < target:
            return int(x)
    return None


def gap_closed(*, value: float, local_only: float, ceiling: float) -> float | None:
    """Return ``(local_only − value) / (local_only − ceiling)``; None if the gap is 0."""
    if local_only == ceiling:
        return None
    return (local_only - value) / (local_only - ceiling)


def eval_points(last: int, *, every: int) -> list[int]:
    """0, 1, 2, 4, … up to ``every``, then every ``every`` up to ``last`` (included)."""
    points = {0, last}
    p = 1
    while p < min(every, last):
        points.add(p)
        p *= 2
    points.update(range(every, last + 1, every))
    return sorted(x for x in points if x <= last)


# ---------------------------------------------------------------------------- training


class _Learner:
    """One adapter training on one byte stream with Adam, resumable between evaluations.

    The loop of :func:`edge_client.train.train_adapter` (attach, Adam on ΔB, global
    gradient clip), kept running across evaluation points so that a curve costs one
    run, not one run per point. Its one optimizer warms up once, over the run's first
    ``warmup_steps`` steps, as a task's fresh optimizer does.
    """

    def __init__(
        self,
        base: nn.Module,
        adapter: GlobalAdapter,
        data: bytes,
        *,
        rank: int,
        lr: float,
        seed: int,
        warmup_steps: int = 0,
    ) -> None:
        self.base = base
        self.adapter = adapter
        self.sampler = WindowSampler(data, seq_len=SEQ_LEN, seed=seed)
        self.rank = rank
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.done = 0
        self.delta = {n: np.zeros_like(b) for n, b in adapter.b.items()}
        self.state: dict[str, Any] | None = None

    def train(self, steps: int) -> None:
        modules = attach_adapters(self.base, self.adapter, rank=self.rank)
        try:
            named = dict(zip(self.adapter.shapes, modules, strict=True))
            for name, m in named.items():
                m.lora_delta.data.copy_(torch.from_numpy(self.delta[name][:, : self.rank]))
            params = [m.lora_delta for m in modules]
            opt = torch.optim.Adam(params, lr=self.lr)
            if self.state is not None:
                opt.load_state_dict(self.state)
            self.base.train()
            for _ in range(steps):
                if self.warmup_steps > 1:  # once, over the run's first steps
                    ramp = warmup_factor(
                        self.done, warmup_steps=self.warmup_steps, steps=self.warmup_steps
                    )
                    for group in opt.param_groups:
                        group["lr"] = self.lr * ramp
                self.done += 1
                loss = lm_loss(self.base, self.sampler.batch(BATCH))
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                opt.step()
            self.state = opt.state_dict()
            self.delta = {name: m.padded_delta() for name, m in named.items()}
        finally:
            detach_adapters(self.base)
            self.base.eval()

    def current(self) -> GlobalAdapter:
        return self.adapter.apply_update(self.delta)


def train_single(
    base: nn.Module,
    data: bytes,
    *,
    lr: float,
    seed: int,
    checkpoints: Sequence[int],
    score: Callable[[GlobalAdapter], tuple[float, float]],
    rank: int = R_MAX,
    warmup_steps: int = 0,
) -> Curve:
    """Train one rank-``rank`` adapter on ``data``; ``(val, test)`` at every checkpoint."""
    zero = GlobalAdapter.for_model(base, AdapterConfig(r_max=R_MAX))
    learner = _Learner(base, zero, data, rank=rank, lr=lr, seed=seed, warmup_steps=warmup_steps)
    curve = Curve()
    done = 0
    for point in checkpoints:
        if point > done:
            learner.train(point - done)
            done = point
        val, test = score(learner.current())
        curve.add(point, point * BATCH, val, test)
    return curve


def train_local_only(
    base: nn.Module,
    splits: Splits,
    *,
    lr: float,
    seed: int,
    checkpoints: Sequence[int],
    patience: int,
    warmup_steps: int = 0,
) -> tuple[Curve, dict[str, Any]]:
    """Every client trains alone; each early-stops on its **own** validation windows.

    A client stops training once ``patience`` checkpoints in a row bring no
    validation gain and keeps its best-validation adapter for the remaining points.

    Returns the union curve (each client's windows scored by its own adapter, at each
    checkpoint) and, per client, the step its validation score chose. The union value
    used as *local-only's best* is the test score of each client at its own chosen
    step (:func:`local_only_union`).
    """
    names = [c.name for c in splits.clients]
    val_per: dict[str, list[float]] = {n: [] for n in names}
    test_per: dict[str, list[float]] = {n: [] for n in names}
    for i, client in enumerate(splits.clients):
        zero = GlobalAdapter.for_model(base, AdapterConfig(r_max=R_MAX))
        learner = _Learner(
            base,
            zero,
            client.train,
            rank=R_MAX,
            lr=lr,
            seed=seed * 1000 + i,
            warmup_steps=warmup_steps,
        )
        own_val, own_test = splits.own(i)
        done, since = 0, 0
        vals, tests = val_per[client.name], test_per[client.name]
        for point in checkpoints:
            if since >= patience:
                # Early-stopped: the client keeps its best-validation adapter from here on.
                best = int(np.argmin(vals))
                vals.append(vals[best])
                tests.append(tests[best])
                continue
            if point > done:
                learner.train(point - done)
                done = point
            adapter = learner.current()
            vals.append(own_val.score(base, adapter).union)
            tests.append(own_test.score(base, adapter).union)
            since = 0 if vals[-1] <= min(vals) else since + 1
    curve = Curve()
    for k, point in enumerate(checkpoints):
        curve.add(
            point,
            point * BATCH * len(names),
            splits.validation._union({n: val_per[n][k] for n in names}),
            splits.test._union({n: test_per[n][k] for n in names}),
        )
    chosen = {n: int(np.argmin(val_per[n])) for n in names}
    stopped_val = splits.validation._union({n: val_per[n][chosen[n]] for n in names})
    stopped_test = splits.test._union({n: test_per[n][chosen[n]] for n in names})
    steps = {n: int(checkpoints[chosen[n]]) for n in names}
    return curve, {"steps": steps, "val": stopped_val, "test": stopped_test}


#: Column rules: "nested" (first r columns, mean over all updates), "rotating"
#: (owned_columns, cohort sums × r_max / r), "rotating_plain" (owned_columns, plain mean),
#: "rotating_ratio" (owned_columns, each column over the weight that trained it).
RULES = ("nested", "rotating", "rotating_plain", "rotating_ratio")


@dataclass(frozen=True)
class FedConfig:
    """A federated variant: ranks per client (cycled) and the column rule."""

    ranks: tuple[int, ...]
    rule: str  # "nested": first r columns; "rotating": owned_columns + coverage_scale
    local_steps: int
    lr_power: float = 0.0  # a rank-r client trains at lr · (R_MAX / r)^lr_power
    warmup_steps: int = 0  # linear lr warm-up over each task's first steps (train_adapter)


def train_federated(
    base: nn.Module,
    splits: Splits,
    variant: FedConfig,
    *,
    rounds: int,
    lr: float,
    server_lr: float,
    momentum: float,
    seed: int,
    checkpoints: Sequence[int],
    score: Callable[[GlobalAdapter], tuple[float, float]],
) -> Curve:
    """Synchronous rounds of every client; the server adds ``η · Σ w s ΔB / Σ w``.

    ``w`` is the client's training size (as the coordinator weights data), ``s`` its
    cohort scale: 1 under nested ranks, ``r_max / r`` (:func:`coverage_scale`) under
    rotating ownership. A client's member index is its position among the clients of
    its rank, as in a cohort of one class. Server momentum (FedAvgM) adds
    ``β·v + step`` instead of ``step``.
    """
    from edge_client.train import train_adapter

    if variant.rule not in RULES:
        raise ValueError(f"rule: one of {RULES}, got {variant.rule!r}")
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=R_MAX))
    velocity = {n: np.zeros(b.shape, np.float64) for n, b in adapter.b.items()}
    ranks = [variant.ranks[i % len(variant.ranks)] for i in range(len(splits.clients))]
    members = [ranks[:i].count(r) for i, r in enumerate(ranks)]
    per_round = variant.local_steps * BATCH * len(splits.clients)
    curve = Curve()
    todo = sorted(set(checkpoints))
    if todo and todo[0] == 0:
        curve.add(0, 0, *score(adapter))
    for round_ in range(1, rounds + 1):
        updates, weights = [], []
        column_weight = np.zeros(R_MAX)
        for i, client in enumerate(splits.clients):
            # Every rotating rule takes its block as the coordinator hands it out
            # (training.column_rule = "rotating"); full-rank members train every column.
            columns = trained_columns(
                "nested" if variant.rule == "nested" else "rotating",
                ranks[i],
                R_MAX,
                version=round_ - 1,
                member=members[i],
            )
            result = train_adapter(
                base,
                adapter,
                client.train,
                rank=ranks[i],
                steps=variant.local_steps,
                lr=rank_learning_rate(lr, rank=ranks[i], r_max=R_MAX, power=variant.lr_power),
                batch_size=BATCH,
                seq_len=SEQ_LEN,
                threads=torch.get_num_threads(),
                seed=seed * 1_000_003 + 10_000 * round_ + i,
                columns=columns,
                warmup_steps=variant.warmup_steps,
            )
            scale = coverage_scale(ranks[i], R_MAX) if variant.rule == "rotating" else 1.0
            updates.append({n: scale * d for n, d in result.delta_b.items()})
            weights.append(float(len(client.train)))
            column_weight[list(columns or range(ranks[i]))] += weights[-1]
        total, weight_sum = weighted_sum(updates, weights)  # what secure aggregation reveals
        if variant.rule == "rotating_ratio":
            # Per-column step sizes known to the server: column j's sum over the weight
            # of the members that trained it (0 where nobody did).
            per_col = np.where(column_weight > 0, 1.0 / np.maximum(column_weight, 1e-12), 0.0)
            mean = {n: (t * per_col[None, :]).astype(np.float32) for n, t in total.items()}
        else:
            mean = mean_from_sum(total, weight_sum)
        velocity = {n: momentum * velocity[n] + mean[n] for n in mean}
        adapter = adapter.apply_update(velocity, server_lr=server_lr)
        if round_ in todo:
            curve.add(round_, round_ * per_round, *score(adapter))
    return curve


def timed(fn: Callable[[], Curve]) -> tuple[Curve, float]:
    start = time.perf_counter()
    curve = fn()
    return curve, time.perf_counter() - start
