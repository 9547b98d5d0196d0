"""Load role settings from a TOML file plus ``ESTUARY_*`` environment overrides.

Every failure becomes one :class:`ConfigError` whose message names the file (or the
environment variable), the field and the reason, so an operator can fix a deployment
from the first line of the log.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from estuary.config.env import ENV_NESTED_DELIMITER, ENV_PREFIX
from estuary.config.models import ROLES, RoleSettings
from estuary.config.secrets import SecretRef

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration.

    Attributes
    ----------
    source
        The file path, or ``env:NAME`` when the value came from an environment variable.
    field
        Dotted path of the field (``state.url``), or ``""`` for the file as a whole.
    reason
        What is wrong, in words.
    """

    source: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return f"{where}: {self.reason}"


class ConfigError(Exception):
    """A configuration file or override is invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


_LEADING_FIELD = re.compile(r"^([a-z_][a-z0-9_.]*): ")


def role_names() -> list[str]:
    """Return the roles that have settings, in a stable order."""
    return list(ROLES)


_SETTINGS_ERROR_FIELD = re.compile(r'field "([^"]+)"')


def _env_var_for(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """Return the ``ESTUARY_*`` variable that set the field at ``loc``, if any.

    Matched case-insensitively, as pydantic-settings reads overrides.
    """
    present = {name.upper(): name for name in environ}
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in loc[:depth]).upper()
        if name in present:
            return present[name]
    return None


def _secret_reason(field: str, var: str | None) -> str:
    """Reason for a secret field given something other than a reference."""
    if var is None:
        return (
            'a secret is never written inline: give { env = "VAR" } (a variable outside '
            f'{ENV_PREFIX}) or {{ file = "/run/secrets/name" }}'
        )
    return (
        f"{var} overrides the secret reference {field}, so it must name where the secret "
        f"is, not hold it: set {var}{ENV_NESTED_DELIMITER}ENV=VAR or "
        f"{var}{ENV_NESTED_DELIMITER}FILE=PATH. If {var} holds the secret itself, rename "
        f"it: variables starting {ENV_PREFIX} are settings overrides, and the file's "
        f"{field} should name the renamed variable"
    )


def _problems_of(exc: ValidationError, source: str) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        var = _env_var_for(loc, os.environ)
        field = ".".join(str(p) for p in loc)
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field (misspelt, or not a setting of this role)"
        elif err["type"] == "model_type" and err.get("ctx", {}).get("class_name") == "SecretRef":
            reason = _secret_reason(field, var)
        elif err["type"] == "value_error":
            reason = reason.removeprefix("Value error, ")
            # Cross-field checks raise "field: reason"; report them under that field.
            match = _LEADING_FIELD.match(reason)
            if match:
                field = ".".join(p for p in (field, match.group(1)) if p)
                reason = reason[match.end() :]
        problems.append(ConfigProblem(f"env:{var}" if var else source, field, reason))
    return problems


def load_settings(role: str, path: str | Path | None) -> RoleSettings:
    """Return the validated settings of ``role`` from ``path`` and ``os.environ``.

    Parameters
    ----------
    role
        One of :func:`role_names` (``coordinator``, ``worker``, ``edge``, ``simulation``).
    path
        TOML file. ``None``: defaults plus environment overrides only.

    Raises
    ------
    ConfigError
        If the role is unknown, the file is missing or not valid TOML, or any field is
        invalid; the message names the file or variable, the field and the reason.
    """
    source = str(path) if path is not None else "<defaults>"
    if role not in ROLES:
        raise ConfigError(
            [ConfigProblem(source, "", f"unknown role {role!r}; choose one of {role_names()}")]
        )
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise ConfigError([ConfigProblem(source, "", "file not found")]) from None
        except OSError as exc:
            raise ConfigError([ConfigProblem(source, "", f"cannot read: {exc.strerror}")]) from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError([ConfigProblem(source, "", f"not UTF-8 text: {exc}")]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([ConfigProblem(source, "", f"invalid TOML: {exc}")]) from exc
    settings_cls = ROLES[role]
    try:
        return settings_cls(**data)
    except ValidationError as exc:
        raise ConfigError(_problems_of(exc, source)) from None
    except SettingsError as exc:
        # A whole section or list given by one variable must be JSON; pydantic-settings
        # names only the field, so name the variable here.
        match = _SETTINGS_ERROR_FIELD.search(str(exc))
        field = match.group(1) if match else ""
        var = _env_var_for((field,), os.environ) if field else None
        reason = (
            "cannot parse the value: a section or list given by one variable must be "
            f"JSON; or set one field with {ENV_PREFIX}<SECTION>{ENV_NESTED_DELIMITER}<FIELD>"
        )
        raise ConfigError(
            [ConfigProblem(f"env:{var}" if var else "environment", field, reason)]
        ) from None


def _redact(value: Any) -> Any:
    if isinstance(value, SecretRef):
        state = "set" if value.is_available() else "MISSING"
        return f"<secret {value.describe()} ({state})>"
    if isinstance(value, BaseModel):
        return {name: _redact(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def effective_settings(settings: BaseModel) -> dict[str, Any]:
    """Return ``settings`` as plain JSON-able data with every secret shown as its reference.

    A secret's value is never read into the result; only where it comes from and whether it
    can currently be read.
    """
    result = _redact(settings)
    assert isinstance(result, dict)
    return result
