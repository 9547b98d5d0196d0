"""deploy/k8s: every overlay renders, validates, and runs real commands on configs that load.

``kubectl kustomize`` renders each overlay (offline); ``kubernetes-validate`` checks every
built-in kind strictly against the Kubernetes 1.32 schemas; the Prometheus Operator's
ServiceMonitor, a custom resource with no schema there, is checked by hand. Then the
rendered objects are checked against each other and against the role settings: each
container's command parses with the real CLI, its config (from the generated ConfigMap)
loads with the container's environment, and every port, path, volume and Secret that one
side names exists on the other.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from deploy_checks import DEPLOY, REPO, ROLE_OF_COMMAND, load_role, parse_estuary

from estuary import __version__
from estuary.config import CoordinatorSettings, RoleSettings, WorkerSettings

K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
#: The Kubernetes release whose schemas the manifests must satisfy (the kubectl here).
KUBERNETES = "1.32.0"
#: Values standing in for what the operator puts in the Secrets, by key.
SECRET_SAMPLES = {"url": "rediss://redis.example.internal:6380/0", "password": "sample"}
#: The Secrets the manifests expect to exist; README.md's Deploying section creates them.
SECRETS = {"estuary-redis", "estuary-coordinator-tls"}

Objects = list[dict[str, Any]]


def render(overlay: str) -> Objects:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize overlays are not rendered here")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objects]:
    return request.param, render(request.param)


def find(objects: Objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def get(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    (found,) = find(objects, kind, name)
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def containers(
    objects: Objects, *, init: bool = False
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) of every Deployment, StatefulSet and Job (and init containers)."""
    for workload in objects:
        if workload["kind"] in ("Deployment", "StatefulSet", "Job"):
            pod = workload["spec"]["template"]["spec"]
            for container in pod["containers"] + (pod.get("initContainers", []) if init else []):
                yield workload, container


def estuary_containers(objects: Objects) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload, container in containers(objects):
        if container["image"].startswith("estuary-"):
            yield workload, container


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in container["ports"]}, port
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


