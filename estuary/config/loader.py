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

from estuary.config.models import ENV_NESTED_DELIMITER, ENV_PREFIX, ROLES, RoleSettings
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


def _env_var_for(loc: tuple[int | str, ...], environ: Mapping[str, str]) -> str | None:
    """Return the ``ESTUARY_*`` variable that set the field at ``loc``, if any."""
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in loc[:depth]).upper()
        if name in environ:
            return name
    return None


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
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            var = _env_var_for(loc, os.environ)
            field = ".".join(str(p) for p in loc)
            reason = err["msg"]
            if err["type"] == "extra_forbidden":
                reason = "unknown field (misspelt, or not a setting of this role)"
            elif err["type"] == "value_error":
                reason = reason.removeprefix("Value error, ")
                # Cross-field checks raise "field: reason"; report them under that field.
                match = _LEADING_FIELD.match(reason)
                if match:
                    field = ".".join(p for p in (field, match.group(1)) if p)
                    reason = reason[match.end() :]
            problems.append(ConfigProblem(f"env:{var}" if var else source, field, reason))
        raise ConfigError(problems) from None


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


def missing_secrets(settings: BaseModel, prefix: str = "") -> list[str]:
    """Return the dotted names of secret references that cannot currently be read."""
    missing: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, SecretRef):
            if not value.is_available():
                missing.append(dotted)
        elif isinstance(value, BaseModel):
            missing.extend(missing_secrets(value, dotted + "."))
    return missing
