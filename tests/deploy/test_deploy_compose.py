"""deploy/docker: the compose file runs real estuary commands on configs that load.

No container engine is needed: the compose file, the Dockerfiles and the Prometheus and
Grafana files are read as data and checked against the CLI, the role settings and each
other (what one names, the other must provide).
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_checks import DEPLOY, REPO, ROLE_OF_COMMAND, load_role, parse_estuary

from estuary import __version__ as VERSION
from estuary.config import CoordinatorSettings, EdgeSettings, RoleSettings, WorkerSettings

DOCKER = DEPLOY / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
GPU = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
#: Where edge.Dockerfile links the interpreter's standard library (the demo's data).
STDLIB_LINK = PurePosixPath("/usr/share/estuary/stdlib")


def estuary_services() -> dict[str, dict[str, Any]]:
    """Services built from one of deploy/docker's Dockerfiles (entrypoint ``estuary``)."""
    return {name: s for name, s in SERVICES.items() if "build" in s}


def role_services() -> dict[str, dict[str, Any]]:
    """The estuary services that run a role on a config (all but the one-shot base)."""
    return {
        name: s
        for name, s in estuary_services().items()
        if parse_estuary(s["command"])[0] in ROLE_OF_COMMAND
    }


def dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO, "the build context is the repository root"
    return Path(context, str(build["dockerfile"]))


def bind_source(service: dict[str, Any], target: PurePosixPath) -> Path | None:
    """The repository path bind-mounted at ``target`` (or at a folder above it)."""
    for volume in service.get("volumes", []):
        source, mount, *_ = str(volume).split(":")
        if not source.startswith("."):
            continue
        mount_path = PurePosixPath(mount)
        if target == mount_path or mount_path in target.parents:
            return (DOCKER / source / target.relative_to(mount_path)).resolve()
    return None


def named_volume(service: dict[str, Any], target: PurePosixPath) -> str | None:
    for volume in service.get("volumes", []):
        source, mount, *_ = str(volume).split(":")
        if not source.startswith(".") and PurePosixPath(mount) == target:
            return source
    return None


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def settings_of(name: str, service: dict[str, Any] | None = None) -> tuple[str, RoleSettings]:
    """Parse the service's command and load its config file with its environment."""
    service = service if service is not None else SERVICES[name]
    path, params = parse_estuary(service["command"])
    role = ROLE_OF_COMMAND[path]
    source = bind_source(service, PurePosixPath(str(params["config"])))
    assert source is not None, f"{name}: nothing mounts {params['config']}"
    assert source.is_file(), f"{name}: {source} does not exist"
    return role, load_role(role, source, service_env(service))


def coordinator() -> CoordinatorSettings:
    settings = settings_of("coordinator")[1]
    assert isinstance(settings, CoordinatorSettings)
    return settings


def worker() -> WorkerSettings:
    settings = settings_of("worker")[1]
    assert isinstance(settings, WorkerSettings)
    return settings


def edges() -> dict[str, EdgeSettings]:
    found = {}
    for name, service in SERVICES.items():
        if service.get("command", [None])[0] == "edge":
            settings = settings_of(name)[1]
            assert isinstance(settings, EdgeSettings)
            found[name] = settings
    return found


def networks(name: str) -> set[str]:
    return set(SERVICES[name].get("networks", []))


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("name", sorted(estuary_services()))
def test_every_estuary_service_runs_a_real_command(name: str) -> None:
    service = SERVICES[name]
    text = dockerfile(service).read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["estuary"]' in text
    parse_estuary(service["command"])
    assert service["image"].endswith(f":{VERSION}"), "images are tagged with the release"


@pytest.mark.parametrize("name", sorted(role_services()))
def test_every_role_service_runs_on_a_config_that_loads(name: str) -> None:
    role, _ = settings_of(name)
    assert role in dockerfile(SERVICES[name]).name


def test_the_base_service_makes_the_model_the_roles_load() -> None:
    base = SERVICES["base"]
    path, params = parse_estuary(base["command"])
    assert path == ("model", "init")
    assert base["profiles"] == ["init"], "run once, by hand, before the first up"
    out = PurePosixPath(str(params["out"]))
    volume = named_volume(base, out)
    assert volume in COMPOSE["volumes"]
    for name, settings in (("coordinator", coordinator()), ("worker", worker())):
        assert settings.model.path is not None, f"{name} must load the pretrained base"
        model = PurePosixPath(str(settings.model.path))
        assert named_volume(SERVICES[name], model) == volume, name
        mount = next(v for v in SERVICES[name]["volumes"] if v.startswith(f"{volume}:"))
        assert mount.endswith(":ro"), f"{name} only reads the base"
    # the image has the folder, owned by its user, so the fresh volume is writable by it
    assert str(out) in dockerfile(base).read_text(encoding="utf-8")


