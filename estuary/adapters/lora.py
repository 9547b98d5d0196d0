"""LoRA with a frozen, seed-derived, nested A shared by every client.

For a target module with weight ``W`` (out × in) the adapted layer computes

    y = W x + B A x,        A: (r_max, in), frozen;  B: (out, r_max)

``A`` has orthonormal rows derived from ``(seed, epoch, module name)``, so every client
and the server build the same ``A`` without sending it. A device class of rank
``r ≤ r_max`` trains only the first ``r`` columns of ``B`` (it uses the first ``r`` rows
of ``A``: the ranks are *nested*). Its update ``ΔB`` is zero-padded to ``r_max`` columns.
Because ``A`` is shared and fixed, ``ΔW_i = ΔB_i A`` is linear in ``ΔB_i`` and

    Σ w_i ΔB_i A / Σ w_i  =  (Σ w_i ΔB_i / Σ w_i) · A

exactly, for any mix of ranks: aggregation is a plain (securely maskable) sum of ΔB.
The LoRA scaling is 1 (PEFT ``lora_alpha = r = r_max``); ``A``'s orthonormal rows already
give ``A x`` the magnitude of a standard LoRA initialisation.

**Which columns a low rank trains.** With nested ranks (the default, the first ``r``
columns) a mixed fleet learns slowly: column ``j`` only ever sees the clients whose rank
exceeds ``j``, and a server that divides the sum by the number of updates moves it by
that fraction of a step (``r_max`` 16, ranks 4/8/16 in equal shares: columns 8–15 at a
third of a step, forever, and only from the rank-16 clients' data). *Rotating*
ownership (:func:`owned_columns`) hands a rank-``r`` member a block of ``r`` columns
that moves with the version and the member's index in its cohort, so every client's
data reaches every column over time, and members of one cohort cover disjoint blocks.
A member then trains a given column with frequency ``r / r_max``; :func:`coverage_scale`
is the inverse-probability factor a server can put on a cohort's sum (one scalar per
cohort: it knows its class's rank). The aggregate stays a plain sum of zero-padded ΔB.
Measured (``bench/learning.py``, issue 15): with Adam clients that factor makes a
column's step one member's sign-like update, far larger than a mean over members, and
learning at server lr 1 got worse. What helped: a rank-``r`` client training at
``lr · r_max / r`` (:func:`rank_learning_rate`, ``training.rank_lr_power``), and with it
rotation under the *plain* mean (no coverage factor): ranks 4/8/16 at 64 rounds closed
about 80 % of the local-only → centralized gap against 55 % nested, so rotation is the
default rule (``training.column_rule``, :func:`trained_columns`); the coordinator hands
each task its columns.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from estuary.compress.quant import QuantLinear

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Every projection of a Llama-style block: attention and MLP. Adapting the MLP too
#: matters for a byte-level model, whose "vocabulary" knowledge lives there.
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of the shared adapter.

    Attributes
    ----------
    r_max
        Largest rank any device class may train; rows of every ``A``.
    seed
        Seed from which every ``A`` is derived.
    epoch
        Re-seeding counter: bumped when ``A`` is re-drawn after a merge.
    targets
        Module-name suffixes to adapt (matched on the last dotted component).
    """

    r_max: int = 16
    seed: int = 0
    epoch: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.r_max <= 0:
            raise ValueError(f"r_max: must be positive, got {self.r_max}")
        if self.epoch < 0:
            raise ValueError(f"epoch: must be >= 0, got {self.epoch}")
        if not self.targets:
            raise ValueError("targets: at least one target module name is needed")


