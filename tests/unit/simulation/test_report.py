from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from simulation.report import (
    LiveDisplay,
    MetricsLog,
    StalenessHistogram,
    Summary,
    plot_bpb,
    plot_staleness,
    progress_note,
    read_events,
    read_summary,
    staleness_figure,
    write_summary,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _summary() -> Summary:
    return {
        "initial": {"per_client": {"email": 3.5, "json": 3.25}, "union": 3.4},
        "final": {"per_client": {"email": 3.0, "json": 2.75}, "union": 2.9},
        "baselines": {
            "local_only": {"per_client": {"email": 3.2, "json": 3.0}, "union": 3.1},
            "centralized": {"per_client": {"email": 2.8, "json": 2.6}, "union": 2.7},
        },
        "versions": 6,
        "updates_accepted": 40,
        "updates_rejected": 3,
        "dropouts": 2,
        "staleness_histogram": {"0": 30, "1": 8, "2": 2},
        "bytes_up_per_client": {"email": 1234, "json": 999},
        "bytes_down_per_client": {"email": 5678, "json": 5678},
        "wall_time_s": 42.5,
        "config": "configs/simulate.toml",
    }


# ------------------------------------------------------------------- metrics log


def test_metrics_log_writes_one_parsable_line_per_event(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "run" / "metrics.jsonl"

    with MetricsLog(path, clock=clock) as log:
        log.event("version", version=1, union_bpb=np.float32(2.5))
        clock.now += 1.25
        returned = log.event("update", client="email", staleness=np.int64(2), shape=np.zeros(2))
        # Flushed per line: readable before the log is closed.
        assert len(path.read_text().splitlines()) == 2

    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == read_events(path)
    first, second = read_events(path)
    assert first == {"t": 0.0, "kind": "version", "version": 1, "union_bpb": 2.5}
    assert second == {
        "t": 1.25,
        "kind": "update",
        "client": "email",
        "staleness": 2,
        "shape": [0.0, 0.0],
    }
    assert returned["t"] == 1.25


def test_metrics_log_appends_and_rejects_misuse(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.event("start")
    log = MetricsLog(path)
    log.event("again")

    with pytest.raises(ValueError, match="reserved"):
        log.event("x", t=1)
    with pytest.raises(ValueError, match="kind"):
        log.event("")
    with pytest.raises(TypeError):
        log.event("x", thing=object())
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.event("late")

    assert [e["kind"] for e in read_events(path)] == ["start", "again"]


# --------------------------------------------------------------------- staleness


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=200))
def test_histogram_counts_every_add(values: list[int]) -> None:
    hist = StalenessHistogram()

    for value in values:
        hist.add(value)

    counts = hist.as_dict()
    assert sum(counts.values()) == len(values) == hist.total
    assert list(counts) == sorted(set(values))
    assert all(counts[v] == values.count(v) for v in counts)
    assert hist.to_json() == {str(k): n for k, n in counts.items()}
    if values:
        assert hist.mean == pytest.approx(sum(values) / len(values))
    else:
        assert hist.mean is None


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5)), max_size=50))
def test_adding_a_count_is_adding_one_at_a_time_and_remove_undoes_one(
    pairs: list[tuple[int, int]],
) -> None:
    counted, one_by_one = StalenessHistogram(), StalenessHistogram()
    for staleness, count in pairs:
        counted.add(staleness, count)
        for _ in range(count):
            one_by_one.add(staleness)
    assert counted.as_dict() == one_by_one.as_dict()
    for staleness, count in pairs:
        for _ in range(count):
            counted.remove(staleness)
    assert counted.total == 0 and counted.as_dict() == {}
    with pytest.raises(ValueError, match="no update counted at 3"):
        counted.remove(3)
    with pytest.raises(ValueError, match="count: must be >= 0"):
        counted.add(1, -1)


def test_histogram_rejects_negative_staleness() -> None:
    with pytest.raises(ValueError, match="staleness"):
        StalenessHistogram().add(-1)


# ----------------------------------------------------------------------- summary


def test_summary_round_trips_with_sorted_keys(tmp_path: Path) -> None:
    path = tmp_path / "out" / "summary.json"
    summary = _summary()

    write_summary(path, summary)

    assert read_summary(path) == summary
    text = path.read_text()
    assert text.startswith('{\n  "baselines": {')  # sorted keys, indent 2
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temp file left


