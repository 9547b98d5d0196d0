"""gRPC size limits and keepalive settings, in one place, each with its reason.

Both the coordinator's server and the edge's channel take their options from here so
the two sides can never disagree about what is too large or too idle.
"""

from __future__ import annotations

#: Largest single gRPC message accepted or sent, in bytes: 4 MiB. Bulk data (artifacts,
#: masked uploads) travels as streams of chunks well below this, so only a misbehaving
#: or malicious peer reaches it, and it then gets RESOURCE_EXHAUSTED instead of making
#: the server buffer an arbitrary amount of memory. gRPC's own default is also 4 MiB.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: Chunk size of artifact downloads and masked uploads when the client does not ask for
#: one: 1 MiB, large enough that per-message overhead is negligible, small enough that a
#: phone on a flaky link loses little work when a stream breaks and resumes.
DEFAULT_CHUNK_BYTES = 1024 * 1024

#: Largest chunk a client may ask for: half the message limit, leaving room for framing.
MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES // 2

#: Longest a long-poll RPC (AwaitSecAgg) is held open server-side, in ms: 20 s, below
#: the common 30-60 s idle timeouts of load balancers and NAT boxes between phones and
#: the cloud, so the poll returns "pending" before a middlebox silently drops it.
MAX_LONG_POLL_MS = 20_000

#: Client keepalive ping interval: 60 s. Mobile NATs drop idle mappings after about
#: 2-5 minutes; pinging every minute keeps a stream alive through them without waking
#: the radio often enough to matter for battery.
KEEPALIVE_TIME_MS = 60_000

#: How long to wait for a ping ack before the connection is declared dead: 20 s, so a
#: device that vanished is noticed well inside a cohort's deadline.
KEEPALIVE_TIMEOUT_MS = 20_000

#: The server tolerates client pings no more often than every 30 s (half the client's
#: interval, so jitter never trips it); faster pings are abuse and get GOAWAY.
SERVER_MIN_PING_INTERVAL_MS = 30_000

#: Close a connection idle for 10 minutes: frees server resources held by devices that
#: went away without closing; an active device reconnects transparently.
SERVER_MAX_CONNECTION_IDLE_MS = 10 * 60_000

GrpcOptions = list[tuple[str, int]]


def server_options() -> GrpcOptions:
    """Return the channel arguments for the coordinator's gRPC server."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", SERVER_MAX_CONNECTION_IDLE_MS),
    ]


def channel_options() -> GrpcOptions:
    """Return the channel arguments for an edge's (or test's) channel to the coordinator."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Long polls and training leave the channel idle between calls; keep pinging so
        # NAT mappings survive.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
