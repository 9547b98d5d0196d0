"""Training and held-out data: the standard-library corpus, a user's own files, windows."""

from __future__ import annotations

from estuary.data.stdlib import (
    DEFAULT_CLIENT_PACKAGES,
    ClientData,
    pretrain_corpus,
    stdlib_client,
    stdlib_clients,
    stdlib_root,
)
from estuary.data.user import load_user_data
from estuary.data.windows import WindowSampler, eval_windows

__all__ = [
    "DEFAULT_CLIENT_PACKAGES",
    "ClientData",
    "WindowSampler",
    "eval_windows",
    "load_user_data",
    "pretrain_corpus",
    "stdlib_client",
    "stdlib_clients",
    "stdlib_root",
]