def test_summary_without_baselines_round_trips(tmp_path: Path) -> None:
    summary = _summary()
    del summary["baselines"]

    write_summary(tmp_path / "s.json", summary)

    assert read_summary(tmp_path / "s.json") == summary
    assert "baselines" not in read_summary(tmp_path / "s.json")


def test_summary_rejects_missing_keys_and_keeps_extra_ones(tmp_path: Path) -> None:
    incomplete = dict(_summary())
    del incomplete["dropouts"]
    with pytest.raises(ValueError, match="dropouts"):
        write_summary(tmp_path / "s.json", incomplete)
    assert not (tmp_path / "s.json").exists()

    write_summary(tmp_path / "s.json", {**_summary(), "stopped_by": "versions", "extra": [1]})

    assert read_summary(tmp_path / "s.json")["stopped_by"] == "versions"
    with pytest.raises(ValueError, match="not a simulation summary"):
        (tmp_path / "bad.json").write_text('{"versions": 1}')
        read_summary(tmp_path / "bad.json")


def test_summary_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_summary(path, _summary())
    changed = _summary()
    changed["versions"] = 7

    write_summary(path, changed)

    assert read_summary(path)["versions"] == 7


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_summary_has_the_permissions_of_the_other_run_files(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_summary(tmp_path / "summary.json", _summary())
        MetricsLog(tmp_path / "metrics.jsonl").close()
        plot_staleness({0: 1}, tmp_path / "staleness.png")
        (tmp_path / "config.json").write_text("{}")
    finally:
        os.umask(old)

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert len(modes) == 4  # no temporary file left behind


# ------------------------------------------------------------------------- plots


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def test_plot_bpb_writes_a_png(tmp_path: Path) -> None:
    out = plot_bpb(
        [(0.0, 3.4), (5.0, 3.2), (9.5, 3.0)],
        baselines={"local_only": 3.1, "centralized": 2.7},
        base=3.4,
        out_png=tmp_path / "plots" / "bpb.png",
    )

    assert out == tmp_path / "plots" / "bpb.png"
    _assert_png(out)


def test_plot_bpb_needs_points(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="points"):
        plot_bpb([], baselines={}, base=3.0, out_png=tmp_path / "x.png")


@pytest.mark.parametrize("hist", [{0: 30, 1: 8, 3: 1}, {"0": 2, "2": 1}, {}])
def test_plot_staleness_writes_a_png(tmp_path: Path, hist: dict[int, int]) -> None:
    out = plot_staleness(hist, tmp_path / "staleness.png")

    _assert_png(out)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.integers(0, 40), st.integers(1, 500), min_size=1, max_size=12))
def test_staleness_bars_are_the_counts_on_a_non_negative_axis(hist: dict[int, int]) -> None:
    figure = staleness_figure({str(k): v for k, v in hist.items()})
    (axes,) = figure.axes

    bars = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in axes.patches}
    assert bars == hist
    assert axes.get_ylim()[0] == 0.0
    assert axes.get_ylim()[1] >= max(hist.values())
    assert axes.get_xlim()[0] >= min(hist) - 0.5
    assert list(axes.get_xticks()) == sorted(hist)
    ticks = [t for t in axes.get_yticks() if axes.get_ylim()[0] <= t <= axes.get_ylim()[1]]
    assert all(t >= 0 and float(t).is_integer() for t in ticks)


def test_empty_staleness_plot_says_there_is_nothing_to_plot() -> None:
    figure = staleness_figure({})
    (axes,) = figure.axes

    assert not axes.patches  # no bar, so no negative one
    assert axes.get_xlim() == (0.0, 1.0) and axes.get_ylim() == (0.0, 1.0)
    assert list(axes.get_xticks()) == [] and list(axes.get_yticks()) == []
    assert any("nothing to plot" in t.get_text() for t in axes.texts)


def test_staleness_plot_rejects_negative_entries() -> None:
    with pytest.raises(ValueError, match="hist"):
        staleness_figure({-1: 3})
    with pytest.raises(ValueError, match="hist"):
        staleness_figure({"2": -1})


# ------------------------------------------------------------------ live display


