"""``estuary status``: what the state store holds about a run."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer
from rich.table import Table

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, fail, print_json
from estuary.state.keys import COHORT_PREFIX, DEVICE_PREFIX, VERSION_PREFIX, WORKER_PREFIX

SECTIONS = {
    "versions": VERSION_PREFIX,
    "cohorts": COHORT_PREFIX,
    "workers": WORKER_PREFIX,
    "devices": DEVICE_PREFIX,
}


def _decode(key: str, prefix: str, value: bytes) -> dict[str, Any]:
    ident = key[len(prefix) :]
    try:
        obj = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"id": ident, "error": "record is not JSON"}
    if not isinstance(obj, dict):
        return {"id": ident, "error": "record is not a JSON object"}
    return {"id": ident, **obj}


def collect_status(store_url: str, *, password: str | None = None) -> dict[str, Any]:
    """Return the run's records grouped by kind, each list sorted by id.

    Raises
    ------
    InvalidStoreURL
        If the URL is not a store URL.
    StoreUnavailable
        If the store cannot be reached.
    """
    # Imported here: the store pulls in redis-py, which other commands never need.
    from estuary.state import open_store

    options: dict[str, Any] = {}
    if password is not None:
        options["password"] = password
    store = open_store(store_url, **options)
    try:
        result: dict[str, Any] = {"state": store.url}
        for section, prefix in SECTIONS.items():
            records = store.scan(prefix)
            result[section] = [
                _decode(key, prefix, rec.value) for key, rec in sorted(records.items())
            ]
        return result
    finally:
        store.close()


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = Table(title=f"{title} ({len(rows)})", title_justify="left")
    for col in columns or ["id"]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    return table


def status(
    state: Annotated[
        str,
        typer.Option(
            "--state",
            help="State store URL: memory://, redis://host:port/db or rediss://host:port/db.",
        ),
    ],
    password_env: Annotated[
        str | None,
        typer.Option(
            "--password-env", help="Name of the environment variable holding the Redis password."
        ),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print as text or JSON.")
    ] = OutputFormat.text,
) -> None:
    """Show what the state store holds about a run: versions, cohorts, workers, devices.

    A fresh store (and memory://, which lives only inside one process) shows empty
    lists. Exit code 4 when the store cannot be reached, 3 for a malformed URL.
    """
    from estuary.state import InvalidStoreURL, StoreError, StoreUnavailable

    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            fail(f"--password-env: environment variable {password_env} is unset or empty")
            raise typer.Exit(ExitCode.CONFIG)
    try:
        data = collect_status(state, password=password)
    except InvalidStoreURL as exc:
        fail(f"--state: {exc}")
        raise typer.Exit(ExitCode.CONFIG) from None
    except StoreUnavailable as exc:
        fail(f"state store unreachable: {exc}")
        raise typer.Exit(ExitCode.STATE_UNAVAILABLE) from None
    except StoreError as exc:
        fail(f"state store error: {exc}")
        raise typer.Exit(ExitCode.FAILURE) from None
    if output is OutputFormat.json:
        print_json(data)
        return
    console.print(f"state store: {data['state']}")
    for section in SECTIONS:
        console.print(_table(section, data[section]))
