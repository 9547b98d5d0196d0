"""On-device adapter training: rank-r columns of B on a frozen compressed base.

The edge holds the compressed base and the global adapter of version v. It trains the
first ``rank`` columns of ``B`` for a fixed number of steps and returns ΔB zero-padded to
``r_max`` — the quantity secure aggregation sums — plus metrics. Windows are sampled
lazily from the data (which may be memory-mapped), so memory is bounded by the batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from estuary.adapters.lora import GlobalAdapter, attach_adapters, delta_b, detach_adapters
from estuary.data.windows import WindowSampler
from estuary.model.pretrain import lm_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainMetrics:
    """What a local training run measured.

    Attributes
    ----------
    loss_first, loss_last, loss_mean
        Training loss of the first step, the last step and the mean over steps, in
        bits per byte (nats / ln 2).
    tokens
        Tokens (bytes) predicted during training.
    seconds
        Wall-clock time of the training loop.
    steps
        Optimizer steps taken.
    """

    loss_first: float
    loss_last: float
    loss_mean: float
    tokens: int
    seconds: float
    steps: int


@dataclass(frozen=True)
class TrainResult:
    """ΔB per module (``(out, r_max)`` float32, zero outside the trained columns), metrics."""

    delta_b: dict[str, npt.NDArray[np.float32]]
    metrics: TrainMetrics


def _check_args(
    *,
    rank: int,
    steps: int,
    lr: float,
    grad_clip_norm: float,
    batch_size: int,
    seq_len: int,
    threads: int,
    warmup_steps: int = 0,
) -> None:
    if steps <= 0:
        raise ValueError(f"steps: must be positive, got {steps}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"lr: must be a positive number, got {lr}")
    if grad_clip_norm <= 0 or not math.isfinite(grad_clip_norm):
        raise ValueError(f"grad_clip_norm: must be a positive number, got {grad_clip_norm}")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    if seq_len <= 0:
        raise ValueError(f"seq_len: must be positive, got {seq_len}")
    if threads <= 0:
        raise ValueError(f"threads: must be positive, got {threads}")
    if rank <= 0:
        raise ValueError(f"rank: must be positive, got {rank}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: must be 0 or more, got {warmup_steps}")


def warmup_factor(step: int, *, warmup_steps: int, steps: int) -> float:
    """Fraction of the rate at local step ``step`` (from 0) of a ``steps``-step task.

    A linear ramp over the first ``min(warmup_steps, steps)`` steps: ``(step + 1) / w``,
    then 1. The ramp never outlasts the task, so every task ends at its full rate;
    ``warmup_steps`` 0 (or 1) is no warm-up.
    """
    w = min(warmup_steps, steps)
    return 1.0 if w <= 1 else min(1.0, (step + 1) / w)


def train_adapter(
    base: nn.Module,
    adapter: GlobalAdapter,
    data: bytes | npt.NDArray[np.uint8] | Path,
    *,
    rank: int,
    steps: int,
    lr: float = 2e-3,
    grad_clip_norm: float = 1.0,
    batch_size: int = 8,
    seq_len: int = 128,
    threads: int = 2,
    seed: int = 0,
    optimizer: Literal["adam", "sgd"] = "adam",
    columns: Sequence[int] | None = None,
    warmup_steps: int = 0,
) -> TrainResult:
    """Train the rank-``rank`` part of ``adapter`` on ``base`` and return ΔB and metrics.

    The adapters are attached for the run and detached afterwards, so ``base`` is left
    as it was and can be reused for the next task.

    Parameters
    ----------
    base
        Frozen base (compressed or full precision), a causal LM.
    adapter
        Global adapter of the task's version (shared A, current B).
    data
        Local training bytes, a ``uint8`` array, or a file path (memory-mapped).
    rank
        Device class rank, ``1 ≤ rank ≤ r_max``.
    steps
        Optimizer steps.
    lr
        Adam learning rate for ΔB. The default suits ``A`` with orthonormal rows and
        LoRA scaling 1 (ΔB entries of order 1e-2 after ~50 steps).
    grad_clip_norm
        Global gradient-norm clip per step.
    batch_size, seq_len
        Windows per step and tokens per window.
    threads
        torch intra-op threads for the run (restored afterwards).
    seed
        Seed of window sampling; with a fixed thread count the result is a function of
        the inputs.
    optimizer
        ``"adam"`` (default) or ``"sgd"`` (plain, no momentum). With few local steps
        Adam's first updates are sign-like (every coordinate moves by ≈ ``lr``), so an
        average over clients is noisy; SGD updates are proportional to the gradient and
        average like a larger batch, which suits a server-side adaptive optimizer.
    columns
        Columns of ``B`` to train (``rank`` distinct indices below ``r_max``); None: the
        first ``rank``.
    warmup_steps
        Linear learning-rate warm-up: step ``k`` (from 0) runs at
        ``lr · min(1, (k + 1) / w)``, ``w = min(warmup_steps, steps)``
        (:func:`warmup_factor`); 0: ``lr`` from the first step. Every task starts a fresh
        optimizer, and Adam's first steps move every coordinate by about ``lr`` whatever
        the gradient's size (sign-like), so without a warm-up a few-step task's update is
        mostly noise of size ``lr``.

    Raises
    ------
    ValueError
        If an argument is out of range (the message names it), e.g. ``rank > r_max``.
    """
    _check_args(
        rank=rank,
        steps=steps,
        lr=lr,
        grad_clip_norm=grad_clip_norm,
        batch_size=batch_size,
        seq_len=seq_len,
        threads=threads,
        warmup_steps=warmup_steps,
    )
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer: must be 'adam' or 'sgd', got {optimizer!r}")
    if rank > adapter.config.r_max:
        raise ValueError(f"rank: {rank} exceeds r_max={adapter.config.r_max}")
    if isinstance(data, Path):
        sampler = WindowSampler.from_file(data, seq_len=seq_len, seed=seed)
    else:
        sampler = WindowSampler(data, seq_len=seq_len, seed=seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    modules = attach_adapters(base, adapter, rank=rank, columns=columns)
    try:
        params = [m.lora_delta for m in modules]
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=lr)
            if optimizer == "adam"
            else torch.optim.SGD(params, lr=lr)
        )
        losses: list[float] = []
        base.train()
        start = time.perf_counter()
        for step in range(steps):
            if warmup_steps > 1:
                for group in opt.param_groups:
                    group["lr"] = lr * warmup_factor(step, warmup_steps=warmup_steps, steps=steps)
            batch = sampler.batch(batch_size)  # (batch, seq_len + 1)
            loss = lm_loss(base, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch stubs leave it unannotated
            nn.utils.clip_grad_norm_(params, grad_clip_norm)
            opt.step()
            losses.append(loss.item() / math.log(2))
        seconds = time.perf_counter() - start
        update = delta_b(base)
    finally:
        detach_adapters(base)
        base.eval()
        torch.set_num_threads(previous_threads)
    metrics = TrainMetrics(
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=float(np.mean(losses)),
        tokens=steps * batch_size * seq_len,
        seconds=seconds,
        steps=steps,
    )
    logger.debug(
        "trained rank %d for %d steps: loss %.3f -> %.3f", rank, steps, losses[0], losses[-1]
    )
    return TrainResult(delta_b=update, metrics=metrics)
