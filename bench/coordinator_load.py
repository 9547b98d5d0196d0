"""Coordinator load benchmark: one replica under N enrolled devices polling on the paced path.

Usage::

    python bench/coordinator_load.py --devices 1000 --json
    python bench/coordinator_load.py --devices 200 --rate 2 --duration 20 --json

Starts a private ``redis-server`` on a free loopback port in a temporary directory (with
``appendfsync always`` as deployed, so every request's nonce write waits for the disk) and one
coordinator replica (``estuary coordinator serve``, plaintext gRPC on 127.0.0.1) as a
subprocess, so its CPU and RSS are its own. ``workers = "groups"`` with no worker group
running: no edge artifact is ever built, so every GetTask takes the paced path (the
device is told to come back), which is what an idle fleet costs a replica.

``--devices`` fake devices each make a real Ed25519 identity, get a one-time token issued
in the store (as ``estuary coordinator token`` does) and enrol over gRPC. Then each polls
at ``--rate`` requests per second (random phase, fixed schedule: a late reply delays the
next request, so the offered rate is an upper bound), alternating signed GetTask and
Heartbeat (for a task it does not hold: answered ABANDON). The requests come from
``--clients`` processes, each with its own event loop and channels.

``--server null`` replaces the replica (and Redis) with a gRPC server in its own process that
answers every call at once with an empty reply: no signature check, no store, no logic. It is
the floor of this machine's gRPC stack under the same generator, so a replica's figures can be
read against what no Python gRPC server could beat here.

Latency is measured from sending a request to its reply. Prints one JSON object with
``--json``, else a short summary: ``devices``, ``offered_rps``, ``achieved_rps``,
``p50_s``, ``p99_s``, ``errors`` (count by status code), ``cpu_percent`` and
``rss_bytes`` of the coordinator process over the measured window (and Redis's and the
load generator's CPU, the host's load average and core count, for context).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/coordinator_load.py`
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import (  # noqa: E402
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from estuary.auth import raw_public_key, sign_message  # noqa: E402
from estuary.proto.v1 import edge_pb2, edge_pb2_grpc  # noqa: E402

DEVICE_CLASS = "phone"
#: Channels (HTTP/2 connections) per client process: a few, so one connection's framing
#: is not the bottleneck, as many devices behind one NAT would share few connections.
CHANNELS_PER_CLIENT = 4
#: Concurrent Enroll calls per client process while setting up.
ENROL_CONCURRENCY = 32
#: Seconds to wait for redis-server and the coordinator to come up.
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(directory: Path, appendfsync: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            appendfsync,
            "--daemonize",
            "no",
        ],
        stdout=(directory / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server did not answer on port {port}")


def write_config(
    path: Path, *, port: int, redis_port: int, blobs: Path, handler_threads: int
) -> None:
    path.write_text(
        f"""
