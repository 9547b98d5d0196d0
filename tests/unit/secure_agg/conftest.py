"""Fixtures of the secure aggregation tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from secagg_harness import Harness


@pytest.fixture
def harness() -> Callable[..., Harness]:
    def make(**kwargs: Any) -> Harness:
        return Harness(**kwargs)

    return make
