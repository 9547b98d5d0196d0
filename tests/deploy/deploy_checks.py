"""What the deployment tests share: the repository, the real CLI, role settings under an env.

The units, compose file and manifests under deploy/ name ``estuary`` command lines and TOML
files; these helpers check a command line against the installed ``estuary`` command tree
(the same Typer app the console script runs, parsed, not executed) and load a config file
the way the role would, with the deployment's ``ESTUARY_*`` overrides.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer.main

from estuary.cli.app import app
from estuary.config import RoleSettings, load_settings
from estuary.config.env import ENV_PREFIX

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

#: The role whose settings each daemon command reads from its --config.
ROLE_OF_COMMAND: dict[tuple[str, ...], str] = {
    ("coordinator", "serve"): "coordinator",
    ("coordinator", "token"): "coordinator",
    ("worker", "run"): "worker",
    ("edge", "run"): "edge",
    ("edge", "enroll"): "edge",
}


def _pending_args(ctx: Any) -> list[str]:
    # A group's context keeps the subcommand and its arguments apart from its own; the
    # attribute is public in click and private in the click Typer vendors.
    protected = getattr(ctx, "protected_args", None)
    if protected is None:
        protected = getattr(ctx, "_protected_args", [])
    return [*protected, *ctx.args]


def parse_estuary(argv: Sequence[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Parse ``estuary ARGV`` against the real command tree without running it.

    Returns the subcommand path (``("coordinator", "serve")``) and the leaf's parameters.
    Raises the CLI's usage error for an unknown command or option, a missing required
    option or a value of the wrong type.
    """
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("estuary", list(argv))
    path: list[str] = []
    while hasattr(command, "resolve_command"):
        rest = _pending_args(ctx)
        if not rest:
            raise ValueError(f"estuary {' '.join(argv)}: names a command group, not a command")
        name, command, rest = command.resolve_command(ctx, rest)
        path.append(name)
        ctx = command.make_context(name, list(rest), parent=ctx)
    return tuple(path), dict(ctx.params)


@contextmanager
def role_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run the block with exactly ``env``'s ``ESTUARY_*`` overrides (and its other names)."""
    saved = dict(os.environ)
    try:
        for name in list(os.environ):
            if name.upper().startswith(ENV_PREFIX):
                del os.environ[name]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_role(role: str, path: Path, env: Mapping[str, str]) -> RoleSettings:
    """Load ``path`` as ``role``'s settings under the deployment's environment ``env``."""
    with role_environment(env):
        return load_settings(role, path)
