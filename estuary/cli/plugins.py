"""Role commands, discovered rather than imported: the core CLI never imports a role.

Each role package offers its command (a :class:`typer.Typer` group or a plain command
function) under the ``estuary.commands`` entry-point group, tagged with the extra that
installs what it needs (``"coordinator.cli:app [coordinator]"``). A command whose extra is
not installed is not offered in ``--help``; invoking it anyway prints one line naming the
extra to install and exits with :attr:`~estuary.cli.exit_codes.ExitCode.CONFIG`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points

import typer

from estuary.cli.exit_codes import ExitCode
from estuary.cli.output import fail
from estuary.extras import install_hint, missing_for

__all__ = ["COMMAND_ENTRY_POINTS", "RoleCommand", "discover", "register"]

log = logging.getLogger(__name__)

#: Entry-point group of role commands.
COMMAND_ENTRY_POINTS = "estuary.commands"


@dataclass(frozen=True)
class RoleCommand:
    """One discovered command: its name, extra, and what is missing to run it."""

    name: str
    extras: tuple[str, ...]
    missing: tuple[str, ...]
    target: object | None  # the Typer group or command function, when it loaded

    @property
    def available(self) -> bool:
        """Whether the command can run here."""
        return self.target is not None and not self.missing

    @property
    def install_hint(self) -> str:
        """The pip command that installs what the command needs."""
        return install_hint(self.extras)


def discover() -> list[RoleCommand]:
    """Return every registered role command, sorted by name."""
    found: dict[str, RoleCommand] = {}
    for ep in entry_points(group=COMMAND_ENTRY_POINTS):
        extras = tuple(ep.extras)
        missing = tuple(missing_for(extras))
        target: object | None = None
        if not missing:
            try:
                target = ep.load()
            except ImportError as exc:
                log.debug("command %s does not load: %s", ep.name, exc)
                missing = (getattr(exc, "name", None) or str(exc),)
        found[ep.name] = RoleCommand(ep.name, extras, missing, target)
    return [found[name] for name in sorted(found)]


def _unavailable(command: RoleCommand) -> Callable[..., None]:
    def run() -> None:
        fail(
            f"`estuary {command.name}` is not installed here: it needs the "
            f"{'/'.join(command.extras) or 'full'} extra (missing: "
            f"{', '.join(command.missing)}). Install it with: {command.install_hint}"
        )
        raise typer.Exit(ExitCode.CONFIG)

    return run


def register(app: typer.Typer, commands: Iterable[RoleCommand]) -> list[RoleCommand]:
    """Add ``commands`` to ``app``; return the ones that are not available here.

    An unavailable command stays invocable (hidden from ``--help``, accepting any
    arguments) so that it explains itself instead of "No such command".
    """
    absent = []
    for command in commands:
        if command.available and isinstance(command.target, typer.Typer):
            app.add_typer(command.target, name=command.name)
        elif command.available and callable(command.target):
            app.command(command.name)(command.target)
        else:
            absent.append(command)
            app.command(
                command.name,
                hidden=True,
                add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            )(_unavailable(command))
    return absent
