"""Secure aggregation costs nothing in quality (issue 15 item 5).

The same small federation runs twice from the same seeds: once with every cohort sum
computed by the secure-aggregation protocol (clip, weight, stochastic rounding to fixed
point, masking in Z_(2^32), unmasking), once as the plain float sum of the same clipped,
weighted updates. Each run trains its clients on its own versions, so rounding differences
could compound across rounds; the held-out scores must still agree within 0.005
bits/byte, which is fixed-point rounding alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from coordinator.staleness import StalenessPolicy
from coordinator.versions import VersionLedger
from edge_client.train import train_adapter
from estuary.adapters import AdapterConfig, GlobalAdapter, merge_into_base
from estuary.config.models import CohortSettings
from estuary.data.windows import eval_windows
from estuary.model.evaluate import bits_per_byte
from estuary.state.blobs import BlobStore
from estuary.state.memory import MemoryStore
from secure_agg.driver import run_local
from secure_agg.numerics import clip_update

CLIENTS, ROUNDS, STEPS = 4, 3, 4
#: The production cohort numerics: 32-bit ring, update clip 10 (CohortSettings defaults).
BITS, CLIP = CohortSettings().bits, CohortSettings().clip_norm
#: Staleness weights the relay could hand out (0, 1, 0 and 2 versions behind): w < 1
#: exercises the weighted fixed-point path, not only w = 1.
WEIGHTS = [StalenessPolicy().weight(s) for s in (0, 1, 0, 2)]


def _client_data() -> list[bytes]:
    """Four non-IID clients: text over four different vocabularies, fixed by seed.

    Generated, not read from this repository's files: an edit to such a file changed the
    data, and with it how far rounding differences compounded.
    """
    clients = []
    for i in range(CLIENTS):
        rng = np.random.default_rng(1000 + i)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))[rng.permutation(26)[:10]]
        vocabulary = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(60)]
        words = rng.choice(vocabulary, size=1500, p=rng.dirichlet(np.ones(60)))
        clients.append(" ".join(words).encode())
    return clients


def _masked_sum(
    deltas: list[dict[str, np.ndarray]], seed: int
) -> tuple[dict[str, np.ndarray], float]:
    result = run_local(
        deltas, threshold=3, clip=CLIP, bits=BITS, weights=WEIGHTS, seed=seed, active=True
    )
    assert isinstance(result.float_sum, dict)
    shapes = {n: d.shape for n, d in deltas[0].items()}
    return {
        n: np.asarray(result.float_sum[n]).reshape(shapes[n]) for n in shapes
    }, result.weight_sum


def _plain_sum(deltas: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], float]:
    total = {n: np.zeros(d.shape, np.float64) for n, d in deltas[0].items()}
    for w, delta in zip(WEIGHTS, deltas, strict=True):
        clipped = clip_update(delta, clip=CLIP, per_tensor=False)
        for name in total:
            total[name] += w * clipped[name].reshape(total[name].shape)
    return total, float(sum(WEIGHTS))


def _federation(base: nn.Module, tmp_path: Path, *, masked: bool) -> tuple[GlobalAdapter, float]:
    data = _client_data()
    ledger = VersionLedger(
        MemoryStore(),
        blobs=BlobStore(tmp_path / ("masked" if masked else "plain")),
        holder="r1",
        buffer_size=CLIENTS,
    )
    head = ledger.initialise(GlobalAdapter.for_model(base, AdapterConfig(r_max=4, seed=0)))
    for round_ in range(ROUNDS):
        adapter = ledger.adapter(head)
        deltas = [
            train_adapter(
                base,
                adapter,
                data[i],
                rank=4,
                steps=STEPS,
                lr=1e-2,
                grad_clip_norm=10.0,
                batch_size=4,
                seq_len=32,
                threads=1,
                seed=100 * round_ + i,
            ).delta_b
            for i in range(CLIENTS)
        ]
        summed, weight = _masked_sum(deltas, seed=round_) if masked else _plain_sum(deltas)
        ledger.add_cohort_sum(
            f"r{round_}",
            weighted_sum={n: a.astype(np.float32) for n, a in summed.items()},
            weight_total=weight,
            updates=CLIENTS,
            trained_on=head.version,
        )
        info = ledger.try_commit()
        assert info is not None and info.version == round_ + 1
        head = info
    final = ledger.adapter(head)
    merged = copy.deepcopy(base)
    merge_into_base(merged, final)
    held_out = b"".join(_client_data())[::-1]  # bytes no client trained on in this order
    return final, bits_per_byte(merged, eval_windows(held_out, seq_len=32, max_windows=32))


def test_masked_and_plain_aggregation_end_within_fixed_point_rounding(
    base: nn.Module, tmp_path: Path
) -> None:
    masked, masked_bpb = _federation(base, tmp_path, masked=True)
    plain, plain_bpb = _federation(base, tmp_path, masked=False)
    initial = GlobalAdapter.for_model(base, AdapterConfig(r_max=4, seed=0))

    # The run learned something (the comparison is not between two untouched adapters).
    moved = max(float(np.max(np.abs(plain.b[n] - initial.b[n]))) for n in plain.b)
    assert moved > 1e-3
    # Adapters agree to fixed-point resolution (2^-f with f ≈ 26 for 4 clients, clip
    # 10, 32 bits), compounded over three rounds of training on them.
    for name in plain.b:
        np.testing.assert_allclose(masked.b[name], plain.b[name], atol=1e-4)
    assert masked_bpb == pytest.approx(plain_bpb, abs=0.005)
