"""Server-side limits on an upload stream: how many chunks, how long idle, how long in all.

A masked upload is a header followed by data chunks. The announced size is checked up
front and the bytes can never exceed it, but without further limits one member could
hold a handler for as long as it liked: 100 000 empty chunks, or one byte a minute. So
:class:`LimitedStream` reads the stream under three limits of :class:`StreamLimits`
(``server.upload_*`` settings), refusing the stream with a message that names the
setting:

- more than ``max_chunks`` data chunks: :class:`~coordinator.errors.ResourceExhausted`;
- no message for ``idle_s`` (the header included): :class:`~coordinator.errors.DeadlineExceeded`;
- the stream open for more than ``max_s`` in all: DeadlineExceeded.

Both times are measured and waited on the injected clock. Empty data chunks are refused
by the servicer outright (they carry nothing and only count towards the limits).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from coordinator.errors import DeadlineExceeded, ResourceExhausted
from estuary.clock import Clock

if TYPE_CHECKING:
    from estuary.config.models import ServerSettings

__all__ = ["LimitedStream", "StreamLimits"]

M = TypeVar("M")


@dataclass(frozen=True)
class StreamLimits:
    """Limits of one upload stream.

    Attributes
    ----------
    max_chunks
        Most data chunks after the header (≥ 1).
    idle_s
        Longest wait for the next message, in seconds (> 0).
    max_s
        Longest the whole stream may stay open, in seconds (≥ ``idle_s``).
    """

    max_chunks: int
    idle_s: float
    max_s: float

    def __post_init__(self) -> None:
        if isinstance(self.max_chunks, bool) or not isinstance(self.max_chunks, int):
            raise ValueError(f"max_chunks: must be an int, got {self.max_chunks!r}")
        if self.max_chunks < 1:
            raise ValueError(f"max_chunks: must be >= 1, got {self.max_chunks}")
        if not (self.idle_s > 0 and math.isfinite(self.idle_s)):
            raise ValueError(f"idle_s: must be a finite number > 0, got {self.idle_s}")
        if not (self.max_s >= self.idle_s and math.isfinite(self.max_s)):
            raise ValueError(f"max_s: must be finite and >= idle_s={self.idle_s}, got {self.max_s}")

    @classmethod
    def from_settings(cls, server: ServerSettings) -> StreamLimits:
        """Return the limits set by ``server.upload_max_chunks``, ``_idle_s`` and ``_max_s``."""
        return cls(
            max_chunks=server.upload_max_chunks,
            idle_s=server.upload_idle_s,
            max_s=server.upload_max_s,
        )


class LimitedStream(Generic[M]):
    """Read a header-then-chunks stream under :class:`StreamLimits`.

    Parameters
    ----------
    messages
        The client's stream (a gRPC request iterator).
    limits
        The limits to enforce.
    clock
        The replica's clock; the total time counts from construction.
    """

    def __init__(self, messages: AsyncIterator[M], *, limits: StreamLimits, clock: Clock) -> None:
        self._messages = messages
        self._limits = limits
        self._clock = clock
        self._deadline = clock.monotonic() + limits.max_s
        self._read = 0

    @property
    def data_chunks(self) -> int:
        """Messages read after the first (the header)."""
        return max(0, self._read - 1)

    async def next(self) -> M | None:
        """Return the next message, or ``None`` at the end of the stream.

        Raises
        ------
        coordinator.errors.DeadlineExceeded
            No message within ``idle_s``, or the stream has been open for ``max_s``.
        coordinator.errors.ResourceExhausted
            This message would be data chunk ``max_chunks + 1``.
        """
        limits = self._limits
        left = self._deadline - self._clock.monotonic()
        if left <= 0:
            raise self._too_long()
        idle = limits.idle_s <= left
        message = await self._within(limits.idle_s if idle else left)
        if message is _TIMED_OUT:
            if idle:
                raise DeadlineExceeded(
                    f"upload: no chunk for {limits.idle_s:g} s (server.upload_idle_s); "
                    "the stream was cut"
                )
            raise self._too_long()
        if message is None:
            return None
        self._read += 1
        if self.data_chunks > limits.max_chunks:
            raise ResourceExhausted(
                f"upload: more than {limits.max_chunks} data chunks "
                "(server.upload_max_chunks); send fewer, larger chunks"
            )
        return message  # type: ignore[return-value]

    def _too_long(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"upload: stream open longer than {self._limits.max_s:g} s (server.upload_max_s); "
            "the stream was cut"
        )

    async def _within(self, seconds: float) -> M | object | None:
        """Return the next message (None at the end), or ``_TIMED_OUT`` after ``seconds``."""
        receive = asyncio.ensure_future(anext(self._messages, None))
        timer = asyncio.ensure_future(self._clock.sleep_async(seconds))
        try:
            await asyncio.wait((receive, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not receive.done():
                receive.cancel()
        if receive.done() and not receive.cancelled():
            return receive.result()
        return _TIMED_OUT


#: Marks a wait that ended on the clock rather than with a message.
_TIMED_OUT = object()