def test_live_display_without_tty_prints_rate_limited_lines() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    clock = FakeClock()

    with LiveDisplay(
        target_versions=6, console=console, min_interval_s=5.0, clock=clock
    ) as display:
        display.update(version=1, cohorts={"TRAINING": 2}, devices_active=12)
        clock.now += 1.0
        display.update(version=2, union_bpb=3.14159)  # within 5 s: not printed
        clock.now += 5.0
        display.update(staleness=0.5)

    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3  # first update, the one 6 s later, and the last on exit
    assert "versions 1/6" in lines[0] and "TRAINING=2" in lines[0] and "devices 12" in lines[0]
    assert "versions 2/6" in lines[1] and "bits/byte 3.1416" in lines[1]
    assert "staleness 0.50" in lines[1] and "6 s" in lines[1]
    assert "\x1b" not in buffer.getvalue()  # no terminal control codes in a log


def test_live_display_on_a_terminal_draws_a_panel() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)

    # Not entered with ``with``: the first update starts the panel.
    display = LiveDisplay(target_versions=4, console=console)
    display.update(version=3, union_bpb=2.5, devices_active=5, elapsed_s=12.0)
    display.close()

    raw = buffer.getvalue()
    assert "\x1b[" in raw  # drawn as a live panel, with terminal control codes
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "held-out bits/byte  2.5000" in text and "active devices      5" in text
    # The whole panel, rendered without a terminal:
    plain = Console(file=io.StringIO(), force_terminal=False, width=100)
    plain.print(display.panel())
    panel = plain.file.getvalue()  # type: ignore[attr-defined]
    assert "versions            3 / 4" in panel and "mean staleness      -" in panel
    assert "elapsed             12.0 s" in panel


def test_disabled_live_display_shows_nothing() -> None:
    buffer = io.StringIO()
    display = LiveDisplay(
        target_versions=2, enabled=False, console=Console(file=buffer, force_terminal=False)
    )

    display.update(version=1, union_bpb=3.0)
    display.close()

    assert buffer.getvalue() == ""
    assert display.version == 1 and display.union_bpb == 3.0


def test_live_display_checks_arguments() -> None:
    with pytest.raises(ValueError, match="target_versions"):
        LiveDisplay(target_versions=0)
    with pytest.raises(ValueError, match="min_interval_s"):
        LiveDisplay(target_versions=1, min_interval_s=-1)


# ------------------------------------------------------------------------ progress


def _curve(unions: list[float]) -> list[dict[str, float]]:
    return [{"version": v, "wall_s": 10.0 * v, "union": u} for v, u in enumerate(unions)]


def test_progress_says_how_far_below_local_only_and_whether_still_improving() -> None:
    unions = [3.2 - 0.01 * v for v in range(41)]  # 0.01 bits/byte per version, steadily
    summary = {
        "initial": {"union": 3.2},
        "curve": _curve(unions),
        "baselines": {"local_only": {"union": 2.95}},
    }

    note = progress_note(summary)

    assert note["versions"] == 40
    assert note["gain_over_base"] == pytest.approx(0.4)
    assert note["gain_over_local_only"] == pytest.approx(0.15)
    assert note["slope_per_version"] == pytest.approx(0.01)
    assert note["still_improving"] is True
    assert note["text"].startswith(
        "version 40: 0.400 bits/byte below the base; 0.150 below local-only at equal client "
        "samples; still improving by 0.0100 bits/byte per version"
    )


def test_progress_of_a_flat_curve_behind_local_only() -> None:
    summary = {
        "initial": {"union": 3.0},
        "curve": _curve([3.0, 2.95, *[2.9] * 10]),
        "baselines": {"local_only": {"union": 2.8}},
    }

    note = progress_note(summary)

    assert note["gain_over_local_only"] == pytest.approx(-0.1)
    assert note["still_improving"] is False
    assert "0.100 above local-only" in note["text"] and "flattened" in note["text"]


def test_progress_without_a_version() -> None:
    note = progress_note({"initial": {"union": 3.0}, "curve": _curve([3.0]), "baselines": None})

    assert note["versions"] == 0 and note["slope_per_version"] is None
    assert note["text"] == "no version committed: the curve did not start"


def test_plot_bpb_with_a_note_writes_a_png(tmp_path: Path) -> None:
    out = plot_bpb(
        [(0.0, 3.0), (5.0, 2.9)],
        baselines={"local_only": 2.95},
        base=3.0,
        out_png=tmp_path / "bpb.png",
        note="version 1: 0.100 bits/byte below the base; " * 4,
    )
    assert out.read_bytes().startswith(b"\x89PNG")
