from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from estuary.data import WindowSampler, eval_windows


@settings(max_examples=50, deadline=None)
@given(
    data=st.binary(min_size=2, max_size=600),
    seq_len=st.integers(1, 64),
    batch=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_sampled_windows_are_contiguous_slices(
    data: bytes, seq_len: int, batch: int, seed: int
) -> None:
    if len(data) < seq_len + 1:
        with pytest.raises(ValueError, match="data"):
            WindowSampler(data, seq_len=seq_len, seed=seed)
        return
    sampler = WindowSampler(data, seq_len=seq_len, seed=seed)

    windows = sampler.batch(batch)

    assert windows.shape == (batch, seq_len + 1) and windows.dtype == torch.int64
    for row in windows.tolist():
        assert bytes(row) in data


def test_sampling_is_deterministic_for_a_seed() -> None:
    data = bytes(range(256)) * 4

    first = WindowSampler(data, seq_len=16, seed=3)
    second = WindowSampler(data, seq_len=16, seed=3)

    for _ in range(3):
        assert torch.equal(first.batch(4), second.batch(4))
    assert not torch.equal(WindowSampler(data, seq_len=16, seed=4).batch(4), first.batch(4))


def test_sampler_does_not_copy_the_data(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * 4096)

    from_bytes_data = bytes(1000)
    sampler = WindowSampler(from_bytes_data, seq_len=8)
    mapped = WindowSampler.from_file(path, seq_len=32, seed=1)

    assert np.shares_memory(sampler._data, np.frombuffer(from_bytes_data, dtype=np.uint8))
    assert isinstance(mapped._data, np.memmap)
    assert len(mapped) == 256 * 4096
    assert mapped.batch(2).shape == (2, 33)


@settings(max_examples=50, deadline=None)
@given(length=st.integers(2, 2000), seq_len=st.integers(1, 50))
def test_eval_windows_tile_the_data_without_overlap(length: int, seq_len: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    if length < seq_len + 1:
        with pytest.raises(ValueError, match="data"):
            eval_windows(data, seq_len=seq_len)
        return

    windows = eval_windows(data, seq_len=seq_len)

    count = length // (seq_len + 1)
    assert windows.shape == (count, seq_len + 1)
    assert bytes(windows.reshape(-1).tolist()) == data[: count * (seq_len + 1)]


def test_eval_window_cap_spreads_over_the_data() -> None:
    data = bytes(range(100)) * 11  # 1100 bytes, 110 windows of 10

    windows = eval_windows(data, seq_len=9, max_windows=5)

    assert windows.shape == (5, 10)
    assert windows[0, 0] == 0 and windows[-1].tolist() == list(range(90, 100))
