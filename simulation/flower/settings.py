"""The run configuration of Estuary's Flower app, read from Flower's ``run_config``.

Flower hands an app its settings as a flat ``run_config`` (``[tool.flwr.app.config]`` in
the app's ``pyproject.toml``, overridden by ``flwr run --run-config``): scalars only, keys
in kebab-case. :class:`FlowerSettings` is that table typed and checked once; an unknown
key, a value of the wrong type or out of range is refused with a :class:`ValueError`
naming the key, before any model is loaded. ``flwr.simulation.run_simulation`` passes an
empty ``run_config``, so the Python entry points (:func:`~simulation.flower.server_app.
make_server_app`, :func:`~simulation.flower.client_app.make_client_app`) take a
:class:`FlowerSettings` instead.

What a node brings itself (its data and its rank) comes from its ``node_config``, see
:mod:`simulation.flower.client_app`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from estuary.data.stdlib import DEFAULT_CLIENT_PACKAGES

Scheme = Literal["int8", "nf4"]
Preset = Literal["tiny", "small"]
WriteModel = Literal["final", "every", "never"]
Optimizer = Literal["adam", "sgd"]
ColumnRule = Literal["rotating", "nested"]

#: What a run-config value may be (Flower's ``UserConfigValue``).
ConfigValue = bool | int | float | str | bytes


@dataclass(frozen=True)
class FlowerSettings:
    """Every setting of a run, with Flower's run-config key in brackets.

    Attributes
    ----------
    num_server_rounds
        [``num-server-rounds``] Rounds the strategy runs; each makes one version.
    base
        [``base``] Hugging Face model directory of the full-precision base; ``None`` (empty
        string in the run config) builds ``preset`` (deterministic, the same in every
        process).
    preset
        [``preset``] Built-in preset used when ``base`` is unset: ``tiny`` or ``small``.
    scheme
        [``scheme``] How clients compress the frozen base: ``int8`` or ``nf4`` weights.
    r_max
        [``r-max``] Rows of the shared frozen LoRA ``A``; the largest rank any node trains.
    adapter_seed
        [``adapter-seed``] Seed of ``A`` (every process derives the same ``A`` from it).
    ranks
        [``ranks``] Comma-separated nested ranks given to simulated partitions round-robin
        (partition ``i`` trains ``ranks[i % len(ranks)]``); a node's own
        ``node_config["rank"]`` wins. Each must be in ``1..r_max``.
    local_steps
        [``local-steps``] Optimizer steps per client per round.
    learning_rate
        [``learning-rate``] Client learning rate of ΔB at rank ``r_max``.
    rank_lr_power
        [``rank-lr-power``] A rank-``r`` node trains at ``learning-rate · (r_max / r)^power``
        (:func:`estuary.adapters.rank_learning_rate`, as the coordinator hands out); 0: every
        rank at ``learning-rate``.
    column_rule
        [``column-rule``] Which ``rank`` columns of ``B`` a node trains
        (:func:`estuary.adapters.trained_columns`, as the coordinator's
        ``training.column_rule``): ``rotating`` (a block that moves on each round and with
        the node's partition) or ``nested`` (the first ``rank``).
    warmup_steps
        [``warmup-steps``] Linear learning-rate warm-up over a round's first local steps,
        as the coordinator's ``training.warmup_steps``; 0: none.
    batch_size, seq_len
        [``batch-size``, ``seq-len``] Windows per step and bytes per window.
    grad_clip_norm
        [``grad-clip-norm``] Per-step gradient-norm clip of local training.
    optimizer
        [``optimizer``] Local optimizer: ``adam`` or ``sgd``.
    client_threads
        [``client-threads``] torch threads of one client's training (a simulation runs
        several clients per machine, so 1 by default).
    server_lr
        [``server-lr``] Step of the server: ``B ← B + server_lr · Σ w ΔB / Σ w``.
    fraction_train
        [``fraction-train``] Fraction of connected nodes sampled per round.
    fraction_evaluate
        [``fraction-evaluate``] Fraction of nodes asked for held-out bits/byte after each
        round (Flower's federated evaluation); 0 skips it.
    min_train_nodes
        [``min-train-nodes``] Nodes a round waits for at least.
    out_dir
        [``out-dir``] Where versions are written (``v0001/``, ...; see
        :mod:`simulation.flower.versions`).
    write_model
        [``write-model``] When to write a merged Hugging Face directory (what ``estuary
        edge infer --model`` serves) beside a version: ``final`` (last round only),
        ``every`` round, or ``never``. The adapter and its PEFT export are always written.
    stdlib_packages
        [``stdlib-packages``] Comma-separated standard-library packages backing simulated
        partitions (partition ``i`` holds package ``i``'s text) when a node has no
        ``data-path``; empty: the built-in twelve.
    max_train_bytes
        [``max-train-bytes``] Cap on a simulated partition's training bytes (the scarce
        regime of ``estuary simulate``); 0: no cap.
    data_seed
        [``data-seed``] Seed of the train/held-out split of simulated partitions and of
        window sampling.
    """

    num_server_rounds: int = 3
    base: Path | None = None
    preset: Preset = "tiny"
    scheme: Scheme = "int8"
    r_max: int = 16
    adapter_seed: int = 0
    ranks: tuple[int, ...] = (4, 8, 16)
    local_steps: int = 10
    learning_rate: float = 0.01
    rank_lr_power: float = 1.0
    column_rule: ColumnRule = "rotating"
    warmup_steps: int = 5
    batch_size: int = 8
    seq_len: int = 128
    grad_clip_norm: float = 10.0
    optimizer: Optimizer = "adam"
    client_threads: int = 1
    server_lr: float = 1.0
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    out_dir: Path = Path("flower-versions")
    write_model: WriteModel = "final"
    stdlib_packages: tuple[str, ...] = field(default=DEFAULT_CLIENT_PACKAGES)
    max_train_bytes: int = 4096
    data_seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "num-server-rounds": self.num_server_rounds,
            "r-max": self.r_max,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "seq-len": self.seq_len,
            "client-threads": self.client_threads,
            "min-train-nodes": self.min_train_nodes,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"{key}: must be positive, got {value}")
        for key, number in {
            "learning-rate": self.learning_rate,
            "grad-clip-norm": self.grad_clip_norm,
            "server-lr": self.server_lr,
        }.items():
            if not (number > 0 and math.isfinite(number)):
                raise ValueError(f"{key}: must be a positive number, got {number}")
        if not (0 <= self.rank_lr_power <= 2 and math.isfinite(self.rank_lr_power)):
            raise ValueError(f"rank-lr-power: must be in [0, 2], got {self.rank_lr_power}")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction-train: must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(f"fraction-evaluate: must be in [0, 1], got {self.fraction_evaluate}")
        if self.adapter_seed < 0 or self.data_seed < 0:
            raise ValueError("adapter-seed, data-seed: must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup-steps: must be >= 0, got {self.warmup_steps}")
        if self.max_train_bytes < 0:
            raise ValueError(f"max-train-bytes: must be >= 0, got {self.max_train_bytes}")
        if not self.ranks:
            raise ValueError("ranks: at least one rank is needed")
        bad = [r for r in self.ranks if not 1 <= r <= self.r_max]
        if bad:
            raise ValueError(f"ranks: {bad} outside 1..r-max={self.r_max}")
        if not self.stdlib_packages:
            raise ValueError("stdlib-packages: at least one package is needed")
        choices: tuple[tuple[str, str, tuple[str, ...]], ...] = (
            ("scheme", self.scheme, get_args(Scheme)),
            ("write-model", self.write_model, get_args(WriteModel)),
            ("optimizer", self.optimizer, get_args(Optimizer)),
            ("column-rule", self.column_rule, get_args(ColumnRule)),
            ("preset", self.preset, get_args(Preset)),
        )
        for key, choice, allowed in choices:
            if choice not in allowed:
                raise ValueError(f"{key}: must be one of {allowed}, got {choice!r}")

    def rank_of_partition(self, partition_id: int) -> int:
        """Return the rank of simulated partition ``partition_id`` (round-robin)."""
        if partition_id < 0:
            raise ValueError(f"partition-id: must be >= 0, got {partition_id}")
        return self.ranks[partition_id % len(self.ranks)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, ConfigValue]) -> FlowerSettings:
        """Return the settings of a Flower ``run_config`` (missing keys keep defaults).

        Raises
        ------
        ValueError
            If a key is unknown or its value has the wrong type or is out of range; the
            message names the key.
        """
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(fields))
        if unknown:
            raise ValueError(f"run_config: unknown keys {unknown}; known: {sorted(fields)}")
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            values[fields[key].name] = _convert(
                key, raw, cls.__dataclass_fields__[fields[key].name]
            )
        return cls(**values)

    def to_run_config(self) -> dict[str, ConfigValue]:
        """Return the ``run_config`` that :meth:`from_run_config` reads back to ``self``."""
        out: dict[str, ConfigValue] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if f.name == "base":
                out[key] = "" if value is None else str(value)
            elif isinstance(value, tuple):
                out[key] = ",".join(str(v) for v in value)
            elif isinstance(value, Path):
                out[key] = str(value)
            else:
                out[key] = value
        return out


_INT_FIELDS = {
    "num_server_rounds",
    "r_max",
    "adapter_seed",
    "local_steps",
    "warmup_steps",
    "batch_size",
    "seq_len",
    "client_threads",
    "min_train_nodes",
    "max_train_bytes",
    "data_seed",
}
_FLOAT_FIELDS = {
    "learning_rate",
    "rank_lr_power",
    "grad_clip_norm",
    "server_lr",
    "fraction_train",
    "fraction_evaluate",
}


def _convert(key: str, raw: ConfigValue, spec: dataclasses.Field[Any]) -> Any:
    """Return run-config value ``raw`` of ``key`` as the type of field ``spec``."""
    name = spec.name
    if name in _INT_FIELDS:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"{key}: expected an integer, got {raw!r}")
        return raw
    if name in _FLOAT_FIELDS:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"{key}: expected a number, got {raw!r}")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(f"{key}: expected a string, got {raw!r}")
    if name == "base":
        return Path(raw) if raw else None
    if name == "out_dir":
        if not raw:
            raise ValueError(f"{key}: must name a directory")
        return Path(raw)
    if name == "ranks":
        try:
            return tuple(int(part) for part in raw.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{key}: expected comma-separated integers, got {raw!r}") from None
    if name == "stdlib_packages":
        packages = tuple(p.strip() for p in raw.split(",") if p.strip())
        return packages or DEFAULT_CLIENT_PACKAGES
    return raw
