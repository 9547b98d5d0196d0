"""``estuary status`` text at 80 columns: a summary that fits, values right, details on request.

Each test renders on a rich console exactly 80 columns wide and checks three things: no
line is wider, no cell was cut to "…", and the values shown are the stored ones.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from status_fixtures import (
    COHORT_STAGES,
    HEAD,
    NOW,
    bpb,
    cells,
    cohort_id,
    device_id,
    overlong,
    render_text,
    sample_report,
    table_rows,
)

from estuary.cli.status_render import SUMMARY_VERSIONS, ago, duration, utc
from estuary.cli.status_report import (
    ClassRow,
    CohortRow,
    DeviceRow,
    StatusReport,
    VersionRow,
    WorkerRow,
)

ALL = ("versions", "cohorts", "workers", "devices")
#: A Unix time in seconds as the old status printed it (10 digits, 2001–2286).
RAW_EPOCH = re.compile(r"\b1\d{9}(\.\d+)?\b")


def test_summary_fits_80_columns_with_no_cut_cells() -> None:
    text = render_text(sample_report())

    assert overlong(text) == []
    assert "…" not in text
    assert not RAW_EPOCH.search(text)


def test_summary_shows_head_lag_and_newest_versions_with_scores() -> None:
    text = render_text(sample_report())

    assert cells(text, "head") == ["head", "version", "12,", "committed", "12m", "0s", "ago"]
    assert "evaluation 1 version behind the head (newest scored: 11)" in text
    assert cells(text, "devices") == ["devices", "4", "enrolled,", "1", "revoked"]
    assert f"versions (newest {SUMMARY_VERSIONS} of {HEAD + 1}; all: --versions)" in text
    # Newest first; the head is not scored yet, the others show their stored score.
    assert cells(text, f"     {HEAD}") == [
        str(HEAD),
        "12m",
        "0s",
        "ago",
        "8",
        "not",
        "scored",
        "yet",
    ]
    for v in range(HEAD - 1, HEAD - SUMMARY_VERSIONS, -1):
        age = (HEAD - v) * 4 + 12
        assert cells(text, f"{v:>7}") == [str(v), f"{age}m", "0s", "ago", "8", f"{bpb(v):.4f}"]
    # Older versions are behind --versions.
    assert not any(line.split()[:1] == [str(HEAD - SUMMARY_VERSIONS)] for line in text.splitlines())


def test_summary_shows_each_class_waiting_against_min_size() -> None:
    text = render_text(sample_report())

    assert cells(text, "class") == ["class", "rank", "enrolled", "waiting", "needs"]
    assert cells(text, "phone") == ["phone", "4", "2", "2", "4"]
    # One laptop of three is revoked: 2 enrolled, none waiting.
    assert cells(text, "laptop") == ["laptop", "16", "2", "0", "4"]
    # The newcomer's trap: too few devices of a class for any cohort.
    assert "class phone: 2 enrolled, but a cohort needs 4 of this class" in text
    assert "class laptop: 2 enrolled, but a cohort needs 4 of this class" in text


def test_summary_counts_cohorts_by_stage_in_protocol_order() -> None:
    text = render_text(sample_report())

    rows = [cells(text, name) for name in ("advertise_keys", "masked_input", "unmasking")]
    assert rows == [["advertise_keys", "1"], ["masked_input", "2"], ["unmasking", "1"]]
    assert cells(text, "completed") == ["completed", str(COHORT_STAGES.count("COMPLETED"))]
    assert cells(text, "aborted") == ["aborted", "1"]
    lines = text.splitlines()
    order = [
        next(i for i, ln in enumerate(lines) if ln.startswith(s))
        for s in ("advertise_keys", "masked_input", "unmasking", "completed", "aborted")
    ]
    assert order == sorted(order)
    # Cohort ids are details, not summary.
    assert cohort_id(0)[:12] not in text


def test_summary_shows_workers_with_age_and_job_lag() -> None:
    text = render_text(sample_report())

    assert cells(text, "gpu-a") == ["gpu-a", "2.2s", "ago", "31", "0", "7.5s", "version", "11"]
    assert cells(text, "cpu-b") == ["cpu-b", "6m", "40s", "ago", "3", "-", "2m", "5s", "-"]


def test_without_published_settings_needs_is_unknown_and_said_so() -> None:
    text = render_text(sample_report(published=False))

    assert cells(text, "phone") == ["phone", "-", "2", "2", "-"]
    assert "no coordinator has published its settings" in text
    assert overlong(text) == [] and "…" not in text


def test_details_fit_80_columns_and_list_every_record() -> None:
    report = sample_report()
    text = render_text(report, details=ALL)

    assert overlong(text) == []
    assert "…" not in text
    assert not RAW_EPOCH.search(text)
    # Every version, with its commit date in UTC and its score.
    assert cells(text, "      0") == [
        "0",
        *utc(NOW - 3600).split(),
        "0",
        "3.0000",
        "7.5s",
        "00" + "ab" * 5,
    ]
    assert utc(NOW - 3600) == "2025-06-15 14:06:40"
    # Every cohort by its short id, with its outcome.
    for i, stage in enumerate(COHORT_STAGES):
        row = cells(text, cohort_id(i)[:12])
        state = stage.lower()
        assert row[:5] == [
            cohort_id(i)[:12],
            "phone" if i % 2 else "laptop",
            str(i // 2),
            state,
            "5",
        ]
    assert cells(text, cohort_id(0)[:12])[-4:] == ["4", "of", "5", "summed"]
    assert "2 survivors, threshold 4" in " ".join(text.split())
    # Every device in full, revoked or not.
    for i in range(5):
        assert cells(text, device_id(i))[-1] == ("yes" if i == 4 else "no")
    # Every worker's heartbeat in full.
    assert "31 done, 3 skipped (superseded), 0 failed" in text
    jobs = [line.split()[2:] for line in text.splitlines() if line.startswith("current job")]
    assert jobs == [["none"], ["build_artifacts-v12-phone"]]  # cpu-b, then gpu-a


@pytest.mark.parametrize("view", ALL)
def test_each_detail_view_alone_fits_80_columns(view: str) -> None:
    text = render_text(sample_report(), details=(view,))

    assert overlong(text) == [] and "…" not in text
    assert f"all {view if view != 'workers' else 'worker groups'} (" in text


def test_unknown_detail_view_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="details: unknown views \\['jobs'\\]"):
        render_text(sample_report(), details=("jobs",))


def test_values_are_text_not_markup() -> None:
    report = sample_report()
    worker = replace(report.workers[0], group="[bold red]x[/bold red]")
    text = render_text(replace(report, workers=(worker,)))

    assert "[bold red]x[/bold red]" in text


def test_times_for_people() -> None:
    assert [duration(s) for s in (0.04, 9.96, 42.9, 184, 7500, 3 * 86400 + 3700)] == [
        "0.0s",
        "10.0s",
        "42s",
        "3m 4s",
        "2h 5m",
        "3d 1h",
    ]
    assert ago(NOW - 184, NOW) == "3m 4s ago"
    assert ago(NOW + 2, NOW) == "in 2.0s"  # another machine's clock runs ahead
    assert ago(None, NOW) == "-" and utc(None) == "-"
    with pytest.raises(ValueError, match="seconds: must be >= 0"):
        duration(-1)


# --------------------------------------------------------------------------- any content

_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
# Any printable text, wide characters included; no control, format or combining
# characters (how a terminal draws those is the terminal's business, not the layout's).
_text = st.text(
    st.characters(
        blacklist_characters="…", blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Mn", "Me")
    ),
    max_size=60,
)
_opt_int = st.none() | st.integers(min_value=0, max_value=10**9)
_opt_time = st.none() | st.floats(min_value=NOW - 10**8, max_value=NOW + 10**5)
_opt_float = st.none() | st.floats(min_value=0, max_value=1e6)


@st.composite
def reports(draw: st.DrawFn) -> StatusReport:
    versions = draw(
        st.lists(
            st.builds(
                VersionRow,
                version=st.integers(0, 10**6),
                committed_at=_opt_time,
                updates=_opt_int,
                eval_bpb=_opt_float,
                eval_at=_opt_time,
                adapter_sha256=st.none() | st.text("0123456789abcdef", min_size=64, max_size=64),
            ),
            max_size=8,
            unique_by=lambda v: v.version,
        )
    )
    classes = draw(
        st.lists(
            st.builds(
                ClassRow,
                name=_names,
                rank=st.none() | st.integers(1, 256),
                enrolled=st.integers(0, 10**6),
                revoked=st.integers(0, 10**6),
                waiting=st.integers(0, 10**4),
                min_size=st.none() | st.integers(2, 10**4),
                forming_since=_opt_time,
            ),
            max_size=6,
            unique_by=lambda c: c.name,
        )
    )
    cohorts = draw(
        st.lists(
            st.builds(
                CohortRow,
                cohort_id=st.text("0123456789abcdef", min_size=32, max_size=32),
                device_class=st.none() | _names,
                version=_opt_int,
                stage=st.none() | st.sampled_from(["ADVERTISE_KEYS", "MASKED_INPUT", "COMPLETED"]),
                status=st.sampled_from(["active", "completed", "aborted"]),
                size=_opt_int,
                survivors=_opt_int,
                sealed_at=_opt_time,
                abort_reason=st.none() | _text,
            ),
            max_size=6,
        )
    )
    workers = draw(
        st.lists(
            st.builds(
                WorkerRow,
                group=_text.filter(bool),
                last_seen=_opt_time,
                jobs_done=_opt_int,
                jobs_skipped=_opt_int,
                jobs_failed=_opt_int,
                throughput_per_min=_opt_float,
                last_lag_s=_opt_float,
                last_eval_version=_opt_int,
                current_job=st.none() | _text,
                stages=st.none() | st.integers(1, 64),
            ),
            max_size=4,
        )
    )
    devices = draw(
        st.lists(
            st.builds(
                DeviceRow,
                device_id=st.text("0123456789abcdef", min_size=32, max_size=32),
                device_class=st.none() | _names,
                enrolled_at=_opt_time,
                last_seen=_opt_time,
                revoked=st.none() | st.booleans(),
            ),
            max_size=4,
        )
    )
    return StatusReport(
        state=draw(st.sampled_from(["memory://", "redis://127.0.0.1:6379/0"])),
        now=NOW,
        head_version=draw(_opt_int),
        federation=None,
        versions=tuple(sorted(versions, key=lambda v: v.version)),
        classes=tuple(classes),
        cohorts=tuple(cohorts),
        workers=tuple(workers),
        devices=tuple(devices),
        problems=tuple(draw(st.lists(_text, max_size=3))),
    )


@settings(max_examples=40, deadline=None)
@given(report=reports())
def test_any_report_fits_80_columns_without_cut_cells(report: StatusReport) -> None:
    text = render_text(report, details=ALL)

    assert overlong(text) == []
    assert "…" not in text
    # Every class's row shows its counts (class names are short enough for one line).
    if report.classes:
        rows = table_rows(text, "class")
        assert [row[0] for row in rows] == [c.name for c in report.classes]
        assert [row[2:4] for row in rows] == [
            [str(c.enrolled), str(c.waiting)] for c in report.classes
        ]
