"""``estuary coordinator``: serve the federation, issue enrolment tokens, revoke devices.

Exit codes follow :class:`estuary.cli.exit_codes.ExitCode`: 3 invalid configuration or
TLS material, 4 state store unreachable, 5 base model missing or corrupt, 130 stopped by
SIGINT/SIGTERM (after a clean shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, fail, print_json
from estuary.cli.shutdown import DEFAULT_SHUTDOWN_GRACE_S, ShutdownDeadline

if TYPE_CHECKING:
    from coordinator.enrolment import DeviceRegistry
    from estuary.config.models import CoordinatorSettings

__all__ = ["app", "apply_overrides"]

log = logging.getLogger(__name__)

app = typer.Typer(
    help="Coordinator: serve the federation; issue enrolment tokens; revoke devices.",
    no_args_is_help=True,
)


@app.callback()
def _coordinator() -> None:
    """Coordinator: serve the federation; issue enrolment tokens; revoke devices."""


def _load(config: Path) -> CoordinatorSettings:
    from estuary.config import ConfigError, load_settings
    from estuary.config.models import CoordinatorSettings

    try:
        settings = load_settings("coordinator", config)
    except ConfigError as exc:
        for problem in exc.problems:
            fail(str(problem))
        raise typer.Exit(ExitCode.CONFIG) from None
    assert isinstance(settings, CoordinatorSettings)
    return settings


def apply_overrides(
    settings: CoordinatorSettings,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    client_ca: Path | None = None,
    listen: str | None = None,
) -> CoordinatorSettings:
    """Return ``settings`` with command-line flags replacing the file's tls/server values.

    Raises
    ------
    pydantic.ValidationError
        If the result is inconsistent (e.g. a certificate without its key).
    """
    from estuary.config.models import ServerSettings, ServerTLSSettings

    tls: dict[str, Any] = settings.tls.model_dump()
    for name, value in (("cert_file", tls_cert), ("key_file", tls_key)):
        if value is not None:
            tls[name] = value
    if client_ca is not None:
        tls["client_ca_file"] = client_ca
    server: dict[str, Any] = settings.server.model_dump()
    if listen is not None:
        server["listen"] = listen
    return settings.model_copy(
        update={
            "tls": ServerTLSSettings.model_validate(tls),
            "server": ServerSettings.model_validate(server),
        }
    )


@app.command("serve")
def serve(
    config: Annotated[Path, typer.Option("--config", help="Coordinator TOML configuration file.")],
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Server certificate chain (PEM).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Server key (PEM).")] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option("--client-ca", help="CA (PEM) client certificates must chain to (mTLS)."),
    ] = None,
    listen: Annotated[
        str | None, typer.Option("--listen", help="HOST:PORT to serve on (overrides the config).")
    ] = None,
    shutdown_grace_s: Annotated[
        float,
        typer.Option(
            "--shutdown-grace-s",
            min=0.1,
            help="After SIGINT/SIGTERM, seconds to drain requests and let a local job finish; "
            "then exit anyway (the unfinished job is reclaimed by another worker).",
        ),
    ] = DEFAULT_SHUTDOWN_GRACE_S,
) -> None:
    """Serve the federation until SIGINT/SIGTERM, then shut down within the grace period.

    Exit codes: 3 invalid config or TLS files, or the address cannot be bound; 4 state
    store unreachable; 5 base model missing or corrupt; 130 stopped by a signal.
    """
    settings = _load(config)
    try:
        settings = apply_overrides(
            settings, tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca, listen=listen
        )
    except ValidationError as exc:
        for error in exc.errors():
            fail(f"{'.'.join(str(p) for p in error['loc']) or 'tls'}: {error['msg']}")
        raise typer.Exit(ExitCode.CONFIG) from None
    raise typer.Exit(asyncio.run(_serve(settings, shutdown_grace_s=shutdown_grace_s)))


async def _serve(settings: CoordinatorSettings, *, shutdown_grace_s: float) -> int:
    from coordinator.server import DEFAULT_GRACE_S, CoordinatorServer, ServerStartError
    from estuary.config.secrets import SecretUnavailable
    from estuary.jobs import LocalWorkerUnavailable, find_local_worker
    from estuary.model.loading import CheckpointError
    from estuary.pki import PKIError
    from estuary.state import InvalidStoreURL, StoreUnavailable

    stop = asyncio.Event()
    deadline = ShutdownDeadline(shutdown_grace_s, what=f"coordinator {settings.node_id}")

    def _on_signal() -> None:
        stop.set()
        deadline.arm()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal)
    server = None
    try:
        local_worker = find_local_worker() if settings.workers == "local" else None
    except LocalWorkerUnavailable as exc:
        fail(f"workers: {exc}")
        return ExitCode.CONFIG
    try:
        server = CoordinatorServer(settings, local_worker=local_worker)
        await server.start()
    except (ServerStartError, PKIError) as exc:
        fail(str(exc) if isinstance(exc, ServerStartError) else f"tls: {exc}")
        return ExitCode.CONFIG
    except (InvalidStoreURL, SecretUnavailable) as exc:
        fail(f"state: {exc}")
        return ExitCode.CONFIG
    except StoreUnavailable as exc:
        fail(f"state: {exc}")
        return ExitCode.STATE_UNAVAILABLE
    except CheckpointError as exc:
        fail(f"model: {exc}")
        return ExitCode.INPUT
    _freeze_startup_heap()
    try:
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        await server.stop(grace=min(DEFAULT_GRACE_S, shutdown_grace_s / 2))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    deadline.finish(server.lingering_threads)
    return ExitCode.INTERRUPTED


def _freeze_startup_heap() -> None:
    """Move everything allocated at start-up out of the garbage collector's sight.

    The base model, torch and the generated protobuf modules leave hundreds of thousands
    of objects that live as long as the process (about 380 000 with the tiny preset);
    every full collection would walk them all again, a pause on the event loop that the
    allocations of requests themselves trigger (0.5 s measured on a busy 2-core host).
    Frozen (``gc.freeze``), they are never scanned; the objects of requests are collected
    as before.
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def _registry(settings: CoordinatorSettings, why_not_memory: str) -> Iterator[DeviceRegistry]:
    """Open the configured store's device registry, mapping failures to exit codes.

    ``memory://`` is refused (exit 3: nothing else would ever see what is written, which
    ``why_not_memory`` says for this command); a bad URL or secret exits 3, an
    unreachable store 4. The store is closed on the way out.
    """
    from coordinator.enrolment import DeviceRegistry
    from estuary.config.secrets import SecretUnavailable
    from estuary.state import InvalidStoreURL, StoreUnavailable
    from estuary.state.configured import open_state_store

    if settings.state.url.startswith("memory://"):
        fail(
            f"state.url is memory://: {why_not_memory}; point state.url at the coordinator's Redis"
        )
        raise typer.Exit(ExitCode.CONFIG)
    try:
        store = open_state_store(settings.state)
    except (InvalidStoreURL, SecretUnavailable) as exc:
        fail(f"state: {exc}")
        raise typer.Exit(ExitCode.CONFIG) from None
    try:
        yield DeviceRegistry(store, device_classes=[c.name for c in settings.device_classes])
    except StoreUnavailable as exc:
        fail(f"state: {exc}")
        raise typer.Exit(ExitCode.STATE_UNAVAILABLE) from None
    finally:
        store.close()


