"""Fixtures shared by the coordinator's unit tests."""

from __future__ import annotations

import pytest
from torch import nn

from estuary.model.presets import build_preset


@pytest.fixture(scope="session")
def base() -> nn.Module:
    """The tiny preset base model (seed 0), built once: the tests only read it."""
    return build_preset("tiny", seed=0)
