"""``estuary status``: what the state store holds about a run.

The command reads the records (:mod:`estuary.cli.status_report`) and prints either a
summary for people that fits 80 columns, with details behind flags
(:mod:`estuary.cli.status_render`), or everything as JSON for programs.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, fail, print_json
from estuary.cli.status_render import DETAILS, render
from estuary.cli.status_report import StatusReport, build_report, collect_records
from estuary.clock import SYSTEM_CLOCK, Clock


def read_status(
    store_url: str, *, password: str | None = None, clock: Clock = SYSTEM_CLOCK
) -> tuple[dict[str, Any], StatusReport]:
    """Return the run's records (:func:`collect_records`) and their report at ``clock``'s now.

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
        records = collect_records(store)
    finally:
        store.close()
    return records, build_report(records, now=clock.time())


def collect_status(
    store_url: str, *, password: str | None = None, clock: Clock = SYSTEM_CLOCK
) -> dict[str, Any]:
    """Return what ``--format json`` prints: every record, grouped and sorted, plus ``summary``.

    Raises
    ------
    InvalidStoreURL
        If the URL is not a store URL.
    StoreUnavailable
        If the store cannot be reached.
    """
    records, report = read_status(store_url, password=password, clock=clock)
    return {**records, "summary": report.summary()}


def _flag(name: str, what: str) -> Any:
    return typer.Option(f"--{name}", help=f"Also list {what} (text output).")


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
        OutputFormat,
        typer.Option("--format", help="text: a summary for people; json: every record."),
    ] = OutputFormat.text,
    versions: Annotated[bool, _flag("versions", "every version with its commit date")] = False,
    cohorts: Annotated[bool, _flag("cohorts", "every cohort with its stage and outcome")] = False,
    workers: Annotated[bool, _flag("workers", "every worker group's last heartbeat")] = False,
    devices: Annotated[
        bool, _flag("devices", "every enrolled device (last seen: its newest request)")
    ] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list versions, cohorts, workers and devices.")
    ] = False,
) -> None:
    """Show what the state store holds about a run.

    The text summary fits 80 columns: the store's size (keys, bytes), the head version,
    the newest versions with their
    held-out score (bits/byte), each device class with its devices enrolled and waiting
    against the cohort minimum (cohorts form within one class and need cohort.min_size
    devices of it), cohorts by stage, worker groups and how far evaluation lags the head.
    --versions, --cohorts, --workers, --devices (or --all) add full lists. --format json
    prints every record plus the summary, with Unix-second times.

    A fresh store (and memory://, which lives only inside one process) shows nothing yet.
    Exit code 4 when the store cannot be reached, 3 for a malformed URL.
    """
    from estuary.state import InvalidStoreURL, StoreError, StoreUnavailable

    password = None
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            fail(f"--password-env: environment variable {password_env} is unset or empty")
            raise typer.Exit(ExitCode.CONFIG)
    try:
        records, report = read_status(state, password=password)
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
        print_json({**records, "summary": report.summary()})
        return
    asked = {"versions": versions, "cohorts": cohorts, "workers": workers, "devices": devices}
    render(report, console, details=[name for name in DETAILS if show_all or asked[name]])
