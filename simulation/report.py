"""What a simulated run leaves behind: a JSONL event log, a summary, plots, a live view.

A run directory ``runs/<id>/`` holds

- ``metrics.jsonl`` (:class:`MetricsLog`): one JSON object per line, each with ``t``
  (seconds since the run started) and ``kind``;
- ``summary.json`` (:func:`write_summary`, schema :class:`Summary`);
- ``bits_per_byte.png`` (:func:`plot_bpb`) and ``staleness.png`` (:func:`plot_staleness`).

Every file of a run is created with the same permissions: ``0o666`` less the process
umask, what ``open()`` gives (``0644`` under the usual umask ``022``).

Plots draw on a :class:`matplotlib.figure.Figure` with its own Agg canvas, never through
``pyplot``, so no global backend or figure registry is touched and nothing leaks.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypedDict

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# --------------------------------------------------------------------------- event log


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays (via .item() / .tolist()) and paths reach the log from
    # metrics code; anything else is a bug worth a TypeError.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class MetricsLog:
    """Append-only JSON-lines event log, flushed after every line.

    Safe to call from several threads (one lock around each write), so the agents and
    the coordinator of a simulation may share one log.

    Parameters
    ----------
    path
        File to append to; parent directories are created.
    clock
        Monotonic clock in seconds; ``t`` of an event is ``clock() - clock()`` at
        construction. Injected for tests.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append ``{"t": ..., "kind": kind, **fields}`` as one line and return it.

        Raises
        ------
        ValueError
            If ``kind`` is empty, a field is named ``t`` or ``kind``, or the log is closed.
        """
        if not kind:
            raise ValueError("kind: must be a non-empty string")
        clash = {"t", "kind"} & set(fields)
        if clash:
            raise ValueError(f"fields: {sorted(clash)} are reserved")
        record: dict[str, Any] = {"t": round(self._clock() - self._start, 6), "kind": kind}
        record.update(fields)
        line = json.dumps(record, default=_json_default, allow_nan=True)
        with self._lock:
            if self._file is None:
                raise ValueError(f"{self.path}: the metrics log is closed")
            self._file.write(line + "\n")
            # Flushed per line: a run killed mid-way still leaves every event before it.
            self._file.flush()
        return record

    def close(self) -> None:
        """Close the file; later events raise."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Return every event of a :class:`MetricsLog` file, in order."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------- staleness


