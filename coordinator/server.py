"""The coordinator process: gRPC server, periodic work, health, metrics, local worker.

:class:`CoordinatorServer` assembles one replica from its settings:

- the state store and blob store (or ones the caller passes in: the simulator shares an
  in-memory store and a pretrained base);
- the :class:`~coordinator.service.FederationService` over them, with version 0's
  adapter derived from the base;
- a ``grpc.aio`` server with :class:`~coordinator.grpc_service.EdgeServicer` and the
  standard health service, over TLS (mTLS with a client CA) or, only when the settings
  allow it, plaintext;
- the handler pool the servicer runs its blocking calls in (bounded; refuses requests
  while the store is known silent, see :mod:`coordinator.handler_pool`);
- a store watcher on its own thread (:mod:`coordinator.store_watch`): one short probe per
  ``health_interval_s`` on a dedicated connection, so health (SERVING only while the
  store answers) turns NOT_SERVING within ``health_interval_s +
  server.store_probe_timeout_s`` of the store going silent, however busy the handlers;
- background tasks: the service's tick, applying the watcher's verdicts to the health
  service, and refreshing the metrics gauges;
- with ``workers = "local"``, a cloud worker group in a daemon thread of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.grpc_service import EdgeServicer, add_edge_service
from coordinator.handler_pool import HandlerPool
from coordinator.metrics import CoordinatorMetrics
from coordinator.peer_identity import PeerInterceptor
from coordinator.service import FederationService, ServiceObserver
from coordinator.store_watch import StoreWatch
from coordinator.tick import TICK_INTERVAL_S
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.log import log_context
from estuary.proto.v1 import edge_pb2
from estuary.state.errors import StoreError
from estuary.transport import server_options

if TYPE_CHECKING:
    from torch import nn

    from estuary.config.models import CoordinatorSettings
    from estuary.jobs import LocalWorkerFactory
    from estuary.state.base import Store
    from estuary.state.blobs import BlobStore

__all__ = [
    "HEALTH_INTERVAL_S",
    "TICK_INTERVAL_S",
    "CoordinatorServer",
    "ServerStartError",
]

log = logging.getLogger(__name__)


#: Seconds between store probes of the watcher (health) and refreshes of the gauges: 1 s,
#: so with the default probe timeout (0.5 s) a load balancer probing every second or more
#: sees NOT_SERVING at its next probe after the store goes silent.
HEALTH_INTERVAL_S = 1.0

#: How long :meth:`CoordinatorServer.stop` waits for the local worker's thread: a job in
#: progress (an artifact build takes seconds to a minute) finishes rather than being cut.
LOCAL_WORKER_JOIN_S = 35.0

#: Pause before the local worker retries after its loop failed (e.g. the store went
#: away): long enough not to spin on an outage, short enough to resume promptly.
LOCAL_WORKER_RETRY_S = 2.0

#: Grace period of :meth:`CoordinatorServer.stop` for in-flight RPCs: 5 s lets short
#: calls finish; long polls (up to MAX_LONG_POLL_MS) are cut and the client retries.
DEFAULT_GRACE_S = 5.0

_EDGE_SERVICE = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name


class ServerStartError(RuntimeError):
    """The server cannot start: TLS material unreadable, plaintext refused, bind failed."""


class _FanOut:
    """A ServiceObserver that tells several observers; one failing does not stop the rest."""

    def __init__(self, *observers: ServiceObserver) -> None:
        self._observers = observers

    def event(self, kind: str, **fields: Any) -> None:
        for observer in self._observers:
            try:
                observer.event(kind, **fields)
            except Exception:
                log.exception("observer failed on event %s", kind)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServerStartError(f"tls.{what}: cannot read {path}: {exc.strerror or exc}") from None


class CoordinatorServer:
    """One coordinator replica serving ``estuary.v1.EdgeService``.

    Parameters
    ----------
    settings
        The coordinator's settings.
    store, blobs
        State and blob stores; ``None``: opened from ``settings.state`` (and then closed
        by :meth:`stop`). Stores passed in stay open: the caller owns them.
    base
        The full-precision base model; ``None``: loaded as ``settings.model`` says.
    local_worker
        Builds the job runner of ``workers = "local"`` (see
        :class:`estuary.jobs.LocalWorkerFactory`); required then, unused with
        ``workers = "groups"``. The coordinator imports no worker code itself.
    observer
        Also told about every service event (the simulator's log); metrics always are.
    clock
        The one clock of this replica: the service and everything under it read it, and
        the tick loop, the store watcher's period, the gauge refreshes and the local
        worker's retry pause wait on it.
    tick_interval_s, health_interval_s
        Periods of the tick and of the store watcher's probes (and gauge refreshes), in
        seconds.
    metrics_port
        Port of the ``/metrics`` HTTP endpoint, overriding ``settings.server.metrics_port``
        (0: disabled). ``None``: the settings' value.
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        store: Store | None = None,
        blobs: BlobStore | None = None,
        base: nn.Module | None = None,
        local_worker: LocalWorkerFactory | None = None,
        observer: ServiceObserver | None = None,
        clock: Clock = SYSTEM_CLOCK,
        tick_interval_s: float = TICK_INTERVAL_S,
        health_interval_s: float = HEALTH_INTERVAL_S,
        metrics_port: int | None = None,
    ) -> None:
        if not tick_interval_s > 0:
            raise ValueError(f"tick_interval_s: must be > 0, got {tick_interval_s}")
        if not health_interval_s > 0:
            raise ValueError(f"health_interval_s: must be > 0, got {health_interval_s}")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be in 0..65535, got {metrics_port}")
        tls = settings.tls
        if tls.cert_file is None and not tls.allow_plaintext:
            raise ServerStartError(
                "tls.cert_file: not set and tls.allow_plaintext is false; refusing to serve "
                "without TLS"
            )
        if settings.workers == "local" and local_worker is None:
            raise ServerStartError(
                "workers = 'local' but no local worker was given: install the worker extra "
                "(pip install 'estuary-fl[worker]') or set workers = 'groups'"
            )
        self.settings = settings
        self._local_worker = local_worker
        self._store = store
        self._owns_store = store is None
        self._blobs = blobs
        self._base = base
        self._observer = observer
        self._clock = clock
        self._tick_interval_s = tick_interval_s
        self._health_interval_s = health_interval_s
        self._metrics_port = settings.server.metrics_port if metrics_port is None else metrics_port
        self.metrics = CoordinatorMetrics()
        self._service: FederationService | None = None
        self._server: Any = None
        self._health: Any = None
        self._health_server: Any = None
        #: Port bound for server.health_listen (after start), else None.
        self.health_port: int | None = None
        self._port: int | None = None
        #: Port bound for tls.enrol_listen (after start), else None.
        self.enrol_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._worker_stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        #: Threads still running after :meth:`stop` (a local worker inside a job).
        self.lingering_threads: list[threading.Thread] = []
        self._serving: bool | None = None
        self._stopped = asyncio.Event()
        self._pool: HandlerPool | None = None
        self._watch: StoreWatch | None = None
        #: The store watcher's latest verdict, applied to health by _health_loop.
        self._store_healthy = True
        self._health_changed = asyncio.Event()

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        """The port the gRPC server is bound to (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("port: the server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to connect to (the listen host with the bound port)."""
        host = self.settings.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def service(self) -> FederationService:
        """The federation service (after :meth:`start`)."""
        if self._service is None:
            raise RuntimeError("service: the server is not started")
        return self._service

    @property
    def store(self) -> Store:
        """The state store (after :meth:`start`)."""
        if self._store is None:
            raise RuntimeError("store: the server is not started")
        return self._store

    @property
    def serving(self) -> bool:
        """Whether health currently reports SERVING."""
        return bool(self._serving)

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Open the stores, record version 0 if new, bind and start serving.

        Raises
        ------
        ServerStartError
            TLS files unreadable or the listen address cannot be bound.
        estuary.state.errors.StoreUnavailable
            The state store cannot be reached.
        estuary.model.loading.CheckpointError
            The base model cannot be loaded.
        """
        if self._server is not None:
            raise RuntimeError("start: already started")
        with log_context(node=self.settings.node_id):
            await asyncio.to_thread(self._prepare)
            try:
                await self._start_grpc()
            except BaseException:
                await self._close_resources()
                raise
            self._start_watch()
            self._tasks = [
                asyncio.create_task(self._tick_loop(), name="coordinator-tick"),
                asyncio.create_task(self._health_loop(), name="coordinator-health"),
                asyncio.create_task(self._gauges_loop(), name="coordinator-gauges"),
            ]
            if self.settings.workers == "local":
                self._start_local_worker()
            else:
                log.info("workers = groups: cloud jobs are left to `estuary worker run` groups")
            if self._metrics_port:
                host = self.settings.server.listen.rsplit(":", 1)[0].strip("[]")
                self.metrics.serve(self._metrics_port, addr=host)
        log.info("coordinator %s serving on %s", self.settings.node_id, self.address)

    def _prepare(self) -> None:
        """Blocking part of start-up: stores, base, service, version 0."""
        from estuary.adapters.lora import AdapterConfig, GlobalAdapter
        from estuary.model.loading import load_base
        from estuary.state.blobs import BlobStore
        from estuary.state.configured import open_state_store

        settings = self.settings
        if self._store is None:
            self._store = open_state_store(settings.state)
        self._store.ping()
        if self._blobs is None:
            self._blobs = BlobStore(settings.state.blob_dir)
        if self._base is None:
            self._base = load_base(settings.model)
        adapter = GlobalAdapter.for_model(
            self._base,
            AdapterConfig(r_max=settings.model.r_max, seed=settings.model.adapter_seed),
        )
        observer: ServiceObserver = (
            self.metrics if self._observer is None else _FanOut(self.metrics, self._observer)
        )
        self._service = FederationService(
            settings,
            store=self._store,
            blobs=self._blobs,
            initial_adapter=adapter,
            clock=self._clock,
            observer=observer,
        )
        head = self._service.start()
        self.metrics.version.set(head.version)
        log.info("federation at version %d", head.version)

    async def _start_grpc(self) -> None:
        settings = self.settings
        # The peer interceptor serves the device-certificate rule alone; without a device
        # CA it would only cost every call an extra coroutine and handler per request.
        interceptors = [PeerInterceptor()] if self.service.requires_device_certificates else []
        server = grpc.aio.server(options=server_options(), interceptors=interceptors)
        self._pool = pool = HandlerPool(
            threads=settings.server.handler_threads,
            queue=settings.server.handler_queue,
            name=f"handler-{settings.node_id}",
        )
        self.metrics.handler_calls.set_function(lambda: pool.in_flight)
        add_edge_service(EdgeServicer(self.service, recorder=self.metrics, pool=pool), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        listen = settings.server.listen
        tls = settings.tls
        try:
            if tls.cert_file is not None and tls.key_file is not None:
                key = _read(tls.key_file, "key_file")
                cert = _read(tls.cert_file, "cert_file")
                client_ca = (
                    _read(tls.client_ca_file, "client_ca_file")
                    if tls.client_ca_file is not None
                    else None
                )
                credentials = grpc.ssl_server_credentials(
                    [(key, cert)],
                    root_certificates=client_ca,
                    require_client_auth=client_ca is not None,
                )
                port = server.add_secure_port(listen, credentials)
                if tls.enrol_listen is not None:  # devices without a certificate enrol here
                    enrol_port = server.add_secure_port(
                        tls.enrol_listen, grpc.ssl_server_credentials([(key, cert)])
                    )
                    self.enrol_port = int(enrol_port)
            else:
                log.warning("serving WITHOUT TLS on %s (tls.allow_plaintext)", listen)
                port = server.add_insecure_port(listen)
        except ServerStartError:
            raise
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            raise ServerStartError(f"server.listen: cannot bind {listen}: {exc}") from None
        if not port:
            raise ServerStartError(f"server.listen: cannot bind {listen}")
        if settings.server.health_listen is not None:
            await self._start_health_port(settings.server.health_listen)
        await server.start()
        self._server = server
        self._port = int(port)
        await self._set_health(True)

    async def _start_health_port(self, listen: str) -> None:
        """Serve the same health verdict, and nothing else, on a plaintext port.

        Kubernetes' native gRPC probes cannot present TLS (or a client certificate), so
        they cannot probe a TLS listener; this port answers them without exposing any edge
        method in the clear.
        """
        health_server = grpc.aio.server(options=server_options())
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health_server)
        try:
            bound = health_server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise ServerStartError(f"server.health_listen: cannot bind {listen}: {exc}") from None
        if not bound:
            raise ServerStartError(f"server.health_listen: cannot bind {listen}")
        await health_server.start()
        self._health_server = health_server
        self.health_port = int(bound)

    def _start_local_worker(self) -> None:
        assert self._store is not None and self._blobs is not None and self._base is not None
        assert self._local_worker is not None  # checked in __init__
        group = self._local_worker(
            self._store,
            blobs=self._blobs,
            base=self._base,
            name=f"local-{self.settings.node_id}",
        )
        node = self.settings.node_id
        clock = self._clock

        def run() -> None:
            with log_context(node=node):
                while not self._worker_stop.is_set():
                    try:
                        group.run(self._worker_stop)
                    except StoreError as exc:
                        log.warning("local worker: store error, retrying: %s", exc)
                        clock.wait(self._worker_stop, LOCAL_WORKER_RETRY_S)
                    except Exception:
                        log.exception("local worker failed; restarting its loop")
                        clock.wait(self._worker_stop, LOCAL_WORKER_RETRY_S)

        self._worker_thread = threading.Thread(target=run, name=f"local-worker-{node}", daemon=True)
        self._worker_thread.start()
        log.info("local worker group %s started", group.name)

    # ------------------------------------------------------------------ background

    async def _tick_loop(self) -> None:
        service = self.service
        while True:
            try:
                await asyncio.to_thread(service.tick)
            except StoreError as exc:
                log.warning("tick: store error: %s", exc)
            except Exception:
                log.exception("tick failed")
            await self._clock.sleep_async(self._tick_interval_s)

    async def _set_health(self, serving: bool) -> None:
        if self._health is None or self._serving is serving:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", _EDGE_SERVICE):
            await self._health.set(name, status)
        if self._serving is not None:
            log.warning("health: %s", "SERVING" if serving else "NOT_SERVING (store unreachable)")
        self._serving = serving

    def _start_watch(self) -> None:
        loop = asyncio.get_running_loop()

        def on_change(healthy: bool) -> None:  # on the watcher's thread
            loop.call_soon_threadsafe(self._store_health, healthy)

        self._watch = StoreWatch(
            self.store,
            interval_s=self._health_interval_s,
            timeout_s=self.settings.server.store_probe_timeout_s,
            on_change=on_change,
            on_probe=self.metrics.store_probe,
            clock=self._clock,
            node=self.settings.node_id,
        )
        self._watch.start()

    def _store_health(self, healthy: bool) -> None:
        # On the event loop: shut (or reopen) the handler pool at once, so requests
        # waiting on a silent store are answered now; health follows in _health_loop.
        self._store_healthy = healthy
        if self._pool is not None:
            self._pool.set_store_healthy(healthy)
        self._health_changed.set()

    async def _health_loop(self) -> None:
        # One task applies verdicts in order; the latest always wins.
        while True:
            await self._health_changed.wait()
            self._health_changed.clear()
            try:
                await self._set_health(self._store_healthy)
            except Exception:
                log.exception("setting health failed")

    async def _gauges_loop(self) -> None:
        service = self.service
        while True:
            if self._store_healthy:  # a silent store would only hold a thread for nothing
                try:
                    self.metrics.refresh(await asyncio.to_thread(service.snapshot))
                except StoreError as exc:
                    log.debug("gauges: store error: %s", exc)
                except Exception:
                    log.exception("refreshing the gauges failed")
            await self._clock.sleep_async(self._health_interval_s)

    # ------------------------------------------------------------------ stop

    async def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Stop serving (in-flight RPCs get ``grace`` seconds), then stop everything else.

        Releases the aggregator lease on the way out so another replica can take over
        at once instead of waiting for it to expire. Idempotent.
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(None)
            self._health_server = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._close_resources()
        self._stopped.set()
        log.info("coordinator %s stopped", self.settings.node_id)

    async def _close_resources(self) -> None:
        self._worker_stop.set()
        # The lease first: a caller that bounds the stop (estuary.cli.shutdown) may end
        # the process while the local worker finishes its job below.
        if self._service is not None:
            try:
                await asyncio.to_thread(self._service.ledger.release)
            except StoreError as exc:
                log.warning("could not release the aggregator lease: %s", exc)
        if self._pool is not None:
            self._pool.close()
        if self._watch is not None:
            await asyncio.to_thread(self._watch.stop)  # at most one probe's timeout
            self._watch = None
        if self._worker_thread is not None:
            thread = self._worker_thread
            await asyncio.to_thread(thread.join, LOCAL_WORKER_JOIN_S)
            if thread.is_alive():
                log.warning("local worker did not stop in time (a job is still running)")
                self.lingering_threads.append(thread)
            self._worker_thread = None
        self.metrics.close()
        if self._owns_store and self._store is not None:
            self._store.close()

    async def wait(self) -> None:
        """Return when the server has been stopped by :meth:`stop`."""
        await self._stopped.wait()
