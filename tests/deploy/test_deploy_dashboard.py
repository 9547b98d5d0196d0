"""deploy/grafana/estuary.json queries only what a coordinator exports, with its labels.

The exported series come from a real :class:`coordinator.metrics.CoordinatorMetrics`: its
registry's metric families give every name (with the suffixes Prometheus adds: ``_total``
for counters; ``_bucket``, ``_sum``, ``_count`` for histograms), and feeding each of its
inputs once gives the label names of the labelled ones.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from deploy_checks import DEPLOY
from prometheus_client.parser import text_string_to_metric_families

from coordinator.metrics import CoordinatorMetrics

DASHBOARD = json.loads((DEPLOY / "grafana" / "estuary.json").read_text(encoding="utf-8"))
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
#: What the issue asks the dashboard to show, as the series that carry it.
REQUIRED = {
    "estuary_version",  # head version
    "estuary_versions_committed_total",  # commit rate
    "estuary_cohorts",  # cohorts by stage
    "estuary_devices_active",
    "estuary_uploads_total",
    "estuary_upload_bytes_total",
    "estuary_staleness_bucket",  # staleness histogram
    "estuary_store_ping_seconds_bucket",  # store latency
    "estuary_rpcs_total",  # RPC codes
    "estuary_jobs_submitted_total",  # cloud jobs
}

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Every series name a coordinator exports, with the label names it carries."""
    metrics = CoordinatorMetrics()
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names[family.name + suffix] = set()
    # feed every input once so the labelled series exist and show their labels
    metrics.event("upload", bytes=10)
    metrics.event("weight_assigned", staleness=1)
    metrics.event("version_committed", version=1)
    metrics.event("cohort_finished", status="COMPLETED")
    metrics.event("update_rejected")
    metrics.event("update_dropped", updates=1)
    metrics.event("paced")
    metrics.event("job_submitted")
    metrics.rpc("GetTask", "OK", bytes_in=1, bytes_out=2)
    metrics.store_probe(0.001)
    metrics.refresh({"version": 1, "devices_active": 4, "cohorts": {"FORMING": 1}})
    text = metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


EXPORTED = exported()

# PromQL, enough of it to find metric names: everything that is not a metric name is
# removed (strings, label matchers, ranges, grouping clauses, numbers, variables), then a
# name followed by "(" is a function or aggregation.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    stripped = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub('""', expr))))
    stripped = _VARIABLE.sub(" ", stripped)
    names = set()
    for match in _IDENT.finditer(stripped):
        following = stripped[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Labels the expression groups by or matches on."""
    labels = set()
    for _, group in _GROUPING.findall(expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in _MATCHERS.findall(_STRING.sub('""', expr)):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def panels(items: list[dict[str, Any]] = DASHBOARD["panels"]) -> list[dict[str, Any]]:
    found = []
    for panel in items:
        found.append(panel)
        found.extend(panels(panel.get("panels", [])))
    return found


def queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels()
        for target in panel.get("targets", [])
    ]


def test_the_query_parser_finds_metrics_and_labels() -> None:
    # The checks below can fail: names and labels come out of a query as PromQL reads it.
    expr = (
        'histogram_quantile(0.9, sum by (le, instance) (rate(estuary_nope_bucket{code!="OK",'
        'method=~"Get.*"}[$__rate_interval]))) / on (job) max(up) * 60'
    )
    assert metric_names(expr) == {"estuary_nope_bucket", "up"}
    assert label_names(expr) == {"le", "instance", "code", "method", "job"}
    assert "estuary_nope_bucket" not in EXPORTED


def test_every_query_uses_only_exported_metrics_and_their_labels() -> None:
    assert queries()
    for title, expr in queries():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - EXPORTED.keys()
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the coordinator"
        allowed = set.union(*(EXPORTED[n] for n in names)) | TARGET_LABELS
        assert label_names(expr) <= allowed, f"{title}: labels {label_names(expr) - allowed}"


def test_dashboard_shows_what_an_operator_needs() -> None:
    used = set().union(*(metric_names(expr) for _, expr in queries()))
    assert used >= REQUIRED, f"missing: {sorted(REQUIRED - used)}"


def test_panels_take_the_datasource_variable_and_do_not_overlap() -> None:
    (variable,) = DASHBOARD["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    boxes = []
    for panel in panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        boxes.append((panel["title"], pos))
    for i, (a, pa) in enumerate(boxes):
        for b, pb in boxes[i + 1 :]:
            apart = (
                pa["x"] + pa["w"] <= pb["x"]
                or pb["x"] + pb["w"] <= pa["x"]
                or pa["y"] + pa["h"] <= pb["y"]
                or pb["y"] + pb["h"] <= pa["y"]
            )
            assert apart, f"panels {a!r} and {b!r} overlap"


@pytest.mark.parametrize("uid_field", ["uid", "title"])
def test_dashboard_identity_is_stable(uid_field: str) -> None:
    # Provisioning replaces a dashboard by uid; a changed uid would duplicate it in Grafana.
    assert (
        DASHBOARD[uid_field]
        == {"uid": "estuary-federation", "title": "Estuary federation"}[uid_field]
    )
