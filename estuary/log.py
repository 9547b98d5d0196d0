"""Process-wide logging: one :func:`init_logging`, per-module loggers, context fields.

Modules log with ``logging.getLogger(__name__)`` and lazy %-formatting. The fields
``run``, ``version``, ``cohort`` and ``node`` are carried in :mod:`contextvars`, so an
asyncio task or a thread sets them once (:func:`log_context`) and every record logged
beneath it carries them, in text and in JSON lines alike.

Secrets are never passed to a logger: keys, seeds, shares, tokens and raw updates stay
out of log calls by construction (tests capture logs and check).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import IO, Any, Literal

#: The context fields every record carries (``None`` when unset).
CONTEXT_FIELDS = ("run", "version", "cohort", "node")

# An immutable empty default: every change goes through log_context(), which sets a new
# mapping, so tasks and threads never share a mutable dict.
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "estuary_log_context", default=MappingProxyType({})
)

LogFormat = Literal["text", "json"]

#: Environment variables read by :func:`init_logging` when no explicit value is given.
LEVEL_ENV = "ESTUARY_LOG_LEVEL"
FORMAT_ENV = "ESTUARY_LOG_FORMAT"

_HANDLER_NAME = "estuary-root-handler"


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add context fields to every record logged inside the ``with`` block.

    Only the names in :data:`CONTEXT_FIELDS` are accepted; nesting merges, the inner value
    winning, and the outer values are restored on exit.

    Raises
    ------
    ValueError
        If a field name is not one of :data:`CONTEXT_FIELDS`.
    """
    unknown = sorted(set(fields) - set(CONTEXT_FIELDS))
    if unknown:
        raise ValueError(f"log_context: unknown fields {unknown}; allowed {list(CONTEXT_FIELDS)}")
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copy the context fields onto each record (``record.run`` etc.)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the fields and keep the record."""
        ctx = _context.get()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name))
        return True


class TextFormatter(logging.Formatter):
    """``time level logger [run=… version=…] message`` with only the fields that are set."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one line (plus a traceback if any)."""
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        ctx = " ".join(
            f"{name}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        )
        line = (
            f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z {record.levelname:<7} "
            f"{record.name}{' [' + ctx + ']' if ctx else ''} {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one JSON line."""
        ts = _dt.datetime.fromtimestamp(record.created, tz=_dt.timezone.utc)
        obj: dict[str, Any] = {
            "time": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                obj[name] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted.

    Binding the stream object at :func:`init_logging` time breaks as soon as someone
    swaps ``sys.stderr`` for a while and closes the temporary (a CLI test runner, pytest's
    capture, a daemon that redirects): every later record then fails with "I/O operation
    on closed file". Looking the stream up per record follows the swap instead.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr


def init_logging(
    *,
    level: str | int | None = None,
    fmt: LogFormat | None = None,
    stream: IO[str] | None = None,
) -> None:
    """Configure the root logger once for the process; calling again reconfigures it.

    Parameters
    ----------
    level
        Level name or number. ``None``: ``$ESTUARY_LOG_LEVEL``, else ``INFO``.
    fmt
        ``"text"`` or ``"json"`` (JSON lines). ``None``: ``$ESTUARY_LOG_FORMAT``, else text.
    stream
        Where to write; ``None``: standard error (standard output stays for command results).

    Raises
    ------
    ValueError
        If the level or format (argument or environment) is not recognised.
    """
    raw_level = level if level is not None else os.environ.get(LEVEL_ENV, "INFO")
    if isinstance(raw_level, str):
        resolved = logging.getLevelName(raw_level.upper())
        if not isinstance(resolved, int):
            raise ValueError(
                f"log level {raw_level!r} (from {LEVEL_ENV} or --log-level) is not one of "
                "DEBUG, INFO, WARNING, ERROR, CRITICAL"
            )
        numeric = resolved
    else:
        numeric = raw_level
    chosen = fmt if fmt is not None else os.environ.get(FORMAT_ENV, "text")
    if chosen not in ("text", "json"):
        raise ValueError(f"log format {chosen!r} (from {FORMAT_ENV}) must be 'text' or 'json'")
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    )
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