class StalenessHistogram:
    """Counts of accepted updates per staleness (versions behind when aggregated)."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()

    def add(self, staleness: int, count: int = 1) -> None:
        """Count ``count`` updates of staleness ``staleness``.

        Raises
        ------
        ValueError
            If ``staleness`` or ``count`` is negative.
        """
        if staleness < 0:
            raise ValueError(f"staleness: must be >= 0, got {staleness}")
        if count < 0:
            raise ValueError(f"count: must be >= 0, got {count}")
        if count:
            self._counts[int(staleness)] += count

    def remove(self, staleness: int) -> None:
        """Take back one update counted at ``staleness`` (its sum was later dropped).

        Raises
        ------
        ValueError
            If no update was counted at ``staleness``.
        """
        if self._counts[int(staleness)] < 1:
            raise ValueError(f"staleness: no update counted at {staleness}")
        self._counts[int(staleness)] -= 1
        if not self._counts[int(staleness)]:
            del self._counts[int(staleness)]

    @property
    def total(self) -> int:
        """Number of updates counted."""
        return sum(self._counts.values())

    @property
    def mean(self) -> float | None:
        """Mean staleness, or ``None`` before the first update."""
        total = self.total
        if total == 0:
            return None
        return sum(s * n for s, n in self._counts.items()) / total

    def as_dict(self) -> dict[int, int]:
        """Return ``staleness -> count``, ascending, only staleness values seen."""
        return dict(sorted(self._counts.items()))

    def to_json(self) -> dict[str, int]:
        """Return :meth:`as_dict` with decimal-string keys (what JSON objects hold)."""
        return {str(s): n for s, n in self.as_dict().items()}


# ------------------------------------------------------------------------- summary


class ScoresJSON(TypedDict):
    """Held-out bits/byte: per client name and the token-weighted union.

    The JSON form of :class:`simulation.evaluation.Scores` (its ``as_dict()``).
    """

    per_client: dict[str, float]
    union: float


class _BaselinesRequired(TypedDict):
    local_only: ScoresJSON
    centralized: ScoresJSON


class BaselinesJSON(_BaselinesRequired, total=False):
    """The two reference runs (:mod:`simulation.baselines`).

    Attributes
    ----------
    local_only, centralized
        Held-out scores of each baseline.
    sample_budget
        Optional: the budget they were given (steps per client, batch size, seq_len).
    """

    sample_budget: dict[str, Any]


class _SummaryRequired(TypedDict):
    initial: ScoresJSON
    final: ScoresJSON
    versions: int
    updates_accepted: int
    updates_rejected: int
    dropouts: int
    staleness_histogram: dict[str, int]
    bytes_up_per_client: dict[str, int]
    bytes_down_per_client: dict[str, int]
    wall_time_s: float
    config: str


class Summary(_SummaryRequired, total=False):
    """Schema of ``summary.json``, written once at the end of a simulated run.

    Required keys:

    initial
        Held-out bits/byte of version 0 (the base with the zero adapter).
    final
        Held-out bits/byte of the last committed version.
    versions
        New adapter versions committed during the run (not counting version 0).
    updates_accepted
        Client updates that entered an aggregate.
    updates_rejected
        Client updates refused (too stale, failed checks, or late for their cohort).
    dropouts
        Tasks whose client vanished before uploading.
    staleness_histogram
        Accepted updates per staleness when their weight was fixed (the share relay),
        keyed by the staleness as a decimal string (:meth:`StalenessHistogram.to_json`).
    bytes_up_per_client, bytes_down_per_client
        Bytes each client sent to / received from the coordinator, by client name.
    wall_time_s
        Wall-clock seconds of the whole run: pretraining the base (if this run did),
        the federation and the baselines.
    config
        Path of the effective configuration of the run (``config.json``).

    Optional keys (absent, or ``baselines`` also ``null``, when not measured):

    baselines
        Local-only and centralized scores (:class:`BaselinesJSON`).
    run_id
        The run's folder name under the output directory.
    stopped_by
        ``"versions"`` (the target was reached) or ``"time_limit"``.
    versions_target
        Versions the run was asked to commit.
    shortfall
        Why fewer than ``versions_target`` versions were committed, for a person;
        ``null`` when the target was reached. ``estuary simulate`` prints it and exits 7.
    folded_staleness_histogram
        Updates folded into a committed version, by the staleness that version's commit
        priced them at (``v − t_c``: what their discount was; a cohort may unmask a
        version or two after its weights were fixed), keyed as ``staleness_histogram``.
        Its total is ``updates_accepted`` less the updates still buffered at the end and
        ``updates_dropped``.
    updates_dropped
        Of ``updates_accepted``: updates whose cohort sum was retired at a commit without
        being folded in (trained on a version too old by then, or one a rollback
        abandoned).
    cohorts
        Cohorts that ended during the run, by final status.
    tasks_per_client
        Training tasks each client completed, by client name.
    federation_wall_time_s
        Wall-clock seconds of the federation alone: from the coordinator's start to its
        stop, neither pretraining the base nor the baselines. ``time_limit_s`` bounds it.
    pretrain_wall_time_s
        Wall-clock seconds this run spent pretraining the base; 0 when it came from
        ``model.path`` or from the cache of an earlier run.
    base_model
        Where the base came from: ``path`` (its Hugging Face directory) and ``source``
        (``"model.path"``, ``"cache"`` or ``"pretrained"``).
    machine_load
        How busy the machine was during the federation: ``adjusted`` (the run's clock
        followed the load, :mod:`simulation.machine_clock`), ``federation_clock_s`` (the
        federation's seconds on that clock), ``mean_speed`` and ``min_speed`` (clock
        seconds per wall second: 1 on an idle machine).
    curve
        ``{"version", "wall_s", "union"}`` of each scored version, from version 0.
    progress
        How far along its curve the run got (:func:`progress_note`).

    Keys not listed here are written as given; readers must ignore those they do not
    know.
    """

    baselines: BaselinesJSON | None
    run_id: str
    stopped_by: str
    versions_target: int
    shortfall: str | None
    updates_dropped: int
    folded_staleness_histogram: dict[str, int]
    cohorts: dict[str, int]
    tasks_per_client: dict[str, int]
    federation_wall_time_s: float
    pretrain_wall_time_s: float
    base_model: dict[str, str]
    machine_load: dict[str, Any]
    curve: list[dict[str, float]]
    progress: dict[str, Any]


#: Keys every summary must have.
SUMMARY_REQUIRED_KEYS: frozenset[str] = frozenset(_SummaryRequired.__annotations__)


def write_summary(path: str | Path, summary: Summary | Mapping[str, Any]) -> Path:
    """Write ``summary`` as JSON (sorted keys, indent 2), atomically.

    The text goes to a temporary file in the same directory, is fsynced, and replaces
    ``path`` in one rename, so a reader never sees a half-written summary. The file gets
    the permissions of the run's other files (``0o666`` less the umask), not the
    owner-only mode of :func:`tempfile.mkstemp`.

    Raises
    ------
    ValueError
        If a required key of :class:`Summary` is missing.
    """
    missing = sorted(SUMMARY_REQUIRED_KEYS - set(summary))
    if missing:
        raise ValueError(f"summary: missing keys {missing}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, sort_keys=True, indent=2, default=_json_default) + "\n"
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: a fresh name of our own; 0o666: the umask then applies as for open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def read_summary(path: str | Path) -> Summary:
    """Read a file written by :func:`write_summary`.

    Raises
    ------
    ValueError
        If the file is not a JSON object with every required key of :class:`Summary`.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not set(data) >= SUMMARY_REQUIRED_KEYS:
        raise ValueError(f"{path}: not a simulation summary")
    summary: Summary = data  # type: ignore[assignment]  # keys checked just above
    return summary


