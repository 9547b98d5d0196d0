"""The one table of process exit codes used by every ``estuary`` command and daemon.

Scripts and service managers (systemd ``RestartPreventExitStatus=``, Kubernetes
restart policies) key on these numbers, so they are part of the public interface:
add new codes, never renumber existing ones.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit status of an ``estuary`` command.

    Attributes
    ----------
    OK
        The command did what was asked.
    FAILURE
        An unexpected internal error (a bug); the traceback is logged.
    USAGE
        Wrong command-line usage (unknown option, missing argument). Typer/click
        already use 2 for this, so we keep it.
    CONFIG
        A configuration file or environment override is invalid or unreadable.
    STATE_UNAVAILABLE
        The state store (Redis) could not be reached after the bounded retry.
        A supervisor may restart the process later.
    INPUT
        A named input (model directory, data folder, checkpoint, artifact) is
        missing, empty or corrupt.
    PROTOCOL
        The remote side refused us or spoke a protocol we cannot accept
        (authentication failure, version mismatch).
    INCOMPLETE
        The command ran to its end but fell short of what was asked (``estuary
        simulate`` committed fewer versions than ``versions`` within its time limit);
        its outputs are written and the reason is printed.
    INTERRUPTED
        Stopped by SIGINT/SIGTERM before finishing; state on disk is consistent.
    """

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    STATE_UNAVAILABLE = 4
    INPUT = 5
    PROTOCOL = 6
    INCOMPLETE = 7
    INTERRUPTED = 130
