"""Held-out bits/byte of a base model with a global adapter, per client and over all.

Every client's held-out bytes are cut once into evenly spaced windows
(:func:`estuary.data.eval_windows`); a score is the next-byte cross-entropy over those
windows in bits per byte. The *union* score is the token-weighted mean over every
client's windows, i.e. ``Σ_c nats_c / Σ_c tokens_c / ln 2`` — a client with more
held-out windows counts for more, and the union equals the score of one model on the
pooled windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from estuary.adapters.lora import GlobalAdapter, attach_adapters, detach_adapters
from estuary.data.stdlib import ClientData
from estuary.data.windows import eval_windows
from estuary.model.pretrain import lm_loss

#: Windows per forward pass. Bounds memory only (each window's loss is summed on its
#: own, so the batching does not change which tokens are scored). 32 windows of 128
#: bytes keep the tiny preset's activations to a few MB, and larger batches were not
#: faster on two CPU cores.
EVAL_BATCH_WINDOWS = 32


@dataclass(frozen=True)
class Scores:
    """Held-out bits/byte.

    Attributes
    ----------
    per_client
        Bits/byte on each client's held-out windows, by client name.
    union
        Token-weighted mean of ``per_client`` over every client's windows.
    """

    per_client: dict[str, float]
    union: float

    def as_dict(self) -> dict[str, float | dict[str, float]]:
        """Return ``{"per_client": {...}, "union": ...}`` (JSON-ready)."""
        return {"per_client": dict(self.per_client), "union": self.union}


def token_weighted_union(per_client: Mapping[str, float], tokens: Mapping[str, int]) -> float:
    """Return ``Σ_c per_client[c] · tokens[c] / Σ_c tokens[c]``.

    Raises
    ------
    ValueError
        If the names differ, a count is negative, or the counts sum to zero.
    """
    if set(per_client) != set(tokens):
        raise ValueError("tokens: client names differ from those of per_client")
    if any(n < 0 for n in tokens.values()):
        raise ValueError("tokens: counts must be non-negative")
    total = sum(tokens.values())
    if total <= 0:
        raise ValueError("tokens: counts sum to zero")
    return sum(per_client[c] * tokens[c] for c in per_client) / total


class HeldOut:
    """Every client's held-out windows, scored together.

    Parameters
    ----------
    clients
        The clients; each needs at least ``seq_len + 1`` held-out bytes.
    seq_len
        Tokens per window (the same as in training).
    max_windows_per_client
        Cap on each client's windows, evenly spaced over its held-out bytes; ``None``
        takes every non-overlapping window.

    Raises
    ------
    ValueError
        If ``clients`` is empty or names a client twice, ``seq_len`` or
        ``max_windows_per_client`` is not positive, or a client has too few held-out
        bytes for one window.
    """

    def __init__(
        self,
        clients: list[ClientData],
        *,
        seq_len: int,
        max_windows_per_client: int | None = None,
    ) -> None:
        if not clients:
            raise ValueError("clients: at least one client is needed")
        names = [c.name for c in clients]
        if len(set(names)) != len(names):
            raise ValueError(f"clients: names must be unique, got {names}")
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        if max_windows_per_client is not None and max_windows_per_client <= 0:
            raise ValueError(
                f"max_windows_per_client: must be positive or None, got {max_windows_per_client}"
            )
        self.seq_len = seq_len
        self.windows: dict[str, torch.Tensor] = {}
        for client in clients:
            try:
                self.windows[client.name] = eval_windows(
                    client.heldout, seq_len=seq_len, max_windows=max_windows_per_client
                )
            except ValueError as exc:
                raise ValueError(f"clients: {client.name!r} held-out data: {exc}") from exc
        # Each window predicts seq_len tokens (all but its first byte).
        self.tokens: dict[str, int] = {
            n: int(w.shape[0]) * seq_len for n, w in self.windows.items()
        }
        # (Σ_c n_c, seq_len + 1): all windows in one tensor, client by client, so one
        # model is scored in a few large batches instead of one small batch per client.
        self._all = torch.cat(list(self.windows.values()), dim=0)
        self._bounds: dict[str, tuple[int, int]] = {}
        start = 0
        for name, w in self.windows.items():
            self._bounds[name] = (start, start + int(w.shape[0]))
            start += int(w.shape[0])

    @property
    def clients(self) -> list[str]:
        """Client names, in the order given."""
        return list(self.windows)

    def score(
        self, model: nn.Module, adapter: GlobalAdapter | None, *, threads: int | None = None
    ) -> Scores:
        """Return every client's bits/byte under ``model`` plus ``adapter``.

        The adapter is attached for the call and detached afterwards, so ``model`` is left
        as it was. The whole ``B`` (all ``r_max`` columns) acts in the forward pass: the
        attached rank only sets how many columns of ``ΔB`` *train*, and ``ΔB`` is zero here.
        A zero adapter therefore scores exactly (bit for bit) as the base alone.

        Parameters
        ----------
        model
            The base the clients train on (e.g. the int8-compressed base); no adapter
            may be attached to it.
        adapter
            Global adapter to evaluate; ``None`` scores the base alone.
        threads
            torch intra-op threads for the call (restored afterwards); ``None`` keeps
            the current setting.
        """
        if adapter is not None:
            attach_adapters(model, adapter, rank=1)
        try:
            nats = _window_nats(model, self._all, threads=threads)
        finally:
            if adapter is not None:
                detach_adapters(model)
        per_client = {
            name: float(nats[lo:hi].sum()) / self.tokens[name] / math.log(2)
            for name, (lo, hi) in self._bounds.items()
        }
        return Scores(per_client=per_client, union=self._union(per_client))

    def score_each(
        self,
        model: nn.Module,
        adapters: Mapping[str, GlobalAdapter],
        *,
        rank: int = 1,
        threads: int | None = None,
    ) -> Scores:
        """Return each client's bits/byte under its own adapter (the local-only baseline).

        Parameters
        ----------
        model
            The base every adapter was trained on; left as it was.
        adapters
            One adapter per client name of this held-out set.
        rank
            Rank the adapters are attached at, ``1 ≤ rank ≤ r_max``. It does not change
            the score (every column of ``B`` acts in the forward pass); it is checked
            against each adapter's ``r_max``.
        threads
            As in :meth:`score`.

        Raises
        ------
        ValueError
            If ``adapters`` does not hold exactly this set's clients, or ``rank`` is out
            of range for an adapter.
        """
        if set(adapters) != set(self.windows):
            missing = sorted(set(self.windows) - set(adapters))[:3]
            extra = sorted(set(adapters) - set(self.windows))[:3]
            raise ValueError(f"adapters: client names differ (missing {missing}, extra {extra})")
        per_client: dict[str, float] = {}
        for name, windows in self.windows.items():
            attach_adapters(model, adapters[name], rank=rank)
            try:
                nats = _window_nats(model, windows, threads=threads)
            finally:
                detach_adapters(model)
            per_client[name] = float(nats.sum()) / self.tokens[name] / math.log(2)
        return Scores(per_client=per_client, union=self._union(per_client))

    def _union(self, per_client: Mapping[str, float]) -> float:
        return token_weighted_union(per_client, self.tokens)


@torch.no_grad()
def _window_nats(model: nn.Module, windows: torch.Tensor, *, threads: int | None) -> torch.Tensor:
    """Return the summed next-token loss (nats, float64) of each window: shape ``(n,)``."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads <= 0:
            raise ValueError(f"threads: must be positive, got {threads}")
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    try:
        parts: list[torch.Tensor] = []
        for start in range(0, int(windows.shape[0]), EVAL_BATCH_WINDOWS):
            chunk = windows[start : start + EVAL_BATCH_WINDOWS]  # (b, seq_len + 1)
            loss = lm_loss(model, chunk, reduction="none")  # (b * seq_len,)
            # (b * seq_len,) -> (b, seq_len) -> (b,)
            parts.append(loss.reshape(chunk.shape[0], -1).double().sum(dim=1))
        return torch.cat(parts)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