def test_the_service_command_check_rejects_what_the_cli_would() -> None:
    # The check above can fail: a misspelt option, a command that does not exist, and an
    # environment override the role refuses.
    service = dict(SERVICES["coordinator"])
    with pytest.raises(Exception, match="--confg"):
        settings_of("coordinator", {**service, "command": ["coordinator", "serve", "--confg", "x"]})
    with pytest.raises(Exception, match="serv"):
        settings_of("coordinator", {**service, "command": ["coordinator", "serv"]})
    with pytest.raises(Exception, match="buffer_size"):
        settings_of(
            "coordinator",
            {**service, "environment": {"ESTUARY_AGGREGATION__BUFFER_SIZE": "0"}},
        )


@pytest.mark.parametrize("role", ["coordinator", "worker", "edge"])
def test_dockerfiles_are_multi_stage_non_root_with_a_real_default_command(role: str) -> None:
    text = (DOCKER / f"{role}.Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001:10001$", final, flags=re.MULTILINE), "non-root"
    assert "COPY --from=build /opt/estuary /opt/estuary" in final
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert cmd is not None
    path, _ = parse_estuary(yaml.safe_load(cmd.group(1)))
    assert ROLE_OF_COMMAND[path] == role
    assert f'"/src[{role}]"' in text, "installs the role's extra"


def test_torch_is_cpu_by_default_and_cuda_is_a_worker_build_arg() -> None:
    for role in ("coordinator", "edge"):
        text = (DOCKER / f"{role}.Dockerfile").read_text(encoding="utf-8")
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    worker_file = (DOCKER / "worker.Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG CUDA=$", worker_file, flags=re.MULTILINE)
    assert 'https://download.pytorch.org/whl/${CUDA:-cpu}"' in worker_file
    assert GPU["services"]["worker"]["build"]["args"]["CUDA"].startswith("cu")


def test_the_build_context_leaves_out_the_venv_and_git() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    ignore = [line for line in lines if line and not line.startswith("#")]
    assert ignore[0] == "*", "everything is excluded first, then the sources let in"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed >= {"pyproject.toml", "README.md", "LICENSE", "estuary", "secure_agg"}
    assert not allowed & {".venv", ".git", "runs", "tests"}
    # what the package build needs is let in: every package setuptools is told to find
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    include = re.search(
        r"^\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]$", pyproject, re.M
    )
    assert include is not None
    for pattern in re.findall(r'"([^"]+)"', include.group(1)):
        assert pattern.rstrip("*") in allowed, pattern


# --------------------------------------------------------------------------- topology


def test_redis_keeps_every_write_in_an_append_only_file_on_a_volume() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "always"
    volume = named_volume(redis, PurePosixPath(options["--dir"]))
    assert volume in COMPOSE["volumes"], "the AOF lives on a named volume"


def test_coordinators_and_worker_group_share_one_store_and_one_blob_volume() -> None:
    coord, work = coordinator(), worker()
    assert SERVICES["coordinator"]["deploy"]["replicas"] >= 2
    assert coord.workers == "groups", "jobs go to the worker group service"
    assert coord.state.url == work.state.url
    assert coord.model == work.model, "both derive the same base and adapters"
    host = urlsplit(coord.state.url).hostname
    assert host in SERVICES, f"state.url names {host}, which is not a service"
    for name in ("coordinator", "worker"):
        assert networks(name) & networks(str(host)), f"{name} cannot reach {host}"
    blob = PurePosixPath(str(coord.state.blob_dir))
    assert coord.state.blob_dir == work.state.blob_dir
    volume = named_volume(SERVICES["coordinator"], blob)
    assert volume is not None and volume == named_volume(SERVICES["worker"], blob)


def test_redis_is_only_on_the_internal_network() -> None:
    # The compose Redis has no password: only the coordinators and the worker reach it.
    (network,) = networks("redis")
    assert COMPOSE["networks"][network]["internal"] is True
    reaching = {name for name in SERVICES if network in networks(name)}
    assert reaching == {"redis", "coordinator", "worker"}


