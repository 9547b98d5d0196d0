"""``estuary edge``: commands of the on-device agent.

``enroll`` registers the device with the coordinator (one-time token, identity key
generated on the device); ``run`` asks for tasks and trains until stopped; ``status``
shows the local state. All three read an edge config file (``EdgeSettings``).

``infer`` serves a model with onnxruntime. It takes either a served ONNX directory (from
``estuary model export-onnx``) or a Hugging Face model directory (from ``estuary model
init``); the latter is exported and quantised once into a cache subfolder, which later
runs reuse until the model's files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edge_client.serving import DEFAULT_THREADS
from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import OutputFormat, console, err_console, fail, print_json

if TYPE_CHECKING:
    from edge_client.agent import EdgeAgent
    from edge_client.state import EdgeState
    from edge_client.tls import ChannelTLS
    from estuary.config import EdgeSettings
    from estuary.config.models import EdgeTLSSettings

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="On-device agent: enrol, train tasks for the federation, serve the model.",
    no_args_is_help=True,
)


@app.callback()
def _edge() -> None:
    """On-device agent: enrol, train tasks for the federation, serve the model."""


ConfigOption = Annotated[
    Path, typer.Option("--config", help="Edge config file (TOML, EdgeSettings).")
]


def _settings(config: Path) -> EdgeSettings:
    """Load the edge settings; exits with ``CONFIG`` naming the problems."""
    from estuary.config import ConfigError, EdgeSettings, load_settings

    try:
        settings = load_settings("edge", config)
    except ConfigError as exc:
        fail(f"invalid configuration:\n{exc}")
        raise typer.Exit(ExitCode.CONFIG) from None
    assert isinstance(settings, EdgeSettings)
    return settings


def _state(settings: EdgeSettings) -> EdgeState:
    from edge_client.state import EdgeState, StateError

    try:
        return EdgeState(settings.state_dir)
    except (OSError, StateError) as exc:
        fail(f"{settings.state_dir}: cannot use the state directory: {exc}")
        raise typer.Exit(ExitCode.INPUT) from None


def channel_tls(tls: EdgeTLSSettings) -> ChannelTLS | None:
    """Return the channel's TLS material from ``tls``, or ``None`` for plaintext.

    ``ca_file`` unset uses the system trust store; ``cert_file``/``key_file`` add a
    client certificate (mTLS) on top of the device's request signatures. Exits with
    ``CONFIG`` naming the file when one is unreadable or not PEM.
    """
    from edge_client.tls import ChannelTLS

    if tls.allow_plaintext:
        return None
    try:
        return ChannelTLS.from_files(
            ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file
        )
    except ValueError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.CONFIG) from None


def _agent(settings: EdgeSettings, *, with_data: bool, target: str | None = None) -> EdgeAgent:
    from edge_client.agent import EdgeAgent

    threads = settings.threads or (os.cpu_count() or 1)
    return EdgeAgent(
        _state(settings),
        target or settings.coordinator,
        credentials=channel_tls(settings.tls),
        data=settings.data_dir if with_data else None,
        threads=threads,
        max_backoff_s=settings.max_backoff_s,
    )


@app.command("enroll")
def enroll(
    config: ConfigOption,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print the enrolment as text or JSON.")
    ] = OutputFormat.text,
) -> None:
    """Enrol this device with the coordinator, using the config's one-time token.

    The identity key is generated here and never leaves the device. Over TLS without a
    configured client certificate, a TLS key is generated here too and a CSR for it sent
    with the token (to enrol_coordinator if set); the certificate that comes back is kept
    in the state directory and `estuary edge run` uses and renews it. Exit code 3 when the
    token is not configured or unreadable, or TLS to the coordinator cannot work as
    configured (untrusted certificate, plaintext against TLS, refused client
    certificate: said at once, not retried); 6 when the coordinator refuses the token
    (unknown, expired, already used) or the device is already enrolled.
    """
    from edge_client.agent import AgentError
    from edge_client.errors import TLSFailure
    from estuary.config import SecretUnavailable

    settings = _settings(config)
    if settings.enrolment_token is None:
        fail(f"{config}: enrolment_token is not set; it is needed to enrol")
        raise typer.Exit(ExitCode.CONFIG)
    try:
        token = settings.enrolment_token.reveal()
    except SecretUnavailable as exc:
        fail(f"enrolment_token ({settings.enrolment_token.describe()}): {exc}")
        raise typer.Exit(ExitCode.CONFIG) from None
    agent = _agent(settings, with_data=False, target=settings.enrol_coordinator)

    async def main() -> dict[str, Any]:
        try:
            return await agent.enroll(token, settings.device_class)
        finally:
            await agent.close()

    try:
        record = asyncio.run(main())
    except TLSFailure as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.CONFIG) from None
    except AgentError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.PROTOCOL) from None
    if output is OutputFormat.json:
        print_json(record)
        return
    console.print(
        f"enrolled as device {record['device_id']} (class {record['device_class']}, "
        f"rank {record['rank']}, r_max {record['r_max']}) with {record['coordinator']}",
        highlight=False,
    )


@app.command("run")
def run(
    config: ConfigOption,
    max_tasks: Annotated[
        int | None,
        typer.Option("--max-tasks", min=1, help="Stop after this many tasks (done or abandoned)."),
    ] = None,
) -> None:
    """Ask the coordinator for tasks and train them until stopped.

    A client certificate issued at enrolment is renewed (new key, CSR) once a third of
    its lifetime is left.
    Ctrl-C or SIGTERM stops cleanly (a task under way is recorded as abandoned) with exit
    code 130. Exit code 3 when data_dir is not set or TLS to the coordinator cannot work
    as configured (said at once, not retried), 5 when the data or the state is unusable,
    6 when the coordinator does not recognise the device.
    """
    from edge_client.agent import AgentError
    from edge_client.errors import TLSFailure
    from edge_client.state import StateError

    settings = _settings(config)
    if settings.data_dir is None:
        fail(f"{config}: data_dir is not set; a device without data cannot train")
        raise typer.Exit(ExitCode.CONFIG)
    try:
        agent = _agent(settings, with_data=True)
    except StateError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    stopped = False

    async def main() -> Any:
        nonlocal stopped
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            nonlocal stopped
            stopped = True
            err_console.print("stopping…", highlight=False)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, on_signal)
        try:
            return await agent.run(stop=stop, max_tasks=max_tasks)
        finally:
            await agent.close()

    try:
        stats = asyncio.run(main())
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except TLSFailure as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.CONFIG) from None
    except AgentError as exc:
        fail(str(exc))
        code = ExitCode.PROTOCOL if "not enrolled" in str(exc) else ExitCode.INPUT
        raise typer.Exit(code) from None
    except StateError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    err_console.print(
        f"tasks done {stats.tasks_done}, abandoned {stats.tasks_abandoned}; "
        f"{stats.bytes_up} bytes up, {stats.bytes_down} down",
        highlight=False,
    )
    if stopped:
        raise typer.Exit(ExitCode.INTERRUPTED)


@app.command("status")
def status(
    config: ConfigOption,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print the status as text or JSON.")
    ] = OutputFormat.text,
) -> None:
    """Show this device's local state: enrolment, tasks, cached artifacts, traffic.

    Reads only the state directory; contacts nobody. Exit code 5 when a state file is
    corrupt.
    """
    from edge_client.state import SERVED_DIR, StateError

    settings = _settings(config)
    state = _state(settings)
    try:
        enrolment = state.load_enrolment()
        progress = state.load_progress()
        cached = state.cached_artifacts()
        cached_bytes = state.cached_bytes()
        served = state.root / SERVED_DIR
    except StateError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    data: dict[str, Any] = {
        "state_dir": str(state.root),
        "coordinator": settings.coordinator,
        "enrolled": enrolment is not None,
        "enrolment": None if enrolment is None else dataclasses.asdict(enrolment),
        "current_task": None
        if progress.task_id is None
        else {
            "task_id": progress.task_id,
            "cohort_id": progress.cohort_id,
            "version": progress.version,
            "phase": progress.phase,
        },
        "tasks_done": progress.tasks_done,
        "tasks_abandoned": progress.tasks_abandoned,
        "cached_artifacts": len(cached),
        "cached_bytes": cached_bytes,
        "bytes_up": progress.bytes_up,
        "bytes_down": progress.bytes_down,
        "served_model": str(served) if served.is_dir() else None,
    }
    if output is OutputFormat.json:
        print_json(data)
        return
    if enrolment is None:
        console.print(f"not enrolled (state in {state.root})", highlight=False)
    else:
        console.print(
            f"device {enrolment.device_id}: class {enrolment.device_class}, rank "
            f"{enrolment.rank}, enrolled {enrolment.enrolled_at} with {enrolment.coordinator}",
            highlight=False,
        )
    if progress.task_id is not None:
        cohort = "" if progress.cohort_id is None else f"cohort {progress.cohort_id}, "
        console.print(
            f"task under way: {progress.task_id} ({cohort}phase {progress.phase})",
            highlight=False,
        )
    console.print(
        f"tasks done {progress.tasks_done}, abandoned {progress.tasks_abandoned}; "
        f"{len(cached)} cached artifacts ({cached_bytes} bytes); "
        f"{progress.bytes_up} bytes up, {progress.bytes_down} down",
        highlight=False,
    )
    if served.is_dir():
        console.print(
            f"serving model: {served} (estuary edge infer --model {served} PROMPT)",
            highlight=False,
        )


def _served_dir(model: Path, *, cache: Path | None, fp32: bool) -> Path:
    """Return the served directory for MODEL, exporting a Hugging Face directory first.

    Exits with ``INPUT`` naming the path when MODEL is neither kind of directory.
    """
    from estuary.onnx_meta import is_served_dir

    if not model.is_dir():
        fail(f"{model}: model directory does not exist")
        raise typer.Exit(ExitCode.INPUT)
    if is_served_dir(model):
        return model
    if not (model / "config.json").is_file():
        fail(
            f"{model}: neither a served ONNX directory (no estuary_onnx.json) nor a Hugging "
            "Face model directory (no config.json)"
        )
        raise typer.Exit(ExitCode.INPUT)
    try:
        from estuary.onnx_export import CACHE_DIRNAME, cached_export
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        fail(f"exporting {model} needs onnx and onnxscript (the 'worker' extra): {exc}")
        raise typer.Exit(ExitCode.FAILURE) from None
    target = cache if cache is not None else model / CACHE_DIRNAME
    started = time.perf_counter()
    try:
        served, exported = cached_export(model, cache_dir=target, int8=not fp32)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        fail(f"{model}: cannot export: {exc}")
        raise typer.Exit(ExitCode.INPUT) from None
    except PermissionError as exc:
        fail(f"{target}: cannot write the export cache ({exc}); pass --cache DIR")
        raise typer.Exit(ExitCode.INPUT) from None
    if exported:
        err_console.print(
            f"exported {model} to ONNX{'' if fp32 else ' and quantised it to int8'} in "
            f"{time.perf_counter() - started:.1f} s (first use); cached in {served}",
            highlight=False,
        )
    return served


@app.command("infer")
def infer(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="Served ONNX directory, or a Hugging Face model directory "
            "(exported and quantised into a cache subfolder on first use).",
        ),
    ],
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=0, help="Tokens to generate.")
    ] = 64,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="onnxruntime intra-op threads.")
    ] = DEFAULT_THREADS,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="Print the completion as text or JSON.")
    ] = OutputFormat.text,
    fp32: Annotated[
        bool,
        typer.Option("--fp32", help="Serve the fp32 graph instead of the int8 one."),
    ] = False,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Where to cache the export of a Hugging Face directory "
            "(default: MODEL/.estuary-onnx).",
        ),
    ] = None,
) -> None:
    """Continue PROMPT greedily with the model in MODEL, served by onnxruntime.

    Text format writes only the completion's bytes to standard output; JSON adds the
    served directory, graph file, byte count and time taken. Exit code 5 when MODEL is
    missing or invalid.
    """
    from edge_client.serving import OrtLM

    served = _served_dir(model, cache=cache, fp32=fp32)
    try:
        lm = OrtLM(served, threads=threads, precision="fp32" if fp32 else "auto")
    except (ValueError, FileNotFoundError) as exc:
        fail(f"{served}: {exc}")
        raise typer.Exit(ExitCode.INPUT) from None
    started = time.perf_counter()
    try:
        completion = lm.generate(prompt, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        fail(str(exc))
        raise typer.Exit(ExitCode.INPUT) from None
    seconds = time.perf_counter() - started
    if output is OutputFormat.json:
        print_json(
            {
                "model": str(served),
                "graph": lm.path.name,
                "prompt": prompt,
                "completion": completion.decode("utf-8", errors="replace"),
                "completion_bytes": len(completion),
                "seconds": round(seconds, 4),
                "threads": threads,
            }
        )
        return
    # Raw bytes: a byte-level model may emit a partial UTF-8 sequence at the end, which a
    # text stream would reject or mangle.
    sys.stdout.buffer.write(completion + b"\n")
    sys.stdout.flush()