node_id = "load-bench"
workers = "groups"
[server]
listen = "127.0.0.1:{port}"
metrics_port = 0
device_requests_per_s = 50.0
device_burst = 100
handler_threads = {handler_threads}
[tls]
allow_plaintext = true
[state]
url = "redis://127.0.0.1:{redis_port}/0"
blob_dir = "{blobs}"
[model]
preset = "tiny"
r_max = 4
[[device_classes]]
name = "{DEVICE_CLASS}"
rank = 4
expected_task_s = 5.0
[aggregation]
buffer_size = 4
[pacing]
target_staleness = 2.0
retry_after_min_s = 1.0
[cohort]
min_size = 3
max_size = 8
threshold_fraction = 0.6
deadline_s = 60.0
"""
    )


def start_coordinator(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ESTUARY_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "estuary.cli.app", "coordinator", "serve", "--config", str(config)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(
                    f"coordinator exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"coordinator not SERVING within {START_TIMEOUT_S:.0f}s")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 for no process."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- null server


class _NullEdge(edge_pb2_grpc.EdgeServiceServicer):
    """Answers Enroll, GetTask and Heartbeat at once with empty replies."""

    async def Enroll(self, request: Any, context: Any) -> Any:
        return edge_pb2.EnrollResponse()

    async def GetTask(self, request: Any, context: Any) -> Any:
        return edge_pb2.GetTaskResponse()

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        return edge_pb2.HeartbeatResponse()


async def _serve_null(port: int) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from estuary.transport import server_options

    server = grpc.aio.server(options=server_options())
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(_NullEdge(), server)  # type: ignore[no-untyped-call]
    checker = health.aio.HealthServicer()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def start_null_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-null", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


# --------------------------------------------------------------------------- client process


async def _client(
    address: str,
    keys: list[bytes],
    tokens: list[str],
    *,
    rate: float,
    warmup_s: float,
    duration_s: float,
    ready: Any,
    go: Any,
    start: Any,
) -> dict[str, Any]:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS_PER_CLIENT)
    ]
    stubs = [
        edge_pb2_grpc.EdgeServiceStub(ch)  # type: ignore[no-untyped-call]
        for ch in channels
    ]
    privates = [Ed25519PrivateKey.from_private_bytes(k) for k in keys]
    gate = asyncio.Semaphore(ENROL_CONCURRENCY)

    async def enrol(i: int) -> None:
        async with gate:
            await stubs[i % len(stubs)].Enroll(
                edge_pb2.EnrollRequest(
                    token=tokens[i],
                    identity_public_key=raw_public_key(privates[i]),
                    device_class=DEVICE_CLASS,
                ),
                timeout=60.0,
            )

    await asyncio.gather(*(enrol(i) for i in range(len(privates))))
    ready.set()
    go.wait()  # nothing else runs on this loop yet: blocking is fine
    start_at = float(start.value)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    late = 0
    measure_from = start_at + warmup_s
    measure_to = measure_from + duration_s
    loop = asyncio.get_running_loop()
    offset = time.time() - loop.time()  # wall = loop + offset

    async def device(i: int) -> None:
        nonlocal late
        stub = stubs[i % len(stubs)]
        key = privates[i]
        period = 1.0 / rate
        due = start_at + random.random() * period
        n = i % 2
        while True:
            now = time.time()
            if due >= measure_to:
                return
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > period:
                late += 1  # more than a period behind: skip ahead rather than burst
                due = now
            method = "GetTask" if n % 2 == 0 else "Heartbeat"
            n += 1
            stamp = int(time.time() * 1000)
            if method == "GetTask":
                request: Any = sign_message(
                    edge_pb2.GetTaskRequest(), private_key=key, method=method, timestamp_ms=stamp
                )
                call = stub.GetTask
            else:
                request = sign_message(
                    edge_pb2.HeartbeatRequest(task_id="no-such-task"),
                    private_key=key,
                    method=method,
                    timestamp_ms=stamp,
                )
                call = stub.Heartbeat
            sent = loop.time() + offset
            try:
                await call(request, timeout=30.0)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            done = loop.time() + offset
            if measure_from <= sent < measure_to:
                latencies.append(done - sent)
                if code != "OK":
                    errors[code] += 1
            due += period

    await asyncio.gather(*(device(i) for i in range(len(privates))))
    for ch in channels:
        await ch.close()
    return {"latencies": latencies, "errors": dict(errors), "late": late}


def client_main(
    address: str,
    keys: list[bytes],
    tokens: list[str],
    params: dict[str, Any],
    ready: Any,
    go: Any,
    start: Any,
    results: Any,
) -> None:
    cpu = time.process_time()
    out = asyncio.run(_client(address, keys, tokens, ready=ready, go=go, start=start, **params))
    out["cpu_s"] = time.process_time() - cpu
    results.put(out)


# --------------------------------------------------------------------------- driver


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from coordinator.enrolment import DeviceRegistry
    from estuary.state import open_store

    tmp = Path(tempfile.mkdtemp(prefix="coordinator-load-", dir=args.tmp_dir))
    null = args.server == "null"
    redis_proc: subprocess.Popen[bytes] | None = None
    coordinator: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        if null:
            log = tmp / "null-server.log"
            coordinator = start_null_server(port, log)
            address = f"127.0.0.1:{port}"
            wait_serving(address, coordinator, log)
            tokens = ["token"] * args.devices
            return _measure(args, address, coordinator, None, tokens)
        redis_proc, redis_port = start_redis(tmp / "redis", args.appendfsync)
        config = tmp / "coordinator.toml"
        write_config(
            config,
            port=port,
            redis_port=redis_port,
            blobs=tmp / "blobs",
            handler_threads=args.handler_threads,
        )
        log = tmp / "coordinator.log"
        coordinator = start_coordinator(config, log)
        address = f"127.0.0.1:{port}"
        wait_serving(address, coordinator, log)

        store = open_store(f"redis://127.0.0.1:{redis_port}/0")
        registry = DeviceRegistry(store, device_classes=[DEVICE_CLASS])
        tokens = [
            registry.issue_token(device_class=DEVICE_CLASS, ttl_s=3600) for _ in range(args.devices)
        ]
        store.close()
        return _measure(args, address, coordinator, redis_proc, tokens)
    finally:
        if coordinator is not None and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                coordinator.kill()
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)


def _measure(
    args: argparse.Namespace,
    address: str,
    coordinator: subprocess.Popen[bytes],
    redis_proc: subprocess.Popen[bytes] | None,
    tokens: list[str],
) -> dict[str, Any]:
    """Enrol the devices, poll for the warm-up and the measured window, and report."""
    keys = [
        Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        for _ in range(args.devices)
    ]

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    clients = max(1, min(args.clients, args.devices))
    readies = [ctx.Event() for _ in range(clients)]
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    params = {
        "rate": args.rate,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
    }
    procs = []
    for c in range(clients):
        proc = ctx.Process(
            target=client_main,
            args=(
                address,
                keys[c::clients],
                tokens[c::clients],
                params,
                readies[c],
                go,
                start,
                results,
            ),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    for ev in readies:
        if not ev.wait(timeout=args.setup_s):
            raise SystemExit(
                f"enrolment of {args.devices} devices took longer than --setup-s {args.setup_s}"
            )
    start_at = time.time() + 0.5
    start.value = start_at
    go.set()
    # Measure the coordinator (and Redis) over the measured window only.
    time.sleep(max(0.0, start_at + args.warmup - time.time()))
    load_before = os.getloadavg()
    redis_pid = None if redis_proc is None else redis_proc.pid
    c0, r0, t0 = cpu_seconds(coordinator.pid), cpu_seconds(redis_pid), time.monotonic()
    time.sleep(args.duration)
    c1, r1, t1 = cpu_seconds(coordinator.pid), cpu_seconds(redis_pid), time.monotonic()
    rss = rss_bytes(coordinator.pid)
    load_after = os.getloadavg()
    outs = [results.get(timeout=args.duration + 120) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    latencies = sorted(x for o in outs for x in o["latencies"])
    errors: Counter[str] = Counter()
    for o in outs:
        errors.update(o["errors"])
    answered = len(latencies)
    return {
        "server": args.server,
        "devices": args.devices,
        "rate_per_device": args.rate,
        "offered_rps": args.devices * args.rate,
        "achieved_rps": round(answered / args.duration, 1),
        "ok_rps": round((answered - sum(errors.values())) / args.duration, 1),
        "p50_s": round(percentile(latencies, 0.50), 4),
        "p90_s": round(percentile(latencies, 0.90), 4),
        "p99_s": round(percentile(latencies, 0.99), 4),
        "max_s": round(latencies[-1], 4) if latencies else None,
        "errors": dict(errors),
        "late_requests": sum(o["late"] for o in outs),
        "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 1),
        "cpu_ms_per_request": round(1000 * (c1 - c0) / answered, 3) if answered else None,
        "rss_bytes": rss,
        "redis_cpu_percent": round(100 * (r1 - r0) / (t1 - t0), 1),
        "client_cpu_s": round(sum(o["cpu_s"] for o in outs), 1),
        "clients": clients,
        "handler_threads": args.handler_threads,
        "appendfsync": args.appendfsync,
        "duration_s": args.duration,
        "cores": os.cpu_count(),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--devices", type=int, default=1000, help="enrolled devices polling")
    parser.add_argument(
        "--rate", type=float, default=1.5, help="requests per second per device (default 1.5)"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=2, help="load-generating processes")
    parser.add_argument(
        "--handler-threads", type=int, default=32, help="server.handler_threads of the replica"
    )
    parser.add_argument(
        "--setup-s", type=float, default=180.0, help="seconds allowed for enrolment"
    )
    parser.add_argument(
        "--appendfsync",
        choices=["always", "everysec"],
        default="always",
        help="Redis fsync policy (default always, as deployed: every nonce write is durable)",
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where the temporary directory goes (its disk is Redis's)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--server",
        choices=["replica", "null"],
        default="replica",
        help="replica: a coordinator with Redis (default); null: an empty gRPC server, the floor",
    )
    parser.add_argument("--serve-null", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_null is not None:
        asyncio.run(_serve_null(args.serve_null))
        return
    if args.devices < 1:
        parser.error("--devices: must be >= 1")
    if not args.rate > 0:
        parser.error("--rate: must be > 0")
    if not args.duration > 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['devices']} devices at {report['rate_per_device']:g}/s: "
            f"{report['achieved_rps']} req/s, p50 {report['p50_s'] * 1000:.1f} ms, "
            f"p99 {report['p99_s'] * 1000:.1f} ms, errors {report['errors']}, "
            f"coordinator {report['cpu_percent']}% CPU, {report['rss_bytes'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
