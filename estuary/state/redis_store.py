"""Redis-backed state store for deployments with several coordinator replicas.

Every multi-step operation that must be atomic (compare-and-set, fenced
writes, lease acquisition) is one Lua script, so it runs without interleaving
on the server. Keys live under a configurable prefix (default ``estuary:``):

========================  ==========  =========================================
key                       type        holds
========================  ==========  =========================================
``<p>r:<key>``            hash        record: ``v`` value, ``n`` version
``<p>lease:<name>``       hash + TTL  current lease: holder, token, expiry (ms)
``<p>lease-token:<name>`` string      newest fencing token ever issued (no TTL)
``<p>z:<name>``           zset        sorted set
``<p>s:<stream>``         stream      job stream with its consumer groups
========================  ==========  =========================================

The fencing-token counter is a separate key without a TTL so that tokens keep
growing after a lease expires; with ``appendonly yes`` and ``appendfsync
always`` it also survives a restart, which is what makes fencing safe.

Failures to reach Redis are retried a few times and then raised as
:class:`~estuary.state.errors.StoreUnavailable`. A write whose request may
already have reached the server is *not* retried (that could apply it twice);
it is reported at once with ``outcome_unknown=True``. :meth:`RedisStore.probe` is the
exception, for health watchers: one PING, never retried, on a dedicated connection whose
every wait is bounded by the probe's own short timeout.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import redis
from redis.backoff import NoBackoff
from redis.connection import Connection, SSLConnection
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from estuary.state.base import (
    Footprint,
    Job,
    Lease,
    PendingJob,
    Record,
    Store,
    check_count,
    check_name,
    check_seconds,
)
from estuary.state.errors import (
    FencingError,
    LeaseLost,
    StoreError,
    StoreUnavailable,
    VersionConflict,
)

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Connecting to Redis on loopback or a LAN takes well under 10 ms; 2 s absorbs
# a loaded host or a cross-zone hop while still noticing a dead address fast.
DEFAULT_CONNECT_TIMEOUT_S = 2.0
# Every command we send is O(small) on the server (blocking stream reads are
# cut into slices well below this), so a reply slower than 5 s means the server
# is hung or the network is partitioned, not that it is busy.
DEFAULT_SOCKET_TIMEOUT_S = 5.0
# Three attempts ride out the common transient failures (a restart's brief
# connection refusal, the AOF "LOADING" window, a failover blip) while the
# worst case stays bounded: attempts × (connect or socket timeout) + backoff.
DEFAULT_ATTEMPTS = 3
# First retry delay; doubled per retry (0.2 s, 0.4 s): long enough for a
# restarting server to open its port, short enough not to stall requests.
DEFAULT_BACKOFF_S = 0.2
# Batch size for SCAN / XPENDING / HMGET paging: big enough to need few round
# trips, small enough that one reply never blocks the server noticeably.
_PAGE = 500

_GLOB_SPECIAL = frozenset("*?[]\\")


class _Conn(Protocol):
    """The slice of redis-py's (untyped) ``Connection`` this module uses."""

    def send_command(self, *args: Any) -> None: ...
    def send_packed_command(self, command: list[bytes]) -> None: ...
    def pack_commands(self, commands: Sequence[Sequence[Any]]) -> list[bytes]: ...
    def read_response(self) -> Any: ...
    def disconnect(self) -> None: ...


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        # SHA-1 here is Redis's script cache id, not a security primitive.
        return cls(source=source, sha=hashlib.sha1(source.encode()).hexdigest())


# KEYS[1] record. ARGV[1] value. Returns the new version.
_PUT = _Script.of(
    """
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'v', ARGV[1])
return n
"""
)

# KEYS[1] record. ARGV[1] value, ARGV[2] expected version (0: must not exist).
# Returns {1, new version} or {0, actual version}.
_CAS = _Script.of(
    """
local cur = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if cur ~= tonumber(ARGV[2]) then return {0, cur} end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', cur + 1)
return {1, cur + 1}
"""
)

