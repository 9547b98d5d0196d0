"""State store (records, leases, sorted sets, job streams) and blob store.

Open a store from a URL with :func:`open_store`:

- ``memory://`` — a fresh private :class:`MemoryStore`;
- ``memory://NAME`` — the process-wide MemoryStore called NAME (shared by
  every ``open_store`` call in this process with the same URL);
- ``redis://[USER[:PASSWORD]@]HOST[:PORT][/DB][?OPTIONS]`` — a :class:`RedisStore`;
- ``rediss://…`` — the same over TLS.

Options come from the query string or from keyword arguments (not both for
the same option): ``prefix``, ``socket_connect_timeout_s``,
``socket_timeout_s``, ``attempts``, ``backoff_s``, and for ``rediss`` also
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``.
``username`` and ``password`` are keyword-only options (pass secrets that way,
read from the environment or a file, rather than writing them in a URL).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from estuary.state.base import Job, Lease, PendingJob, Record, Store
from estuary.state.blobs import BlobCorrupt, BlobError, BlobNotFound, BlobStore
from estuary.state.errors import (
    FencingError,
    InvalidStoreURL,
    LeaseLost,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)
from estuary.state.memory import MemoryStore, shared_memory_store

__all__ = [
    "BlobCorrupt",
    "BlobError",
    "BlobNotFound",
    "BlobStore",
    "FencingError",
    "InvalidStoreURL",
    "Job",
    "Lease",
    "LeaseLost",
    "MemoryStore",
    "PendingJob",
    "Record",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "VersionConflict",
    "open_store",
    "redact_url",
    "shared_memory_store",
]

_FLOAT_OPTIONS = ("socket_connect_timeout_s", "socket_timeout_s", "backoff_s")
_INT_OPTIONS = ("attempts",)
_STR_OPTIONS = ("prefix",)
_TLS_STR_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_BOOL_OPTIONS = ("ssl_check_hostname",)
_SECRET_OPTIONS = ("username", "password")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to log or print).

    Parameters
    ----------
    url
        A store URL.

    Returns
    -------
    str
        The URL without its password; unparsable input is returned as ``"<invalid url>"``.
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{user}:***@{host}").geturl()
    except ValueError:
        return "<invalid url>"


def open_store(url: str, **options: Any) -> Store:
    """Open the state store that ``url`` names.

    Parameters
    ----------
    url
        ``memory://``, ``memory://NAME``, ``redis://…`` or ``rediss://…``; see
        the module documentation.
    **options
        Store options (see the module documentation); each must not also
        appear in the URL's query string.

    Returns
    -------
    Store
        A :class:`MemoryStore` or :class:`~estuary.state.redis_store.RedisStore`.
        Opening a Redis store does not connect; call :meth:`Store.ping` to check.

    Raises
    ------
    InvalidStoreURL
        The URL or an option is malformed; the message says which and why
        (and never contains the password).
    """
    if not isinstance(url, str):
        raise InvalidStoreURL(f"store URL must be a str, got {type(url).__name__}")
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidStoreURL(f"store URL {shown!r} is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return _open_memory(shown, parts.netloc, parts.path, parts.query, options)
    if scheme not in ("redis", "rediss"):
        raise InvalidStoreURL(
            f"store URL {shown!r}: scheme must be memory, redis or rediss, got {parts.scheme!r}"
        )
    tls = scheme == "rediss"
    if not parts.hostname:
        raise InvalidStoreURL(f"store URL {shown!r}: host is missing")
    db_text = parts.path.lstrip("/") or "0"
    if not db_text.isdigit():
        raise InvalidStoreURL(f"store URL {shown!r}: database must be a number, got {db_text!r}")
    merged = _merge_options(shown, parts.query, options, tls=tls)
    for secret, value in (("username", parts.username), ("password", parts.password)):
        if value is not None:
            if secret in merged:
                raise InvalidStoreURL(f"store URL {shown!r}: {secret} given twice")
            merged[secret] = unquote(value)
    # Imported here so that memory:// works in an install without redis-py
    # (the edge extra deliberately leaves it out).
    try:
        from estuary.state.redis_store import RedisStore
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise InvalidStoreURL(
            f"store URL {shown!r} needs the redis package (install the coordinator extra)"
        ) from exc
    try:
        return RedisStore(parts.hostname, port=port or 6379, db=int(db_text), tls=tls, **merged)
    except ValueError as exc:
        raise InvalidStoreURL(f"store URL {shown!r}: {exc}") from None


def _open_memory(
    shown: str, netloc: str, path: str, query: str, options: dict[str, Any]
) -> MemoryStore:
    if path not in ("", "/") or query:
        raise InvalidStoreURL(f"store URL {shown!r}: memory:// takes only a name, no path or query")
    if options:
        raise InvalidStoreURL(
            f"store URL {shown!r}: memory:// takes no options, got {sorted(options)}"
        )
    if not netloc:
        return MemoryStore()
    return shared_memory_store(unquote(netloc))


def _merge_options(shown: str, query: str, options: dict[str, Any], *, tls: bool) -> dict[str, Any]:
    allowed = set(_FLOAT_OPTIONS + _INT_OPTIONS + _STR_OPTIONS)
    if tls:
        allowed |= set(_TLS_STR_OPTIONS + _TLS_BOOL_OPTIONS)
    merged: dict[str, Any] = {}
    for name, value in options.items():
        if name not in allowed and name not in _SECRET_OPTIONS:
            raise InvalidStoreURL(f"store URL {shown!r}: unknown option {name!r}")
        merged[name] = value
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise InvalidStoreURL(f"store URL {shown!r}: malformed query string") from None
    for name, text in pairs:
        if name not in allowed:
            hint = " (TLS options need rediss://)" if name.startswith("ssl_") else ""
            raise InvalidStoreURL(f"store URL {shown!r}: unknown option {name!r}{hint}")
        if name in merged:
            raise InvalidStoreURL(f"store URL {shown!r}: option {name!r} given twice")
        merged[name] = _convert(shown, name, text)
    return merged


def _convert(shown: str, name: str, text: str) -> Any:
    try:
        if name in _FLOAT_OPTIONS:
            return float(text)
        if name in _INT_OPTIONS:
            return int(text)
    except ValueError:
        raise InvalidStoreURL(f"store URL {shown!r}: option {name!r} must be a number") from None
    if name in _TLS_BOOL_OPTIONS:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise InvalidStoreURL(f"store URL {shown!r}: option {name!r} must be true or false")
    return text
