"""``estuary status`` as text for people: a summary that fits 80 columns, details on request.

The summary (:func:`render_summary`) shows the head, the newest versions with their
held-out score, each device class's waiting devices against ``min_size``, cohorts by
stage, worker groups and evaluation lag. The details (:func:`render_versions`,
:func:`render_cohorts`, :func:`render_workers`, :func:`render_devices`) list every record
of one kind. Times are ages ("3m 4s ago") or UTC dates, never raw Unix seconds.

Every table folds a value that does not fit its column onto a second line rather than
cutting it to "…", and every value is printed as text (a worker group called ``[red]``
is shown, not interpreted as markup).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from estuary.cli.status_report import CohortRow, StatusReport

__all__ = [
    "SUMMARY_VERSIONS",
    "ago",
    "duration",
    "render",
    "render_cohorts",
    "render_devices",
    "render_summary",
    "render_versions",
    "render_workers",
    "utc",
]

#: Versions the summary lists, newest first: enough to see the trend of the held-out
#: score, few enough that the summary stays on one screen; ``--versions`` lists all.
SUMMARY_VERSIONS = 5

#: Hex digits shown of a cohort id or adapter digest: unique in practice within one run
#: (like a short git hash), and short enough for an 80-column row; JSON has them whole.
SHORT_ID = 12

#: What a value the record does not hold is shown as.
UNKNOWN = "-"


# --------------------------------------------------------------------------- values


def duration(seconds: float) -> str:
    """Return ``seconds`` (≥ 0) for a person: ``0.4s``, ``42s``, ``3m 4s``, ``2h 5m``, ``3d 1h``."""
    if seconds < 0:
        raise ValueError(f"seconds: must be >= 0, got {seconds}")
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def ago(when: float | None, now: float) -> str:
    """Return the age of Unix time ``when`` at ``now``: ``3m 4s ago`` (``in 2.0s`` if ahead)."""
    if when is None:
        return UNKNOWN
    delta = now - when
    if delta < 0:
        # Another machine's clock runs ahead of this one's.
        return f"in {duration(-delta)}"
    return f"{duration(delta)} ago"


def utc(when: float | None) -> str:
    """Return Unix time ``when`` as a UTC date and time, ``2025-01-02 03:04:05``."""
    if when is None:
        return UNKNOWN
    return dt.datetime.fromtimestamp(when, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float | None, fmt: str = "{}") -> str:
    return UNKNOWN if value is None else fmt.format(value)


def _size(count: int) -> str:
    """Bytes in binary units, one decimal (``1.5 MiB``)."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _stage(name: str | None) -> str:
    return UNKNOWN if name is None else name.lower()


# --------------------------------------------------------------------------- layout


def _table(*columns: str, right: Iterable[str] = ()) -> Table:
    """Return a borderless table with a header rule; columns fold, never cut to "…"."""
    right = set(right)
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        highlight=False,
        collapse_padding=True,
    )
    for name in columns:
        table.add_column(
            name, overflow="fold", justify="right" if name in right else "left", no_wrap=False
        )
    return table


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))


def _heading(text: str) -> Text:
    return Text(text, style="bold")


def _note(text: str) -> Padding:
    """Return an indented remark whose wrapped lines keep the indent."""
    return Padding(Text(text), (0, 0, 0, 2))


