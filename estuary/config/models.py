"""Typed configuration of every Estuary role.

One pydantic model per role (:class:`CoordinatorSettings`, :class:`WorkerSettings`,
:class:`EdgeSettings`, :class:`SimulationSettings`), each a tree of small section
models. Every field documents its unit and what 0 / ``None`` means; combinations that
cannot work are refused when the file is loaded, naming the field.

Values come from a TOML file and can be overridden by environment variables
``ESTUARY_<SECTION>__<FIELD>`` (double underscore between levels), e.g.
``ESTUARY_STATE__URL=redis://redis:6379/0``. See :mod:`estuary.config.loader`.

Every path field carries a :class:`~estuary.config.checks.UsesPath` marker saying how
the role uses it, so ``estuary config check`` can tell whether this machine has it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from estuary.config.checks import PathUse, UsesPath
from estuary.config.env import ENV_NESTED_DELIMITER, ENV_PREFIX
from estuary.config.secrets import SecretRef


class Section(BaseModel):
    """Base of every config section: unknown keys are errors (they are usually typos)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- shared sections


class StateSettings(Section):
    """Where durable state and blobs live."""

    url: str = Field(
        default="memory://",
        description=(
            "State store URL: 'memory://' (in-process, lost at exit; single-process simulation "
            "only), 'redis://host:port/db' or 'rediss://host:port/db' (TLS). Never put a "
            "password in the URL; use 'password'."
        ),
    )
    password: SecretRef | None = Field(
        default=None, description="Redis password, by environment variable or file. None: no AUTH."
    )
    tls_ca_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "Redis CA bundle")] = Field(
        default=None,
        description="CA bundle (PEM) to verify a rediss:// server. None: the system trust store.",
    )
    key_prefix: str = Field(
        default="estuary:",
        min_length=1,
        description="Prefix of every Redis key, so several federations can share one Redis.",
    )
    blob_dir: Annotated[Path, UsesPath(PathUse.WRITE_DIR, "blob directory")] = Field(
        default=Path("estuary-blobs"),
        description="Directory of the content-addressed blob store (artifacts, adapter versions).",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"memory", "redis", "rediss"}:
            raise ValueError(
                f"unsupported scheme {parts.scheme!r}; use memory://, redis:// or rediss://"
            )
        if parts.password:
            raise ValueError(
                "the URL contains a password; secrets are never inline: set "
                "state.password.env or state.password.file instead"
            )
        return value

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> StateSettings:
        if self.tls_ca_file is not None and not self.url.startswith("rediss://"):
            raise ValueError("tls_ca_file: set, but url is not rediss:// (TLS is not in use)")
        return self