def derive_a(*, seed: int, epoch: int, name: str, r_max: int, in_features: int) -> FloatArray:
    """Return the frozen ``(r_max, in_features)`` A of module ``name``, orthonormal rows.

    Derived from a SHA-256 of ``(seed, epoch, name)`` fed to numpy's PCG64, then a QR
    decomposition in float64; signs are fixed by ``diag(R) > 0`` so the result is unique.
    A rank-``r`` device uses the first ``r`` rows of this ``A`` (nested ranks).

    Raises
    ------
    ValueError
        If ``r_max > in_features`` (rows cannot be orthonormal) or a size is not positive.
    """
    if r_max <= 0:
        raise ValueError(f"r_max: must be positive, got {r_max}")
    if in_features < r_max:
        raise ValueError(f"r_max: {r_max} exceeds in_features {in_features} of module {name}")
    digest = hashlib.sha256(f"estuary-lora-A:{seed}:{epoch}:{name}".encode()).digest()
    rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint32).tolist())
    gaussian = rng.standard_normal((in_features, r_max))
    q, r = np.linalg.qr(gaussian)  # q: (in, r_max) orthonormal columns
    q = q * np.sign(np.diag(r))[None, :]
    return np.ascontiguousarray(q.T, dtype=np.float32)


def owned_columns(rank: int, r_max: int, *, version: int, member: int) -> tuple[int, ...]:
    """Return the columns of ``B`` a rank-``rank`` member trains under rotating ownership.

    A block of ``rank`` consecutive columns (modulo ``r_max``) starting at
    ``((version + member) · rank) mod r_max``: members ``0, 1, …`` of one cohort (one
    class, one version) get consecutive disjoint blocks, and the blocks move on by one
    each version, so over ``r_max / rank`` versions (or members) every column is covered
    equally often. ``rank == r_max`` owns every column. Server and client compute it from
    what both know (the task's version and member index), so nothing extra is sent.

    Raises
    ------
    ValueError
        If ``rank`` is outside ``1..r_max`` or ``version`` / ``member`` is negative.
    """
    if r_max <= 0:
        raise ValueError(f"r_max: must be positive, got {r_max}")
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank: must be in 1..r_max={r_max}, got {rank}")
    if version < 0:
        raise ValueError(f"version: must be >= 0, got {version}")
    if member < 0:
        raise ValueError(f"member: must be >= 0, got {member}")
    start = ((version + member) * rank) % r_max
    return tuple(sorted((start + k) % r_max for k in range(rank)))


#: How a rank-``r`` device picks its ``r`` columns of ``B`` (``training.column_rule``).
COLUMN_RULES: tuple[str, ...] = ("rotating", "nested")


def trained_columns(
    rule: str, rank: int, r_max: int, *, version: int, member: int
) -> tuple[int, ...] | None:
    """Return the columns a rank-``rank`` device trains under ``rule``; None: the first ``rank``.

    ``"rotating"``: :func:`owned_columns` of the version it trains from and its index
    among the devices of its rank (its member index in a cohort of one class);
    ``"nested"``, or a full-rank device under either rule: None (every column, or the
    first ``rank``). The server needs nothing of this: the update is a zero-padded
    ``ΔB`` whichever columns it fills, and the plain mean of the sums stays exact.

    Raises
    ------
    ValueError
        If ``rule`` is not one of :data:`COLUMN_RULES`, or as :func:`owned_columns`.
    """
    if rule not in COLUMN_RULES:
        raise ValueError(f"column rule: one of {list(COLUMN_RULES)}, got {rule!r}")
    if rule == "nested" or rank == r_max:
        return None
    return owned_columns(rank, r_max, version=version, member=member)


def coverage_scale(rank: int, r_max: int) -> float:
    """Return ``r_max / rank``: the server's factor on a rotating rank-``rank`` cohort's sum.

    Under :func:`owned_columns` a rank-``rank`` member trains each column with frequency
    ``rank / r_max``; scaling its cohort's sum by the inverse makes every column's
    expected contribution that of a full-rank member (an inverse-probability weight).
    Unbiased, but not a small step: see the module docstring for what it measured.

    Raises
    ------
    ValueError
        If ``rank`` is outside ``1..r_max``.
    """
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank: must be in 1..r_max={r_max}, got {rank}")
    return r_max / rank


