"""Open the state store a role's ``[state]`` settings name (shared by every daemon)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from estuary.config.models import StateSettings
    from estuary.state.base import Store

__all__ = ["open_state_store"]


def open_state_store(state: StateSettings) -> Store:
    """Return the store of ``state``: its URL with key prefix, password and TLS CA.

    The password is read (from its environment variable or file) here, at the last
    moment, and handed to the store as a keyword option, never put in the URL. Opening
    a Redis store does not connect; call :meth:`~estuary.state.base.Store.ping` to check.

    Raises
    ------
    estuary.state.errors.InvalidStoreURL
        If the URL or an option is malformed.
    estuary.config.secrets.SecretUnavailable
        If the password's variable or file cannot be read.
    """
    from estuary.state import open_store

    options: dict[str, Any] = {}
    if not state.url.startswith("memory://"):
        options["prefix"] = state.key_prefix
        if state.password is not None:
            options["password"] = state.password.reveal()
        if state.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(state.tls_ca_file)
    return open_store(state.url, **options)