class ModelSettings(Section):
    """Which base model the federation fine-tunes and the shape of its adapters."""

    preset: Literal["tiny", "small"] | None = Field(
        default=None,
        description=(
            "Built-in preset to create the base from. None: load 'path', or 'tiny' when "
            "'path' is not set either."
        ),
    )
    path: Annotated[Path | None, UsesPath(PathUse.READ_DIR, "model directory")] = Field(
        default=None,
        description="Local Hugging Face model directory. None: use 'preset'.",
    )
    r_max: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Largest adapter rank (rows of the shared frozen LoRA A), in ranks.",
    )
    adapter_seed: int = Field(
        default=0, ge=0, description="Seed that derives the shared frozen LoRA A matrices."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if self.preset is not None and self.path is not None:
            raise ValueError("preset: set preset or path, not both")
        if self.preset is None and self.path is None:
            # TOML has no null, so "path only" must be expressible by leaving preset out.
            self.preset = "tiny"
        return self


class DeviceClass(Section):
    """A class of edge devices that train the same adapter rank at a similar speed."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", description="Class identifier.")
    rank: int = Field(ge=1, le=256, description="Adapter rank r this class trains (≤ r_max).")
    expected_task_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Typical seconds for one local training task; the pacer's speed estimate. It also "
            "spaces the retries of devices waiting for a slot: set too high, slots stay idle "
            "while devices wait; too low, waiting devices ask more often than slots free."
        ),
    )


def pacer_cap(buffer_size: int, target_staleness: float) -> int:
    """Devices the pacer lets train at once: ``ceil(K × target_staleness)``, at least 1."""
    return max(1, math.ceil(buffer_size * target_staleness))


def _check_pacer_fits_cohort(
    aggregation: AggregationSettings, pacing: PacingSettings, cohort: CohortSettings
) -> None:
    """Refuse a pacer cap below ``cohort.min_size``.

    The pacer lets at most ``ceil(K × target_staleness)`` devices train at once and a
    cohort is sealed only once ``min_size`` of them have trained: below it every cohort
    fills across several rounds of training, its first members' updates going stale.
    """
    k, target = aggregation.buffer_size, pacing.target_staleness
    cap = pacer_cap(k, target)
    if cap < cohort.min_size:
        raise ValueError(
            f"pacing.target_staleness: aggregation.buffer_size × target_staleness = "
            f"{k} × {target:g} lets {cap} devices train at once, fewer than "
            f"cohort.min_size={cohort.min_size}, so every cohort could only fill across "
            "several rounds of training, its first members' updates going stale; "
            f"raise target_staleness to at least {cohort.min_size / k:g} or lower "
            "cohort.min_size"
        )


def _check_device_classes(classes: list[DeviceClass], r_max: int) -> None:
    names = [c.name for c in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"device_classes: duplicate class names {duplicates}")
    too_big = [c.name for c in classes if c.rank > r_max]
    if too_big:
        raise ValueError(f"device_classes: rank above model.r_max={r_max} for {too_big}")


class AggregationSettings(Section):
    """Buffered asynchronous, staleness-aware aggregation (FedBuff)."""

    buffer_size: int = Field(
        default=8, ge=1, description="K: client updates buffered before a new version is made."
    )
    server_lr: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="η_server: B ← B + η · Σ d·wΔB / N (or / K, step_divisor); dimensionless.",
    )
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        default="polynomial",
        description=(
            "Weight f(s) of an update s versions stale: constant 1; polynomial (1+s)^-a; "
            "hinge 1 for s ≤ b, else 1/(a·(s−b)+1)."
        ),
    )
    staleness_a: float = Field(
        default=0.5, ge=0, description="Exponent (polynomial) or slope (hinge) a."
    )
    staleness_b: int = Field(default=4, ge=0, description="Hinge knee b, in versions.")
    max_staleness: int = Field(
        default=16,
        ge=0,
        description="Updates more than this many versions stale are refused. 0: only current.",
    )
    step_divisor: Literal["updates", "buffer"] = Field(
        default="updates",
        description=(
            "What a version's discounted sum is divided by: 'updates', the N >= K updates "
            "it holds (one mean step per version); 'buffer', K (every update moves B as "
            "much however cohorts group into versions, but a version of 2K updates takes a "
            "double step: in estuary simulate, K = 8 with 10 % dropouts, the held-out score "
            "swung by up to 0.24 bits/byte and the guard rolled back twice)."
        ),
    )
    max_step_norm: float = Field(
        default=5.0,
        ge=0,
        description=(
            "Largest L2 norm of one version's step B_{v+1} − B_v, all adapter tensors "
            "together (adapter units); a larger step is scaled down to it. Healthy steps of "
            "the tiny preset (10 local Adam steps at lr 1e-2, K = 4) are ~1-4; half the "
            "default update clip (cohort.clip_norm 10) leaves them alone and stops a run of "
            "stale, aligned updates from moving B far in one version. 0: unbounded."
        ),
    )
    guard: bool = Field(
        default=True,
        description=(
            "Regression guard: a committed version whose held-out score (eval_bpb, written "
            "by the evaluate job) is more than guard_tolerance_bpb above the best version "
            "so far is rolled back: the next version repeats the best one's adapter, and "
            "work trained on the versions after the best is dropped. False: no guard."
        ),
    )
    guard_tolerance_bpb: float = Field(
        default=0.1,
        ge=0,
        description=(
            "Bits/byte a version may score above the best so far before the guard rolls "
            "back. 0.1 is well above the version-to-version change of a healthy run "
            "(~0.01-0.05 on the tiny preset) and below the 0.17 the diverging run of "
            "issue 15 lost within four versions."
        ),
    )
    lease_ttl_s: float = Field(
        default=15.0,
        gt=0,
        description=(
            "Seconds the replica that commits versions holds its lease without renewing it; "
            "after a crash of that replica, commits pause at most this long."
        ),
    )


class PacingSettings(Section):
    """How many devices train at once, and how long idle devices wait."""

    target_staleness: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Expected staleness to aim for, in versions; concurrency ≈ K × this (at "
            "least cohort.min_size, or no cohort could be sealed)."
        ),
    )
    retry_after_min_s: float = Field(
        default=1.0, gt=0, description="Shortest retry-after told to a device, in seconds."
    )
    retry_after_max_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Longest retry-after told to a device, in seconds. A device deferred for a slot "
            "is put behind those already waiting (one turn of the queue), up to this."
        ),
    )
    one_task_per_version: bool = Field(
        default=True,
        description=(
            "A device whose last task trained on the newest version waits for the next "
            "one while the buffered updates and those under way fill it (a second update "
            "from the same weights on the same data arrives stale and over-weights fast "
            "devices). When the work under way cannot make the next version it trains "
            "again. False: a device may train again on the version it just trained on."
        ),
    )

    @model_validator(mode="after")
    def _ordered(self) -> PacingSettings:
        if self.retry_after_min_s > self.retry_after_max_s:
            raise ValueError("retry_after_min_s: must not exceed retry_after_max_s")
        return self


class CohortSettings(Section):
    """Secure-aggregation cohorts: size, threshold and numerics."""

    min_size: int = Field(
        default=4,
        ge=3,
        description=(
            "Smallest cohort, in devices. At least 3: the sum of one or two inputs reveals "
            "them (secure aggregation refuses smaller sessions)."
        ),
    )
    max_size: int = Field(default=32, ge=3, description="Largest cohort, in devices.")
    active_adversary: bool = Field(
        default=True,
        description=(
            "Secure aggregation against a coordinator that deviates from the protocol: "
            "members sign their keys and the survivor set with their enrolled identity keys "
            "(carried in each task), so a coordinator showing different survivor sets to "
            "different members gets no unmasking share from them. False: passive mode, one "
            "stage and one signature per member fewer."
        ),
    )
    threshold_fraction: float = Field(
        default=0.67,
        gt=0.5,
        le=1.0,
        description=(
            "t / n: survivors needed to unmask. Above 1/2 so two disjoint halves can never "
            "both reconstruct."
        ),
    )
    deadline_s: float = Field(
        default=600.0, gt=0, description="Seconds from cohort start to the upload deadline."
    )
    neighbours: int | None = Field(
        default=None,
        ge=2,
        description="SecAgg+ neighbourhood size k. None: complete graph (plain SecAgg).",
    )
    formation_s: float = Field(
        default=5.0,
        ge=0,
        description=(
            "Seconds a cohort that has min_size trained devices stays open for more before "
            "it is sealed (it is sealed at once when it reaches max_size, while no device "
            "trains and so no one could join, or once a version newer than one of its "
            "members trained on is committed, since waiting would only make the updates "
            "staler)."
        ),
    )
    silence_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "A member training for its cohort that has sent nothing (no heartbeat, no "
            "message) for this many seconds is taken as gone; once every member still "
            "awaited is gone, the upload stage closes without waiting for deadline_s. "
            "Edge agents heartbeat every 5 s while training."
        ),
    )
    key_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds each key-exchange stage, the consistency check (active_adversary) "
            "and the unmasking stage wait for members; members silent that long are dropped."
        ),
    )
    bits: int = Field(
        default=32, ge=8, le=32, description="b: masked sums live in Z_(2^b), in bits (≤ 32)."
    )
    clip_norm: float = Field(
        default=10.0,
        gt=0,
        description=(
            "L2 clip of each update ΔB before masking (adapter units); the gradient clip of "
            "local steps is training.grad_clip_norm. Ten local Adam steps "
            "at lr 1e-2 give norms of ~5-10 on the tiny preset; a clip far below the "
            "typical norm shrinks every update and slows learning."
        ),
    )

    @model_validator(mode="after")
    def _sizes(self) -> CohortSettings:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size: {self.min_size} exceeds max_size={self.max_size}")
        return self


class RetentionSettings(Section):
    """What the coordinator keeps in the state store and blob store, and for how long.

    A federation runs for months; without these rules every version, cohort and job
    would leave records behind for ever (about 260 KB of cohort log per cohort).
    """

    keep_versions: int = Field(
        default=32,
        ge=1,
        description=(
            "Newest versions whose records, job results and blobs are kept, besides every "
            "version within aggregation.max_staleness of the head and every version an "
            "unfinished cohort trains on."
        ),
    )
    grace_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Seconds a finished cohort's record, log (with its masked uploads) and "
            "accepted-sum marker are kept after it was folded into a committed version "
            "or aborted: longer than any replica's tick could still be reading its log."
        ),
    )
    interval_s: float = Field(
        default=60.0,
        ge=0,
        description="Seconds between retention sweeps of one replica. 0: sweep every tick.",
    )
    blob_grace_s: float = Field(
        default=3600.0,
        gt=0,
        description=(
            "Seconds an unreferenced blob is kept after it was written, so a job still "
            "writing its outputs (not yet recorded) never loses them."
        ),
    )
    worker_gone_s: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="Seconds after its last heartbeat a worker group's record is removed.",
    )


class TrainingSettings(Section):
    """Local training that a task asks of a device."""

    local_steps: int = Field(default=20, ge=1, description="Optimizer steps per task.")
    learning_rate: float = Field(
        default=3e-3, gt=0, description="Local Adam learning rate of a full-rank (r_max) device."
    )
    rank_lr_power: float = Field(
        default=1.0,
        ge=0,
        le=2,
        description=(
            "A rank-r device trains at learning_rate · (r_max / r)^rank_lr_power: fewer "
            "trained columns, larger steps, so mixed-rank fleets learn nearly as fast per "
            "version as full-rank ones. 0: every rank at learning_rate."
        ),
    )
    column_rule: Literal["rotating", "nested"] = Field(
        default="rotating",
        description=(
            "Which r of the r_max columns of B a rank-r device trains. 'rotating': a block "
            "of r that moves on with the version and the device's index in its cohort, so "
            "every device's data reaches every column over time (members of one cohort "
            "train disjoint blocks); 'nested': always the first r, so columns past the "
            "lowest rank learn only from the higher-rank devices. Full-rank devices train "
            "every column either way. bench/learning.py, ranks 4/8/16: rotating closes "
            "~80 % of the local-only → centralized gap at 64 rounds, nested ~55 %."
        ),
    )
    warmup_steps: int = Field(
        default=5,
        ge=0,
        description=(
            "Linear learning-rate warm-up over a task's first steps: step k (from 0) runs "
            "at the device's rate · min(1, (k + 1) / w), w = min(warmup_steps, "
            "local_steps), so a task always ends at its full rate. Every task starts a "
            "fresh Adam, whose first steps move every coordinate by about the rate "
            "(sign-like); a warm-up keeps short tasks' updates from being mostly that "
            "noise (bench/learning.py, 5-step tasks: mixed ranks 4/8/16 at 64 rounds "
            "2.624 bits/byte with 5 warm-up steps, 2.651 without). 0: no warm-up."
        ),
    )
    batch_size: int = Field(default=8, ge=1, description="Sequences per step.")
    seq_len: int = Field(default=128, ge=8, description="Tokens per sequence.")
    grad_clip_norm: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Global L2 clip of the gradient at every local step (gradient units). Not the "
            "update clip: that is cohort.clip_norm, applied once to ΔB before masking. "
            "10.0 keeps the value both had when they were one setting."
        ),
    )


class ServerTLSSettings(Section):
    """TLS of a gRPC server."""

    cert_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "server certificate")] = Field(
        default=None, description="Server certificate chain (PEM)."
    )
    key_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "server private key")] = Field(
        default=None, description="Server private key (PEM)."
    )
    client_ca_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "client CA")] = Field(
        default=None,
        description="CA (PEM) that client certificates must chain to. None: no client certs.",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="Serve without TLS. Only for loopback tests and simulation.",
    )
    device_ca_cert_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "device CA")] = Field(
        default=None,
        description=(
            "Device CA certificate (PEM, `estuary pki init`'s device-ca.pem). Set with "
            "device_ca_key_file: devices then get client certificates by CSR at "
            "enrolment, and every signed request must arrive over mutual TLS with a "
            "certificate naming the device that signed it. None: no device certificates."
        ),
    )
    device_ca_key_file: Annotated[
        Path | None, UsesPath(PathUse.READ_FILE, "device CA private key")
    ] = Field(default=None, description="Device CA private key (PEM), signs device CSRs.")
    device_cert_lifetime_s: float = Field(
        default=7 * 86_400.0,
        ge=60.0,
        description=(
            "Lifetime of an issued device certificate, seconds (default 7 days; at least "
            "60). Agents renew with one third left, so keep it well above how long a device "
            "may stay offline."
        ),
    )
    enrol_listen: str | None = Field(
        default=None,
        pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$",
        description=(
            "host:port of a second port, TLS without client certificates, where devices "
            "that have no certificate yet enrol (it serves the same methods, but only "
            "Enroll succeeds there once device certificates are required). None: no such "
            "port."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServerTLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        if (self.device_ca_cert_file is None) != (self.device_ca_key_file is None):
            raise ValueError("set both device_ca_cert_file and device_ca_key_file, or neither")
        if self.device_ca_cert_file is not None and self.client_ca_file is None:
            raise ValueError(
                "client_ca_file: needed with device_ca_cert_file (the device CA certificate, "
                "or a bundle with the old and new device CAs while rotating)"
            )
        if self.enrol_listen is not None and self.cert_file is None:
            raise ValueError("enrol_listen: needs cert_file and key_file (it serves TLS)")
        if self.cert_file is None and not self.allow_plaintext:
            raise ValueError(
                "cert_file: not set; set cert_file and key_file, or allow_plaintext = true"
            )
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file: needs cert_file and key_file (mTLS runs over TLS)")
        return self


class ServerSettings(Section):
    """Where the coordinator listens."""

    listen: str = Field(
        default="0.0.0.0:50051",
        pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$",
        description="host:port (IPv6 as [addr]:port) of the gRPC server.",
    )
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus /metrics HTTP port. 0: disabled."
    )
    health_listen: str | None = Field(
        default=None,
        pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$",
        description=(
            "host:port of a plaintext port that serves grpc.health.v1 only (no edge "
            "methods), for probes that cannot speak TLS such as Kubernetes' native gRPC "
            "probes. None: health is served on the main port only."
        ),
    )
    device_requests_per_s: float = Field(
        default=5.0, gt=0, description="Sustained per-device request rate limit, per second."
    )
    device_burst: int = Field(
        default=20, ge=1, description="Requests a device may burst above that rate."
    )
    handler_threads: int = Field(
        default=32,
        ge=1,
        description=(
            "Threads that run the requests' blocking store and blob calls (each holds at most "
            "one Redis connection). Store round trips take about a millisecond, so 32 serve "
            "thousands of calls per second while bounding how many can hang on a slow store."
        ),
    )
    handler_queue: int = Field(
        default=256,
        ge=0,
        description=(
            "Store calls that may wait for a free handler thread; one more and the request "
            "is refused UNAVAILABLE ('overloaded') at once instead of piling up. 0: refuse "
            "as soon as every thread is busy. At 32 threads and ~1 ms a call, 256 waiting "
            "calls are ~8 ms of work: only a stalled store fills the queue."
        ),
    )
    store_probe_timeout_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description=(
            "Seconds the health watcher waits for the store's PING (one try, on its own "
            "connection and thread). Health turns NOT_SERVING, and requests are refused "
            "UNAVAILABLE, at most one watch period (1 s) plus this after the store stops "
            "answering. A PING answers in well under a millisecond; keep this above the "
            "longest single store command (the write of the largest masked upload)."
        ),
    )
    upload_max_chunks: int = Field(
        default=4096,
        ge=1,
        description=(
            "Most data chunks one UploadMasked stream may carry; more are refused "
            "RESOURCE_EXHAUSTED. 4096 carries the largest upload (256 MiB) in 64 KiB chunks; "
            "edge agents send 1 MiB chunks."
        ),
    )
    upload_idle_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds an UploadMasked stream may go without a message before it is cut "
            "(DEADLINE_EXCEEDED). An agent's 1 MiB chunk crosses a 200 kbit/s uplink in ~42 s."
        ),
    )
    upload_max_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Seconds one UploadMasked stream may last in all before it is cut "
            "(DEADLINE_EXCEEDED): the default cohort.deadline_s, after which the upload "
            "could not count anyway."
        ),
    )

    @model_validator(mode="after")
    def _upload_times(self) -> ServerSettings:
        if self.upload_idle_s > self.upload_max_s:
            raise ValueError(
                f"upload_idle_s: {self.upload_idle_s} exceeds upload_max_s={self.upload_max_s}"
            )
        return self


# --------------------------------------------------------------------------- roles


class RoleSettings(BaseSettings):
    """Common behaviour of the per-role settings: strict keys, ``ESTUARY_*`` overrides."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls,
        settings_cls: type[BaseSettings],
        init_settings: object,
        env_settings: object,
        dotenv_settings: object,
        file_secret_settings: object,
    ) -> tuple[object, ...]:
        """Return the sources in priority order: environment, then the TOML file's values."""
        # The loader passes the TOML file's content as init kwargs; environment overrides
        # must win over the file, so env comes first. No .env files: deployments already
        # have a way to set environment variables, and a stray .env would be a surprise.
        return (env_settings, init_settings)