def mounted(workload: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume that holds ``path`` in the container (the deepest mount above it)."""
    target = PurePosixPath(path)
    best: tuple[int, str] | None = None
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if target == mount_path or mount_path in target.parents:
            depth = len(mount_path.parts)
            if best is None or depth > best[0]:
                best = (depth, mount["name"])
    assert best is not None, f"{container['name']}: nothing is mounted at {path}"
    volumes: dict[str, dict[str, Any]] = {
        v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]
    }
    return volumes[best[1]]


def container_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
        else:
            ref = source["secretKeyRef"]
            assert ref["name"] in SECRETS, ref
            env[item["name"]] = SECRET_SAMPLES[ref["key"]]
    return env


def settings_of(
    objects: Objects, workload: dict[str, Any], container: dict[str, Any], tmp: Path
) -> tuple[str, RoleSettings, dict[str, Any]]:
    """Parse the container's command; load its config from the ConfigMap with its env."""
    path, params = parse_estuary(container["args"])
    role = ROLE_OF_COMMAND[path]
    config = PurePosixPath(str(params["config"]))
    volume = mounted(workload, container, str(config))
    configmap = get(objects, "ConfigMap", volume["configMap"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    key = str(config.relative_to(mount["mountPath"]))
    assert key in configmap["data"], f"{configmap['metadata']['name']} has no {key}"
    file = tmp / f"{workload['metadata']['name']}-{key}"
    file.write_text(configmap["data"][key], encoding="utf-8")
    pod = f"{workload['metadata']['name']}-0"
    return role, load_role(role, file, container_env(container, pod)), params


# --------------------------------------------------------------------------- validation


def test_every_built_in_object_validates_strictly(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_strict_validation_rejects_a_misspelt_field(overlay: tuple[str, Objects]) -> None:
    # The validation above can fail.
    _, objects = overlay
    broken = copy.deepcopy(get(objects, "Deployment", "estuary-coordinator"))
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_service_monitor_scrapes_the_coordinators_metrics_port(
    overlay: tuple[str, Objects],
) -> None:
    _, objects = overlay
    (monitor,) = find(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] and monitor["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector, "an empty selector would scrape every Service"
    services = [s for s in find(objects, "Service") if selects(selector, s["metadata"]["labels"])]
    (service,) = services
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    deployment = get(objects, "Deployment", "estuary-coordinator")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container_port(container, port["targetPort"]) == 9464
    assert endpoint["path"] == "/metrics"


# --------------------------------------------------------------------------- commands


def test_every_estuary_container_runs_a_real_command_on_a_config_that_loads(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    _, objects = overlay
    roles = set()
    for workload, container in estuary_containers(objects):
        path, _ = parse_estuary(container["args"])
        if path not in ROLE_OF_COMMAND:
            assert path == ("model", "init") and workload["kind"] == "Job"
            continue
        role, settings, _ = settings_of(objects, workload, container, tmp_path)
        roles.add(role)
        assert role in container["image"]
        # every secret the config names is in the container's environment
        for ref in (getattr(getattr(settings, "state", None), "password", None),):
            if ref is not None and ref.env is not None:
                assert ref.env in {e["name"] for e in container["env"]}, ref.env
    assert roles == {"coordinator", "worker"}


def test_the_container_command_check_rejects_what_the_cli_would(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    # The check above can fail: a misspelt option, and an override the role refuses.
    _, objects = overlay
    deployment = get(objects, "Deployment", "estuary-coordinator")
    container = copy.deepcopy(deployment["spec"]["template"]["spec"]["containers"][0])
    container["args"] = ["coordinator", "serve", "--conf", "/etc/estuary/config/x.toml"]
    with pytest.raises(Exception, match="--conf"):
        settings_of(objects, deployment, container, tmp_path)
    container = copy.deepcopy(deployment["spec"]["template"]["spec"]["containers"][0])
    container["env"].append({"name": "ESTUARY_SERVER__METRICS_PORT", "value": "-1"})
    with pytest.raises(Exception, match="metrics_port"):
        settings_of(objects, deployment, container, tmp_path)


def test_images_are_tagged_with_the_release(overlay: tuple[str, Objects]) -> None:
    for _, container in estuary_containers(overlay[1]):
        tag = container["image"].rsplit(":", 1)[1]
        assert tag == __version__ or tag.startswith(f"{__version__}-"), container["image"]


# --------------------------------------------------------------------------- coordinator


def coordinator_settings(objects: Objects, tmp: Path) -> tuple[CoordinatorSettings, Any, Any]:
    deployment = get(objects, "Deployment", "estuary-coordinator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    _, settings, params = settings_of(objects, deployment, container, tmp)
    assert isinstance(settings, CoordinatorSettings)
    return settings, deployment, (container, params)


def test_coordinators_are_replicated_and_a_drain_keeps_one_serving(
    overlay: tuple[str, Objects],
) -> None:
    _, objects = overlay
    deployment = get(objects, "Deployment", "estuary-coordinator")
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    (pdb,) = find(objects, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    # at least one must stay up, and a drain must still be able to evict one
    assert 1 <= pdb["spec"]["minAvailable"] < replicas


def test_probes_check_grpc_health_where_the_port_speaks_plaintext(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    name, objects = overlay
    settings, _, (container, _) = coordinator_settings(objects, tmp_path)
    listen_port = int(settings.server.listen.rsplit(":", 1)[1])
    assert container_port(container, "grpc") == listen_port
    plaintext = settings.tls.cert_file is None
    health = settings.server.health_listen
    health_port = int(health.rsplit(":", 1)[1]) if health is not None else None
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        handlers = {"grpc", "tcpSocket", "httpGet", "exec"} & probe.keys()
        assert handlers == {"grpc"}, f"{name}: {kind} must be a native gRPC probe, got {handlers}"
        # grpc.health.v1, dialled without TLS: the main port when it is plaintext, else the
        # plaintext health-only port (server.health_listen).
        port = container_port(container, probe["grpc"]["port"])
        if plaintext and port == listen_port:
            continue
        assert health_port is not None, f"{name}: a gRPC probe cannot complete a TLS handshake"
        assert port == health_port, f"{name}: {kind} probes {port}, health_listen is {health}"
    assert name != "dev" or plaintext, "dev serves plaintext"
    # liveness tolerates a store outage longer than readiness does (NOT_SERVING then)
    live, ready = container["livenessProbe"], container["readinessProbe"]
    assert (
        live["periodSeconds"] * live["failureThreshold"]
        > ready["periodSeconds"] * ready["failureThreshold"]
    )


def test_files_the_coordinator_reads_are_mounted(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    _, objects = overlay
    settings, deployment, (container, params) = coordinator_settings(objects, tmp_path)
    for path in (settings.tls.cert_file, settings.tls.key_file):
        if path is not None:
            volume = mounted(deployment, container, str(path))
            assert volume["secret"]["secretName"] == "estuary-coordinator-tls"
    blobs = mounted(deployment, container, str(settings.state.blob_dir))
    assert blobs["persistentVolumeClaim"]["claimName"] == "estuary-blobs"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= params["shutdown_grace_s"] + 10
    assert settings.workers == "groups"
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]


# --------------------------------------------------------------------------- workers, store


def worker_settings(objects: Objects, tmp: Path) -> tuple[WorkerSettings, Any, Any]:
    statefulset = get(objects, "StatefulSet", "estuary-worker")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    _, settings, _ = settings_of(objects, statefulset, container, tmp)
    assert isinstance(settings, WorkerSettings)
    return settings, statefulset, container


def test_worker_group_shares_the_store_blobs_and_model(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    name, objects = overlay
    coord, *_ = coordinator_settings(objects, tmp_path)
    work, statefulset, container = worker_settings(objects, tmp_path)
    assert work.group == "estuary-worker-0", "one group per pod, named after it"
    assert work.stages > 1, "a torchrun group of several stages"
    assert work.state.url == coord.state.url
    assert work.model == coord.model
    assert work.state.blob_dir == coord.state.blob_dir
    blobs = mounted(statefulset, container, str(work.state.blob_dir))
    assert blobs["persistentVolumeClaim"]["claimName"] == "estuary-blobs"
    shm = mounted(statefulset, container, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name == "prod":
        assert work.backend == "nccl" and gpus == work.stages, "one GPU per stage"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    else:
        assert gpus is None and work.backend == "gloo"


def test_blob_volume_reaches_every_node_in_prod(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    claim = get(objects, "PersistentVolumeClaim", "estuary-blobs")
    expected = ["ReadWriteMany"] if name == "prod" else ["ReadWriteOnce"]
    assert claim["spec"]["accessModes"] == expected


def test_store_is_redis_with_aof_in_dev_and_external_in_prod(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    name, objects = overlay
    coord, _, (container, _) = coordinator_settings(objects, tmp_path)
    env = {e["name"]: e for e in container["env"]}
    redis = find(objects, "StatefulSet", "estuary-redis")
    if name == "prod":
        assert not redis
        ref = env["ESTUARY_STATE__URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "estuary-redis", "key": "url"}
        assert coord.state.url == SECRET_SAMPLES["url"]
        return
    (statefulset,) = redis
    (server,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = server["args"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "always"
    assert options["--requirepass"] == "$(REDIS_PASSWORD)"
    assert "REDIS_PASSWORD" in {e["name"] for e in server["env"]}
    (data,) = [m for m in server["volumeMounts"] if m["mountPath"] == options["--dir"]]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == data["name"]
    url = urlsplit(coord.state.url)
    service = get(objects, "Service", str(url.hostname))
    assert selects(
        service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"]
    )
    (port,) = service["spec"]["ports"]
    assert port["port"] == url.port
    assert container_port(server, port["targetPort"]) == 6379


def test_secrets_referenced_are_the_ones_the_readme_creates(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    text = yaml.safe_dump(objects)
    names = set(re.findall(r"secretName: (\S+)", text))
    names |= {
        item["valueFrom"]["secretKeyRef"]["name"]
        for _, container in containers(objects)
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert names <= SECRETS
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    deploying = readme.split("## Deploying", 1)[1].split("\n## ", 1)[0]
    for secret in names:
        assert secret in deploying, f"README's Deploying section never creates {secret}"
    assert not find(objects, "Secret"), "no secret values in the repository"


def test_containers_run_unprivileged_with_resources(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    for workload, container in containers(objects, init=True):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_the_base_job_makes_the_model_the_roles_wait_for_and_load(
    overlay: tuple[str, Objects], tmp_path: Path
) -> None:
    _, objects = overlay
    job = get(objects, "Job", "estuary-base")
    (init,) = job["spec"]["template"]["spec"]["containers"]
    path, params = parse_estuary(init["args"])
    assert path == ("model", "init")
    out = mounted(job, init, str(params["out"]))
    claim = out["persistentVolumeClaim"]["claimName"]
    coord, deployment, (coord_container, _) = coordinator_settings(objects, tmp_path)
    work, statefulset, work_container = worker_settings(objects, tmp_path)
    for settings, workload, container in (
        (coord, deployment, coord_container),
        (work, statefulset, work_container),
    ):
        assert settings.model.path is not None, "the roles load the pretrained base"
        model = str(settings.model.path)
        assert model == str(params["out"])
        volume = mounted(workload, container, model)
        assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        # the pod starts once the Job has written the model
        (wait,) = workload["spec"]["template"]["spec"]["initContainers"]
        assert f"[ -f {model}/config.json ]" in wait["command"][-1]
        assert mounted(workload, wait, model)["persistentVolumeClaim"]["claimName"] == claim
    assert get(objects, "PersistentVolumeClaim", claim)
