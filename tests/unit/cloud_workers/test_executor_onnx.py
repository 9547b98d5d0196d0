"""Two executors of one process export ONNX at the same time.

This is two worker groups sharing a process (``bench/workers.py``, or a local worker
beside another group): their ``export_onnx`` jobs export concurrently while a third
executor evaluates. In-process exports broke each other (torch.export's process-wide
tracing state); each must succeed and carry its own version's graph.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from worker_fixtures import eval_windows, publish_version

from cloud_workers.executor import ModelJobExecutor
from estuary.jobs import make_job
from estuary.model.presets import build_preset
from estuary.onnx_meta import INT8_FILENAME, METADATA_FILENAME
from estuary.state import open_store
from estuary.state.blobs import BlobStore

pytestmark = pytest.mark.slow

#: Longest a job thread may take; the test took 49 s on 2 cores at a load average of 6.
THREAD_LIMIT_S = 240.0


@pytest.fixture(scope="module")
def base() -> Any:
    return build_preset("tiny", seed=0)


def test_concurrent_exports_and_an_evaluation_all_succeed(base: Any, tmp_path: Path) -> None:
    # Prepare: two versions, three executors over one store (one per "group").
    store = open_store("memory://")
    blobs = BlobStore(tmp_path / "blobs", fsync=False)
    digests = {v: publish_version(store, blobs, base, v) for v in (1, 2)}
    executors = [
        ModelJobExecutor(store, blobs=blobs, base=base, eval_windows=eval_windows())
        for _ in range(3)
    ]
    jobs = [
        make_job("export_onnx", version=1),
        make_job("export_onnx", version=2),
        make_job("evaluate", version=1),
    ]
    start = threading.Barrier(len(jobs))
    outputs: dict[int, dict[str, Any]] = {}
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            start.wait()
            outputs[i] = executors[i].execute(jobs[i])
        except Exception as exc:  # recorded, then asserted on below
            errors.append(f"{jobs[i].job_id}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_LIMIT_S)

    # Assert: every job succeeded; each export is its own version's merged model
    # (named in its metadata, and computing that model's logits).
    assert errors == []
    assert sorted(outputs) == [0, 1, 2]
    from edge_client.serving import OrtLM
    from estuary.model.evaluate import bits_per_byte

    ids = np.arange(2, 26, dtype=np.int64).reshape(2, 12)
    for i, version in ((0, 1), (1, 2)):
        served = tmp_path / f"served-{version}"
        served.mkdir()
        for name, blob in outputs[i]["onnx"].items():
            (served / name).write_bytes(blobs.read(blob))
        metadata = json.loads((served / METADATA_FILENAME).read_text())
        assert (metadata["source"], metadata["int8"]) == (
            f"estuary adapter {digests[version]}",
            INT8_FILENAME,
        )
        merged = executors[2].merged_model(jobs[i])
        with torch.no_grad():
            want = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
        # int8 weights: measured 0.023 from torch's logits, which span ±0.9.
        assert np.abs(OrtLM(served).logits(ids) - want).max() < 0.1
    expected = bits_per_byte(executors[2].merged_model(jobs[2]), eval_windows())
    assert outputs[2]["eval_bpb"] == pytest.approx(expected, abs=1e-6)