def _default_classes() -> list[DeviceClass]:
    return [
        DeviceClass(name="phone", rank=4, expected_task_s=120.0),
        DeviceClass(name="laptop", rank=16, expected_task_s=40.0),
    ]


class CoordinatorSettings(RoleSettings):
    """Settings of ``estuary coordinator serve``."""

    node_id: str = Field(
        default_factory=lambda: os.environ.get("HOSTNAME", "coordinator"),
        min_length=1,
        description="Name of this replica in logs, leases and metrics.",
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    tls: ServerTLSSettings = Field(default_factory=ServerTLSSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    device_classes: list[DeviceClass] = Field(
        default_factory=_default_classes,
        min_length=1,
        description="Device classes the federation admits.",
    )
    aggregation: AggregationSettings = Field(default_factory=AggregationSettings)
    pacing: PacingSettings = Field(default_factory=PacingSettings)
    cohort: CohortSettings = Field(default_factory=CohortSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    workers: Literal["local", "groups"] = Field(
        default="local",
        description=(
            "Who runs cloud jobs (evaluate, build_artifacts): 'local' starts a worker in this "
            "process; 'groups' leaves them to `estuary worker run` groups on the same store."
        ),
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> CoordinatorSettings:
        _check_device_classes(self.device_classes, self.model.r_max)
        _check_pacer_fits_cohort(self.aggregation, self.pacing, self.cohort)
        return self


class WorkerSettings(RoleSettings):
    """Settings of ``estuary worker run``: one worker group."""

    group: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Worker group name (the job stream's consumer name).",
    )
    state: StateSettings = Field(default_factory=StateSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    stages: int = Field(
        default=1, ge=1, description="Pipeline stages (= processes) the model is split into."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="torch.distributed backend; auto: nccl with CUDA, else gloo."
    )
    micro_batches: int = Field(default=4, ge=1, description="Pipeline micro-batches per batch.")
    heartbeat_s: float = Field(
        default=5.0, gt=0, description="Seconds between heartbeats written to the store."
    )
    reclaim_idle_s: float = Field(
        default=120.0,
        gt=0,
        description="A job pending this many seconds on a silent group is taken over.",
    )
    process_group_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="torch.distributed collective timeout: a dead peer fails the group.",
    )

    @model_validator(mode="after")
    def _heartbeat_vs_reclaim(self) -> WorkerSettings:
        if self.reclaim_idle_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"reclaim_idle_s: {self.reclaim_idle_s} must exceed 2 × heartbeat_s="
                f"{self.heartbeat_s}, or live groups would have their jobs taken"
            )
        return self


class EdgeTLSSettings(Section):
    """TLS of the edge's connection to the coordinator."""

    ca_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "coordinator CA")] = Field(
        default=None, description="CA (PEM) of the coordinator. None: the system trust store."
    )
    cert_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "client certificate")] = Field(
        default=None, description="Client certificate (PEM), mTLS."
    )
    key_file: Annotated[Path | None, UsesPath(PathUse.READ_FILE, "client private key")] = Field(
        default=None, description="Client private key (PEM), mTLS."
    )
    allow_plaintext: bool = Field(
        default=False, description="Connect without TLS. Only for loopback and simulation."
    )

    @model_validator(mode="after")
    def _pair(self) -> EdgeTLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        return self