@app.command("token")
def token(
    config: Annotated[Path, typer.Option("--config", help="Coordinator TOML configuration file.")],
    device_class: Annotated[
        str | None,
        typer.Option("--class", help="Restrict the tokens to this device class (default: any)."),
    ] = None,
    ttl_s: Annotated[
        float, typer.Option("--ttl-s", min=1.0, help="Seconds each token stays valid.")
    ] = 86_400.0,
    count: Annotated[int, typer.Option("--count", min=1, max=10_000, help="Tokens.")] = 1,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="text: one token a line; json.")
    ] = OutputFormat.text,
) -> None:
    """Issue one-time enrolment tokens in the configured state store and print them.

    Only the tokens' hashes are stored; this is the one time they are shown. Exit codes:
    2 unknown device class, 3 invalid config or a memory:// store, 4 store unreachable.
    """
    settings = _load(config)
    classes = [c.name for c in settings.device_classes]
    if device_class is not None and device_class not in classes:
        fail(f"--class: unknown device class {device_class!r}; configured: {sorted(classes)}")
        raise typer.Exit(ExitCode.USAGE)
    with _registry(settings, "tokens would vanish when this command exits") as registry:
        tokens = [
            registry.issue_token(device_class=device_class, ttl_s=ttl_s) for _ in range(count)
        ]
    if fmt is OutputFormat.json:
        print_json({"device_class": device_class, "ttl_s": ttl_s, "tokens": tokens})
    else:
        for value in tokens:
            typer.echo(value)


@app.command("revoke")
def revoke(
    device: Annotated[str, typer.Argument(help="Device id to revoke (32 hex characters).")],
    config: Annotated[Path, typer.Option("--config", help="Coordinator TOML configuration file.")],
    fmt: Annotated[OutputFormat, typer.Option("--format", help="text or json.")] = (
        OutputFormat.text
    ),
) -> None:
    """Revoke DEVICE in the configured state store.

    Every replica checks the revocation epoch on every request, so the revocation takes
    effect on the device's next request to any replica, whatever client certificate it
    still holds (certificates are short-lived; a revoked device cannot renew one).
    Revoking an already revoked device succeeds again. Exit codes: 3 invalid config or a
    memory:// store, 4 store unreachable, 5 unknown device.
    """
    settings = _load(config)
    with _registry(settings, "no coordinator shares it") as registry:
        found = registry.revoke(device)
    if not found:
        fail(f"device {device!r}: not enrolled in {settings.state.url.split('@')[-1]}")
        raise typer.Exit(ExitCode.INPUT)
    if fmt is OutputFormat.json:
        print_json({"device_id": device, "revoked": True})
    else:
        typer.echo(f"revoked device {device}")
