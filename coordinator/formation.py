"""How full each device class's forming cohort is, said in the log once per change.

Cohorts never mix device classes and are sealed only once they hold ``cohort.min_size``
devices, so a federation whose devices are spread thinly over its classes trains
nothing, silently, unless someone says why. The tick therefore counts the devices
waiting in each class's forming cohort (:func:`waiting_by_class`) and
:class:`FormationLog` logs ``class phone: 2 waiting, needs 4`` whenever a count changes
(never on every tick: a tick runs four times a second).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from coordinator.cohort_book import CohortBook

__all__ = ["FormationLog", "waiting_by_class"]

log = logging.getLogger(__name__)


def waiting_by_class(book: CohortBook, classes: Sequence[str]) -> dict[str, int]:
    """Return, per class in ``classes``, the devices admitted to its forming cohort.

    A class with no forming cohort has 0 waiting. Devices of a sealed cohort are not
    waiting: they are training.
    """
    waiting: dict[str, int] = {}
    for name in classes:
        found = book.forming(name)
        waiting[name] = 0 if found is None else len(found[0].members)
    return waiting


class FormationLog:
    """Logs each class's waiting count when it differs from the last one logged.

    Parameters
    ----------
    min_size
        ``cohort.min_size``: the devices of one class a cohort needs (≥ 1).
    """

    def __init__(self, *, min_size: int) -> None:
        if min_size < 1:
            raise ValueError(f"min_size: must be >= 1, got {min_size}")
        self._min_size = min_size
        # Nothing logged yet reads as 0 waiting, so a quiet federation logs nothing and
        # a replica that starts while devices already wait says so on its first tick.
        self._last: dict[str, int] = {}

    def observe(self, waiting: Mapping[str, int]) -> dict[str, int]:
        """Log the classes whose count changed since the last call; return their counts."""
        changed: dict[str, int] = {}
        for name, count in waiting.items():
            if count < 0:
                raise ValueError(f"waiting[{name!r}]: must be >= 0, got {count}")
            if count == self._last.get(name, 0):
                continue
            self._last[name] = count
            changed[name] = count
            log.info("class %s: %d waiting, needs %d", name, count, self._min_size)
        return changed
