"""``estuary pki``: make the federation's CAs and the coordinator's certificate.

Exit codes: 0 written; 5 (input) a file to write exists, or the CA to sign with is
missing or unreadable; 2 (usage) a name or number that is not valid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from estuary import pki
from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, fail, print_json

app = typer.Typer(
    help=(
        "Make the federation CA, the device CA and the coordinator's certificate. Device "
        "certificates are not made here: devices get them by CSR when they enrol."
    ),
    no_args_is_help=True,
)


def _report(paths: dict[str, Path], output: OutputFormat) -> None:
    if output is OutputFormat.json:
        print_json({name: str(path) for name, path in paths.items()})
        return
    for name, path in paths.items():
        console.print(f"{name:<20} {path}", highlight=False, soft_wrap=True)


@app.command("init")
def init(
    folder: Annotated[Path, typer.Argument(help="Directory for the CAs (created, mode 0700).")],
    organization: Annotated[
        str, typer.Option("--org", help="Organization name in the CAs' subjects.")
    ] = "Estuary federation",
    days: Annotated[
        int, typer.Option("--days", min=1, help="Validity of both CAs, days.")
    ] = pki.CA_VALIDITY_DAYS,
    output: Annotated[OutputFormat, typer.Option("--format", help="text or json.")] = (
        OutputFormat.text
    ),
) -> None:
    """Create a federation CA and a separate device CA in FOLDER.

    Writes federation-ca.pem/.key (signs the coordinator's certificate; edges trust it as
    tls.ca_file) and device-ca.pem/.key (signs device certificates at enrolment; the
    coordinator's tls.client_ca_file, tls.device_ca_cert_file and tls.device_ca_key_file).
    Private keys get mode 0600. Existing files are never overwritten (exit 5).
    """
    try:
        paths = pki.init_pki(folder, organization=organization, now=time.time(), days=days)
    except FileExistsError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    except ValueError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.USAGE) from None
    _report(
        {
            "federation_ca_cert": paths.federation_ca_cert,
            "federation_ca_key": paths.federation_ca_key,
            "device_ca_cert": paths.device_ca_cert,
            "device_ca_key": paths.device_ca_key,
        },
        output,
    )


@app.command("server")
def server(
    folder: Annotated[Path, typer.Argument(help="The directory `estuary pki init` made.")],
    dns: Annotated[
        list[str] | None,
        typer.Option("--dns", help="DNS name edges connect to (repeatable)."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="IP address edges connect to (repeatable)."),
    ] = None,
    days: Annotated[
        int, typer.Option("--days", min=1, help="Validity, days.")
    ] = pki.SERVER_VALIDITY_DAYS,
    output: Annotated[OutputFormat, typer.Option("--format", help="text or json.")] = (
        OutputFormat.text
    ),
) -> None:
    """Issue the coordinator's certificate (server.pem, server.key) from FOLDER's federation CA.

    Every --dns and --ip goes into the subjectAltName; give each name edges and load
    balancers use. All coordinator replicas share this certificate. Exit 5 if server.pem
    or server.key exists or the federation CA is missing; 2 for a malformed name.
    """
    try:
        paths = pki.issue_server_certificate(
            folder, dns=dns or [], ips=ip or [], now=time.time(), days=days
        )
    except (FileExistsError, pki.PKIError) as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    except ValueError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.USAGE) from None
    _report({"server_cert": paths.server_cert, "server_key": paths.server_key}, output)