def test_edge_agents_reach_the_coordinators_each_with_its_own_state_and_data() -> None:
    agents = edges()
    assert len(agents) >= 4
    coord = coordinator()
    listen_port = int(coord.server.listen.rsplit(":", 1)[1])
    state_volumes, data = set(), set()
    for name, settings in agents.items():
        host, port = settings.coordinator.rsplit(":", 1)
        assert host == "coordinator" and int(port) == listen_port, name
        assert networks(name) & networks("coordinator"), name
        assert settings.device_class in {c.name for c in coord.device_classes}
        volume = named_volume(SERVICES[name], PurePosixPath(str(settings.state_dir)))
        assert volume is not None, f"{name}: state_dir is not on a volume"
        state_volumes.add(volume)
        # the TLS files the config names are mounted
        assert settings.tls.ca_file is not None
        assert bind_source(SERVICES[name], PurePosixPath(str(settings.tls.ca_file)))
        # data: a standard-library package, linked into the image by edge.Dockerfile
        assert settings.data_dir is not None
        relative = PurePosixPath(str(settings.data_dir)).relative_to(STDLIB_LINK)
        assert (Path(sysconfig.get_paths()["stdlib"]) / relative).is_dir(), relative
        data.add(relative)
    assert len(state_volumes) == len(agents), "agents never share a state directory"
    assert len(data) == len(agents), "each agent has its own data"
    assert str(STDLIB_LINK) in (DOCKER / "edge.Dockerfile").read_text(encoding="utf-8")
    # a one-time token enrols one device, so the agents start once enrolled (profile)
    assert all(SERVICES[name].get("profiles") == ["edge"] for name in agents)


def test_certificates_the_configs_name_are_mounted_from_the_git_ignored_pki_folder() -> None:
    coord = coordinator()
    tls = coord.tls
    named = {
        tls.cert_file: "server.pem",
        tls.key_file: "server.key",
        tls.client_ca_file: "device-ca.pem",
        tls.device_ca_cert_file: "device-ca.pem",
        tls.device_ca_key_file: "device-ca.key",
    }
    for path, written_by_pki in named.items():
        assert path is not None, written_by_pki
        source = bind_source(SERVICES["coordinator"], PurePosixPath(str(path)))
        assert source is not None and source.parent == DOCKER / "pki", path
        assert source.name == written_by_pki, "the names `estuary pki` writes"
    assert "pki/" in (DOCKER / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_agents_enrol_by_csr_on_the_published_enrolment_port() -> None:
    tls = coordinator().tls
    listen_port = int(coordinator().server.listen.rsplit(":", 1)[1])
    assert tls.enrol_listen is not None, "agents without a certificate need the enrolment port"
    enrol_port = int(tls.enrol_listen.rsplit(":", 1)[1])
    assert enrol_port != listen_port
    published = {str(p).rsplit(":", 1)[1] for p in SERVICES["coordinator"]["ports"]}
    assert {str(listen_port), str(enrol_port)} <= published, "both ports reach the host"
    for name, settings in edges().items():
        assert settings.enrol_coordinator == f"coordinator:{enrol_port}", name
        # no client certificate configured: the enrolment issues one (CSR, key on device)
        assert settings.tls.cert_file is None and settings.tls.key_file is None, name


def test_stop_grace_period_exceeds_the_shutdown_grace() -> None:
    for name in ("coordinator", "worker"):
        _, params = parse_estuary(SERVICES[name]["command"])
        grace = SERVICES[name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) >= params["shutdown_grace_s"] + 10


def test_gpu_override_gives_one_gpu_per_stage_and_switches_to_nccl() -> None:
    base = SERVICES["worker"]
    override = GPU["services"]["worker"]
    (device,) = override["deploy"]["resources"]["reservations"]["devices"]
    merged = {**base, "environment": {**service_env(base), **override["environment"]}}
    settings = settings_of("worker", merged)[1]
    assert isinstance(settings, WorkerSettings)
    assert settings.backend == "nccl"
    assert device["count"] == settings.stages
    assert device["capabilities"] == ["gpu"]


# --------------------------------------------------------------------------- monitoring


def test_prometheus_scrapes_every_coordinator_replica_on_its_metrics_port() -> None:
    source = bind_source(SERVICES["prometheus"], PurePosixPath("/etc/prometheus/prometheus.yml"))
    assert source is not None
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "estuary-coordinator"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["coordinator"] and sd["type"] == "A"
    assert sd["port"] == coordinator().server.metrics_port
    assert networks("prometheus") & networks("coordinator")


def test_grafana_is_provisioned_with_prometheus_and_the_estuary_dashboard() -> None:
    grafana = SERVICES["grafana"]
    provisioning = bind_source(grafana, PurePosixPath("/etc/grafana/provisioning"))
    assert provisioning is not None
    datasources = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    )
    (source,) = datasources["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus"
    assert "127.0.0.1:9090:9090" in SERVICES["prometheus"]["ports"] and url.port == 9090
    providers = yaml.safe_load(
        (provisioning / "dashboards" / "estuary.yaml").read_text(encoding="utf-8")
    )
    (provider,) = providers["providers"]
    folder = bind_source(grafana, PurePosixPath(provider["options"]["path"]))
    assert folder == DEPLOY / "grafana"
    assert (folder / "estuary.json").is_file()
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert bind_source(grafana, home) == DEPLOY / "grafana" / "estuary.json"
