"""Per-device request rate limiting (token bucket), in memory per replica.

Each replica limits the devices it serves; with ``R`` replicas behind a load balancer a
device could in the worst case get ``R`` times the rate, which is acceptable: the limit
protects replicas from a misbehaving device, not a global quota. The table of buckets
is bounded (least recently used devices are forgotten; a forgotten device starts again
with a full bucket), so a flood of fake device ids cannot exhaust memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from estuary.clock import SYSTEM_CLOCK, Clock

#: Buckets kept per replica. 100 000 devices × ~100 bytes ≈ 10 MB: a fleet of that size
#: per replica is far beyond what one replica serves concurrently.
DEFAULT_MAX_DEVICES = 100_000


class RateLimiter:
    """Token bucket per key: ``rate_per_s`` sustained, ``burst`` at once.

    Parameters
    ----------
    rate_per_s
        Tokens added per second; > 0.
    burst
        Bucket capacity; ≥ 1.
    max_keys
        Buckets remembered at most; ≥ 1.
    clock
        Buckets refill by its :meth:`~estuary.clock.Clock.monotonic` seconds (in-process
        intervals only: the buckets are never shared between replicas).
    """

    def __init__(
        self,
        rate_per_s: float,
        *,
        burst: int,
        max_keys: int = DEFAULT_MAX_DEVICES,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s: must be > 0, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst: must be >= 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys: must be >= 1, got {max_keys}")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> bool:
        """Take one token for ``key``; return ``False`` (take nothing) if none is left."""
        now = self._clock.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return allowed