def rank_learning_rate(lr: float, *, rank: int, r_max: int, power: float) -> float:
    """Return the local learning rate of a rank-``rank`` client: ``lr · (r_max / rank)^power``.

    With Adam every trained parameter moves about ``lr`` per step, so a rank-``r`` client,
    which trains ``r / r_max`` of ``B``'s columns, changes the model less per step than a
    full-rank one; under the nested rule its columns' share of the plain mean is smaller
    too. Scaling its learning rate by ``r_max / r`` (``power`` 1) made a 4/8/16 fleet learn
    far closer to an all-16 one per round (``bench/learning.py``, issue 15). ``power`` 0
    gives every rank ``lr``; a full-rank client always gets ``lr``.

    Raises
    ------
    ValueError
        If ``rank`` is outside ``1..r_max``, ``lr`` is not positive or ``power`` is negative.
    """
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank: must be in 1..r_max={r_max}, got {rank}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    if not power >= 0:
        raise ValueError(f"power: must be >= 0, got {power}")
    return float(lr * (r_max / rank) ** power)


def target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear | QuantLinear]:
    """Return the linear modules of ``model`` whose last name component is in ``targets``."""
    found: dict[str, nn.Linear | QuantLinear] = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets:
            base = module.base if isinstance(module, LoRALinear) else module
            if isinstance(base, nn.Linear | QuantLinear):
                found[name] = base
    return found


@dataclass(frozen=True)
class GlobalAdapter:
    """The server's adapter: the shared config plus ``B`` per target module.

    Attributes
    ----------
    config
        Adapter shape and A seed.
    shapes
        ``(out_features, in_features)`` per target module name.
    b
        ``(out, r_max)`` float32 ``B`` per module name.
    """

    config: AdapterConfig
    shapes: dict[str, tuple[int, int]]
    b: dict[str, FloatArray]
    _a_cache: dict[str, FloatArray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def for_model(cls, model: nn.Module, config: AdapterConfig) -> GlobalAdapter:
        """Return a zero adapter for every target module of ``model``.

        Raises
        ------
        ValueError
            If ``model`` has no target module, or ``r_max`` exceeds a module's width.
        """
        modules = target_modules(model, config.targets)
        if not modules:
            raise ValueError(f"config: no module of the model matches targets {config.targets}")
        shapes: dict[str, tuple[int, int]] = {}
        for name, module in modules.items():
            out, inp = int(module.out_features), int(module.in_features)
            if inp < config.r_max:
                raise ValueError(f"r_max: {config.r_max} exceeds in_features {inp} of {name}")
            shapes[name] = (out, inp)
        b = {n: np.zeros((s[0], config.r_max), dtype=np.float32) for n, s in shapes.items()}
        return cls(config=config, shapes=shapes, b=b)

    def a(self, name: str) -> FloatArray:
        """Return module ``name``'s ``(r_max, in)`` A (derived once, then cached)."""
        if name not in self.shapes:
            raise ValueError(f"name: {name!r} is not a target module of this adapter")
        if name not in self._a_cache:
            self._a_cache[name] = derive_a(
                seed=self.config.seed,
                epoch=self.config.epoch,
                name=name,
                r_max=self.config.r_max,
                in_features=self.shapes[name][1],
            )
        return self._a_cache[name]

    def delta_w(self, name: str) -> FloatArray:
        """Return ``B A`` of module ``name``: the weight change it stands for."""
        return cast(FloatArray, (self.b[name] @ self.a(name)).astype(np.float32))

    def apply_update(
        self, mean_delta_b: Mapping[str, npt.NDArray[np.floating]], *, server_lr: float = 1.0
    ) -> GlobalAdapter:
        """Return a new adapter with ``B + server_lr · ΔB``.

        Raises
        ------
        ValueError
            If ``server_lr`` is not positive or ``mean_delta_b`` does not match.
        """
        if server_lr <= 0:
            raise ValueError(f"server_lr: must be positive, got {server_lr}")
        _check_update(mean_delta_b, self)
        b = {
            n: (self.b[n] + server_lr * np.asarray(mean_delta_b[n], np.float64)).astype(np.float32)
            for n in self.b
        }
        return replace(self, b=b, _a_cache=self._a_cache)

    def to_flat(self) -> dict[str, FloatArray]:
        """Return ``B`` as a flat ``name -> array`` dict (copies)."""
        return {n: v.copy() for n, v in self.b.items()}

    def with_b(self, flat: Mapping[str, npt.NDArray[np.floating]]) -> GlobalAdapter:
        """Return a copy whose ``B`` is ``flat`` (checked against the shapes)."""
        _check_update(flat, self)
        return replace(
            self,
            b={n: np.asarray(flat[n], np.float32).copy() for n in self.shapes},
            _a_cache=self._a_cache,
        )

    def save(self, out_dir: str | Path) -> Path:
        """Write ``adapter.safetensors`` (``B`` per module, config in metadata)."""
        import json

        from safetensors.numpy import save_file

        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "r_max": self.config.r_max,
            "seed": self.config.seed,
            "epoch": self.config.epoch,
            "targets": list(self.config.targets),
            "shapes": {n: list(s) for n, s in self.shapes.items()},
        }
        file = path / "adapter.safetensors"
        save_file(self.to_flat(), str(file), metadata={"estuary_adapter": json.dumps(meta)})
        return file

    @classmethod
    def load(cls, file: str | Path) -> GlobalAdapter:
        """Read an adapter written by :meth:`save`.

        Raises
        ------
        estuary.model.loading.CheckpointError
            If the file is missing, corrupt, truncated or not an adapter.
        """
        import json

        from safetensors import safe_open
        from safetensors.numpy import load_file

        from estuary.model.loading import CheckpointError, check_safetensors

        path = Path(file)
        if not path.is_file():
            raise CheckpointError(f"{path}: adapter file not found")
        check_safetensors(path)
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
        if "estuary_adapter" not in metadata:
            raise CheckpointError(f"{path}: not an Estuary adapter (no metadata)")
        meta = json.loads(metadata["estuary_adapter"])
        config = AdapterConfig(
            r_max=int(meta["r_max"]),
            seed=int(meta["seed"]),
            epoch=int(meta["epoch"]),
            targets=tuple(meta["targets"]),
        )
        shapes = {n: (int(s[0]), int(s[1])) for n, s in meta["shapes"].items()}
        adapter = cls(config=config, shapes=shapes, b={})
        return adapter.with_b(load_file(str(path)))


