"""A store holding a run in progress, and width-80 rendering, for the ``estuary status`` tests.

Every record is written the way its role writes it (field names and types), at times
relative to :data:`NOW`, so a test knows every value the status must show.
"""

from __future__ import annotations

import io
import json

from rich.cells import cell_len
from rich.console import Console

from estuary.cli.status_render import render
from estuary.cli.status_report import StatusReport, build_report, collect_records
from estuary.federation import FederationRecord, PublishedClass
from estuary.state.base import Store
from estuary.state.keys import (
    HEAD_KEY,
    cohort_key,
    device_key,
    forming_key,
    version_key,
    worker_key,
)
from estuary.state.memory import MemoryStore

#: The time the report is made at (2025-06-15 15:06:40 UTC).
NOW = 1_750_000_000.0
#: Versions 0..12, one every 4 minutes; all but the head (12) scored 7.5 s after commit.
HEAD = 12
#: Stages of the 19 cohorts, oldest first.
COHORT_STAGES = ["COMPLETED"] * 14 + [
    "ABORTED",
    "ADVERTISE_KEYS",
    "MASKED_INPUT",
    "MASKED_INPUT",
    "UNMASKING",
]


def cohort_id(i: int) -> str:
    """Return the id of cohort ``i``: 32 hex digits whose first 12 differ between cohorts."""
    return f"{i:04x}{'c0ffee' * 5}"[:32].ljust(32, "0")


def device_id(i: int) -> str:
    """Return the id of device ``i`` (32 hex digits)."""
    return f"{i:02d}" + "d" * 30


def bpb(version: int) -> float:
    """Return the held-out bits/byte stored for ``version``."""
    return 3.0 - 0.05 * version


def fill_run(store: Store, *, now: float = NOW, published: bool = True) -> None:
    """Write a run in progress into ``store``.

    Two classes published (phone rank 4, laptop rank 16; min_size 4): 2 phones and
    3 laptops enrolled (one laptop revoked), 2 phones waiting in phone's forming cohort;
    13 versions; 19 cohorts (14 completed, 1 aborted, 4 active); two worker groups.
    """
    if published:
        record = FederationRecord(
            device_classes=(PublishedClass("phone", 4), PublishedClass("laptop", 16)),
            min_size=4,
            max_size=32,
            formation_s=5.0,
            buffer_size=8,
            published_by="coordinator-0",
            published_at=now - 3600,
        )
        store.put("federation/settings", record.to_json())
    for v in range(HEAD + 1):
        committed = now - 3600 + v * 240
        rec: dict[str, object] = {
            "version": v,
            "adapter_sha256": f"{v:02x}" + "ab" * 31,
            "committed_at": committed,
            "updates": 8 if v else 0,
            "cohorts": [],
        }
        if v < HEAD:
            rec.update(eval_bpb=bpb(v), eval_at=committed + 7.5)
        store.put(version_key(v), json.dumps(rec).encode())
    store.put(
        HEAD_KEY,
        json.dumps({"version": HEAD, "adapter_sha256": "ab", "cohorts": [], "updates": 8}).encode(),
    )
    for i, stage in enumerate(COHORT_STAGES):
        status = {"COMPLETED": "completed", "ABORTED": "aborted"}.get(stage, "active")
        rec = {
            "cohort_id": cohort_id(i),
            "device_class": "phone" if i % 2 else "laptop",
            "members": [device_id(j) for j in range(5)],
            "version": i // 2,
            "stage": stage,
            "stage_started": now - 3000 + i * 100,
            "status": status,
            "sealed_at": now - 3000 + i * 100,
            "deadline_at": now - 2400 + i * 100,
            "abandoned": [],
        }
        if status == "completed":
            rec.update(survivors=[0, 1, 2, 3], weight_total=3.5, finished_at=now - 2900 + i * 100)
        if status == "aborted":
            rec.update(abort_reason="2 survivors, threshold 4", finished_at=now - 1000)
        store.put(cohort_key(cohort_id(i)), json.dumps(rec).encode())
    store.put(
        worker_key("gpu-a"),
        json.dumps(
            {
                "group": "gpu-a",
                "last_seen": now - 2.25,
                "jobs_done": 31,
                "jobs_skipped": 3,
                "jobs_failed": 0,
                "jobs_reclaimed": 0,
                "jobs_duplicate": 0,
                "throughput_per_min": 2.4,
                "current_job": "build_artifacts-v12-phone",
                "last_lag_s": 7.5,
                "last_eval_version": 11,
                "last_eval_lag_s": 7.5,
                "stages": 2,
                "started_at": now - 3700,
            }
        ).encode(),
    )
    store.put(
        worker_key("cpu-b"),
        json.dumps(
            {"group": "cpu-b", "last_seen": now - 400, "jobs_done": 3, "last_lag_s": 125.0}
        ).encode(),
    )
    classes = ["phone", "phone", "laptop", "laptop", "laptop"]
    for i, name in enumerate(classes):
        device = {
            "device_class": name,
            "public_key": "00" * 32,
            "enrolled_at": now - 5000,
            "revoked": i == 4,
            "last_seen": now - 30 * i,
        }
        store.put(device_key(device_id(i)), json.dumps(device).encode())
    forming = {
        "cohort_id": "f" * 32,
        "members": [device_id(0), device_id(1)],
        "opened_at": now - 12,
    }
    store.put(forming_key("phone"), json.dumps(forming).encode())


def sample_report(*, published: bool = True) -> StatusReport:
    """Return the report of :func:`fill_run`'s store at :data:`NOW`."""
    store = MemoryStore()
    fill_run(store, published=published)
    return build_report(collect_records(store), now=NOW)


def render_text(report: StatusReport, *, details: tuple[str, ...] = (), width: int = 80) -> str:
    """Render ``report`` on a rich console ``width`` columns wide; return the plain text."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    render(report, console, details=details)
    return console.export_text()


def overlong(text: str, width: int = 80) -> list[str]:
    """Return the lines of ``text`` wider than ``width`` terminal columns (trailing blanks
    ignored; a wide character such as 漢 takes two columns)."""
    return [line for line in text.splitlines() if cell_len(line.rstrip()) > width]


def cells(text: str, first: str) -> list[str]:
    """Return the whitespace-separated cells of the line that starts with ``first``."""
    for line in text.splitlines():
        if line.startswith(first + " ") or line.rstrip() == first:
            return line.split()
    raise AssertionError(f"no line starts with {first!r} in:\n{text}")


def table_rows(text: str, header: str) -> list[list[str]]:
    """Return the cells of each row of the table whose header line starts with ``header``.

    Rows run from below the header's rule to the next blank or indented line (a note
    under the table); so the table's first column must be left-aligned.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header + " "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith(" "):
            break
        rows.append(line.split())
    return rows