# ------------------------------------------------------------------------ progress

#: Points at the end of the curve over which the recent slope is measured: enough to
#: average out the version-to-version noise of eight-update aggregates.
SLOPE_POINTS = 8
#: Bits/byte per version below which the curve counts as flat: over the 40-80 versions
#: of a demo that would add up to less than the last digit shown.
FLAT_SLOPE = 0.001


def progress_note(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Return how far along its curve a run got, from its summary's ``curve`` and scores.

    Parameters
    ----------
    summary
        A summary with ``curve`` (``[{"version", "wall_s", "union"}, ...]`` from version
        0), ``initial`` and optionally ``baselines``.

    Returns
    -------
    dict
        ``versions`` (the last scored), ``gain_over_base`` and, with baselines,
        ``gain_over_local_only`` (bits/byte the final version is below each; negative:
        above), ``slope_per_version`` (bits/byte gained per version over the last
        :data:`SLOPE_POINTS` points; ``None`` with fewer than two), ``still_improving``
        (slope above :data:`FLAT_SLOPE`), and ``text``: all of it in one sentence.
    """
    curve = list(summary.get("curve") or [])
    base = float(summary["initial"]["union"])
    final = float(curve[-1]["union"]) if curve else base
    version = int(curve[-1]["version"]) if curve else 0
    note: dict[str, Any] = {"versions": version, "gain_over_base": round(base - final, 4)}
    baselines = summary.get("baselines") or {}
    local = baselines.get("local_only")
    if local is not None:
        note["gain_over_local_only"] = round(float(local["union"]) - final, 4)
    tail = curve[-SLOPE_POINTS:]
    slope: float | None = None
    if len(tail) >= 2 and tail[-1]["version"] > tail[0]["version"]:
        slope = (float(tail[0]["union"]) - float(tail[-1]["union"])) / (
            int(tail[-1]["version"]) - int(tail[0]["version"])
        )
    note["slope_per_version"] = None if slope is None else round(slope, 5)
    note["still_improving"] = slope is not None and slope > FLAT_SLOPE
    if version == 0:
        note["text"] = "no version committed: the curve did not start"
        return note
    parts = [f"version {version}: {base - final:.3f} bits/byte below the base"]
    if local is not None:
        gain = float(local["union"]) - final
        side = "below" if gain >= 0 else "above"
        parts.append(f"{abs(gain):.3f} {side} local-only at equal client samples")
    if slope is None:
        parts.append("too few versions to tell the trend")
    elif slope > FLAT_SLOPE:
        parts.append(
            f"still improving by {slope:.4f} bits/byte per version over the last "
            f"{int(tail[-1]['version']) - int(tail[0]['version'])} versions: a longer run "
            "(more versions) goes further"
        )
    else:
        parts.append("the curve has flattened")
    note["text"] = "; ".join(parts)
    return note


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _save(figure: Figure, out_png: str | Path) -> Path:
    target = Path(out_png)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, format="png")
    # A Figure not made by pyplot is not registered anywhere; clearing drops its
    # artists now rather than at garbage collection.
    figure.clear()
    return target


def plot_bpb(
    points: Sequence[tuple[float, float]],
    *,
    baselines: Mapping[str, float],
    base: float,
    out_png: str | Path,
    note: str | None = None,
) -> Path:
    """Plot union held-out bits/byte against wall time, with reference lines.

    Parameters
    ----------
    points
        ``(seconds since start, union bits/byte)`` per committed version, in order.
    baselines
        Union bits/byte of each baseline by name (e.g. ``local_only``); a dashed
        horizontal line each. May be empty.
    base
        Union bits/byte of the base without adapter (version 0); a solid grey line.
    out_png
        Output file.
    note
        Optional line under the title (how far along the curve the run got).

    Raises
    ------
    ValueError
        If ``points`` is empty.
    """
    if not points:
        raise ValueError("points: at least one (seconds, bits/byte) point is needed")
    figure = _new_figure(7.0, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    axes.plot(xs, ys, marker="o", color="C0", label="federation (union)")
    axes.axhline(base, color="0.5", linestyle="-", linewidth=1.0, label=f"base {base:.3f}")
    for i, (name, value) in enumerate(sorted(baselines.items())):
        axes.axhline(
            value, color=f"C{i + 1}", linestyle="--", linewidth=1.0, label=f"{name} {value:.3f}"
        )
    axes.set_xlabel("wall time (s)")
    axes.set_ylabel("held-out bits/byte (union)")
    title = "Held-out bits/byte of each committed version"
    if note:
        title = "\n".join([title, *textwrap.wrap(note, 80)])
    axes.set_title(title, fontsize="small" if note else None)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    return _save(figure, out_png)


def staleness_figure(hist: Mapping[int, int] | Mapping[str, int]) -> Figure:
    """Return the bar chart of accepted updates per staleness (see :func:`plot_staleness`).

    Bars stand at each staleness seen, from 0 (staleness is never negative); the count
    axis starts at 0 with whole-number ticks. An empty histogram (no update accepted)
    gives axes from 0 to 1 without ticks and a note that there is nothing to plot.

    Raises
    ------
    ValueError
        If a staleness or a count is negative.
    """
    from matplotlib.ticker import MaxNLocator

    counts = {int(k): int(v) for k, v in hist.items()}
    bad = {k: v for k, v in counts.items() if k < 0 or v < 0}
    if bad:
        raise ValueError(f"hist: staleness and counts must be >= 0, got {bad}")
    keys = sorted(k for k, v in counts.items() if v > 0)
    figure = _new_figure(5.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_xlabel("staleness (versions behind)")
    axes.set_ylabel("accepted updates")
    axes.set_title("Staleness of accepted updates")
    if not keys:
        axes.set_xlim(0.0, 1.0)
        axes.set_ylim(0.0, 1.0)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.text(0.5, 0.5, "no update accepted:\nnothing to plot", ha="center", va="center")
        return figure
    axes.bar(keys, [counts[k] for k in keys], color="C0", width=0.8)
    axes.set_xticks(keys)
    # Bars are 0.8 wide around each staleness: the axis starts half a bar left of 0
    # at most, and the count axis at 0 with whole-number ticks.
    axes.set_xlim(min(keys) - 0.5, max(keys) + 0.5)
    axes.set_ylim(0.0, max(counts[k] for k in keys) * 1.1)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def plot_staleness(hist: Mapping[int, int] | Mapping[str, int], out_png: str | Path) -> Path:
    """Write :func:`staleness_figure` of ``hist`` to ``out_png``; return the path.

    ``hist`` is :meth:`StalenessHistogram.as_dict` or its JSON form (string keys): the
    accepted updates per staleness, as ``summary.json`` holds them.
    """
    return _save(staleness_figure(hist), out_png)


# ---------------------------------------------------------------------- live display


class LiveDisplay:
    """Progress of a simulated run on the terminal.

    On a terminal: a rich ``Live`` panel, started by the first :meth:`update` (or by
    ``with``) and redrawn on every update. Otherwise (CI, a pipe): one compact text line
    at most every ``min_interval_s`` seconds, and a last one on :meth:`close`, so a log
    is neither flooded nor silent.

    Parameters
    ----------
    target_versions
        Versions the run stops after.
    enabled
        ``False`` shows nothing at all (updates only record the state).
    console
        Where to draw; defaults to a console on stdout.
    min_interval_s
        Least seconds between two text lines when not on a terminal. 5 s: a run of a few
        minutes gets a few dozen lines.
    clock
        Monotonic clock in seconds (elapsed time when ``elapsed_s`` is not given);
        injected for tests.

    Raises
    ------
    ValueError
        If ``target_versions`` is not positive or ``min_interval_s`` is negative.
    """

    def __init__(
        self,
        *,
        target_versions: int,
        enabled: bool = True,
        console: Console | None = None,
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if target_versions <= 0:
            raise ValueError(f"target_versions: must be positive, got {target_versions}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s: must be >= 0, got {min_interval_s}")
        self.console = console if console is not None else Console(file=sys.stdout)
        self.target_versions = target_versions
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._start = clock()
        self._last_line: float | None = None
        self._live: Live | None = None
        self._closed = False
        self.version = 0
        self.cohorts: dict[str, int] = {}
        self.devices_active = 0
        self.staleness: float | None = None
        self.union_bpb: float | None = None
        self.speed: float | None = None
        self._elapsed_s: float | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds of the run: the last ``elapsed_s`` given, else since construction."""
        if self._elapsed_s is not None:
            return self._elapsed_s
        return self._clock() - self._start

    def __enter__(self) -> LiveDisplay:
        self._start_live()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start_live(self) -> None:
        if self.enabled and not self._closed and self._live is None and self.console.is_terminal:
            self._live = Live(
                self.panel(), console=self.console, refresh_per_second=4, transient=False
            )
            self._live.start()

    def close(self) -> None:
        """Stop the live panel (or print a last text line); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.update(self.panel())
            self._live.stop()
            self._live = None
        elif self.enabled and not self.console.is_terminal:
            self._print_line()

    def update(
        self,
        *,
        version: int | None = None,
        cohorts: Mapping[str, int] | None = None,
        devices_active: int | None = None,
        staleness: float | None = None,
        union_bpb: float | None = None,
        elapsed_s: float | None = None,
        speed: float | None = None,
    ) -> None:
        """Set the fields given (the others keep their values) and redraw.

        Parameters
        ----------
        version
            Latest committed version (versions committed so far).
        cohorts
            Open cohorts per stage name (e.g. ``{"TRAINING": 2, "FORMING": 1}``).
        devices_active
            Devices currently holding a task.
        staleness
            Mean staleness of the accepted updates so far.
        union_bpb
            Union held-out bits/byte of the latest scored version.
        elapsed_s
            Seconds since the run started; by default, since the display was made.
        speed
            The federation clock's rate (1: an idle machine's speed; 0.25: deadlines
            stretched fourfold because other processes hold the cores).
        """
        if version is not None:
            self.version = version
        if cohorts is not None:
            self.cohorts = dict(cohorts)
        if devices_active is not None:
            self.devices_active = devices_active
        if staleness is not None:
            self.staleness = staleness
        if union_bpb is not None:
            self.union_bpb = union_bpb
        if elapsed_s is not None:
            self._elapsed_s = elapsed_s
        if speed is not None:
            self.speed = speed
        if not self.enabled or self._closed:
            return
        self._start_live()
        if self._live is not None:
            self._live.update(self.panel())
            return
        now = self._clock()
        if self._last_line is None or now - self._last_line >= self.min_interval_s:
            self._print_line()

    def line(self) -> str:
        """Return the compact one-line form of the current state."""
        stages = " ".join(f"{k}={v}" for k, v in sorted(self.cohorts.items())) or "-"
        staleness = "-" if self.staleness is None else f"{self.staleness:.2f}"
        bpb = "-" if self.union_bpb is None else f"{self.union_bpb:.4f}"
        speed = "" if self.speed is None else f" | speed {self.speed:.0%}"
        return (
            f"[simulate] versions {self.version}/{self.target_versions} | cohorts {stages} | "
            f"devices {self.devices_active} | staleness {staleness} | bits/byte {bpb} | "
            f"{self.elapsed_s:.0f} s{speed}"
        )

    def _print_line(self) -> None:
        self._last_line = self._clock()
        self.console.print(self.line(), markup=False, highlight=False, soft_wrap=True)

    def panel(self) -> Group:
        """Return the rich renderable of the current state (what the live view shows)."""
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("versions", f"{self.version} / {self.target_versions}")
        stages = ", ".join(f"{k} {v}" for k, v in sorted(self.cohorts.items()))
        table.add_row("cohorts", stages or "-")
        table.add_row("active devices", str(self.devices_active))
        table.add_row("mean staleness", "-" if self.staleness is None else f"{self.staleness:.2f}")
        table.add_row(
            "held-out bits/byte", "-" if self.union_bpb is None else f"{self.union_bpb:.4f}"
        )
        table.add_row("elapsed", f"{self.elapsed_s:.1f} s")
        if self.speed is not None:
            table.add_row("machine speed", f"{self.speed:.0%} (deadlines stretched to match)")
        bar = ProgressBar(
            total=self.target_versions, completed=min(self.version, self.target_versions)
        )
        return Group(bar, table)
