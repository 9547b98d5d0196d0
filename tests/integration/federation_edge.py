"""One edge-agent process of the federation integration test.

Usage: python federation_edge.py STATE_DIR TARGET CLASS PACKAGE LEDGER_DIR TOKEN KILL

Runs a real :class:`edge_client.agent.EdgeAgent` until SIGTERM. Before each masked
upload it writes the plain (clipped, padded) ΔB and its weight to the test-only ledger
``LEDGER_DIR/<task_id>.npz``, so the test can recompute every committed version from
plain updates. ``KILL=1``: the process SIGKILLs itself when its first training starts
(a device dying mid-task); restarted without it, the agent resumes from its state dir.
``TOKEN`` is ``-`` when the device is already enrolled.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    state_dir, target, device_class, package, ledger, token, kill = sys.argv[1:8]
    from edge_client.agent import AgentHooks, EdgeAgent
    from edge_client.state import EdgeState
    from estuary.data import stdlib_client

    ledger_dir = Path(ledger)
    data = stdlib_client(package, max_train_bytes=4096).train

    def before_upload(task: Any, delta: dict[str, np.ndarray], weight: float) -> None:
        tmp = ledger_dir / f".{task.task_id}.tmp.npz"
        np.savez(tmp, __weight__=np.float64(weight), **delta)
        tmp.rename(ledger_dir / f"{task.task_id}.npz")

    def drop(task: Any, phase: str) -> bool:
        if kill == "1" and phase == "training":
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    async def run() -> None:
        agent = EdgeAgent(
            EdgeState(Path(state_dir)),
            target,
            credentials=None,
            data=data,
            threads=1,
            max_backoff_s=2.0,
            hooks=AgentHooks(before_upload=before_upload, drop=drop),
        )
        if token != "-":
            await agent.enroll(token, device_class)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await agent.run(stop=stop)
        finally:
            await agent.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
