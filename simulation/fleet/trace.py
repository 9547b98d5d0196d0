"""Device traces: what a simulated fleet is made of, read from ``deploy/traces/*.json``.

A trace describes device *classes*, not devices: each class has a share of the fleet, the
adapter rank it trains, and distributions from which every device of the class draws its
own compute speed and network bandwidth, plus a latency, a per-task dropout probability
and an availability pattern. :func:`sample_fleet` draws a fleet of any size from a trace
and a seed; the same trace, size and seed always give the same fleet.

Schema (``"schema": "estuary-device-trace/1"``; every field required unless marked)::

    {
      "schema": "estuary-device-trace/1",
      "name": "phones-laptops",            # [a-z0-9-]+
      "description": "free text",           # optional
      "start_hour": 18.0,                   # local hour of day at virtual time 0, [0, 24)
      "classes": [
        {
          "name": "phone",                  # a coordinator device-class name
          "fraction": 0.7,                  # share of the fleet, > 0; shares sum to 1
          "rank": 2,                        # adapter rank the class trains, >= 1
          "step_s": {"median": 3.0, "sigma": 0.6},
                                            # seconds per local training step, lognormal:
                                            # each device draws median * exp(sigma * N(0,1))
          "bandwidth_up": {"median": 1.0e6, "sigma": 0.8},    # bytes/s, lognormal
          "bandwidth_down": {"median": 4.0e6, "sigma": 0.8},  # bytes/s, lognormal
          "latency_s": 0.08,                # one-way message latency, >= 0
          "dropout": 0.05,                  # probability a task is abandoned mid-training
          "availability": {                 # when a device is reachable at all
            "kind": "diurnal",              # "always" or "diurnal"
            "mean_online_s": 2400.0,        # mean length of an online session (exponential)
            "mean_offline_s": 3600.0,       # mean offline gap at the daily mean (exponential)
            "peak_hour": 21.0,              # hour of day with the shortest offline gaps
            "amplitude": 0.6                # 0..<1: offline gaps scale by 1 - amplitude*cos(...)
          }
        }
      ]
    }

A device that goes offline while it holds a task abandons it (a dropout, the same as the
per-task ``dropout``). :func:`load_trace` refuses a malformed trace with a
:class:`TraceError` naming the bad field (``classes[1].step_s.sigma: ...``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "SCHEMA",
    "TRACE_DIR",
    "Availability",
    "DeviceClassTrace",
    "DeviceSpec",
    "DeviceTrace",
    "LogNormal",
    "TraceError",
    "load_trace",
    "parse_trace",
    "sample_fleet",
    "trace_path",
]

SCHEMA = "estuary-device-trace/1"
#: Where the shipped traces live (``--trace NAME`` looks here).
TRACE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "traces"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: Class shares must sum to one within this (they are typed by hand).
_FRACTION_TOLERANCE = 1e-6


class TraceError(ValueError):
    """A trace file that does not follow the schema; the message names the field."""


@dataclass(frozen=True)
class LogNormal:
    """``median * exp(sigma * N(0, 1))``: median > 0, sigma ≥ 0 (0: every device the same)."""

    median: float
    sigma: float

    def draw(self, rng: np.random.Generator) -> float:
        """Return one draw."""
        return float(self.median * math.exp(self.sigma * rng.standard_normal()))


@dataclass(frozen=True)
class Availability:
    """When a device is reachable: always, or alternating sessions shaped by the hour."""

    kind: Literal["always", "diurnal"]
    mean_online_s: float = math.inf
    mean_offline_s: float = 0.0
    peak_hour: float = 0.0
    amplitude: float = 0.0

    def offline_scale(self, hour: float) -> float:
        """Factor on the mean offline gap at ``hour`` (smallest at the peak hour)."""
        return 1.0 - self.amplitude * math.cos(2 * math.pi * (hour - self.peak_hour) / 24.0)


@dataclass(frozen=True)
class DeviceClassTrace:
    """One device class of a trace (see the module docstring for each field)."""

    name: str
    fraction: float
    rank: int
    step_s: LogNormal
    bandwidth_up: LogNormal
    bandwidth_down: LogNormal
    latency_s: float
    dropout: float
    availability: Availability


@dataclass(frozen=True)
class DeviceTrace:
    """A validated trace."""

    name: str
    description: str
    start_hour: float
    classes: tuple[DeviceClassTrace, ...]

    def hour_at(self, t: float) -> float:
        """Local hour of day at virtual time ``t`` seconds."""
        return (self.start_hour + t / 3600.0) % 24.0


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device, drawn from its class.

    Attributes
    ----------
    index
        Position in the fleet (0-based); its data slice and seeds derive from it.
    device_class
        The class name.
    rank
        Adapter rank.
    step_s
        Seconds per local training step.
    bandwidth_up, bandwidth_down
        Bytes per second.
    latency_s
        One-way latency of a message.
    dropout
        Probability a task is abandoned during training.
    """

    index: int
    device_class: str
    rank: int
    step_s: float
    bandwidth_up: float
    bandwidth_down: float
    latency_s: float
    dropout: float


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: must be an object, got {type(obj).__name__}")
    if key not in obj:
        raise TraceError(f"{where}.{key}: missing" if where else f"{key}: missing")
    return obj[key]


