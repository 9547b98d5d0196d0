"""The stages shared by the client and server state machines."""

from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    """Protocol stage, in order; a party only moves forward or to ABORTED.

    A party's stage is the one whose message it is about to send or collect: a client that
    has advertised its keys is in SHARE_KEYS, waiting for the key broadcast.
    """

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    CONSISTENCY_CHECK = 3
    UNMASKING = 4
    COMPLETED = 5
    ABORTED = 6
