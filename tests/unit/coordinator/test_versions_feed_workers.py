"""The version ledger's records and adapter blobs are what the cloud workers consume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cloud_workers.executor import ModelJobExecutor
from coordinator.versions import VersionLedger
from estuary.adapters import AdapterConfig, GlobalAdapter, merge_into_base
from estuary.data.windows import eval_windows
from estuary.jobs import make_job
from estuary.model.evaluate import bits_per_byte
from estuary.model.presets import build_preset
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key
from estuary.state.memory import MemoryStore


def test_worker_evaluates_a_version_the_ledger_committed(tmp_path: Path) -> None:
    base = build_preset("tiny", seed=0)
    store, blobs = MemoryStore(), BlobStore(tmp_path / "blobs")
    ledger = VersionLedger(store, blobs=blobs, holder="r1", buffer_size=2, server_lr=1.0)
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4, seed=0))
    ledger.initialise(adapter)
    rng = np.random.default_rng(0)
    update = {n: rng.normal(0, 0.05, b.shape).astype(np.float32) for n, b in adapter.b.items()}
    ledger.add_cohort_sum("c1", weighted_sum=update, weight_total=2.0, updates=2)
    info = ledger.try_commit()
    assert info is not None and info.version == 1
    windows = eval_windows(Path(__file__).read_bytes() * 4, seq_len=32, max_windows=4)
    executor = ModelJobExecutor(store, blobs=blobs, base=base, eval_windows=windows)

    executor.execute(make_job("evaluate", version=1))

    record = json.loads(store.get(version_key(1)).value)  # type: ignore[union-attr]
    merged = build_preset("tiny", seed=0)
    expected_adapter = adapter.apply_update({n: u / 2.0 for n, u in update.items()})
    merge_into_base(merged, expected_adapter)
    assert record["adapter_sha256"] == info.adapter_sha256
    assert record["eval_bpb"] == pytest.approx(bits_per_byte(merged, windows), abs=1e-5)
