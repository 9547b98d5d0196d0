"""What a configuration needs from the machine it runs on, and whether this one has it.

A configuration can be valid and still unusable here: a certificate path that does not
exist, a key file this user cannot read, a data folder that is a file, a state directory
under a read-only parent, a secret variable that is unset. None of that is known when
the file is parsed (the file may be checked on a build machine and deployed elsewhere),
so it is a separate question, asked by ``estuary config check`` (a warning; an error
with ``--strict``) and answered by :func:`local_problems`.

Path fields declare how the role uses them with an :class:`UsesPath` marker in their
type (``Annotated[Path | None, UsesPath(PathUse.READ_FILE, "CA certificate")]``), so
a new path field is checked by adding the marker, not by editing a list here.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from estuary.config.secrets import SecretRef, SecretUnavailable

__all__ = [
    "LocalProblem",
    "PathUse",
    "UsesPath",
    "check_path",
    "local_problems",
    "missing_secrets",
]


class PathUse(enum.Enum):
    """How a role uses a path it is configured with."""

    #: Read as a whole (certificate, key, CA bundle): must be a non-empty readable file.
    READ_FILE = "file"
    #: Read from (a model directory): must be a readable directory.
    READ_DIR = "dir"
    #: Read from, either form accepted (training data: a folder, or a JSONL file).
    READ_FILE_OR_DIR = "file_or_dir"
    #: Written into, created on first use (state, blobs, run output): must be a writable
    #: directory, or creatable under its nearest existing parent.
    WRITE_DIR = "write_dir"


@dataclass(frozen=True)
class UsesPath:
    """Marker in a path field's type: how the role uses it, and what it is (for messages)."""

    use: PathUse
    what: str


@dataclass(frozen=True)
class LocalProblem:
    """A secret or path the configuration names that this machine cannot provide now.

    Attributes
    ----------
    field
        Dotted path of the field (``tls.cert_file``).
    kind
        ``"secret"`` or ``"path"``.
    reason
        What is wrong, naming the path or the secret's reference (never its value).
    """

    field: str
    kind: Literal["secret", "path"]
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def _read_file_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            first = handle.read(1)
    except FileNotFoundError:
        return "does not exist"
    except IsADirectoryError:
        return "is a directory, not a file"
    except PermissionError:
        return "is not readable by this user (permission denied)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not first:
        return "is empty"
    return None


def _read_dir_problem(path: Path) -> str | None:
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except PermissionError:
        return "is not readable by this user (permission denied)"
    except OSError as exc:
        return f"cannot be listed: {exc.strerror or exc}"
    return None


def _write_dir_problem(path: Path) -> str | None:
    if path.exists():
        if not path.is_dir():
            return "exists but is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return "is not writable by this user"
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"does not exist and cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"does not exist and cannot be created: {parent} is not writable by this user"
    return None


def check_path(path: Path, use: PathUse) -> str | None:
    """Return why this process cannot use ``path`` as ``use`` requires, or ``None``.

    Relative paths are taken from the current directory, as the roles take them.
    """
    if use is PathUse.READ_FILE:
        return _read_file_problem(path)
    if use is PathUse.READ_DIR:
        return _read_dir_problem(path)
    if use is PathUse.READ_FILE_OR_DIR:
        return _read_dir_problem(path) if path.is_dir() else _read_file_problem(path)
    return _write_dir_problem(path)


def _marker(model: type[BaseModel], name: str) -> UsesPath | None:
    for item in model.model_fields[name].metadata:
        if isinstance(item, UsesPath):
            return item
    return None


def local_problems(settings: BaseModel, prefix: str = "") -> list[LocalProblem]:
    """Return every secret and path of ``settings`` that this machine cannot provide now.

    Secrets are tried as the role would read them (the value is never kept); paths are
    checked as their :class:`UsesPath` marker says. Fields are visited in declaration
    order, sections and lists of sections included.
    """
    problems: list[LocalProblem] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, SecretRef):
            try:
                value.reveal()
            except SecretUnavailable as exc:
                problems.append(LocalProblem(dotted, "secret", str(exc)))
        elif isinstance(value, BaseModel):
            problems.extend(local_problems(value, dotted + "."))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    problems.extend(local_problems(item, f"{dotted}[{index}]."))
        elif isinstance(value, Path):
            marker = _marker(type(settings), name)
            if marker is not None:
                reason = check_path(value, marker.use)
                if reason is not None:
                    problems.append(LocalProblem(dotted, "path", f"{marker.what} {value} {reason}"))
    return problems


def missing_secrets(settings: BaseModel) -> list[str]:
    """Return the dotted names of secret references that cannot currently be read."""
    return [p.field for p in local_problems(settings) if p.kind == "secret"]
