from __future__ import annotations

import io
import json
import logging

import pytest

from estuary.log import init_logging, log_context


@pytest.fixture
def restore_root() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_context_fields(restore_root: object) -> None:
    buf = io.StringIO()
    init_logging(level="DEBUG", fmt="json", stream=buf)
    log = logging.getLogger("estuary.test")
    with log_context(run="r1", version=3):
        with log_context(cohort="c9"):
            log.info("merged %d updates", 5)
        log.debug("outside cohort")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines[0]["message"] == "merged 5 updates"
    assert (lines[0]["run"], lines[0]["version"], lines[0]["cohort"]) == ("r1", 3, "c9")
    assert "cohort" not in lines[1]
    assert lines[1]["level"] == "DEBUG"


def test_text_format_and_level_from_env(
    restore_root: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESTUARY_LOG_LEVEL", "warning")
    buf = io.StringIO()
    init_logging(stream=buf)
    log = logging.getLogger("estuary.test")
    with log_context(node="n1"):
        log.info("hidden")
        log.warning("shown")
    out = buf.getvalue()
    assert "hidden" not in out
    assert "WARNING estuary.test [node=n1] shown" in out


def test_init_twice_does_not_duplicate_lines(restore_root: object) -> None:
    buf = io.StringIO()
    init_logging(level="INFO", stream=buf)
    init_logging(level="INFO", stream=buf)
    logging.getLogger("estuary.test").info("once")
    assert buf.getvalue().count("once") == 1


def test_bad_level_and_unknown_context_field_are_refused(restore_root: object) -> None:
    with pytest.raises(ValueError, match="LOUD"):
        init_logging(level="LOUD")
    with pytest.raises(ValueError, match="unknown fields"), log_context(secret="x"):
        pass


def test_default_handler_follows_stderr_after_a_swapped_stream_is_closed(
    restore_root: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: logging initialised while sys.stderr is a temporary stream (as a CLI test
    # runner does), which is then closed and replaced.
    temporary = io.StringIO()
    monkeypatch.setattr("sys.stderr", temporary)
    init_logging(level="INFO", fmt="text")
    temporary.close()
    later = io.StringIO()
    monkeypatch.setattr("sys.stderr", later)
    # Execute
    logging.getLogger("estuary.test").warning("still heard")
    # Assert: the record reached the current stderr; no "--- Logging error ---".
    assert "still heard" in later.getvalue()
    assert "Logging error" not in later.getvalue()
