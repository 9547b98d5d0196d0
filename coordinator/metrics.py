"""Prometheus metrics of one coordinator replica.

Every metric lives in the replica's own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide default), so several coordinators can run in one process
(tests, the simulator) without their series colliding.

Three feeds:

- :meth:`CoordinatorMetrics.event` implements :class:`coordinator.service.ServiceObserver`
  (uploads, staleness, commits, cohorts);
- :meth:`CoordinatorMetrics.rpc` implements :class:`coordinator.grpc_service.RpcRecorder`
  (RPCs by method and status code, bytes in and out);
- :meth:`CoordinatorMetrics.refresh` is called by the server's gauge loop with the
  service's snapshot (head version, cohorts by stage, active devices), and
  :meth:`CoordinatorMetrics.store_probe` by the store watcher's thread after each probe.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["STALENESS_BUCKETS", "STORE_LATENCY_BUCKETS", "CoordinatorMetrics"]

log = logging.getLogger(__name__)

#: Staleness in versions: powers of two up to 2 × the default max_staleness (16), so the
#: histogram resolves the policy's knee and anything beyond the refusal limit.
STALENESS_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

#: Store round trip in seconds: 0.5 ms (local Redis) up to 2.5 s (near the store's own
#: retry budget, where requests start failing).
STORE_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5)

#: Stages reported by the cohorts gauge even when no cohort is in them (as 0), so a
#: dashboard sees a series drop to zero instead of vanishing.
_STAGES = (
    "FORMING",
    "ADVERTISE_KEYS",
    "SHARE_KEYS",
    "MASKED_INPUT",
    "CONSISTENCY_CHECK",
    "UNMASKING",
    "COMPLETED",
    "ABORTED",
)


class CoordinatorMetrics:
    """The metrics of one replica, in their own registry.

    Parameters
    ----------
    registry
        Registry to register in; ``None``: a new private one.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.version = Gauge(
            "estuary_version", "Head (newest committed) model version; -1: none.", registry=r
        )
        self.versions_committed = Counter(
            "estuary_versions_committed", "Versions committed by this replica.", registry=r
        )
        self.rollbacks = Counter(
            "estuary_rollbacks",
            "Versions committed by this replica as rollbacks of the regression guard.",
            registry=r,
        )
        self.cohorts = Gauge(
            "estuary_cohorts", "Unfinished cohorts by stage.", ["stage"], registry=r
        )
        self.cohorts_finished = Counter(
            "estuary_cohorts_finished", "Cohorts finished, by outcome.", ["status"], registry=r
        )
        self.devices_active = Gauge(
            "estuary_devices_active",
            "Devices training, or in forming and unfinished cohorts.",
            registry=r,
        )
        self.buffered_updates = Gauge(
            "estuary_buffered_updates", "Client updates buffered for the next version.", registry=r
        )
        self.uploads = Counter(
            "estuary_uploads", "Masked inputs stored (duplicates not counted).", registry=r
        )
        self.upload_bytes = Counter(
            "estuary_upload_bytes", "Bytes of masked inputs stored.", registry=r
        )
        self.updates_rejected = Counter(
            "estuary_updates_rejected", "Updates refused as too stale.", registry=r
        )
        self.updates_dropped = Counter(
            "estuary_updates_dropped",
            "Updates accepted into the buffer and then dropped at a commit without being "
            "folded in: trained on a version too old by then, or one a rollback abandoned.",
            registry=r,
        )
        self.paced = Counter("estuary_paced", "GetTask answers that were Pace.", registry=r)
        self.jobs_submitted = Counter(
            "estuary_jobs_submitted", "Cloud jobs queued by this replica.", registry=r
        )
        self.bytes_in = Counter(
            "estuary_rpc_bytes_in", "Serialised request bytes received.", ["rpc"], registry=r
        )
        self.bytes_out = Counter(
            "estuary_rpc_bytes_out", "Serialised response bytes sent.", ["rpc"], registry=r
        )
        self.rpcs = Counter(
            "estuary_rpcs", "Finished RPCs by method and status code.", ["method", "code"],
            registry=r,
        )  # fmt: skip
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.staleness = Histogram(
            "estuary_staleness",
            "Staleness (versions) of updates when their weight was fixed.",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.folded_staleness = Histogram(
            "estuary_folded_staleness",
            "Staleness (versions) of updates when the version that folded them in was "
            "committed: what their discount was priced at.",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.store_latency = Histogram(
            "estuary_store_ping_seconds",
            "Round trip of the state store's ping.",
            buckets=STORE_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_up = Gauge(
            "estuary_store_up", "1 while the last store ping succeeded, else 0.", registry=r
        )
        self.handler_calls = Gauge(
            "estuary_handler_calls",
            "Blocking calls of requests running or waiting in the handler pool.",
            registry=r,
        )
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ feeds

    def event(self, kind: str, **fields: Any) -> None:
        """Record one service event (:class:`~coordinator.service.ServiceObserver`)."""
        if kind == "upload":
            if not fields.get("duplicate", False):
                self.uploads.inc()
                self.upload_bytes.inc(int(fields.get("bytes", 0)))
        elif kind == "weight_assigned":
            self.staleness.observe(float(fields["staleness"]))
        elif kind == "version_committed":
            self.versions_committed.inc()
            self.version.set(int(fields["version"]))
            if fields.get("rolled_back_to") is not None:
                self.rollbacks.inc()
            for staleness, updates in fields.get("folded_staleness", ()):
                for _ in range(int(updates)):
                    self.folded_staleness.observe(float(staleness))
        elif kind == "cohort_finished":
            self.cohorts_finished.labels(status=str(fields.get("status", "unknown"))).inc()
        elif kind == "update_rejected":
            self.updates_rejected.inc()
        elif kind == "update_dropped":
            self.updates_dropped.inc(int(fields["updates"]))
        elif kind == "paced":
            self.paced.inc()
        elif kind == "job_submitted":
            self.jobs_submitted.inc()

    def rpc(self, method: str, code: str, *, bytes_in: int, bytes_out: int) -> None:
        """Record one finished RPC (:class:`~coordinator.grpc_service.RpcRecorder`)."""
        # The labelled children are looked up once per (method, code): every request
        # records here, and a labels() lookup costs more than the increments.
        children = self._rpc_children.get((method, code))
        if children is None:
            children = (
                self.rpcs.labels(method=method, code=code),
                self.bytes_in.labels(rpc=method),
                self.bytes_out.labels(rpc=method),
            )
            self._rpc_children[(method, code)] = children
        rpcs, b_in, b_out = children
        rpcs.inc()
        b_in.inc(bytes_in)
        b_out.inc(bytes_out)

    def store_probe(self, latency_s: float | None) -> None:
        """Record one store probe: its round trip in seconds, or ``None`` when it failed."""
        if latency_s is None:
            self.store_up.set(0)
        else:
            self.store_up.set(1)
            self.store_latency.observe(latency_s)

    def refresh(self, snapshot: dict[str, Any]) -> None:
        """Set the gauges from a service snapshot (:meth:`FederationService.snapshot`)."""
        self.version.set(int(snapshot["version"]))
        self.devices_active.set(int(snapshot["devices_active"]))
        self.buffered_updates.set(int(snapshot.get("buffered_updates", 0)))
        stages: dict[str, int] = dict(snapshot["cohorts"])
        for stage in sorted(set(_STAGES) | set(stages)):
            self.cohorts.labels(stage=stage).set(stages.get(stage, 0))

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Return one sample's value (e.g. ``estuary_uploads_total``), or None if absent."""
        return self.registry.get_sample_value(name, labels or {})

    def serve(self, port: int, *, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` in a daemon thread; return the port.

        ``port`` 0 picks a free port (the settings' "0: disabled" is the caller's check).
        """
        if self._http is not None:
            raise RuntimeError("metrics: already serving")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http, self._http_thread = server, thread
        bound = int(server.server_address[1])
        log.info("serving metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP server, if serving. Idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)
            self._http = None
            self._http_thread = None
