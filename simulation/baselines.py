"""Reference points for a federated run: local-only and centralized adapters.

Both train with the same on-device routine as the federation's clients
(:func:`edge_client.train.train_adapter`: Adam on the rank-r columns of ``B``, frozen
shared ``A``, the compressed base) and are scored on the same held-out windows, so the
three numbers differ only in *whose data* an adapter saw:

- **local-only**: every client trains its own adapter on its own data, with the sample
  budget it had in the federation, and is scored on its own held-out windows. The
  federation should beat it: that is the point of federating.
- **centralized**: one adapter at full rank ``r_max`` trained on everybody's pooled
  training data with the federation's total number of steps: what a server that could
  see all the data would reach (an upper reference, not a bound).

Both are deterministic for a seed and a thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from edge_client.train import train_adapter
from estuary.adapters.lora import GlobalAdapter
from estuary.data.stdlib import ClientData
from simulation.evaluation import HeldOut, Scores

#: Called after each local-only client is trained, with (client name, clients done).
ProgressFn = Callable[[str, int], None]


def _check_common(
    clients: list[ClientData], held_out: HeldOut, *, lr: float, batch_size: int, seq_len: int
) -> None:
    if not clients:
        raise ValueError("clients: at least one client is needed")
    if set(held_out.clients) != {c.name for c in clients}:
        raise ValueError("held_out: its clients differ from the clients given")
    if lr <= 0:
        raise ValueError(f"lr: must be positive, got {lr}")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    if seq_len <= 0:
        raise ValueError(f"seq_len: must be positive, got {seq_len}")


def local_only(
    base: nn.Module,
    adapter0: GlobalAdapter,
    clients: list[ClientData],
    *,
    steps: Mapping[str, int],
    ranks: Mapping[str, int],
    lr: float,
    batch_size: int,
    seq_len: int,
    threads: int,
    seed: int,
    held_out: HeldOut,
    progress: ProgressFn | None = None,
    warmup_steps: int = 0,
) -> Scores:
    """Train one adapter per client on its own data; score each on its own held-out data.

    Client ``i`` (in the order of ``clients``) starts from ``adapter0``, trains the first
    ``ranks[name]`` columns of ``B`` for ``steps[name]`` optimizer steps with window seed
    ``seed + i``, and is scored with ``B0 + ΔB`` on its own windows. A client with 0 steps
    keeps ``adapter0``.

    Parameters
    ----------
    base
        The base the clients train on (the int8-compressed base); left as it was.
    adapter0
        Starting adapter (the federation's version 0, normally zero ``B``).
    clients
        The clients, each with its training bytes.
    steps
        Optimizer steps per client name: the number of steps that client took in the
        federation, so both see the same number of samples.
    ranks
        Trained rank per client name (its device class's rank).
    lr, batch_size, seq_len, threads, warmup_steps
        As in :func:`edge_client.train.train_adapter` (the warm-up once, at the start).
    seed
        Base seed of window sampling.
    held_out
        Held-out windows of exactly these clients.
    progress
        Optional callback after each client.

    Raises
    ------
    ValueError
        If ``steps`` or ``ranks`` lacks a client, a step count is negative, or an
        argument is out of range.
    """
    _check_common(clients, held_out, lr=lr, batch_size=batch_size, seq_len=seq_len)
    for name, table in (("steps", steps), ("ranks", ranks)):
        missing = sorted({c.name for c in clients} - set(table))
        if missing:
            raise ValueError(f"{name}: no entry for clients {missing[:3]}")
    adapters: dict[str, GlobalAdapter] = {}
    for i, client in enumerate(clients):
        count = steps[client.name]
        if count < 0:
            raise ValueError(f"steps: {client.name!r} has {count} steps, must be >= 0")
        if count == 0:
            adapters[client.name] = adapter0
        else:
            result = train_adapter(
                base,
                adapter0,
                client.train,
                rank=ranks[client.name],
                steps=count,
                lr=lr,
                batch_size=batch_size,
                seq_len=seq_len,
                threads=threads,
                warmup_steps=warmup_steps,
                seed=seed + i,
            )
            adapters[client.name] = adapter0.apply_update(result.delta_b)
        if progress is not None:
            progress(client.name, i + 1)
    return held_out.score_each(base, adapters, threads=threads)


def pooled_training_data(clients: list[ClientData]) -> bytes:
    """Return every client's training bytes joined by newlines, in client order.

    Windows are drawn uniformly over this stream, so each client is sampled in
    proportion to its training size (not uniformly over clients) — the same weighting
    as the federation's aggregation, which weights clients by their data size.
    """
    return b"\n".join(c.train for c in clients)


def centralized(
    base: nn.Module,
    adapter0: GlobalAdapter,
    clients: list[ClientData],
    *,
    steps: int,
    rank: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    threads: int,
    seed: int,
    held_out: HeldOut,
    warmup_steps: int = 0,
) -> Scores:
    """Train one adapter on the pooled training data and score it on every client.

    Parameters
    ----------
    base
        The base the clients train on; left as it was.
    adapter0
        Starting adapter.
    clients
        The clients whose training bytes are pooled (:func:`pooled_training_data`:
        sampled in proportion to each client's data size).
    steps
        Optimizer steps: the federation's total over all clients, so the centralized
        adapter sees as many samples as all clients together. 0 keeps ``adapter0``.
    rank
        Trained rank, normally ``r_max``.
    lr, batch_size, seq_len, threads, warmup_steps
        As in :func:`edge_client.train.train_adapter` (the warm-up once, at the start).
    seed
        Seed of window sampling.
    held_out
        Held-out windows of exactly these clients.

    Raises
    ------
    ValueError
        If ``steps`` is negative or an argument is out of range.
    """
    _check_common(clients, held_out, lr=lr, batch_size=batch_size, seq_len=seq_len)
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    adapter = adapter0
    if steps > 0:
        result = train_adapter(
            base,
            adapter0,
            pooled_training_data(clients),
            rank=rank,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seq_len=seq_len,
            threads=threads,
            seed=seed,
            warmup_steps=warmup_steps,
        )
        adapter = adapter0.apply_update(result.delta_b)
    return held_out.score(base, adapter, threads=threads)
