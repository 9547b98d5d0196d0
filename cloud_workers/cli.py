"""``estuary worker``: run a cloud worker group, or generate text with a model version.

``run`` serves jobs. A group of one stage runs in this process; a group of several
stages is one ``torchrun`` launch of that many processes: ``run`` builds and starts the
command, or, when it already runs under torchrun (``WORLD_SIZE`` is set), serves as its
rank. Exit codes follow :class:`estuary.cli.exit_codes.ExitCode`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from estuary.cli.exit_codes import ExitCode
from estuary.cli.shutdown import DEFAULT_SHUTDOWN_GRACE_S, ShutdownDeadline

if TYPE_CHECKING:
    from estuary.config.models import WorkerSettings

__all__ = ["app", "torchrun_command"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Cloud worker groups: serve evaluation, artifact, merge and generate jobs.",
    no_args_is_help=True,
)


@app.callback()
def _worker() -> None:
    """Cloud worker groups: serve evaluation, artifact, merge and generate jobs."""


def torchrun_command(
    config: Path,
    *,
    stages: int,
    idle_exit_s: float | None = None,
    shutdown_grace_s: float | None = None,
) -> list[str]:
    """Return the ``torchrun`` command that starts a group of ``stages`` processes.

    ``--standalone`` runs the rendezvous on this machine (one node per group); each rank
    re-enters ``run`` with torchrun's environment and serves its stage.
    """
    if stages < 1:
        raise ValueError(f"stages: must be >= 1, got {stages}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={stages}",
        "-m", "cloud_workers.cli", "run", "--config", str(config),
    ]  # fmt: skip
    if idle_exit_s is not None:
        command += ["--idle-exit-s", str(idle_exit_s)]
    if shutdown_grace_s is not None:
        command += ["--shutdown-grace-s", str(shutdown_grace_s)]
    return command


def _load(config: Path) -> WorkerSettings:
    from estuary.config import ConfigError, load_settings
    from estuary.config.models import WorkerSettings

    try:
        settings = load_settings("worker", config)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(ExitCode.CONFIG) from None
    assert isinstance(settings, WorkerSettings)
    return settings


@app.command("run")
def run(
    config: Annotated[Path, typer.Option("--config", help="Worker TOML configuration file.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the torchrun command instead of running it.")
    ] = False,
    idle_exit_s: Annotated[
        float | None,
        typer.Option(
            "--idle-exit-s",
            min=0.1,
            help="Exit after this many seconds without a job (batch runs).",
        ),
    ] = None,
    shutdown_grace_s: Annotated[
        float,
        typer.Option(
            "--shutdown-grace-s",
            min=0.1,
            help="After SIGINT/SIGTERM, seconds to let the job in progress finish; then exit "
            "anyway (the unfinished job is reclaimed by another group).",
        ),
    ] = DEFAULT_SHUTDOWN_GRACE_S,
) -> None:
    """Serve jobs from the state store's job stream as worker group GROUP of the config.

    Exit codes: 3 invalid config or a topology that does not divide the model, 4 state
    store unreachable, 5 base model missing or corrupt, 130 stopped by SIGINT/SIGTERM.
    """
    settings = _load(config)
    under_torchrun = bool(os.environ.get("WORLD_SIZE"))
    if settings.stages > 1 and not under_torchrun:
        command = torchrun_command(
            config,
            stages=settings.stages,
            idle_exit_s=idle_exit_s,
            shutdown_grace_s=(
                None if shutdown_grace_s == DEFAULT_SHUTDOWN_GRACE_S else shutdown_grace_s
            ),
        )
        if dry_run:
            typer.echo(" ".join(command))
            raise typer.Exit(ExitCode.OK)
        logger.info("starting %d stages: %s", settings.stages, " ".join(command))
        raise typer.Exit(_run_forwarding_signals(command))
    if dry_run:
        typer.echo("single process (stages = 1, or already under torchrun): nothing to launch")
        raise typer.Exit(ExitCode.OK)
    raise typer.Exit(_serve(settings, idle_exit_s=idle_exit_s, shutdown_grace_s=shutdown_grace_s))


def _run_forwarding_signals(command: list[str]) -> int:
    """Run torchrun and pass SIGINT/SIGTERM on to it; return its exit code.

    In a container only PID 1 (this process) gets the stop signal: without forwarding,
    the stages never hear it and are SIGKILLed at the end of the grace period instead of
    stopping within their own ``--shutdown-grace-s``.
    """
    child = subprocess.Popen(command)
    forwarded: list[int] = []

    def _forward(signum: int, frame: FrameType | None) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, _forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
        # torchrun answers a stop signal with exit 1 (SignalException) whatever its ranks
        # did; the group was stopped by a signal, which is what 130 says.
        return ExitCode.INTERRUPTED if forwarded and code != 0 else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(
    settings: WorkerSettings,
    *,
    idle_exit_s: float | None,
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
) -> int:
    from cloud_workers.worker import serve
    from estuary.model.loading import CheckpointError
    from estuary.state import StoreUnavailable

    stop = threading.Event()
    interrupted = threading.Event()
    deadline = ShutdownDeadline(
        shutdown_grace_s, what=f"worker group {settings.group} (rank {os.environ.get('RANK', 0)})"
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        stop.set()
        deadline.arm()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        serve(settings, environ=os.environ, stop=stop, idle_exit_s=idle_exit_s)
    except CheckpointError as exc:
        typer.echo(f"error: model: {exc}", err=True)
        return ExitCode.INPUT
    except StoreUnavailable as exc:
        typer.echo(f"error: state: {exc}", err=True)
        return ExitCode.STATE_UNAVAILABLE
    except ValueError as exc:  # the topology does not fit the model or the world size
        typer.echo(f"error: {exc}", err=True)
        return ExitCode.CONFIG
    deadline.finish()
    return ExitCode.INTERRUPTED if interrupted.is_set() else ExitCode.OK


@app.command("generate")
def generate(
    config: Annotated[Path, typer.Option("--config", help="Worker TOML configuration file.")],
    version: Annotated[int, typer.Option("--version", min=0, help="Model version to use.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, max=4096, help="Tokens (bytes) to add.")
    ] = 64,
) -> None:
    """Continue PROMPT greedily with VERSION's merged model, in this process.

    Exit codes: 3 invalid config, 4 state store unreachable, 5 unknown version or a
    missing or corrupt adapter/base checkpoint.
    """
    import torch

    from cloud_workers.executor import ModelJobExecutor
    from cloud_workers.worker import open_state
    from estuary.jobs import JobInputError, make_job
    from estuary.model.loading import CheckpointError, load_base
    from estuary.state import StoreUnavailable

    settings = _load(config)
    try:
        store, blobs = open_state(settings)
        # Generation needs no evaluation set; one dummy window satisfies the executor.
        executor = ModelJobExecutor(
            store,
            blobs=blobs,
            base=load_base(settings.model),
            eval_windows=torch.zeros(1, 2, dtype=torch.int64),
        )
        job = make_job("generate", version=version, prompt=prompt, max_new_tokens=max_new_tokens)
        text = executor.execute(job)["text"]
    except (JobInputError, CheckpointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.INPUT) from None
    except StoreUnavailable as exc:
        typer.echo(f"error: state: {exc}", err=True)
        raise typer.Exit(ExitCode.STATE_UNAVAILABLE) from None
    typer.echo(prompt + text)


if __name__ == "__main__":  # entry point of each rank under torchrun
    from estuary.log import init_logging

    init_logging()
    app()
