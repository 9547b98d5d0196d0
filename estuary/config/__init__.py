"""Typed per-role configuration loaded from TOML with ``ESTUARY_*`` overrides."""

from __future__ import annotations

from estuary.config.checks import LocalProblem, local_problems, missing_secrets
from estuary.config.env import ENV_PREFIX, reserved_for_overrides
from estuary.config.loader import (
    ConfigError,
    ConfigProblem,
    effective_settings,
    load_settings,
    role_names,
)
from estuary.config.models import (
    ROLES,
    CoordinatorSettings,
    EdgeSettings,
    RoleSettings,
    SimulationSettings,
    WorkerSettings,
)
from estuary.config.secrets import SecretRef, SecretUnavailable

__all__ = [
    "ENV_PREFIX",
    "ROLES",
    "ConfigError",
    "ConfigProblem",
    "CoordinatorSettings",
    "EdgeSettings",
    "LocalProblem",
    "RoleSettings",
    "SecretRef",
    "SecretUnavailable",
    "SimulationSettings",
    "WorkerSettings",
    "effective_settings",
    "load_settings",
    "local_problems",
    "missing_secrets",
    "reserved_for_overrides",
    "role_names",
]
