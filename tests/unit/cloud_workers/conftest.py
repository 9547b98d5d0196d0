"""Shared settings of the cloud worker tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The tiny model's kernels are far too small to gain from intra-op threads; on a
    # shared 2-core runner two threads contend and a forward pass gets ~20× slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
