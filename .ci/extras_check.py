"""Check one extra inside a venv that has only that extra (run by .ci/extras).

Run from outside the source tree, so the installed wheel is what is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

PACKAGES = {
    "edge": "edge_client",
    "coordinator": "coordinator",
    "worker": "cloud_workers",
    "flower": "simulation.flower",
}
#: The role command each extra offers (the flower extra installs the edge role with it).
COMMANDS = {"edge": "edge", "coordinator": "coordinator", "worker": "worker", "flower": "edge"}


def estuary(*args: str) -> subprocess.CompletedProcess[str]:
    """Run this venv's ``estuary`` console script with ``args``."""
    exe = Path(sys.executable).with_name("estuary")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


def check_gencode(role: str) -> int:
    """Import the committed gencode on this venv's protobuf runtime; print which one."""
    from google.protobuf import __version__ as runtime

    from estuary.proto.v1 import common_pb2, edge_pb2, edge_pb2_grpc, jobs_pb2, jobs_pb2_grpc

    task = edge_pb2.Task(task_id="t", version=3)
    if edge_pb2.Task.FromString(task.SerializeToString()).version != 3:
        print("a Task does not survive a round trip on the wire")
        return 1
    del common_pb2, edge_pb2_grpc, jobs_pb2, jobs_pb2_grpc
    if role == "flower" and int(runtime.split(".")[0]) != 6:
        # flwr caps protobuf below 7: this venv is where the gencode meets runtime 6.
        print(f"protobuf {runtime} beside flwr: expected a 6.x runtime")
        return 1
    print(f"  generated code loads on protobuf {runtime}")
    return 0


def check_flower() -> int:
    """Flower and Estuary in one venv: flwr imports and its CLI answers."""
    from importlib import metadata

    import flwr.serverapp  # noqa: F401 - the import is the check

    exe = Path(sys.executable).with_name("flwr")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"flwr --help: exit {done.returncode}\n{done.stderr[-2000:]}")
        return 1
    print(f"  flwr {metadata.version('flwr')} imports beside estuary-fl; flwr --help: exit 0")
    return 0


def main(role: str) -> int:
    """Check ``role``'s extra; print what held and return the exit status."""
    name = PACKAGES[role]
    package = importlib.import_module(name)
    if "site-packages" not in (package.__file__ or ""):
        print(f"{name} was imported from {package.__file__}, not from the installed wheel")
        return 1
    modules = [name] + [m.name for m in pkgutil.walk_packages(package.__path__, name + ".")]
    for module in modules:
        importlib.import_module(module)
    print(f"  {name}: all {len(modules)} modules import")
    if check_gencode(role) != 0 or (role == "flower" and check_flower() != 0):
        return 1

    offered = COMMANDS[role]
    done = estuary(offered, "--help")
    if done.returncode != 0:
        print(f"estuary {offered} --help: exit {done.returncode}\n{done.stderr[-2000:]}")
        return 1
    print(f"  estuary {offered} --help: exit 0")

    from estuary.cli.plugins import discover

    for command in discover():
        if command.name == offered:
            continue
        done = estuary(command.name, "--help")
        if command.available:
            ok = done.returncode == 0
            what = "available (its extra is covered by this one)"
        else:
            ok = done.returncode == 3 and "estuary-fl[" in done.stderr
            what = "not installed: refused with exit 3 naming the extra"
        if not ok:
            print(f"estuary {command.name} --help: exit {done.returncode}\n{done.stderr[-2000:]}")
            return 1
        print(f"  estuary {command.name}: {what}")
    if role == "coordinator":
        # workers = "local" needs the worker extra: refused up front, not half-loaded.
        from estuary.jobs import LocalWorkerUnavailable, find_local_worker

        try:
            find_local_worker()
        except LocalWorkerUnavailable as exc:
            print(f"  workers = 'local' without [worker]: refused ({str(exc)[:60]}...)")
        else:
            print("the local worker loaded although the worker extra is not installed")
            return 1
    listed = estuary("--help")
    if listed.returncode != 0 or offered not in listed.stdout:
        print(f"estuary --help does not list {offered}:\n{listed.stdout}{listed.stderr}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
