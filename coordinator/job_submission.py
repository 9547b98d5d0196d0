"""Queue the cloud jobs of a committed version: edge artifacts per class, evaluation, export.

Every replica that sees a version (start-up for version 0, the commit for later ones)
may call :meth:`JobSubmitter.submit`; a ``jobs-submitted/<version>`` marker created with
insert-if-absent makes it once per version across replicas. Job ids are deterministic
(:func:`estuary.jobs.make_job`), so even a marker lost with its store would name the same
jobs again, and workers record one outcome per job id.

Artifacts come first: devices wait for them before they can train on the version, and a
worker group takes jobs in order (and runs artifact jobs ahead of the stream besides:
:mod:`estuary.jobs`). The ONNX export for serving comes last: later artifacts name the
newest one completed.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.outcomes import ServiceObserver
from coordinator.versions import VersionInfo
from estuary.clock import SYSTEM_CLOCK, Clock
from estuary.jobs import make_job, submit_job
from estuary.state.base import Store
from estuary.state.blobs import BlobStore

__all__ = ["JOBS_SUBMITTED_PREFIX", "JobSubmitter"]

JOBS_SUBMITTED_PREFIX = "jobs-submitted/"


class JobSubmitter:
    """Queues each version's cloud jobs once.

    Parameters
    ----------
    store, blobs
        Shared state and blob stores (the adapter's size is read from the blobs).
    device_classes
        Names of the configured device classes: one artifact job each.
    observer
        Told ``job_submitted`` for every job queued.
    clock
        Stamps the jobs' ``created_ms``.
    """

    def __init__(
        self,
        store: Store,
        *,
        blobs: BlobStore,
        device_classes: Sequence[str],
        observer: ServiceObserver,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not device_classes:
            raise ValueError("device_classes: at least one class is needed")
        self._store = store
        self._blobs = blobs
        self._classes = tuple(device_classes)
        self._observer = observer
        self._clock = clock

    def submit(self, info: VersionInfo) -> bool:
        """Queue the jobs of ``info`` unless a replica already did; True if this call did."""
        if not self._store.insert_if_absent(f"{JOBS_SUBMITTED_PREFIX}{info.version}", b"1"):
            return False
        size = self._blobs.size(info.adapter_sha256)
        jobs = [
            make_job(
                "build_artifacts",
                version=info.version,
                adapter_sha256=info.adapter_sha256,
                adapter_size=size,
                device_class=name,
                clock=self._clock,
            )
            for name in self._classes
        ]
        jobs += [
            make_job(
                kind,
                version=info.version,
                adapter_sha256=info.adapter_sha256,
                clock=self._clock,
            )
            for kind in ("evaluate", "export_onnx")
        ]
        for job in jobs:
            submit_job(self._store, job)
            self._observer.event("job_submitted", job_id=job.job_id, version=info.version)
        return True
