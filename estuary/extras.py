"""Which optional dependencies (extras) of the installed distribution are present.

Roles are offered through entry points tagged with the extra they need
(``"coordinator.cli:app [coordinator]"``); before loading one, the core asks here whether
that extra's requirements are installed, so an edge-only install neither offers nor
half-loads a command or a local worker that would fail later on a missing module.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

__all__ = ["DISTRIBUTION", "install_hint", "missing_for"]

#: The distribution whose extras the entry points name.
DISTRIBUTION = "estuary-fl"


def _installed(name: str) -> bool:
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


def missing_for(extras: Iterable[str], *, dist: str = DISTRIBUTION) -> list[str]:
    """Return the requirements of ``dist[extras]`` that are not installed (sorted).

    An extra that names ``dist`` itself (``sim = ["estuary-fl[edge,…]"]``) is followed.
    Running from a source tree without installed metadata, nothing is reported missing.
    """
    try:
        requires = distribution(dist).requires or []
    except PackageNotFoundError:
        return []
    todo, seen, missing = list(extras), set(), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in requires:
            req = Requirement(line)
            if req.marker is None or not req.marker.evaluate({"extra": extra}):
                continue
            if req.name == dist:
                todo.extend(req.extras)
            elif not _installed(req.name):
                missing.add(req.name)
    return sorted(missing)


def install_hint(extras: Iterable[str], *, dist: str = DISTRIBUTION) -> str:
    """Return the pip command that installs ``dist`` with ``extras``."""
    names = ",".join(extras)
    return f"pip install '{dist}[{names}]'" if names else f"pip install '{dist}'"
