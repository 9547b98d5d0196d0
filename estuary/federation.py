"""What a coordinator publishes about how its federation forms cohorts.

A cohort is the unit of secure aggregation and never mixes device classes: each class
fills its own forming cohort, which is sealed once it holds ``min_size`` devices (after
``formation_s``) or ``max_size`` at once. So a federation needs at least ``min_size``
devices *of one class* before anything trains; four devices split over two classes with
``min_size = 4`` never form a cohort.

The coordinator knows this from its settings; ``estuary status`` only sees the store. So
every coordinator replica writes a :class:`FederationRecord` at :data:`FEDERATION_KEY` when
it starts, and ``estuary status`` reads it to show "class phone: 2 waiting, needs 4".
Both sides use this module, so the record's form is spelt once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from estuary.state.keys import FEDERATION_KEY

if TYPE_CHECKING:
    from estuary.config.models import CoordinatorSettings

__all__ = ["FEDERATION_KEY", "FederationRecord", "MalformedFederationRecord", "PublishedClass"]


class MalformedFederationRecord(ValueError):
    """The stored federation record does not have the expected shape."""


@dataclass(frozen=True, slots=True)
class PublishedClass:
    """A device class the coordinator admits: its name and adapter rank."""

    name: str
    rank: int


@dataclass(frozen=True, slots=True)
class FederationRecord:
    """How cohorts form, as published by the coordinator replica that started last.

    Attributes
    ----------
    device_classes
        The classes admitted, in configuration order.
    min_size, max_size
        Devices of one class a cohort needs before it can be sealed, and at most holds.
    formation_s
        Seconds a cohort that has ``min_size`` devices stays open for more.
    buffer_size
        Client updates (K) folded into each new version.
    published_by
        ``node_id`` of the replica that wrote the record.
    published_at
        Unix seconds when it was written (from the coordinator's clock).
    """

    device_classes: tuple[PublishedClass, ...]
    min_size: int
    max_size: int
    formation_s: float
    buffer_size: int
    published_by: str
    published_at: float

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings, *, now: float) -> FederationRecord:
        """Return the record a coordinator with ``settings`` publishes at ``now``."""
        return cls(
            device_classes=tuple(
                PublishedClass(name=c.name, rank=c.rank) for c in settings.device_classes
            ),
            min_size=settings.cohort.min_size,
            max_size=settings.cohort.max_size,
            formation_s=settings.cohort.formation_s,
            buffer_size=settings.aggregation.buffer_size,
            published_by=settings.node_id,
            published_at=now,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the stored JSON object."""
        return {
            "device_classes": [{"name": c.name, "rank": c.rank} for c in self.device_classes],
            "min_size": self.min_size,
            "max_size": self.max_size,
            "formation_s": self.formation_s,
            "buffer_size": self.buffer_size,
            "published_by": self.published_by,
            "published_at": self.published_at,
        }

    def to_json(self) -> bytes:
        """Return the stored bytes (sorted-key JSON)."""
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> FederationRecord:
        """Parse stored bytes.

        Raises
        ------
        MalformedFederationRecord
            Not JSON, or a field missing or of the wrong type; the message names it.
        """
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedFederationRecord(f"{FEDERATION_KEY}: not JSON: {exc}") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: object) -> FederationRecord:
        """Parse the stored JSON object (unknown fields are ignored).

        Raises
        ------
        MalformedFederationRecord
            A field is missing or of the wrong type; the message names it.
        """
        if not isinstance(obj, dict):
            raise MalformedFederationRecord(f"{FEDERATION_KEY}: expected a JSON object")
        classes = _field(obj, "device_classes", list)
        published = []
        for item in classes:
            if not isinstance(item, dict):
                raise MalformedFederationRecord(
                    f"{FEDERATION_KEY}: field 'device_classes': expected objects, got {item!r}"
                )
            published.append(
                PublishedClass(name=_field(item, "name", str), rank=_field(item, "rank", int))
            )
        return cls(
            device_classes=tuple(published),
            min_size=_field(obj, "min_size", int),
            max_size=_field(obj, "max_size", int),
            formation_s=float(_field(obj, "formation_s", float)),
            buffer_size=_field(obj, "buffer_size", int),
            published_by=_field(obj, "published_by", str),
            published_at=float(_field(obj, "published_at", float)),
        )


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    """Return ``obj[name]`` checked against ``kind`` (an int is a float; a bool is neither)."""
    if name not in obj:
        raise MalformedFederationRecord(f"{FEDERATION_KEY}: field {name!r} is missing")
    value = obj[name]
    accepted: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise MalformedFederationRecord(
            f"{FEDERATION_KEY}: field {name!r}: expected {kind.__name__}, got {value!r}"
        )
    return value
