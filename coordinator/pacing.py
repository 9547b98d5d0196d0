"""Pace steering: admit a device into training now, or tell it when to come back.

FedBuff makes a new version every ``K`` client updates. With ``C`` devices training at
once and every task taking about the same time, a task spans about ``C / K`` version
commits, which is its expected staleness. Capping concurrency at
``C = ceil(K × target_staleness)`` therefore bounds the expected staleness near the
target, whatever the population size.

Faster device classes are preferred when a slot opens: a class whose expected task time
does not fit in the cohort deadline is not admitted at all (its work would arrive after
the cohort closed), and among classes that fit, idle devices of slower classes are told
to retry later in proportion to how much longer they take. Idle devices get a
retry-after that grows with the load instead of polling hot: the number of devices
already told to come back later (the caller counts them) is the queue a slot is
shared among, so a fleet of any size asks again at about the rate slots free up, not
once a second per device.

The pacer is a pure function of its inputs: no clock, no store, no randomness. The edge
adds jitter to the retry time it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from estuary.config.models import pacer_cap


@dataclass(frozen=True)
class PacerConfig:
    """Pacer parameters (see :class:`estuary.config.models.PacingSettings`).

    Parameters
    ----------
    buffer_size
        ``K``: client updates per new version; ≥ 1.
    target_staleness
        Expected staleness to aim for, in versions; > 0.
    deadline_s
        Seconds a cohort member has from admission to the masked upload; > 0.
    retry_after_min_s, retry_after_max_s
        Bounds of the retry-after told to a deferred device, in seconds.
    """

    buffer_size: int
    target_staleness: float
    deadline_s: float
    retry_after_min_s: float = 1.0
    retry_after_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size: must be >= 1, got {self.buffer_size}")
        if not self.target_staleness > 0:
            raise ValueError(f"target_staleness: must be > 0, got {self.target_staleness}")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s: must be > 0, got {self.deadline_s}")
        if not 0 < self.retry_after_min_s <= self.retry_after_max_s:
            raise ValueError(
                "retry_after_min_s, retry_after_max_s: need 0 < min <= max, got "
                f"{self.retry_after_min_s}, {self.retry_after_max_s}"
            )

    @property
    def max_concurrency(self) -> int:
        """Devices allowed to train at once: ``ceil(K × target_staleness)``, at least 1."""
        return pacer_cap(self.buffer_size, self.target_staleness)


@dataclass(frozen=True)
class Admit:
    """Admit the device into a cohort of its class now."""


@dataclass(frozen=True)
class Defer:
    """Tell the device to come back after ``retry_after_s`` seconds, and why."""

    retry_after_s: float
    reason: str
    #: Whether the device waits for a pacer slot (the concurrency cap) and so joins the
    #: queue of devices the next deferrals count; a class that cannot finish within the
    #: deadline waits for nothing and is not counted.
    queued: bool = False


def decide(
    config: PacerConfig,
    *,
    active: int,
    waiting: int,
    expected_task_s: float,
    fastest_task_s: float,
) -> Admit | Defer:
    """Decide what to tell a device of one class that asks for work.

    Parameters
    ----------
    config
        Pacer parameters.
    active
        Devices currently training (admitted, not yet uploaded or dropped); ≥ 0.
    waiting
        Devices already deferred for a slot and told to come back later than now (the
        queue ahead of this one; it may include this device's own earlier deferral); ≥ 0.
    expected_task_s
        Expected seconds of one task for the asking device's class; > 0.
    fastest_task_s
        Expected task seconds of the fastest configured class; > 0 and ≤
        ``expected_task_s`` is not required (classes may be listed in any order).

    Returns
    -------
    Admit or Defer
        ``Defer`` when the class cannot finish within the deadline (retry at the max),
        or when the concurrency cap is reached: then a slot frees about every
        ``fastest_task_s / cap`` seconds, the device is in line after the ``waiting``
        devices and any over the cap, and a slower class waits proportionally longer so
        faster devices get freed slots first (bounded by ``retry_after_min_s`` and
        ``retry_after_max_s``).
    """
    if active < 0:
        raise ValueError(f"active: must be >= 0, got {active}")
    if waiting < 0:
        raise ValueError(f"waiting: must be >= 0, got {waiting}")
    if not expected_task_s > 0:
        raise ValueError(f"expected_task_s: must be > 0, got {expected_task_s}")
    if not fastest_task_s > 0:
        raise ValueError(f"fastest_task_s: must be > 0, got {fastest_task_s}")
    if expected_task_s > config.deadline_s:
        return Defer(
            config.retry_after_max_s,
            f"tasks of this class take ~{expected_task_s:.0f}s, beyond the "
            f"{config.deadline_s:.0f}s cohort deadline",
        )
    cap = config.max_concurrency
    if active < cap:
        return Admit()
    # A slot frees up roughly every fastest_task_s / cap seconds, and the devices over
    # the cap (after a replica raced or the cap was lowered) and the `waiting` ones are
    # in line before this one; slower classes wait proportionally longer so faster
    # devices get the freed slots first. Each queued device then asks about once per
    # turn of the whole queue: the queue's requests arrive at the rate slots free up.
    slowness = max(1.0, expected_task_s / fastest_task_s)
    ahead = active - cap + waiting
    wait = (ahead + 1) * slowness * fastest_task_s / cap
    retry = min(config.retry_after_max_s, max(config.retry_after_min_s, wait))
    return Defer(retry, f"{active} devices training, cap {cap}, {waiting} waiting", queued=True)