class EdgeSettings(RoleSettings):
    """Settings of ``estuary edge``: one device."""

    coordinator: str = Field(
        default="127.0.0.1:50051",
        pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$",
        description="host:port of the coordinator (or its load balancer).",
    )
    tls: EdgeTLSSettings = Field(default_factory=EdgeTLSSettings)
    enrol_coordinator: str | None = Field(
        default=None,
        pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$",
        description=(
            "host:port where this device enrols: the coordinator's tls.enrol_listen port "
            "when it requires device certificates. None: the coordinator address. The "
            "client certificate it gets (state_dir/tls-cert.pem, key tls-key.pem, made "
            "here) is used for every later connection unless tls.cert_file is set."
        ),
    )
    state_dir: Annotated[Path, UsesPath(PathUse.WRITE_DIR, "state directory")] = Field(
        default=Path("estuary-edge"),
        description="Directory for keys, progress and downloaded artifacts.",
    )
    data_dir: Annotated[Path | None, UsesPath(PathUse.READ_FILE_OR_DIR, "training data")] = Field(
        default=None,
        description=(
            "Private training data (folder of text files, binary and hidden files skipped, "
            "or a JSONL file). None: no training."
        ),
    )
    device_class: str = Field(default="laptop", description="Device class to enrol as.")
    threads: int = Field(
        default=2, ge=0, description="Torch/onnxruntime threads. 0: one per available core."
    )
    enrolment_token: SecretRef | None = Field(
        default=None,
        description=(
            "One-time enrolment token, by environment variable (outside the ESTUARY_ "
            "prefix) or file. None: already enrolled."
        ),
    )
    max_backoff_s: float = Field(
        default=300.0, gt=0, description="Longest wait between reconnection attempts, seconds."
    )