# KEYS[1] record. ARGV[1] value. Returns 1 if inserted, 0 if it existed.
_INSERT = _Script.of(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', 1)
return 1
"""
)

# KEYS[1] record. ARGV[1] expected version. Returns {1, v} deleted or {0, actual}.
_DELETE_IF = _Script.of(
    """
local cur = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
redis.call('DEL', KEYS[1])
return {1, cur}
"""
)

# KEYS[1] record, KEYS[2] lease, KEYS[3] token counter.
# ARGV[1] value, ARGV[2] token, ARGV[3] expected version (-1: unconditional).
# Returns {1, new version}, {0, actual version} (version conflict),
# {-1, newest token} (superseded) or {-2, 0} (expired or released).
_FENCED_WRITE = _Script.of(
    """
local tok = tonumber(ARGV[2])
local newest = tonumber(redis.call('GET', KEYS[3]) or '0')
if tok < newest then return {-1, newest} end
local held = redis.call('HGET', KEYS[2], 'token')
if not held or tonumber(held) ~= tok then return {-2, 0} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
local expected = tonumber(ARGV[3])
if expected >= 0 and cur ~= expected then return {0, cur} end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'n', cur + 1)
return {1, cur + 1}
"""
)

# Server time in ms; scripts are replicated by effects (Redis ≥ 7), so TIME is
# allowed before writes.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] lease, KEYS[2] token counter. ARGV[1] holder, ARGV[2] ttl ms.
# Returns nil if held, else {token, expiry ms}.
_ACQUIRE = _Script.of(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
"""
    + _NOW_MS
    + """
local exp = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token, 'exp', exp)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {token, exp}
"""
)

# KEYS[1] lease. ARGV[1] token, ARGV[2] ttl ms. Returns nil if lost, else expiry ms.
_RENEW = _Script.of(
    """
local held = redis.call('HGET', KEYS[1], 'token')
if not held or tonumber(held) ~= tonumber(ARGV[1]) then return false end
"""
    + _NOW_MS
    + """
local exp = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'exp', exp)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return exp
"""
)

# KEYS[1] lease. ARGV[1] token. Deletes the lease only if it is still this token.
_RELEASE = _Script.of(
    """
local held = redis.call('HGET', KEYS[1], 'token')
if held and tonumber(held) == tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) end
return 0
"""
)