def _pairs(rows: Sequence[tuple[str, str]]) -> Table:
    """Return label / value lines; the value column folds long values."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(Text(label), Text(value))
    return grid


# --------------------------------------------------------------------------- summary


def render_summary(report: StatusReport) -> list[RenderableType]:
    """Return the default view: head, versions, classes, cohorts by stage, workers, lag."""
    parts: list[RenderableType] = [_pairs(_header(report))]
    parts += _versions_summary(report)
    parts += _classes_summary(report)
    parts += _cohorts_summary(report)
    parts += _workers_summary(report)
    if report.problems:
        parts.append(Text())
        parts.append(_heading(f"problems ({len(report.problems)})"))
        parts.extend(_note(line) for line in report.problems)
    return parts


def _header(report: StatusReport) -> list[tuple[str, str]]:
    rows = [("state store", report.state)]
    if report.store_keys is not None and report.store_bytes is not None:
        rows.append(
            ("store size", f"{_plural(report.store_keys, 'key')}, {_size(report.store_bytes)}")
        )
    if report.head_version is None:
        rows.append(("head", "no version yet (no coordinator has started on this store)"))
    else:
        committed = next((v for v in report.versions if v.version == report.head_version), None)
        when = "" if committed is None else f", committed {ago(committed.committed_at, report.now)}"
        rows.append(("head", f"version {report.head_version}{when}"))
    enrolled = sum(1 for d in report.devices if not d.revoked)
    revoked = len(report.devices) - enrolled
    rows.append(("devices", f"{enrolled} enrolled" + (f", {revoked} revoked" if revoked else "")))
    rows.append(("lag", _lag(report)))
    return rows


def _lag(report: StatusReport) -> str:
    scored = report.newest_scored()
    if scored is None:
        return "no version has a held-out score yet"
    behind = report.evaluation_lag()
    if behind is None or behind <= 0:
        text = f"evaluation up to date (version {scored.version} scored)"
    else:
        text = (
            f"evaluation {_plural(behind, 'version')} behind the head "
            f"(newest scored: {scored.version})"
        )
    if scored.eval_at is not None and scored.committed_at is not None:
        text += f"; scored {duration(max(0.0, scored.eval_at - scored.committed_at))} after commit"
    return text


def _versions_summary(report: StatusReport) -> list[RenderableType]:
    total = len(report.versions)
    if total == 0:
        return [Text(), _heading("versions: none committed yet")]
    shown = list(reversed(report.versions))[:SUMMARY_VERSIONS]
    title = (
        f"versions ({total})"
        if total <= SUMMARY_VERSIONS
        else (f"versions (newest {SUMMARY_VERSIONS} of {total}; all: --versions)")
    )
    table = _table(
        "version", "committed", "updates", "held-out bits/byte", right=("version", "updates")
    )
    for v in shown:
        score = "not scored yet" if v.eval_bpb is None else f"{v.eval_bpb:.4f}"
        _row(table, str(v.version), ago(v.committed_at, report.now), _num(v.updates), score)
    return [Text(), _heading(title), table]


def _classes_summary(report: StatusReport) -> list[RenderableType]:
    parts: list[RenderableType] = [
        Text(),
        _heading("device classes (a cohort forms within one class)"),
    ]
    if not report.classes:
        parts.append(Text("  none: no coordinator has published its settings, no device enrolled"))
        return parts
    table = _table(
        "class",
        "rank",
        "enrolled",
        "waiting",
        "needs",
        right=("rank", "enrolled", "waiting", "needs"),
    )
    for c in report.classes:
        _row(table, c.name, _num(c.rank), str(c.enrolled), str(c.waiting), _num(c.min_size))
    parts.append(table)
    parts.extend(_note(note) for note in _class_notes(report))
    return parts


def _class_notes(report: StatusReport) -> list[str]:
    """Return why a class cannot train: fewer devices than a cohort needs, or needs unknown."""
    if report.federation is None:
        return [
            "needs: unknown, no coordinator has published its settings to this store "
            "(cohort.min_size, 4 by default)"
        ]
    notes = []
    for c in report.classes:
        if c.min_size is not None and 0 < c.enrolled < c.min_size:
            notes.append(
                f"class {c.name}: {c.enrolled} enrolled, but a cohort needs {c.min_size} "
                "of this class"
            )
    return notes


def _cohorts_summary(report: StatusReport) -> list[RenderableType]:
    if not report.cohorts:
        return [Text(), _heading("cohorts: none sealed yet")]
    table = _table("stage", "cohorts", right=("cohorts",))
    for stage, count in report.active_by_stage().items():
        _row(table, _stage(stage), str(count))
    for status in ("completed", "aborted"):
        _row(table, status, str(report.finished(status)))
    return [Text(), _heading(f"cohorts by stage ({len(report.cohorts)}; all: --cohorts)"), table]


def _workers_summary(report: StatusReport) -> list[RenderableType]:
    if not report.workers:
        return [Text(), _heading("worker groups: none has reported yet")]
    table = _table(
        "group",
        "last seen",
        "jobs done",
        "failed",
        "job lag",
        "last scored",
        right=("jobs done", "failed", "job lag", "last scored"),
    )
    for w in report.workers:
        _row(
            table,
            w.group,
            ago(w.last_seen, report.now),
            _num(w.jobs_done),
            _num(w.jobs_failed),
            UNKNOWN if w.last_lag_s is None else duration(max(0.0, w.last_lag_s)),
            _num(w.last_eval_version, "version {}"),
        )
    return [Text(), _heading(f"worker groups ({len(report.workers)}; all: --workers)"), table]


# --------------------------------------------------------------------------- details


def render_versions(report: StatusReport) -> list[RenderableType]:
    """Return every version, newest first: commit date (UTC), score, its delay, adapter."""
    table = _table(
        "version",
        "committed (UTC)",
        "updates",
        "bits/byte",
        "scored after",
        "adapter",
        right=("version", "updates", "bits/byte", "scored after"),
    )
    for v in reversed(report.versions):
        delay = UNKNOWN
        if v.eval_at is not None and v.committed_at is not None:
            delay = duration(max(0.0, v.eval_at - v.committed_at))
        _row(
            table,
            str(v.version),
            utc(v.committed_at),
            _num(v.updates),
            _num(v.eval_bpb, "{:.4f}"),
            delay,
            UNKNOWN if v.adapter_sha256 is None else v.adapter_sha256[:SHORT_ID],
        )
    return [Text(), _heading(f"all versions ({len(report.versions)})"), table]


def _outcome(row: CohortRow) -> str:
    """Return what became of a cohort; its stage column already says completed / aborted."""
    if row.status == "completed":
        if row.survivors is not None and row.size is not None:
            return f"{row.survivors} of {row.size} summed"
        return "summed"
    if row.status == "aborted":
        return row.abort_reason or "no reason recorded"
    return "under way"


def render_cohorts(report: StatusReport) -> list[RenderableType]:
    """Return every cohort, oldest sealed first: class, version, stage, size, age, outcome."""
    table = _table(
        "cohort",
        "class",
        "version",
        "stage",
        "size",
        "sealed",
        "outcome",
        right=("version", "size"),
    )
    rows = sorted(report.cohorts, key=lambda c: (c.sealed_at is None, c.sealed_at or 0.0))
    for c in rows:
        stage = _stage(c.stage) if c.status == "active" else c.status
        _row(
            table,
            c.cohort_id[:SHORT_ID],
            c.device_class or UNKNOWN,
            _num(c.version),
            stage,
            _num(c.size),
            ago(c.sealed_at, report.now),
            _outcome(c),
        )
    return [Text(), _heading(f"all cohorts ({len(report.cohorts)})"), table]


def render_workers(report: StatusReport) -> list[RenderableType]:
    """Return every worker group's last heartbeat in full, one block per group."""
    parts: list[RenderableType] = [Text(), _heading(f"all worker groups ({len(report.workers)})")]
    for w in report.workers:
        throughput = _num(w.throughput_per_min, "{:.1f} jobs/min")
        counts = (
            (w.jobs_done, "done"),
            (w.jobs_skipped, "skipped (superseded)"),
            (w.jobs_failed, "failed"),
        )
        jobs = ", ".join(f"{n} {what}" for n, what in counts if n is not None) or UNKNOWN
        lag = UNKNOWN if w.last_lag_s is None else duration(max(0.0, w.last_lag_s))
        parts.append(Text())
        parts.append(
            _pairs(
                [
                    ("group", w.group),
                    ("last seen", ago(w.last_seen, report.now)),
                    ("current job", w.current_job or "none"),
                    ("jobs", jobs),
                    ("throughput", throughput),
                    ("last job lag", f"{lag} from commit to result"),
                    ("last scored", _num(w.last_eval_version, "version {}")),
                    ("pipeline stages", _num(w.stages)),
                ]
            )
        )
    return parts


