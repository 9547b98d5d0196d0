"""The request handlers' thread pool: bounded, and shut while the store is known silent.

``grpc.aio`` runs every handler on one event loop, and the federation service's store and
blob calls block, so each runs in a thread of this pool. A replica whose store hangs must
keep answering instead of piling requests up until their clients' deadlines, so the pool
refuses work, with :class:`~coordinator.errors.Unavailable` (UNAVAILABLE: retry later), in
two cases:

- **The store is known silent.** The health watcher (:mod:`coordinator.store_watch`, on a
  thread of its own) reports each change through :meth:`HandlerPool.set_store_healthy`.
  While its last probe failed, every call is refused before it reaches a thread; and the
  moment it fails, every call still waiting (in the queue or in a thread blocked on the
  store) is answered at once. A thread blocked on the store cannot be interrupted: it
  finishes or times out on its own, counted as in flight until then, and its result is
  discarded; a call still queued is removed without running.
- **The pool is saturated.** At most ``threads`` calls run and ``queue`` more wait; a
  call beyond that is refused at once rather than queued behind work that may never end.

Either way the request fails within milliseconds of the refusal; a device retries with
backoff and a load balancer routes elsewhere (health is NOT_SERVING while the store is).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from coordinator.errors import Unavailable

__all__ = ["STORE_UNAVAILABLE", "HandlerPool"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a device is told when the store is known silent: the details stay in the log.
STORE_UNAVAILABLE = "state store unavailable, retry"


class HandlerPool:
    """Run blocking calls in bounded threads for coroutines on one event loop.

    Parameters
    ----------
    threads
        Threads that run calls (≥ 1).
    queue
        Calls that may wait for a thread beyond those running (≥ 0).
    name
        Prefix of the threads' names.

    :meth:`run` and :meth:`set_store_healthy` must be called on the event loop's thread;
    the count of calls in flight (:attr:`in_flight`) may be read from any thread.
    """

    def __init__(self, *, threads: int, queue: int, name: str = "handler") -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: must be an int >= 1, got {threads!r}")
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
            raise ValueError(f"queue: must be an int >= 0, got {queue!r}")
        self.threads = threads
        self.queue = queue
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._store_healthy = True
        self._waiting: set[asyncio.Future[Any]] = set()
        self._saturated = False

    @property
    def in_flight(self) -> int:
        """Calls submitted and not yet finished: running, queued, or abandoned but running."""
        with self._lock:
            return self._in_flight

    @property
    def store_healthy(self) -> bool:
        """Whether calls are admitted: False while the store is known silent."""
        return self._store_healthy

    def set_store_healthy(self, healthy: bool) -> None:
        """Record the health watcher's verdict; on False, answer every waiting call now."""
        self._store_healthy = healthy
        if healthy:
            return
        waiting, self._waiting = self._waiting, set()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(Unavailable(STORE_UNAVAILABLE))

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Return ``fn(*args, **kwargs)`` run in a pool thread.

        Raises
        ------
        coordinator.errors.Unavailable
            The store is known silent (before or while the call waits), or ``threads``
            calls run and ``queue`` more wait already.
        """
        if not self._store_healthy:
            raise Unavailable(STORE_UNAVAILABLE)
        with self._lock:
            if self._in_flight >= self.threads + self.queue:
                saturated = True
            else:
                saturated = False
                self._in_flight += 1
        if saturated:
            if not self._saturated:  # one warning per episode, not one per refused request
                log.warning(
                    "handler pool saturated (%d threads busy, %d calls waiting): refusing "
                    "requests until calls finish",
                    self.threads,
                    self.queue,
                )
                self._saturated = True
            raise Unavailable(
                f"coordinator overloaded: {self.threads} handler threads busy and "
                f"{self.queue} calls waiting; retry"
            )
        if self._saturated:
            log.info("handler pool has room again")
            self._saturated = False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        try:
            job = self._executor.submit(fn, *args, **kwargs)
        except BaseException:  # the executor is shut down
            self._release()
            raise
        job.add_done_callback(lambda done: self._finished(loop, waiter, done))
        self._waiting.add(waiter)
        try:
            return await waiter
        finally:
            self._waiting.discard(waiter)
            job.cancel()  # still queued (the request was answered or cancelled): never run it

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        waiter: asyncio.Future[T],
        job: concurrent.futures.Future[T],
    ) -> None:
        # In the pool's thread (or the loop's, for a cancelled job): count it out, then
        # hand the outcome to the loop.
        self._release()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits the outcome
            loop.call_soon_threadsafe(_deliver, waiter, job)

    def close(self) -> None:
        """Drop queued calls and stop the threads once their calls end (without waiting)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _deliver(waiter: asyncio.Future[T], job: concurrent.futures.Future[T]) -> None:
    if waiter.done():  # answered already (store known silent) or its request cancelled
        return
    if job.cancelled():
        waiter.cancel()
        return
    error = job.exception()
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(job.result())
