"""The ``ESTUARY_*`` environment namespace: settings overrides, and nothing else.

Any field of a role's settings can be overridden by ``ESTUARY_<SECTION>__<FIELD>``
(pydantic-settings reads these names case-insensitively). A secret reference names an
environment variable too, so the two could collide: ``{ env = "ESTUARY_ENROLMENT_TOKEN" }``
names exactly the override of ``enrolment_token``, and the token would be read as that
field's value instead of as the secret. The whole prefix is therefore reserved for
overrides, and a secret reference may not name a variable under it
(:func:`reserved_for_overrides`); the rule holds at every depth of every role, including
fields added later.
"""

from __future__ import annotations

__all__ = ["ENV_NESTED_DELIMITER", "ENV_PREFIX", "reserved_for_overrides"]

#: Environment prefix of every override; nested fields are joined with ``__``.
ENV_PREFIX = "ESTUARY_"
ENV_NESTED_DELIMITER = "__"


def reserved_for_overrides(name: str) -> bool:
    """Return whether environment variable ``name`` lies in the override namespace.

    Case-insensitive, as pydantic-settings matches override names.
    """
    return name.upper().startswith(ENV_PREFIX)