def render_devices(report: StatusReport) -> list[RenderableType]:
    """Return every enrolled device: id, class, enrolment age, last seen, revoked."""
    table = _table("device", "class", "enrolled", "last seen", "revoked")
    for d in report.devices:
        revoked = UNKNOWN if d.revoked is None else ("yes" if d.revoked else "no")
        _row(
            table,
            d.device_id,
            d.device_class or UNKNOWN,
            ago(d.enrolled_at, report.now),
            ago(d.last_seen, report.now),
            revoked,
        )
    return [Text(), _heading(f"all devices ({len(report.devices)})"), table]


#: Detail views by the name of their flag.
DETAILS = {
    "versions": render_versions,
    "cohorts": render_cohorts,
    "workers": render_workers,
    "devices": render_devices,
}


def render(report: StatusReport, console: Console, *, details: Iterable[str] = ()) -> None:
    """Print the summary, then each requested detail view (names from :data:`DETAILS`)."""
    wanted = list(details)
    unknown = [name for name in wanted if name not in DETAILS]
    if unknown:
        raise ValueError(f"details: unknown views {unknown}; known: {sorted(DETAILS)}")
    parts = render_summary(report)
    for name in DETAILS:
        if name in wanted:
            parts += DETAILS[name](report)
    console.print(Group(*parts), highlight=False)