def _check_update(update: Mapping[str, npt.NDArray[np.floating]], adapter: GlobalAdapter) -> None:
    if set(update) != set(adapter.shapes):
        missing = sorted(set(adapter.shapes) - set(update))[:3]
        extra = sorted(set(update) - set(adapter.shapes))[:3]
        raise ValueError(f"update: module names differ (missing {missing}, unexpected {extra})")
    for name, value in update.items():
        expected = (adapter.shapes[name][0], adapter.config.r_max)
        if tuple(np.shape(value)) != expected:
            raise ValueError(f"update: {name} has shape {np.shape(value)}, expected {expected}")


class LoRALinear(nn.Module):
    """A frozen base linear plus ``B A``, of which only ``B[:, :rank]`` trains.

    Parameters
    ----------
    base
        ``nn.Linear`` or :class:`~estuary.compress.QuantLinear`; frozen.
    a
        ``(r_max, in)`` frozen A.
    b0
        ``(out, r_max)`` current global ``B`` (frozen starting point).
    rank
        Trained columns of ``B``, ``1 ≤ rank ≤ r_max``.
    columns
        Which columns of ``B`` train (``rank`` distinct indices below ``r_max``);
        ``None``: the first ``rank`` (nested ranks).
    """

    lora_A: torch.Tensor
    lora_B0: torch.Tensor
    lora_cols: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        *,
        a: torch.Tensor,
        b0: torch.Tensor,
        rank: int,
        columns: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        r_max = int(a.shape[0])
        if not 1 <= rank <= r_max:
            raise ValueError(f"rank: must be in 1..r_max={r_max}, got {rank}")
        cols = tuple(range(rank)) if columns is None else _check_columns(columns, rank, r_max)
        self.base = base
        self.rank = rank
        self.columns = cols
        # A slice is a view; an index list copies: nested ranks keep the cheaper one.
        self._nested = cols == tuple(range(rank))
        self.register_buffer("lora_A", a.detach().float().clone())
        self.register_buffer("lora_B0", b0.detach().float().clone())
        # Not persistent: a state dict of an adapted model keeps the keys it always had.
        self.register_buffer("lora_cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        # The trainable ΔB columns start at zero: the adapted model equals the global one.
        self.lora_delta = nn.Parameter(torch.zeros(int(b0.shape[0]), rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``base(x) + x Aᵀ (B0 + ΔB)ᵀ``, ΔB zero outside ``columns``."""
        h = nn.functional.linear(x, self.lora_A.to(x.dtype))  # (..., in) -> (..., r_max)
        y = cast(torch.Tensor, self.base(x)) + nn.functional.linear(h, self.lora_B0.to(x.dtype))
        # (..., r_max) -> (..., rank): the A-projections of the trained columns.
        owned = h[..., : self.rank] if self._nested else h.index_select(-1, self.lora_cols)
        return y + nn.functional.linear(owned, self.lora_delta.to(x.dtype))

    def padded_delta(self) -> FloatArray:
        """Return ΔB zero-padded to ``(out, r_max)`` as float32 numpy."""
        out, r_max = self.lora_B0.shape
        padded = np.zeros((int(out), int(r_max)), dtype=np.float32)
        padded[:, list(self.columns)] = self.lora_delta.detach().cpu().numpy()
        return padded


def _check_columns(columns: Sequence[int], rank: int, r_max: int) -> tuple[int, ...]:
    cols = tuple(int(c) for c in columns)
    if len(cols) != rank or len(set(cols)) != rank:
        raise ValueError(f"columns: need {rank} distinct column indices, got {list(cols)}")
    if any(not 0 <= c < r_max for c in cols):
        raise ValueError(f"columns: indices must be in 0..{r_max - 1}, got {list(cols)}")
    return cols


def attach_adapters(
    model: nn.Module,
    adapter: GlobalAdapter,
    *,
    rank: int,
    columns: Sequence[int] | None = None,
) -> list[LoRALinear]:
    """Wrap every target module of ``model`` in a :class:`LoRALinear`, in place.

    Every base parameter is frozen; only the ``lora_delta`` parameters train. Any
    adapters already attached are replaced. ``columns`` picks which ``rank`` columns of
    ``B`` train (e.g. :func:`owned_columns`); ``None`` trains the first ``rank``.

    Raises
    ------
    ValueError
        If ``rank`` is outside ``1..r_max``, ``columns`` is not ``rank`` distinct
        indices below ``r_max``, or the model does not match the adapter.
    """
    r_max = adapter.config.r_max
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank: must be in 1..r_max={r_max}, got {rank}")
    if columns is not None:
        _check_columns(columns, rank, r_max)
    detach_adapters(model)
    modules = target_modules(model, adapter.config.targets)
    if set(modules) != set(adapter.shapes):
        raise ValueError("adapter: target modules of the model differ from the adapter's")
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped: list[LoRALinear] = []
    for name, module in modules.items():
        lora = LoRALinear(
            module,
            a=torch.from_numpy(adapter.a(name)),
            b0=torch.from_numpy(adapter.b[name]),
            rank=rank,
            columns=columns,
        )
        model.set_submodule(name, lora)
        wrapped.append(lora)
    return wrapped


def detach_adapters(model: nn.Module) -> None:
    """Put every :class:`LoRALinear`'s base module back in its place, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            model.set_submodule(name, module.base)


def delta_b(model: nn.Module) -> dict[str, FloatArray]:
    """Return each attached adapter's ΔB, zero-padded to ``(out, r_max)``, by module name."""
    found = {n: m.padded_delta() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not found:
        raise ValueError("model: no adapters attached")
    return found


def weighted_sum(
    updates: Sequence[Mapping[str, npt.NDArray[np.floating]]], weights: Sequence[float]
) -> tuple[dict[str, npt.NDArray[np.float64]], float]:
    """Return ``(Σ w_i ΔB_i, Σ w_i)`` in float64: what secure aggregation reveals.

    Raises
    ------
    ValueError
        If the lists are empty or of different lengths, a weight is negative, or the
        updates do not share names and shapes.
    """
    if not updates:
        raise ValueError("updates: at least one update is needed")
    if len(updates) != len(weights):
        raise ValueError(f"weights: {len(weights)} weights for {len(updates)} updates")
    if any(w < 0 for w in weights):
        raise ValueError("weights: must be non-negative")
    names = set(updates[0])
    total: dict[str, npt.NDArray[np.float64]] = {
        n: np.zeros(np.shape(updates[0][n]), dtype=np.float64) for n in names
    }
    for update, weight in zip(updates, weights, strict=True):
        if set(update) != names:
            raise ValueError("updates: module names differ between updates")
        for name in names:
            value = np.asarray(update[name], dtype=np.float64)
            if value.shape != total[name].shape:
                raise ValueError(f"updates: shape of {name} differs between updates")
            total[name] += weight * value
    return total, float(sum(weights))


def mean_from_sum(
    total: Mapping[str, npt.NDArray[np.floating]], weight_sum: float
) -> dict[str, FloatArray]:
    """Return ``total / weight_sum`` as float32: the aggregated ΔB.

    Raises
    ------
    ValueError
        If ``weight_sum`` is not positive.
    """
    if weight_sum <= 0:
        raise ValueError(f"weight_sum: must be positive, got {weight_sum}")
    return {
        n: (np.asarray(v, dtype=np.float64) / weight_sum).astype(np.float32)
        for n, v in total.items()
    }


def aggregate(
    updates: Sequence[Mapping[str, npt.NDArray[np.floating]]], weights: Sequence[float]
) -> dict[str, FloatArray]:
    """Return the weighted mean ``Σ w_i ΔB_i / Σ w_i`` (exact for mixed ranks)."""
    total, weight_sum = weighted_sum(updates, weights)
    return mean_from_sum(total, weight_sum)


@torch.no_grad()
def merge_into_base(
    model: nn.Module, adapter: GlobalAdapter, *, reseed: bool = False
) -> GlobalAdapter:
    """Add ``B A`` of every target module into ``model``'s weights, in place.

    Works on a full-precision base (``nn.Linear``) and on a compressed one (the weight
    is dequantised, updated and re-quantised; see
    :meth:`~estuary.compress.QuantLinear.add_delta`). Adapters must be detached.

    Parameters
    ----------
    model
        The base to merge into.
    adapter
        The global adapter to merge.
    reseed
        Draw a new ``A`` (``epoch + 1``) for the next rounds, so later updates explore
        new directions instead of the same ``r_max``-dimensional subspace.

    Returns
    -------
    GlobalAdapter
        A zero adapter (the merged change now lives in the base) with the same or the
        next ``A`` epoch.
    """
    modules = target_modules(model, adapter.config.targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model: detach adapters before merging")
    if set(modules) != set(adapter.shapes):
        raise ValueError("adapter: target modules of the model differ from the adapter's")
    for name, module in modules.items():
        delta = torch.from_numpy(adapter.delta_w(name))
        if isinstance(module, QuantLinear):
            module.add_delta(delta)
        else:
            module.weight.add_(delta.to(module.weight.dtype))
    config = replace(adapter.config, epoch=adapter.config.epoch + 1) if reseed else adapter.config
    zeros = {n: np.zeros_like(v) for n, v in adapter.b.items()}
    cache = {} if reseed else adapter._a_cache
    return GlobalAdapter(config=config, shapes=dict(adapter.shapes), b=zeros, _a_cache=cache)