def _sim_classes() -> list[DeviceClass]:
    # Simulated devices share one machine, so a task takes seconds, not minutes; the
    # classes differ in adapter rank and in the task time the pacer expects.
    return [
        DeviceClass(name="phone", rank=4, expected_task_s=8.0),
        DeviceClass(name="laptop", rank=16, expected_task_s=4.0),
    ]


def _sim_cohort() -> CohortSettings:
    return CohortSettings(
        min_size=4,
        max_size=8,
        deadline_s=60.0,
        key_timeout_s=15.0,
        formation_s=1.0,
        silence_s=15.0,
        clip_norm=10.0,
    )


def _sim_training() -> TrainingSettings:
    return TrainingSettings(local_steps=10, learning_rate=1e-2, batch_size=8, seq_len=128)


class SimulationSettings(RoleSettings):
    """Settings of ``estuary simulate``: a whole federation on one machine."""

    clients: int = Field(default=16, ge=2, description="Simulated edge devices.")
    device_classes: list[DeviceClass] = Field(
        default_factory=_sim_classes,
        min_length=1,
        description="Classes clients are split into (round-robin).",
    )
    versions: int = Field(default=6, ge=1, description="Stop after this many new versions.")
    dropout: float = Field(
        default=0.1, ge=0, lt=1, description="Probability a client vanishes during a task."
    )
    seed: int = Field(default=0, ge=0, description="Seed of every random choice in the run.")
    scarce: bool = Field(
        default=True, description="Cap each client's training bytes (the scarce-data regime)."
    )
    baselines: bool = Field(
        default=False, description="Also train local-only and centralized baselines."
    )
    out_dir: Annotated[Path, UsesPath(PathUse.WRITE_DIR, "run output directory")] = Field(
        default=Path("runs"), description="Where runs/<id>/ is written."
    )
    state: StateSettings = Field(default_factory=StateSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    aggregation: AggregationSettings = Field(default_factory=AggregationSettings)
    # Every simulated device trains at once: one task per version (the default) keeps
    # each version built from every client once, on the newest version (as a synchronous
    # round is).
    pacing: PacingSettings = Field(default_factory=PacingSettings)
    cohort: CohortSettings = Field(default_factory=_sim_cohort)
    training: TrainingSettings = Field(default_factory=_sim_training)
    time_limit_s: float = Field(
        default=900.0,
        gt=0,
        description="Stop the federation after this many seconds even if short of versions.",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> SimulationSettings:
        _check_device_classes(self.device_classes, self.model.r_max)
        _check_pacer_fits_cohort(self.aggregation, self.pacing, self.cohort)
        # Clients are split round-robin over the classes and cohorts never mix classes, so
        # the smallest class must be able to fill a cohort on its own.
        smallest = self.clients // len(self.device_classes)
        if self.cohort.min_size > smallest:
            name = self.device_classes[-1].name
            raise ValueError(
                f"cohort.min_size: {self.cohort.min_size} exceeds the {smallest} clients of "
                f"class {name!r} ({self.clients} clients split round-robin over "
                f"{len(self.device_classes)} classes), so its cohorts could never form"
            )
        return self


#: Role name (as typed on the command line) → settings class.
ROLES: dict[str, type[RoleSettings]] = {
    "coordinator": CoordinatorSettings,
    "worker": WorkerSettings,
    "edge": EdgeSettings,
    "simulation": SimulationSettings,
}
