"""Pretraining loop for the demo base model: next-byte prediction on a byte stream.

Used by ``estuary model init``, by tests that need a quickly pretrained tiny model
(:func:`pretrained_preset`), and by ``estuary simulate``, which pretrains a preset base
once and caches it on disk (:func:`ensure_pretrained_preset`) while logging its progress
(:class:`ProgressLog`).
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from estuary.data.stdlib import pretrain_corpus
from estuary.data.windows import WindowSampler
from estuary.model.presets import PRESETS, build_preset

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

logger = logging.getLogger(__name__)

#: Called after each optimizer step with (step number from 1, training loss in bits/byte).
ProgressFn = Callable[[int, float], None]


@dataclass(frozen=True)
class PretrainResult:
    """Outcome of :func:`pretrain`.

    Attributes
    ----------
    losses
        Training loss of every step, in bits per byte.
    tokens
        Tokens (bytes) predicted in total.
    """

    losses: list[float]
    tokens: int


def lm_loss(model: nn.Module, batch: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Return the next-token cross-entropy (nats) of ``model`` on ``batch``.

    ``batch`` is ``(b, seq_len + 1)``: inputs are the first ``seq_len`` ids, targets the
    last ``seq_len``. ``reduction`` is passed to :func:`torch.nn.functional.cross_entropy`
    (``"mean"`` over every predicted token, or ``"sum"``).
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits  # (b, t, vocab)
    # (b, t, vocab) -> (b * t, vocab)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction
    )


def pretrain(
    model: nn.Module,
    data: bytes | npt.NDArray[np.uint8],
    *,
    steps: int,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    warmup_steps: int = 20,
    clip_norm: float = 1.0,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> PretrainResult:
    """Train every parameter of ``model`` on random windows of ``data``, in place.

    AdamW with linear warm-up and cosine decay to 10 % of ``lr``. Deterministic for a
    seed and thread count: window offsets come from a seeded numpy generator and no
    dropout is used.

    Parameters
    ----------
    model
        A causal LM (``forward(input_ids=...).logits``).
    data
        Byte-level training stream.
    steps
        Optimizer steps; 0 returns at once.
    batch_size, seq_len
        Windows per step and tokens per window.
    lr
        Peak learning rate. 3e-3 suits the tiny preset (a ~1 M-parameter model with
        AdamW tolerates a large rate; 1e-3 halves progress per step in our trials).
    warmup_steps
        Linear warm-up length; Adam's early second-moment estimates are noisy, so the
        first steps are kept small.
    clip_norm
        Global gradient-norm clip.
    seed
        Seed for window sampling.
    progress
        Optional callback per step.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr: must be positive, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
    if clip_norm <= 0:
        raise ValueError(f"clip_norm: must be positive, got {clip_norm}")
    sampler = WindowSampler(data, seq_len=seq_len, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        batch = sampler.batch(batch_size)
        loss = lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch stubs leave it unannotated
        nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        scheduler.step()
        bits = loss.item() / math.log(2)
        losses.append(bits)
        if progress is not None:
            progress(step + 1, bits)
    model.eval()
    if losses:
        logger.info("pretrained %d steps, final loss %.3f bits/byte", steps, losses[-1])
    return PretrainResult(losses=losses, tokens=steps * batch_size * seq_len)


def pretrained_preset(
    name: str = "tiny",
    *,
    steps: int = 200,
    seed: int = 0,
    batch_size: int = 16,
    seq_len: int = 128,
    progress: ProgressFn | None = None,
) -> LlamaForCausalLM:
    """Return preset ``name`` pretrained for ``steps`` on the stdlib top-level modules.

    Deterministic for ``seed`` (initialisation and sampling). Pretraining runs under a
    forked RNG, so the caller's global torch seed is untouched.
    """
    model = build_preset(name, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pretrain(
            model,
            pretrain_corpus(),
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
            progress=progress,
        )
    return model


def cached_preset_dir(cache_dir: str | Path, name: str, *, steps: int, seed: int) -> Path:
    """Return where :func:`ensure_pretrained_preset` keeps preset ``name`` pretrained so.

    The name records everything the weights depend on besides the code: preset, steps and
    seed (batch size and window length are the defaults of :func:`pretrained_preset`).
    """
    return Path(cache_dir) / f"base-{name}-{steps}steps-seed{seed}"


def ensure_pretrained_preset(
    cache_dir: str | Path,
    name: str = "tiny",
    *,
    steps: int,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Path:
    """Return a Hugging Face directory of preset ``name`` pretrained ``steps`` steps.

    The first call pretrains (:func:`pretrained_preset`) and saves the model under
    ``cache_dir`` (:func:`cached_preset_dir`); later calls return that directory at once.
    The model is written to a temporary directory of its own and renamed into place, so a
    reader never sees half a model and two processes filling the cache at once both end
    with one complete directory.

    Parameters
    ----------
    cache_dir
        Folder of cached bases; created if missing.
    name, steps, seed
        What to pretrain (see :func:`pretrained_preset`).
    progress
        Called after each pretraining step; never called on a cache hit.

    Raises
    ------
    ValueError
        If ``name`` is not a preset or ``steps`` is negative.
    OSError
        If the cache cannot be written, or a folder without ``config.json`` (not a
        model) stands where the base belongs; the message names it.
    """
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    target = cached_preset_dir(cache_dir, name, steps=steps, seed=seed)
    if (target / "config.json").is_file():
        return target
    if target.is_dir() and any(target.iterdir()):
        raise OSError(
            f"{target}: a folder without config.json (not a model) is where the pretrained "
            "base belongs; delete it to pretrain again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    model = pretrained_preset(name, steps=steps, seed=seed, progress=progress)
    # A fresh name of our own, made like any directory (mkdtemp's would be owner-only).
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}")
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError as exc:
            # Another process filled the cache first: its directory is as good as ours.
            if not (target / "config.json").is_file():
                raise OSError(f"{target}: cannot cache the pretrained base there: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("pretrained %s base cached in %s", name, target)
    return target


class ProgressLog:
    """A :data:`ProgressFn` that logs pretraining progress: step, loss and elapsed time.

    Logs the first step, then at most one line every ``every_s`` seconds, and always the
    last step, so a slow machine shows it is working and a fast one is not flooded.

    Parameters
    ----------
    total
        Steps of the whole run (the ``n`` of "step k/n").
    label
        What is being pretrained, e.g. ``"tiny base"``.
    every_s
        Least seconds between two lines (besides the first and the last). 10 s: a few
        dozen lines for the minutes a base takes on 2 cores.
    clock
        Monotonic seconds; elapsed time counts from construction. Injected for tests.
    log
        Logger to write to (INFO), standard error by default in the CLI.

    Raises
    ------
    ValueError
        If ``total`` is negative or ``every_s`` is negative.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = logger,
    ) -> None:
        if total < 0:
            raise ValueError(f"total: must be >= 0, got {total}")
        if every_s < 0:
            raise ValueError(f"every_s: must be >= 0, got {every_s}")
        self.total = total
        self.label = label
        self.every_s = every_s
        self._clock = clock
        self._log = log
        self._start = clock()
        self._last: float | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds since construction."""
        return self._clock() - self._start

    def __call__(self, step: int, loss: float) -> None:
        """Log step ``step`` of :attr:`total` with its loss (bits/byte) when due."""
        now = self._clock()
        due = self._last is None or step >= self.total or now - self._last >= self.every_s
        if not due:
            return
        self._last = now
        self._log.info(
            "pretraining %s: step %d/%d, loss %.3f bits/byte, %.0f s elapsed",
            self.label,
            step,
            self.total,
            loss,
            now - self._start,
        )
