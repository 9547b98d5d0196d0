"""Typed per-role configuration loaded from TOML with ``ESTUARY_*`` overrides."""

from __future__ import annotations

from estuary.config.loader import (
    ConfigError,
    ConfigProblem,
    effective_settings,
    load_settings,
    missing_secrets,
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
    "ROLES",
    "ConfigError",
    "ConfigProblem",
    "CoordinatorSettings",
    "EdgeSettings",
    "RoleSettings",
    "SecretRef",
    "SecretUnavailable",
    "SimulationSettings",
    "WorkerSettings",
    "effective_settings",
    "load_settings",
    "missing_secrets",
    "role_names",
]
