"""Server-side optimizers applied to the aggregated ΔB (adaptive federated optimization).

The exact rule gives the server ``mean ΔB = Σ w_i ΔB_i / Σ w_i``. Plain FedAvg adds it
(times a server learning rate). :class:`ServerAdam` instead treats ``-mean ΔB`` as a
pseudo-gradient and takes an Adam step (FedAdam, Reddi et al., "Adaptive Federated
Optimization", ICLR 2021). It needs only the aggregate, so it is as compatible with
secure aggregation as the plain sum; its state is per module and lives on the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Float64Array = npt.NDArray[np.float64]


@dataclass
class ServerAdam:
    """Adam on the pseudo-gradient ``-mean ΔB``, one state entry per module.

    Parameters
    ----------
    lr
        Server learning rate: the per-coordinate step size once moments settle.
    beta1, beta2
        Moment decay rates. ``beta2 = 0.99`` rather than Adam's 0.999: a federation has
        tens to hundreds of rounds, not millions of steps, so the second moment must
        adapt within ~100 rounds.
    eps
        Denominator floor. 1e-8 is far below the magnitude of a real ΔB entry (≥ 1e-6)
        yet avoids division by zero for columns no client trained.
    """

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    rounds: int = 0
    _m: dict[str, Float64Array] = field(default_factory=dict, repr=False)
    _v: dict[str, Float64Array] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1: must be in [0, 1), got {self.beta1}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"beta2: must be in [0, 1), got {self.beta2}")
        if self.eps <= 0:
            raise ValueError(f"eps: must be positive, got {self.eps}")

    def step(
        self, mean_delta_b: Mapping[str, npt.NDArray[np.floating]]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Return the ΔB to add to the global ``B`` for this round's aggregate.

        Columns (or modules) whose aggregate is exactly zero in every round so far
        receive a zero step (their moments stay zero, ``0 / (0 + eps) = 0``).
        """
        if not mean_delta_b:
            raise ValueError("mean_delta_b: empty update")
        self.rounds += 1
        correction1 = 1 - self.beta1**self.rounds
        correction2 = 1 - self.beta2**self.rounds
        out: dict[str, npt.NDArray[np.float32]] = {}
        for name, value in mean_delta_b.items():
            grad = -np.asarray(value, dtype=np.float64)
            m = self._m.get(name, np.zeros_like(grad))
            v = self._v.get(name, np.zeros_like(grad))
            if m.shape != grad.shape:
                raise ValueError(f"mean_delta_b: shape of {name} changed between rounds")
            m = self.beta1 * m + (1 - self.beta1) * grad
            v = self.beta2 * v + (1 - self.beta2) * grad * grad
            self._m[name], self._v[name] = m, v
            step = -self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)
            out[name] = step.astype(np.float32)
        return out

    def reset(self) -> None:
        """Forget the moments (after ``A`` is re-seeded, old moments refer to old axes)."""
        self._m.clear()
        self._v.clear()
        self.rounds = 0
