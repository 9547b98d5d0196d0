"""``estuary status`` reports how big the state store is (issue 11, item 9)."""

from __future__ import annotations

import json

from status_fixtures import NOW, fill_run, render_text
from typer.testing import CliRunner

from estuary.cli.app import app
from estuary.cli.status_report import build_report, collect_records
from estuary.state.base import Footprint
from estuary.state.errors import StoreError
from estuary.state.memory import MemoryStore, shared_memory_store

runner = CliRunner()


def test_the_report_carries_the_store_footprint_and_the_header_shows_it() -> None:
    store = MemoryStore()
    fill_run(store)
    footprint = store.footprint()
    report = build_report(collect_records(store), now=NOW)
    assert (report.store_keys, report.store_bytes) == (footprint.keys, footprint.bytes)
    assert report.summary()["store"] == {"keys": footprint.keys, "bytes": footprint.bytes}
    assert footprint.keys > 30 and footprint.bytes > 1024
    text = render_text(report)
    kib = f"{footprint.bytes / 1024:.1f} KiB"
    line = next(line for line in text.splitlines() if "store size" in line)
    assert line.split("store size", 1)[1].strip() == f"{footprint.keys} keys, {kib}"


def test_a_malformed_size_is_a_problem_not_a_crash() -> None:
    records = collect_records(MemoryStore())
    records["store_size"] = {"keys": "many"}
    report = build_report(records, now=NOW)
    assert report.store_keys is None and report.store_bytes is None
    assert any("store size: field 'keys'" in p for p in report.problems)


def test_json_output_has_the_store_size() -> None:
    store = shared_memory_store("status-size")
    fill_run(store)
    result = runner.invoke(app, ["status", "--state", "memory://status-size", "--format", "json"])
    data = json.loads(result.stdout)
    assert data["store_size"]["keys"] == store.footprint().keys
    assert data["summary"]["store"]["bytes"] > 0


class _NoInfo(MemoryStore):
    def footprint(self) -> Footprint:
        raise StoreError("redis://x: footprint: NOPERM this user has no permissions to run INFO")


def test_a_store_that_will_not_say_its_size_is_a_problem_line_and_the_rest_is_shown() -> None:
    store = _NoInfo()
    fill_run(store)
    report = build_report(collect_records(store), now=NOW)
    assert report.store_keys is None and report.head_version is not None
    assert any("store size: " in p and "NOPERM" in p for p in report.problems)
    header = [line.strip() for line in render_text(report).splitlines()]
    assert not any(line.startswith("store size") and "keys" in line for line in header)
