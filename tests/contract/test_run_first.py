"""The suite's longest-first list names modules that exist (a renamed one would silently
lose its place and could leave one xdist worker running it alone at the end)."""

from __future__ import annotations

from pathlib import Path

from run_order import RUN_FIRST

ROOT = Path(__file__).resolve().parents[2]


def test_every_run_first_module_exists_once() -> None:
    missing = [path for path in RUN_FIRST if not (ROOT / path).is_file()]
    assert missing == []
    assert len(set(RUN_FIRST)) == len(RUN_FIRST)
