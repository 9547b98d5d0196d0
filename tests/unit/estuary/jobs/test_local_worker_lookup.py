"""The coordinator finds its in-process worker by entry point, or says what to install."""

from __future__ import annotations

import pytest

import estuary.extras
from estuary.jobs import LocalWorkerUnavailable, find_local_worker, job_id_for, make_job


def test_the_installed_local_worker_is_found() -> None:
    factory = find_local_worker()
    assert callable(factory)
    assert factory.__module__ == "cloud_workers.local"


def test_an_unknown_worker_names_the_extra() -> None:
    with pytest.raises(LocalWorkerUnavailable, match=r"pip install 'estuary-fl\[worker\]'"):
        find_local_worker("no-such-worker")


def test_missing_worker_dependencies_refuse_before_loading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(estuary.extras, "missing_for", lambda extras, **_: ["onnx"])
    with pytest.raises(LocalWorkerUnavailable, match=r"missing: onnx.*estuary-fl\[worker\]"):
        find_local_worker()


@pytest.mark.parametrize(
    ("kind", "device_class", "expected"),
    [
        ("evaluate", "", "evaluate-v3"),
        ("build_artifacts", "phone", "build_artifacts-phone-v3"),
        ("merge", "phone", "merge-v3"),
    ],
)
def test_job_ids_are_deterministic_and_match_make_job(
    kind: str, device_class: str, expected: str
) -> None:
    assert job_id_for(kind, version=3, device_class=device_class) == expected  # type: ignore[arg-type]
    job = make_job(kind, version=3, device_class=device_class, created_ms=1)  # type: ignore[arg-type]
    assert job.job_id == expected
