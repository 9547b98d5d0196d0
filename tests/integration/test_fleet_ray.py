"""The fleet simulator's Ray path trains the same bits as its local path.

A local Ray instance on loopback (2 CPUs) trains a small FedBuff run's device updates;
the same run with in-process training must give the identical event log, held-out
curve and final adapter, bit for bit. Ray runs in a spawned process of its own, as in
``test_flower_simulation.py``: a Ray left half-started in the pytest process (a failure,
a timeout on a busy machine) takes later tests down with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="flwr[simulation] (Ray) is not installed")

#: Quiet, the child takes ~40 s (most of it Ray's start-up); on a 2-core machine under a
#: load average of 20 a Ray start alone has taken minutes. Generous, never a sleep.
RUN_LIMIT_S = 840
pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_LIMIT_S + 60)]


def _run_both(workdir: str, send: Connection) -> None:
    """In a spawned process: one run trained on Ray, one in process; send both back."""
    import json

    import numpy as np

    from estuary.model.presets import build_preset
    from simulation.fleet.policies import FedBuffPolicy, FleetConfig
    from simulation.fleet.run import build_env
    from simulation.fleet.trace import load_trace
    from simulation.fleet.training import InlineTrainer, RayTrainer

    config = FleetConfig(
        devices=8, max_updates=8, buffer_size=4, target_staleness=1.0, local_steps=1,
        batch_size=2, seq_len=16, eval_windows=1, idle_checkin_s=5.0, duration_s=3600.0,
        cohort_min=4, cohort_max=4,  # the pacer's cap (4 × 1) must hold a cohort
    )  # fmt: skip
    env = build_env(
        load_trace("stragglers"), config, workdir=Path(workdir), base=build_preset("tiny", seed=0),
        workers=0, packages=3,
    )  # fmt: skip
    results: dict[str, Any] = {}
    ray_trainer = RayTrainer(env.context, address="local", workers=2)
    try:
        for name, trainer in (("ray", ray_trainer), ("local", InlineTrainer(env.context))):
            env.trainer = trainer
            policy = FedBuffPolicy(env)
            rec = policy.run()
            head = policy.ledger.head()
            adapter = policy.ledger.adapter(head)
            results[name] = {
                "log": rec.log,
                "curve": rec.curve,
                "b": {n: np.asarray(b).tobytes() for n, b in adapter.b.items()},
                "version": head.version,
            }
    finally:
        ray_trainer.close()
    send.send(json.loads(json.dumps({"ok": True})) | results)
    send.close()


def test_ray_training_equals_local_training_bit_for_bit(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_run_both, args=(str(tmp_path), send))
    child.start()
    send.close()
    results: dict[str, Any] = {}
    try:
        if receive.poll(RUN_LIMIT_S):
            with contextlib.suppress(EOFError):  # the child died; its exit code says more
                results = receive.recv()
        child.join(60)
    finally:
        if child.is_alive():  # never leave Ray running behind the suite
            child.kill()
            child.join(10)
    assert child.exitcode == 0, f"the fleet process exited {child.exitcode}"
    assert results.get("ok"), f"nothing came back within {RUN_LIMIT_S} s"
    ray, local = results["ray"], results["local"]
    assert ray["version"] >= 2  # several versions, each from trained updates
    assert ray["log"] == local["log"]
    assert ray["curve"] == local["curve"]
    assert ray["curve"][-1][3] < ray["curve"][0][3]  # the training was real
    assert ray["b"] == local["b"]  # bit for bit
