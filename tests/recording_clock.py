"""Test helper: a virtual clock that lists every sleep asked of it.

Code under test waits on the injected clock; on this one the waits are instant and a
test can assert on exactly which waits were requested, in order.
"""

from __future__ import annotations

from estuary.clock import VirtualClock


class RecordingClock(VirtualClock):
    """A :class:`VirtualClock` that also records each ``sleep_async`` duration in ``sleeps``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__(start)
        self.sleeps: list[float] = []

    async def sleep_async(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep_async(seconds)
