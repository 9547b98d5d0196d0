"""References to secrets: configuration names *where* a secret is, never the secret.

A config file may be committed, copied into a ticket or printed by
``estuary config check``; so a secret is given as the name of an environment
variable or the path of a file (a Kubernetes/Docker secret mount), and read only
when it is used.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SecretUnavailable(RuntimeError):
    """A referenced secret could not be read (variable unset, file missing or empty)."""


class SecretRef(BaseModel):
    """Where to read a secret from: exactly one of ``env`` or ``file``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(
        default=None,
        description="Name of the environment variable that holds the secret.",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    file: Path | None = Field(
        default=None,
        description="Path of a file whose content (trailing newline stripped) is the secret.",
    )

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
