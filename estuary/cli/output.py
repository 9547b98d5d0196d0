"""Printing command results: rich for people, JSON for programs.

Results go to standard output; logs and errors go to standard error, so
``estuary … --format json | jq`` always sees clean JSON.
"""

from __future__ import annotations

import enum
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

#: Human-readable results.
console = Console()
#: Errors and warnings for people; never mixed into standard output.
err_console = Console(stderr=True)


class OutputFormat(str, enum.Enum):
    """How a command prints its data."""

    text = "text"
    json = "json"


def print_json(data: Any) -> None:
    """Write ``data`` as one indented JSON document to standard output."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    """Print an error line for a person on standard error (the caller then exits).

    ``message`` is printed as it is: square brackets in it (an install hint such as
    ``estuary-fl[edge]``, a TOML table name, a path) are text, not rich markup.
    """
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