def _number(
    obj: Any,
    key: str,
    where: str,
    *,
    lo: float,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    path = f"{where}.{key}" if where else key
    value = _field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"{path}: must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise TraceError(f"{path}: must be in {left}{lo:g}, {hi:g}{right}, got {value!r}")
    return float(value)


def _lognormal(obj: Any, key: str, where: str) -> LogNormal:
    sub = _field(obj, key, where)
    path = f"{where}.{key}"
    _no_extra(sub, {"median", "sigma"}, path)
    return LogNormal(
        median=_number(sub, "median", path, lo=0.0, lo_open=True),
        sigma=_number(sub, "sigma", path, lo=0.0, hi=3.0),
    )


def _no_extra(obj: Any, allowed: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: must be an object, got {type(obj).__name__}")
    extra = sorted(set(obj) - allowed)
    if extra:
        raise TraceError(f"{where}: unknown field(s) {extra}; allowed: {sorted(allowed)}")


def _availability(obj: Any, where: str) -> Availability:
    sub = _field(obj, "availability", where)
    path = f"{where}.availability"
    kind = _field(sub, "kind", path)
    if kind == "always":
        _no_extra(sub, {"kind"}, path)
        return Availability(kind="always")
    if kind != "diurnal":
        raise TraceError(f"{path}.kind: must be 'always' or 'diurnal', got {kind!r}")
    _no_extra(sub, {"kind", "mean_online_s", "mean_offline_s", "peak_hour", "amplitude"}, path)
    return Availability(
        kind="diurnal",
        mean_online_s=_number(sub, "mean_online_s", path, lo=0.0, lo_open=True),
        mean_offline_s=_number(sub, "mean_offline_s", path, lo=0.0, lo_open=True),
        peak_hour=_number(sub, "peak_hour", path, lo=0.0, hi=24.0, hi_open=True),
        amplitude=_number(sub, "amplitude", path, lo=0.0, hi=1.0, hi_open=True),
    )


def parse_trace(data: Any) -> DeviceTrace:
    """Validate a decoded trace; raise :class:`TraceError` naming the first bad field."""
    _no_extra(data, {"schema", "name", "description", "start_hour", "classes"}, "trace")
    schema = _field(data, "schema", "")
    if schema != SCHEMA:
        raise TraceError(f"schema: must be {SCHEMA!r}, got {schema!r}")
    name = _field(data, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TraceError(f"name: must match {_NAME.pattern}, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TraceError(f"description: must be a string, got {type(description).__name__}")
    start_hour = _number(data, "start_hour", "", lo=0.0, hi=24.0, hi_open=True)
    raw_classes = _field(data, "classes", "")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise TraceError("classes: must be a non-empty list")
    classes: list[DeviceClassTrace] = []
    allowed = {
        "name", "fraction", "rank", "step_s", "bandwidth_up", "bandwidth_down",
        "latency_s", "dropout", "availability",
    }  # fmt: skip
    for i, raw in enumerate(raw_classes):
        where = f"classes[{i}]"
        _no_extra(raw, allowed, where)
        cname = _field(raw, "name", where)
        if not isinstance(cname, str) or not _NAME.match(cname):
            raise TraceError(f"{where}.name: must match {_NAME.pattern}, got {cname!r}")
        if any(c.name == cname for c in classes):
            raise TraceError(f"{where}.name: {cname!r} appears twice")
        rank = _field(raw, "rank", where)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 256:
            raise TraceError(f"{where}.rank: must be an integer in [1, 256], got {rank!r}")
        classes.append(
            DeviceClassTrace(
                name=cname,
                fraction=_number(raw, "fraction", where, lo=0.0, hi=1.0, lo_open=True),
                rank=rank,
                step_s=_lognormal(raw, "step_s", where),
                bandwidth_up=_lognormal(raw, "bandwidth_up", where),
                bandwidth_down=_lognormal(raw, "bandwidth_down", where),
                latency_s=_number(raw, "latency_s", where, lo=0.0, hi=60.0),
                dropout=_number(raw, "dropout", where, lo=0.0, hi=1.0, hi_open=True),
                availability=_availability(raw, where),
            )
        )
    total = sum(c.fraction for c in classes)
    if abs(total - 1.0) > _FRACTION_TOLERANCE:
        raise TraceError(f"classes[*].fraction: must sum to 1, got {total:g}")
    return DeviceTrace(
        name=name, description=description, start_hour=start_hour, classes=tuple(classes)
    )


def trace_path(name_or_path: str | Path) -> Path:
    """Return the file of a shipped trace name (``phones-laptops``) or a path as given."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.parent != Path("."):
        return path
    return TRACE_DIR / f"{name_or_path}.json"


def load_trace(name_or_path: str | Path) -> DeviceTrace:
    """Read and validate a trace file (a shipped name or a path).

    Raises
    ------
    TraceError
        If the file is missing, not JSON, or breaks the schema (the message names the field).
    """
    path = trace_path(name_or_path)
    try:
        text = path.read_text()
    except OSError as exc:
        shipped = sorted(p.stem for p in TRACE_DIR.glob("*.json"))
        raise TraceError(f"trace: cannot read {path} ({exc}); shipped traces: {shipped}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"trace: {path} is not JSON: {exc}") from None
    try:
        return parse_trace(data)
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from None


def sample_fleet(trace: DeviceTrace, devices: int, *, seed: int) -> list[DeviceSpec]:
    """Draw ``devices`` devices from ``trace``; classes get their shares (largest remainder).

    Classes are interleaved deterministically so any prefix of the fleet mixes them.
    """
    if devices < 1:
        raise ValueError(f"devices: must be >= 1, got {devices}")
    rng = np.random.default_rng([seed, 0x7ACE])
    exact = [c.fraction * devices for c in trace.classes]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: devices - sum(counts)]:
        counts[i] += 1
    # Interleave: device k goes to the class furthest behind its share so far.
    labels: list[int] = []
    given = [0] * len(counts)
    for k in range(devices):
        ci = max(
            (i for i in range(len(counts)) if given[i] < counts[i]),
            key=lambda i: (counts[i] * (k + 1) / devices - given[i], -i),
        )
        given[ci] += 1
        labels.append(ci)
    fleet = []
    for index, ci in enumerate(labels):
        c = trace.classes[ci]
        fleet.append(
            DeviceSpec(
                index=index,
                device_class=c.name,
                rank=c.rank,
                step_s=c.step_s.draw(rng),
                bandwidth_up=c.bandwidth_up.draw(rng),
                bandwidth_down=c.bandwidth_down.draw(rng),
                latency_s=c.latency_s,
                dropout=c.dropout,
            )
        )
    return fleet


def next_session(
    trace: DeviceTrace,
    availability: Availability,
    *,
    online: bool,
    now: float,
    rng: np.random.Generator,
) -> float:
    """Return how long the current online (or offline) period lasts from ``now``."""
    if availability.kind == "always":
        return math.inf
    if online:
        return float(rng.exponential(availability.mean_online_s))
    scale = availability.offline_scale(trace.hour_at(now))
    return float(rng.exponential(availability.mean_offline_s * scale))


def day_fraction_online(availability: Availability) -> float:
    """Long-run fraction of time a device of this availability is online (for docs)."""
    if availability.kind == "always":
        return 1.0
    on, off = availability.mean_online_s, availability.mean_offline_s
    return on / (on + off) if math.isfinite(on) else 1.0
