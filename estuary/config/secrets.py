"""References to secrets: configuration names *where* a secret is, never the secret.

A config file may be committed, copied into a ticket or printed by
``estuary config check``; so a secret is given as the name of an environment
variable or the path of a file (a Kubernetes/Docker secret mount), and read only
when it is used.

A secret's variable may not start with ``ESTUARY_``: that prefix names settings
overrides (:mod:`estuary.config.env`), and a secret there would be read as the value
of a setting rather than as the secret.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from estuary.config.env import ENV_NESTED_DELIMITER, ENV_PREFIX, reserved_for_overrides


class SecretUnavailable(RuntimeError):
    """A referenced secret could not be read (variable unset, file missing or empty)."""


class SecretRef(BaseModel):
    """Where to read a secret from: exactly one of ``env`` or ``file``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(
        default=None,
        description=(
            "Name of the environment variable that holds the secret; not under the "
            "ESTUARY_ prefix, which names settings overrides."
        ),
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    file: Path | None = Field(
        default=None,
        description="Path of a file whose content (trailing newline stripped) is the secret.",
    )

    @field_validator("env")
    @classmethod
    def _not_an_override(cls, value: str | None) -> str | None:
        if value is not None and reserved_for_overrides(value):
            suggestion = value[len(ENV_PREFIX) :] or "MY_SECRET"
            raise ValueError(
                f"{value!r} starts with {ENV_PREFIX}, the prefix of settings overrides "
                f"({ENV_PREFIX}<SECTION>{ENV_NESTED_DELIMITER}<FIELD>): its value would be "
                "read as a setting, not as this secret; name a variable outside that prefix, "
                f'e.g. {{ env = "{suggestion}" }}'
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file' (secrets are never inline)")
        return self

    def describe(self) -> str:
        """Return where the secret comes from, safe to print."""
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"

    def is_available(self) -> bool:
        """Return whether :meth:`reveal` would succeed, without returning the secret."""
        try:
            self.reveal()
        except SecretUnavailable:
            return False
        return True

    def reveal(self) -> str:
        """Read and return the secret.

        Raises
        ------
        SecretUnavailable
            If the variable is unset or empty, or the file is missing, unreadable or empty.
        """
        if self.env is not None:
            value = os.environ.get(self.env, "")
            if not value:
                raise SecretUnavailable(f"environment variable {self.env} is unset or empty")
            return value
        assert self.file is not None  # guaranteed by _exactly_one
        try:
            value = self.file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretUnavailable(f"secret file {self.file}: {exc.strerror}") from exc
        if not value:
            raise SecretUnavailable(f"secret file {self.file} is empty")
        return value
