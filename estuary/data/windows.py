"""Fixed-length windows over a byte stream, for training and evaluation.

Training samples windows *lazily*: only offsets are drawn, and each batch is copied out
of a read-only view of the data, so memory is bounded by the batch, not the corpus (the
data itself may be a memory-mapped file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch


def derive_seed(material: str) -> int:
    """Return a 32-bit seed derived from ``material`` (the first 4 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(material.encode()).digest()[:4], "big")


def client_seed(run_seed: int, index: int) -> int:
    """Return the seed of client ``index`` (from 0) of a simulation seeded ``run_seed``.

    ``estuary simulate`` seeds its agents with it and the Flower ClientApp its partitions,
    so that a client draws the same training windows in both (see :func:`window_seed`).
    """
    if not 0 <= index < 1000:  # beyond, two runs' clients would share seeds
        raise ValueError(f"index: must be in [0, 1000), got {index}")
    return run_seed * 1000 + index


def window_seed(seed: int, version: int, nth: int = 0) -> int:
    """Return the window-sampling seed of a seeded client's ``nth`` task on ``version``.

    A function of the client's ``seed`` and the version it trains from, not of the task's
    random id: two systems running the same clients on the same versions (``estuary
    simulate`` and Flower's FedAvg, ``bench/flower.py``) train on the same batches, so
    the difference between their curves is the systems', not sampling noise. ``nth``
    counts the client's earlier tasks on the same version: a second task draws others.
    """
    if version < 0 or nth < 0:
        raise ValueError(f"version, nth: must be >= 0, got {version}, {nth}")
    return derive_seed(f"{seed}/train/v{version}/{nth}")


def _as_array(data: bytes | npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    if isinstance(data, bytes | bytearray | memoryview):
        # Zero-copy view over the bytes object.
        return np.frombuffer(data, dtype=np.uint8)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"data: must be bytes or a 1-D uint8 array, got {data.dtype} {data.shape}")
    return data


class WindowSampler:
    """Draw random windows of ``seq_len + 1`` tokens (inputs plus next-token targets).

    Parameters
    ----------
    data
        Byte-level token stream: ``bytes`` or a 1-D ``uint8`` array (e.g. ``np.memmap``).
    seq_len
        Tokens per input window; each sample holds ``seq_len + 1`` ids.
    seed
        Seed of the offset generator; the sequence of batches is a function of it.

    Raises
    ------
    ValueError
        If ``seq_len`` is not positive or ``data`` is shorter than one window.
    """

    def __init__(self, data: bytes | npt.NDArray[np.uint8], *, seq_len: int, seed: int = 0) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        self._data = _as_array(data)
        if len(self._data) < seq_len + 1:
            raise ValueError(
                f"data: {len(self._data)} bytes is shorter than one window of {seq_len + 1}"
            )
        self.seq_len = seq_len
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_file(cls, path: str | Path, *, seq_len: int, seed: int = 0) -> WindowSampler:
        """Sample from a file without reading it into memory (memory-mapped)."""
        return cls(np.memmap(path, dtype=np.uint8, mode="r"), seq_len=seq_len, seed=seed)

    def __len__(self) -> int:
        """Return the number of bytes in the underlying stream."""
        return len(self._data)

    def batch(self, batch_size: int) -> torch.Tensor:
        """Return a ``(batch_size, seq_len + 1)`` int64 tensor of random windows."""
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        span = self.seq_len + 1
        starts = self._rng.integers(0, len(self._data) - span + 1, size=batch_size)
        # (batch,) starts + (span,) arange -> (batch, span) gather indices
        index = starts[:, None] + np.arange(span)[None, :]
        return torch.from_numpy(self._data[index].astype(np.int64))


def eval_windows(
    data: bytes | npt.NDArray[np.uint8], *, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Return consecutive non-overlapping windows of ``seq_len + 1`` tokens.

    Each byte after the first of a window is predicted exactly once, so the mean loss
    over these windows is an unbiased held-out estimate. A trailing partial window is
    dropped.

    Parameters
    ----------
    data
        Byte-level token stream.
    seq_len
        Tokens per input window.
    max_windows
        Cap on the number of windows, evenly spaced over the data when it applies
        (so a cap does not just evaluate the first file of a corpus).

    Raises
    ------
    ValueError
        If ``data`` is shorter than one window or an argument is not positive.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len: must be positive, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows: must be positive or None, got {max_windows}")
    array = _as_array(data)
    span = seq_len + 1
    count = len(array) // span
    if count == 0:
        raise ValueError(f"data: {len(array)} bytes is shorter than one window of {span}")
    # (count * span,) -> (count, span)
    windows = array[: count * span].reshape(count, span)
    if max_windows is not None and count > max_windows:
        keep = np.linspace(0, count - 1, max_windows).round().astype(np.int64)
        windows = windows[keep]
    return torch.from_numpy(windows.astype(np.int64))