def _escape_glob(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _pairs(flat: Sequence[Any]) -> list[tuple[str, float]]:
    return [(_text(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]


def _fields(flat: Sequence[Any]) -> dict[str, bytes]:
    return {_text(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}


def _record(reply: Sequence[Any]) -> Record | None:
    """Return the record of an ``HMGET <record> v n`` reply, or None if there is none."""
    if reply[1] is None:
        return None
    return Record(value=bytes(reply[0]), version=int(reply[1]))


def _ttl_ms(ttl_s: float) -> int:
    # Redis expiry resolution is 1 ms; round up so a tiny TTL is never 0 ("no expiry").
    return max(1, math.ceil(ttl_s * 1000))


class RedisStore(Store):
    """:class:`~estuary.state.base.Store` on a Redis server (≥ 6.2), via redis-py.

    Parameters
    ----------
    host
        Server host name or address.
    port
        Server TCP port.
    db
        Database number.
    username, password
        ACL credentials, or ``None``. The password is never logged or shown in
        :attr:`url`.
    tls
        Connect with TLS (``rediss://``).
    ssl_ca_certs, ssl_certfile, ssl_keyfile
        CA bundle to verify the server, and client certificate and key for
        mutual TLS; only with ``tls``.
    ssl_check_hostname
        Verify that the server certificate names ``host``; only with ``tls``.
    prefix
        Prepended to every key, so several deployments (or test cases) can
        share one database without seeing each other's data.
    socket_connect_timeout_s, socket_timeout_s
        Connect and per-reply timeouts; see the module constants for why the
        defaults are what they are.
    attempts
        How many times an operation is tried before :class:`StoreUnavailable`.
    backoff_s
        Delay before the first retry, doubled for each further one.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_check_hostname: bool = True,
        prefix: str = "estuary:",
        socket_connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        check_name(host, parameter="host")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an int in 1..65535, got {port!r}")
        check_count(db, parameter="db", minimum=0)
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {type(prefix).__name__}")
        self._connect_timeout = check_seconds(
            socket_connect_timeout_s, parameter="socket_connect_timeout_s", allow_zero=False
        )
        self._socket_timeout = check_seconds(
            socket_timeout_s, parameter="socket_timeout_s", allow_zero=False
        )
        self._attempts = check_count(attempts, parameter="attempts")
        self._backoff = check_seconds(backoff_s, parameter="backoff_s", allow_zero=True)
        if not tls and (ssl_ca_certs or ssl_certfile or ssl_keyfile):
            raise ValueError("ssl_ca_certs, ssl_certfile and ssl_keyfile need tls=True")
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile must be given together")
        self._prefix = prefix
        scheme = "rediss" if tls else "redis"
        auth = ""
        if username or password:
            auth = f"{username or ''}{':***' if password else ''}@"
        self._url = f"{scheme}://{auth}{host}:{port}/{db}"
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "db": db,
            "username": username,
            "password": password,
            "socket_connect_timeout": self._connect_timeout,
            "socket_timeout": self._socket_timeout,
            # redis-py's own retries are disabled: this class's loop is the one
            # bounded, logged retry policy, and it knows which writes are safe
            # to repeat.
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
        }
        if tls:
            kwargs.update(
                connection_class=SSLConnection,
                ssl_ca_certs=ssl_ca_certs,
                ssl_certfile=ssl_certfile,
                ssl_keyfile=ssl_keyfile,
                ssl_check_hostname=ssl_check_hostname,
                ssl_cert_reqs="required",
            )
        else:
            kwargs["connection_class"] = Connection
        self._pool = redis.ConnectionPool(**kwargs)
        # The health probe's own connection, outside the pool: a probe never waits behind
        # requests and carries its own short timeout (see _probe).
        self._probe_lock = threading.Lock()
        self._probe_conn: _Conn | None = None
        self._probe_timeout: float | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def url(self) -> str:
        """The server URL with the password replaced by ``***``."""
        return self._url

    @property
    def prefix(self) -> str:
        """The prefix under which every key of this store lives."""
        return self._prefix

    def _run(self, op: str, fn: Callable[[_Conn], T], *, idempotent: bool) -> T:
        """Run ``fn`` on a pooled connection with the bounded retry policy.

        A failure to *obtain* a connection (refused, connect timeout) or a
        ``LOADING`` reply means the command was not applied, so it is retried
        for every operation. A failure after the command was sent is retried
        only when ``idempotent``; otherwise it is raised at once as an
        outcome-unknown :class:`StoreUnavailable`.
        """
        failure: Exception | None = None
        for attempt in range(1, self._attempts + 1):
            sent = False
            try:
                raw = self._pool.get_connection()
            except (AuthenticationError, AuthorizationError) as exc:
                raise StoreError(f"{self._url}: {op}: authentication refused: {exc}") from exc
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                failure = exc
            else:
                conn = cast(_Conn, raw)
                try:
                    return fn(conn)
                except BusyLoadingError as exc:
                    # The server refused the command while loading its data set;
                    # drop the connection since pipelined replies may be unread.
                    conn.disconnect()
                    failure = exc
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    conn.disconnect()
                    failure, sent = exc, True
                except ResponseError as exc:
                    conn.disconnect()  # a pipelined reply may be left unread
                    raise StoreError(f"{self._url}: {op}: {exc}") from exc
                except BaseException:
                    conn.disconnect()
                    raise
                finally:
                    self._pool.release(raw)
            if sent and not idempotent:
                logger.warning(
                    "%s: %s failed after the request was sent (%s); not retried",
                    self._url,
                    op,
                    failure,
                )
                raise StoreUnavailable(
                    f"{self._url}: {op} failed after sending, outcome unknown: {failure}",
                    outcome_unknown=True,
                ) from failure
            if attempt < self._attempts:
                delay = self._backoff * 2 ** (attempt - 1)
                logger.warning(
                    "%s: %s failed (attempt %d of %d): %s; retrying in %.2f s",
                    self._url,
                    op,
                    attempt,
                    self._attempts,
                    failure,
                    delay,
                )
                time.sleep(delay)
        logger.error("%s: %s failed after %d attempts: %s", self._url, op, self._attempts, failure)
        raise StoreUnavailable(
            f"{self._url}: {op} failed after {self._attempts} attempts: {failure}"
        ) from failure

    def _command(self, op: str, *args: Any, idempotent: bool) -> Any:
        def call(conn: _Conn) -> Any:
            conn.send_command(*args)
            return conn.read_response()

        return self._run(op, call, idempotent=idempotent)

    def _script(self, op: str, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        def call(conn: _Conn) -> Any:
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return conn.read_response()
            except NoScriptError:
                # First use on this server (or after a restart): send the body,
                # which also caches it for the EVALSHA calls that follow.
                conn.send_command("EVAL", script.source, len(keys), *keys, *args)
                return conn.read_response()

        # Every script here is a read-check-write; repeating one whose reply was
        # lost could apply it twice, so they are never retried once sent.
        return self._run(op, call, idempotent=False)

    def _pipeline(self, op: str, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send read-only ``commands`` in one round trip and return their replies."""
        if not commands:
            return []

        def call(conn: _Conn) -> list[Any]:
            conn.send_packed_command(conn.pack_commands(commands))
            return [conn.read_response() for _ in commands]

        return self._run(op, call, idempotent=True)

    def _k(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._command("ping", "PING", idempotent=True)

    def _probe(self, timeout_s: float) -> None:
        """One PING on a dedicated connection whose every wait is bounded by ``timeout_s``.

        Not :meth:`ping`: that one shares the pool and retries (3 × 5 s by default), so
        a server that accepts connections but never answers (hung, SIGSTOPped,
        partitioned behind a live proxy) would keep a health check waiting for seconds.
        """
        with self._probe_lock:
            conn = self._probe_conn
            if conn is None or self._probe_timeout != timeout_s:
                if conn is not None:
                    conn.disconnect()
                options = {
                    **self._pool.connection_kwargs,
                    "socket_timeout": timeout_s,
                    "socket_connect_timeout": min(timeout_s, self._connect_timeout),
                }
                conn = cast(_Conn, self._pool.connection_class(**options))
                self._probe_conn, self._probe_timeout = conn, timeout_s
            try:
                conn.send_command("PING")
                reply = conn.read_response()
            except (AuthenticationError, AuthorizationError) as exc:
                conn.disconnect()
                raise StoreError(f"{self._url}: probe: authentication refused: {exc}") from exc
            except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError) as exc:
                # Includes BusyLoadingError (a ConnectionError): a server still loading its
                # data set cannot serve requests either.
                conn.disconnect()
                raise StoreUnavailable(
                    f"{self._url}: probe: no answer within {timeout_s:g} s: {exc}"
                ) from exc
            except BaseException:
                conn.disconnect()
                raise
        if _text(reply) != "PONG":
            raise StoreUnavailable(f"{self._url}: probe: PING answered {reply!r}")

    def close(self) -> None:
        """See :meth:`Store.close`."""
        self._pool.disconnect()
        with self._probe_lock:
            if self._probe_conn is not None:
                self._probe_conn.disconnect()
                self._probe_conn = None

    # ------------------------------------------------------------------ records

    def _get(self, key: str) -> Record | None:
        return _record(self._command("get", "HMGET", self._k("r", key), "v", "n", idempotent=True))

    def _get_many(self, keys: list[str]) -> list[Record | None]:
        # One pipelined round trip of HMGETs: each reply is one record's (value, version).
        replies = self._pipeline(
            "get_many", [("HMGET", self._k("r", key), "v", "n") for key in keys]
        )
        return [_record(reply) for reply in replies]

    def _put(self, key: str, value: bytes) -> int:
        return int(self._script("put", _PUT, [self._k("r", key)], [value]))

    def _compare_and_set(self, key: str, value: bytes, *, expected_version: int) -> int:
        ok, version = self._script(
            "compare_and_set", _CAS, [self._k("r", key)], [value, expected_version]
        )
        if not ok:
            raise VersionConflict(key, expected=expected_version, actual=int(version))
        return int(version)

    def _insert_if_absent(self, key: str, value: bytes) -> bool:
        return bool(self._script("insert_if_absent", _INSERT, [self._k("r", key)], [value]))

    def _delete(self, key: str, *, expected_version: int | None) -> bool:
        if expected_version is None:
            # Deleting twice has the same effect as once, so this may be retried.
            return bool(self._command("delete", "DEL", self._k("r", key), idempotent=True))
        ok, actual = self._script("delete", _DELETE_IF, [self._k("r", key)], [expected_version])
        if not ok:
            raise VersionConflict(key, expected=expected_version, actual=int(actual))
        return True

    def _scan(self, prefix: str) -> dict[str, Record]:
        base = self._k("r", "")
        pattern = _escape_glob(base + prefix) + "*"
        names: set[bytes] = set()
        cursor: Any = 0
        while True:
            cursor, batch = self._command(
                "scan", "SCAN", cursor, "MATCH", pattern, "COUNT", _PAGE, idempotent=True
            )
            names.update(batch)  # SCAN may return a key twice; the set dedups
            if int(cursor) == 0:
                break
        ordered = sorted(names)
        out: dict[str, Record] = {}
        for start in range(0, len(ordered), _PAGE):
            page = ordered[start : start + _PAGE]
            replies = self._pipeline("scan", [("HMGET", name, "v", "n") for name in page])
            for name, (value, version) in zip(page, replies, strict=True):
                if version is not None:  # deleted between SCAN and HMGET
                    out[_text(name)[len(base) :]] = Record(value=bytes(value), version=int(version))
        return out

    # ------------------------------------------------------------------ leases

    def _acquire_lease(self, name: str, *, holder: str, ttl_s: float) -> Lease | None:
        ttl_ms = _ttl_ms(ttl_s)
        reply = self._script(
            "acquire_lease",
            _ACQUIRE,
            [self._k("lease", name), self._k("lease-token", name)],
            [holder, ttl_ms],
        )
        if reply is None:
            return None
        token, expires_ms = reply
        return Lease(name=name, holder=holder, token=int(token), expires_at=int(expires_ms) / 1000)

    def _renew_lease(self, lease: Lease, *, ttl_s: float) -> Lease:
        ttl_ms = _ttl_ms(ttl_s)
        reply = self._script(
            "renew_lease", _RENEW, [self._k("lease", lease.name)], [lease.token, ttl_ms]
        )
        if reply is None:
            raise LeaseLost(lease.name, token=lease.token)
        return Lease(
            name=lease.name, holder=lease.holder, token=lease.token, expires_at=int(reply) / 1000
        )

    def _release_lease(self, lease: Lease) -> None:
        self._script("release_lease", _RELEASE, [self._k("lease", lease.name)], [lease.token])

    def _fenced_put(self, key: str, value: bytes, *, lease: Lease) -> int:
        return self._fenced("fenced_put", key, value, lease=lease, expected=-1)

    def _fenced_compare_and_set(
        self, key: str, value: bytes, *, lease: Lease, expected_version: int
    ) -> int:
        return self._fenced(
            "fenced_compare_and_set", key, value, lease=lease, expected=expected_version
        )

    def _fenced(self, op: str, key: str, value: bytes, *, lease: Lease, expected: int) -> int:
        status, detail = self._script(
            op,
            _FENCED_WRITE,
            [self._k("r", key), self._k("lease", lease.name), self._k("lease-token", lease.name)],
            [value, lease.token, expected],
        )
        if status == -1:
            raise FencingError(
                key, lease_name=lease.name, token=lease.token, reason=f"superseded by {detail}"
            )
        if status == -2:
            raise FencingError(
                key, lease_name=lease.name, token=lease.token, reason="expired or released"
            )
        if status == 0:
            raise VersionConflict(key, expected=expected, actual=int(detail))
        return int(detail)

    # ------------------------------------------------------------------ sorted sets

    def _zadd(self, name: str, members: dict[str, float]) -> int:
        args: list[Any] = []
        for member, score in members.items():
            args += [repr(score), member]
        # Setting scores is idempotent: a repeat after a lost reply changes nothing.
        return int(self._command("zadd", "ZADD", self._k("z", name), *args, idempotent=True))

    def _zrange_by_score(
        self, name: str, *, min_score: float, max_score: float, limit: int | None
    ) -> list[tuple[str, float]]:
        low, high = repr(min_score), repr(max_score)
        args: list[Any] = ["ZRANGEBYSCORE", self._k("z", name), low, high, "WITHSCORES"]
        if limit is not None:
            if limit == 0:
                return []
            args += ["LIMIT", 0, limit]
        return _pairs(self._command("zrange_by_score", *args, idempotent=True))

    def _zrem(self, name: str, *members: str) -> int:
        return int(self._command("zrem", "ZREM", self._k("z", name), *members, idempotent=False))

    def _zcard(self, name: str) -> int:
        return int(self._command("zcard", "ZCARD", self._k("z", name), idempotent=True))

    def _zcount(self, name: str, *, min_score: float, max_score: float) -> int:
        low, high = repr(min_score), repr(max_score)
        reply = self._command("zcount", "ZCOUNT", self._k("z", name), low, high, idempotent=True)
        return int(reply)

    def _zmax_many(self, names: list[str]) -> list[float | None]:
        # One pipelined round trip: each set's top member with its score, or nothing.
        replies = self._pipeline(
            "zmax_many",
            [("ZRANGE", self._k("z", name), -1, -1, "WITHSCORES") for name in names],
        )
        return [_pairs(reply)[0][1] if reply else None for reply in replies]

    def _zadd_pruned(
        self, name: str, members: dict[str, float], *, prune_max_score: float, read: list[str]
    ) -> tuple[int, list[Record | None]]:
        zset = self._k("z", name)
        add: list[Any] = ["ZADD", zset]
        for member, score in members.items():
            add += [repr(score), member]
        commands: list[Sequence[Any]] = [
            ("ZREMRANGEBYSCORE", zset, "-inf", repr(prune_max_score)),
            add,
            *(("HMGET", self._k("r", key), "v", "n") for key in read),
        ]

        def call(conn: _Conn) -> list[Any]:
            # Pipelined, not MULTI: each command is atomic on its own, and Redis runs the
            # commands of one connection in order, which is all the contract asks.
            conn.send_packed_command(conn.pack_commands(commands))
            return [conn.read_response() for _ in commands]

        # Not idempotent: a repeat after a lost reply would find its own members (count 0).
        replies = self._run("zadd_pruned", call, idempotent=False)
        return int(replies[1]), [_record(reply) for reply in replies[2:]]

    # ------------------------------------------------------------------ job streams

    def _stream_add(self, stream: str, fields: dict[str, bytes]) -> str:
        args: list[Any] = []
        for field_name, value in fields.items():
            args += [field_name, value]
        reply = self._command(
            "stream_add", "XADD", self._k("s", stream), "*", *args, idempotent=False
        )
        return _text(reply)

    def _ensure_group(self, stream: str, group: str) -> None:
        def call(conn: _Conn) -> None:
            conn.send_command("XGROUP", "CREATE", self._k("s", stream), group, "0", "MKSTREAM")
            try:
                conn.read_response()
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

        self._run("ensure_group", call, idempotent=True)

    def _read_group(
        self, stream: str, group: str, consumer: str, *, count: int, block_s: float
    ) -> list[Job]:
        # A wait is cut into slices of at most half the socket timeout, so that
        # a long ``block_s`` never looks like a hung server to the socket.
        deadline = time.monotonic() + block_s
        key = self._k("s", stream)
        while True:
            args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", count]
            remaining = deadline - time.monotonic()
            if remaining > 0:
                # BLOCK 0 would mean "forever", so never send less than 1 ms.
                slice_ms = max(1, int(min(remaining, self._socket_timeout / 2) * 1000))
                args += ["BLOCK", slice_ms]
            args += ["STREAMS", key, ">"]
            reply = self._command("read_group", *args, idempotent=False)
            if reply:
                _, entries = reply[0]
                return [
                    Job(stream=stream, id=_text(i), fields=_fields(f), deliveries=1)
                    for i, f in entries
                ]
            if time.monotonic() >= deadline:
                return []

    def _ack(self, stream: str, group: str, *ids: str) -> int:
        # Acknowledging twice counts the job once, so a retry is harmless.
        return int(self._command("ack", "XACK", self._k("s", stream), group, *ids, idempotent=True))

    def _reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_s: float,
        count: int,
        owners: frozenset[str] | None,
    ) -> list[Job]:
        # XAUTOCLAIM (or XCLAIM of the owners' idle ids) moves the jobs; XPENDING then
        # reads their delivery counts.
        min_idle_ms = int(min_idle_s * 1000)
        key = self._k("s", stream)
        claimed: list[tuple[str, dict[str, bytes]]] = []
        cursor = "0-0"
        if owners is not None:
            ids = [
                p.id
                for p in self._pending(stream, group)
                if p.consumer in owners and p.idle_s * 1000 >= min_idle_ms
            ][:count]
            if ids:
                # XCLAIM re-checks the idle time atomically per id, so a job another
                # reclaimer took in between (idle reset to 0) is not claimed twice.
                reply = self._command(
                    "reclaim",
                    "XCLAIM",
                    key,
                    group,
                    consumer,
                    min_idle_ms,
                    *ids,
                    idempotent=False,
                )
                claimed = [(_text(e[0]), _fields(e[1])) for e in reply if e is not None]
        while owners is None and len(claimed) < count:
            reply = self._command(
                "reclaim",
                "XAUTOCLAIM",
                key,
                group,
                consumer,
                min_idle_ms,
                cursor,
                "COUNT",
                count - len(claimed),
                idempotent=False,
            )
            cursor = _text(reply[0])
            # Redis 6.2 reports entries deleted from the stream as nil; 7.x
            # leaves them out (and lists them in a third element).
            claimed += [(_text(e[0]), _fields(e[1])) for e in reply[1] if e is not None]
            if cursor == "0-0":
                break
        replies = self._pipeline(
            "reclaim", [("XPENDING", key, group, i, i, 1, consumer) for i, _ in claimed]
        )
        jobs = []
        for (entry_id, fields), rows in zip(claimed, replies, strict=True):
            # Empty only if acknowledged or reclaimed again in between; the
            # entry was still delivered here, so it counts at least twice.
            deliveries = int(rows[0][3]) if rows else 2
            jobs.append(Job(stream=stream, id=entry_id, fields=fields, deliveries=deliveries))
        return jobs

    def _pending(self, stream: str, group: str) -> list[PendingJob]:
        key = self._k("s", stream)
        out: list[PendingJob] = []
        start = "-"
        while True:
            rows = self._command(
                "pending", "XPENDING", key, group, start, "+", _PAGE, idempotent=True
            )
            out += [
                PendingJob(
                    id=_text(r[0]),
                    consumer=_text(r[1]),
                    idle_s=int(r[2]) / 1000,
                    deliveries=int(r[3]),
                )
                for r in rows
            ]
            if len(rows) < _PAGE:
                return out
            start = "(" + out[-1].id  # exclusive start (Redis ≥ 6.2)

    def _stream_length(self, stream: str) -> int:
        return int(self._command("stream_length", "XLEN", self._k("s", stream), idempotent=True))

    # ------------------------------------------------------------------ retention

    def _trim_stream(self, stream: str, group: str) -> int:
        key = self._k("s", stream)

        def read(conn: _Conn) -> tuple[Any, Any]:
            # XINFO GROUPS before XPENDING, in one round trip: an entry delivered after
            # the first reply lies past the last-delivered id it reports, and one
            # pending then but acknowledged before the second reply is done for good.
            conn.send_command("XINFO", "GROUPS", key)
            conn.send_command("XPENDING", key, group)
            try:
                groups = conn.read_response()
            except ResponseError:  # no such stream
                groups = []
            try:
                summary = conn.read_response()
            except ResponseError:  # no such stream or group
                summary = None
            return groups, summary

        groups, summary = self._run("trim_stream", read, idempotent=True)
        last: str | None = None
        for row in groups or []:
            info = {_text(row[i]): row[i + 1] for i in range(0, len(row), 2)}
            if _text(info.get("name", b"")) == group:
                last = _text(info["last-delivered-id"])
        if last is None or summary is None:
            return 0
        if int(summary[0]) > 0:
            min_id = _text(summary[1])  # the oldest pending entry stays
        else:
            ms, seq = last.split("-")
            min_id = f"{ms}-{int(seq) + 1}"  # everything up to the last delivered goes
        return int(self._command("trim_stream", "XTRIM", key, "MINID", min_id, idempotent=True))

    def _footprint(self) -> Footprint:
        def call(conn: _Conn) -> tuple[int, int]:
            conn.send_command("DBSIZE")
            conn.send_command("INFO", "memory")
            keys = int(conn.read_response())
            info = _text(conn.read_response())
            used = 0
            for line in info.splitlines():
                if line.startswith("used_memory:"):
                    used = int(line.split(":", 1)[1])
            return keys, used

        keys, used = self._run("footprint", call, idempotent=True)
        return Footprint(keys=keys, bytes=used)
