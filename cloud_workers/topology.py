"""The one validated description of how a worker group is laid out over processes.

A worker group is one ``torchrun`` launch of ``stages`` processes; rank ``i`` runs
pipeline stage ``i``. :class:`Topology` checks the stage count against the world size
and the model's depth and maps decoder layers to stages. It is the only place where
rank arithmetic happens (see torchtitan's ``distributed/parallel_dims.py``): everything
else asks it which layers it owns, whether it is the first or last stage, and who its
neighbours are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Topology"]


@dataclass(frozen=True)
class Topology:
    """Pipeline layout of one worker group.

    Parameters
    ----------
    world_size
        Processes in the group (``torchrun --nproc-per-node``).
    stages
        Pipeline stages; must equal ``world_size`` (one stage per process).
    num_layers
        Decoder layers of the model being split.
    rank
        This process's rank, ``0 ≤ rank < world_size``.
    local_rank
        This process's index on its machine (picks the GPU); ``None``: same as ``rank``.

    Raises
    ------
    ValueError
        If a count is not a positive int, ``stages`` differs from ``world_size``, the
        rank is out of range, or the model has fewer layers than stages or a layer count
        that ``stages`` does not divide (unequal stages would leave the pipeline as slow
        as its longest stage while hiding it; refuse rather than guess).
    """

    world_size: int
    stages: int
    num_layers: int
    rank: int = 0
    local_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "stages", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise ValueError(f"rank: must be an int, got {self.rank!r}")
        if self.local_rank is not None and (
            isinstance(self.local_rank, bool)
            or not isinstance(self.local_rank, int)
            or not 0 <= self.local_rank <= self.rank
        ):
            raise ValueError(f"local_rank: must be an int in 0..rank, got {self.local_rank!r}")
        if self.stages != self.world_size:
            raise ValueError(
                f"stages: {self.stages} stages need exactly {self.stages} processes "
                f"(one stage per rank), but world_size is {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in 0..{self.world_size - 1}, got {self.rank}")
        if self.num_layers < self.stages:
            raise ValueError(
                f"stages: {self.stages} stages cannot split a model of {self.num_layers} "
                "decoder layers (every stage needs at least one layer)"
            )
        if self.num_layers % self.stages:
            raise ValueError(
                f"stages: {self.stages} does not divide the model's {self.num_layers} decoder "
                f"layers; choose a divisor of {self.num_layers}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, stages: int, num_layers: int) -> Topology:
        """Return the topology of this process from torchrun's environment.

        Without ``WORLD_SIZE`` (not launched by torchrun) the process is a one-process
        group of rank 0.

        Raises
        ------
        ValueError
            If the variables are not integers, or as the constructor.
        """
        try:
            world_size = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local_rank = int(environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise ValueError(
                f"environ: RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}"
            ) from exc
        return cls(
            world_size=world_size,
            stages=stages,
            num_layers=num_layers,
            rank=rank,
            local_rank=local_rank,
        )

    @property
    def device_index(self) -> int:
        """Accelerator index this rank uses on its machine (its local rank)."""
        return self.rank if self.local_rank is None else self.local_rank

    @property
    def layers_per_stage(self) -> int:
        """Decoder layers each stage holds."""
        return self.num_layers // self.stages

    @property
    def stage(self) -> int:
        """The pipeline stage this rank runs (the rank itself: one stage per process)."""
        return self.rank

    @property
    def is_first(self) -> bool:
        """Whether this rank holds the embedding (and takes jobs)."""
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """Whether this rank holds the final norm and the LM head."""
        return self.rank == self.stages - 1

    @property
    def last_rank(self) -> int:
        """Rank of the last stage (where logits and losses appear)."""
        return self.stages - 1

    def layers_of(self, stage: int) -> range:
        """Return the decoder-layer indices of ``stage``.

        Raises
        ------
        ValueError
            If ``stage`` is outside ``0..stages-1``.
        """
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage: must be in 0..{self.stages - 1}, got {stage}")
        start = stage * self.layers_per_stage
        return range(start, start + self.layers_per_stage)

    @property
    def my_layers(self) -> range:
        """The decoder-layer indices this rank holds."""
        return self.layers_of(self.stage)

    def stage_map(self) -> dict[int, int]:
        """Return ``layer index -> stage`` for every decoder layer."""
        return {layer: s for s in range(self.stages) for layer in self.layers_of(s)}

    @property
    def is_distributed(self) -> bool:
        """Whether the group has more than one process (needs a process group)."""
        return self.world_size > 1
