"""Helpers shared by the job tests, the integration test and nothing else."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from estuary.state.base import Store
from estuary.state.blobs import BlobStore
from estuary.state.keys import version_key


def publish_version(store: Store, blobs: BlobStore, base: nn.Module, version: int) -> str:
    """Store a random adapter (seeded by ``version``) and its version record; return its digest."""
    from estuary.adapters import AdapterConfig, GlobalAdapter, put_adapter

    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=4, seed=0))
    rng = np.random.default_rng(version)
    digest = put_adapter(
        blobs,
        adapter.with_b(
            {n: rng.normal(0, 0.02, v.shape).astype(np.float32) for n, v in adapter.b.items()}
        ),
    )
    record = {"version": version, "adapter_sha256": digest, "committed_at": time.time()}
    store.put(version_key(version), json.dumps(record).encode())
    return digest


def eval_windows(count: int = 4, seq_len: int = 32) -> torch.Tensor:
    """Deterministic held-out windows: Python source bytes from this file."""
    from estuary.data.windows import eval_windows as make

    data = Path(__file__).read_bytes() * 4
    return make(data, seq_len=seq_len, max_windows=count)
